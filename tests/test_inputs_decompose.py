"""Inputs to decompose, decompose_layers and head_sparsity (issue 11, items 3, 5, 7, 9, 13)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import svtools
from svtools import SVToolsError
from svtools.sad import COLUMNS, head_sparsity

from conftest import VOCAB


def _ids(n: int = 3, pos: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (n, pos), generator=g)


# ----------------------------------------------------------------------------- item 3: attention_mask values

@pytest.mark.parametrize("value", [2, -1, 0.5])
def test_attention_mask_must_be_zero_or_one(random_models, value):
    model = random_models["gpt2"]
    ids = _ids()
    am = torch.ones(ids.shape, dtype=torch.float32 if isinstance(value, float) else torch.long)
    am[0, 3] = value
    with pytest.raises(SVToolsError, match="only 0 .* and 1"):
        svtools.decompose(model, ids, 0, attention_mask=am)
    with pytest.raises(SVToolsError, match="only 0 .* and 1"):
        head_sparsity(model, ids, attention_mask=am, progress=False)


def test_attention_mask_bool_and_float_ones_accepted(random_models):
    model = random_models["bert"]
    ids = _ids()
    am = torch.ones_like(ids)
    am[1, 8:] = 0
    ref = svtools.decompose(model, ids, 0, attention_mask=am)
    for alt in (am.bool(), am.float(), am.numpy(), am.tolist()):
        d = svtools.decompose(model, ids, 0, attention_mask=alt)
        assert torch.equal(d.terms, ref.terms)


# ----------------------------------------------------------------------------- item 5: numpy integers

def test_numpy_integers_round_trip_from_a_frame(minilm):
    texts = ["When Mary and John went to the store, John gave a drink to",
             "The river rose quickly after three days of heavy rain in the hills."]
    df = head_sparsity(minilm, texts, layers=np.int64(2), heads=np.int64(3), threshold=0.2, progress=False)
    assert len(df) and set(df["layer"]) == {2} and set(df["head"]) == {3}
    row = df.iloc[0]
    assert isinstance(row.layer, np.integer)
    d = svtools.decompose(minilm, texts, row.layer, row["head"])
    p, q, k = int(row.prompt), int(row.query), int(row.key)
    assert float(d.scores[p, 0, q, k]) == pytest.approx(row.score, rel=1e-5, abs=1e-5)
    df2 = head_sparsity(minilm, texts, layers=np.arange(2), heads=[np.int64(0)], progress=False, threshold=0.2)
    assert set(df2["layer"]) <= {0, 1}
    assert [d.layer for d in svtools.decompose_layers(minilm, texts, np.arange(2))] == [0, 1]
    prompts = svtools.data.ioi_prompts(np.int64(3))
    assert len(prompts) == 3
    assert len(svtools.data.plain_sentences(np.int64(4))) == 4


@pytest.mark.parametrize("bad", [1.0, 2.5, True, "1", torch.tensor(1.0)])
def test_float_bool_string_layers_rejected(random_models, bad):
    with pytest.raises(SVToolsError, match="layer"):
        svtools.decompose(random_models["gpt2"], _ids(), bad)


@pytest.mark.parametrize("bad", [1.0, [0, 1.5], True, np.array([0.0, 1.0])])
def test_float_bool_heads_rejected(random_models, bad):
    with pytest.raises(SVToolsError, match="head"):
        svtools.decompose(random_models["gpt2"], _ids(), 0, bad)


# ----------------------------------------------------------------------------- item 7: too long

@pytest.mark.parametrize("family,n_pos", [("gpt2", 64), ("bert", 64)])
def test_sequence_longer_than_positions(random_models, family, n_pos):
    model = random_models[family]
    ids = _ids(2, n_pos + 1)
    with pytest.raises(SVToolsError, match=f"only {n_pos} positions"):
        svtools.decompose(model, ids, 0)
    with pytest.raises(SVToolsError, match=f"only {n_pos} positions"):
        head_sparsity(model, ids, progress=False)
    svtools.decompose(model, ids[:, :n_pos], 0)  # exactly the maximum is fine


def test_text_longer_than_minilm_positions(minilm):
    with pytest.raises(SVToolsError, match="512 positions"):
        svtools.decompose(minilm, [" ".join(["word"] * 600)], 0)


# ----------------------------------------------------------------------------- item 9: head/layer ambiguity

def test_bare_pair_tuple_is_ambiguous(random_models):
    model = random_models["gpt2"]
    with pytest.raises(SVToolsError, match=r"ambiguous.*heads=\[\(0, 1\)\].*heads=\[0, 1\]"):
        head_sparsity(model, _ids(), heads=(0, 1), progress=False)
    # the two unambiguous spellings
    pairs = head_sparsity(model, _ids(), heads=[(0, 1)], progress=False, threshold=0.3)
    assert set(zip(pairs.layer, pairs["head"])) <= {(0, 1)}
    flat = head_sparsity(model, _ids(), heads=[0, 1], progress=False, threshold=0.3)
    assert set(flat["head"]) <= {0, 1} and set(flat.layer) <= {0, 1}
    # with layers= a tuple of heads is not ambiguous
    one = head_sparsity(model, _ids(), layers=1, heads=(0, 1), progress=False, threshold=0.3)
    assert set(one.layer) <= {1}


def test_layer_named_twice_merges_heads(random_models):
    model = random_models["gpt2"]  # 2 layers: -2 is layer 0
    (d,) = list(svtools.decompose_layers(model, _ids(), {0: [1], -2: [2]}))
    assert d.layer == 0 and d.heads == [1, 2]
    assert [d.layer for d in svtools.decompose_layers(model, _ids(), 0)] == [0]
    assert [d.layer for d in svtools.decompose_layers(model, _ids(), {1})] == [1]
    with pytest.raises(SVToolsError, match="empty"):
        list(svtools.decompose_layers(model, _ids(), []))


# ----------------------------------------------------------------------------- item 13: tokens

def test_token_input_forms(minilm):
    texts = ["hello world", "a longer sentence than that"]
    ref = svtools.decompose(minilm, texts, 0)
    # a generator of strings
    assert torch.equal(svtools.decompose(minilm, (t for t in texts), 0).terms, ref.terms)
    # a tokenizer's BatchEncoding (right padding, as tokenize() does)
    enc = minilm.tokenizer(texts, padding=True, return_tensors="pt")
    d = svtools.decompose(minilm, enc, 0)
    assert torch.equal(d.tokens, ref.tokens) and torch.equal(d.terms, ref.terms)
    with pytest.raises(SVToolsError, match="mixes strings"):
        svtools.decompose(minilm, [5, "hello"], 0)
    with pytest.raises(SVToolsError, match="input_ids"):
        svtools.decompose(minilm, {"ids": [1, 2]}, 0)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (0,)])
def test_empty_tokens(random_models, shape):
    with pytest.raises(SVToolsError, match="batch, pos"):
        svtools.decompose(random_models["gpt2"], torch.zeros(shape, dtype=torch.long), 0)


def test_ragged_token_lists(random_models):
    with pytest.raises(SVToolsError, match="rectangular"):
        svtools.decompose(random_models["gpt2"], [[1, 2, 3], [4]], 0)


def test_bridge_in_train_mode(random_models):
    model = random_models["bert"]
    model.train()
    try:
        with pytest.raises(SVToolsError, match=r"training mode.*model\.eval\(\)"):
            svtools.decompose(model, _ids(), 0)
    finally:
        model.eval()
    svtools.decompose(model, _ids(), 0)


# ----------------------------------------------------------------------------- item 13: head_sparsity arguments

@pytest.mark.parametrize("kw,match", [({"threshold": None}, "threshold"), ({"frac": None}, "frac"),
                                      ({"threshold": float("nan")}, "threshold"), ({"frac": 0}, "frac"),
                                      ({"batch_size": 2.0}, "batch_size"), ({"seed": 1.5}, "seed"),
                                      ({"dtype": torch.int64}, "dtype"), ({"layers": []}, "empty")])
def test_head_sparsity_argument_errors(random_models, kw, match):
    with pytest.raises(SVToolsError, match=match):
        head_sparsity(random_models["gpt2"], _ids(), progress=False, **kw)


@pytest.mark.parametrize("control", ["rotated", None])
def test_empty_frame_has_the_dtypes_of_a_full_one(random_models, control):
    model = random_models["gpt2"]
    full = head_sparsity(model, _ids(), threshold=0.3, control=control, progress=False)
    # one token per prompt: its only key is position 0, which exclude_first drops
    empty = head_sparsity(model, _ids(2, 1), exclude_first=True, control=control, progress=False)
    assert len(full) > 0 and len(empty) == 0
    assert list(empty.columns) == list(COLUMNS)
    for c in COLUMNS:
        assert empty[c].dtype == full[c].dtype, c
    assert empty["layer"].dtype == np.int64
    assert isinstance(empty, pd.DataFrame)


@pytest.mark.parametrize("bad", [None, "0.5", float("nan"), 0.0, 1.5])
def test_select_pairs_threshold_is_checked(bad):
    from svtools.sad import select_pairs

    pattern = torch.full((1, 1, 3, 3), 1 / 3)
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    with pytest.raises(SVToolsError, match="threshold"):
        select_pairs(pattern, mask, threshold=bad)
