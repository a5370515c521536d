"""Exactness of svtools.decompose against the models' own attention, for every head."""

from __future__ import annotations

import sys

import pytest
import torch

import svtools
from svtools import SVToolsError
from svtools.models import UnsupportedModelError

from conftest import FAMILIES


def _own_qk_scores(model, ids, am, layer):
    """q . k from the model's own projections (after rotary where it has one), per head."""
    pre = f"blocks.{layer}.attn."
    want = {pre + n for n in ("hook_q", "hook_k", "hook_rot_q", "hook_rot_k", "hook_cos", "hook_sin",
                              "hook_attn_scores", "hook_pattern")}
    _, cache = model.run_with_cache(ids, attention_mask=am, stop_at_layer=layer + 1,
                                    names_filter=lambda n: n in want)
    has = set(cache.keys())
    q = cache[pre + "hook_rot_q"] if pre + "hook_rot_q" in has else cache[pre + "hook_q"]
    k = cache[pre + "hook_rot_k"] if pre + "hook_rot_k" in has else cache[pre + "hook_k"]
    if pre + "hook_cos" in has and pre + "hook_rot_q" not in has:
        # rotate with the model's own transformers code and its own cos/sin
        hf_attn = model.blocks[layer].attn.original_component
        apply = sys.modules[type(hf_attn).__module__].apply_rotary_pos_emb
        q, k = apply(q, k, cache[pre + "hook_cos"], cache[pre + "hook_sin"], unsqueeze_dim=2)
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)  # grouped-query attention
    own = torch.einsum("bqhd,bkhd->bhqk", q, k)
    return own, cache[pre + "hook_attn_scores"], cache[pre + "hook_pattern"]


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_on_random_models(random_models, batch_tokens, family):
    model = random_models[family]
    ids, am = batch_tokens
    for layer in range(model.cfg.n_layers):
        d = svtools.decompose(model, ids, layer, attention_mask=am)
        assert d.terms.shape == (3, model.cfg.n_heads, 12, 12, model.cfg.d_head)
        torch.testing.assert_close(d.terms.sum(-1), d.scores)
        # the model's own weights, reproduced by softmax(scale * scores + mask)
        assert d.max_pattern_error() < 1e-4
        # and q . k from the model's own projections, where the query may attend
        own, hooked, pattern = _own_qk_scores(model, ids, am, layer)
        sel = d.mask.expand_as(own)
        torch.testing.assert_close(d.scores[sel], own[sel], rtol=1e-4, atol=1e-4)
        if not torch.equal(hooked, pattern):  # the BERT bridge's score hook holds the pattern
            torch.testing.assert_close((d.scores * d.scale)[sel], hooked[sel], rtol=1e-4, atol=1e-4)
        # non-trivial: attention is peaked, so a wrong decomposition could not pass by accident
        assert d.pattern.max() > 0.9


@pytest.mark.parametrize("family", FAMILIES)
def test_float64_path_and_single_head(random_models, batch_tokens, family):
    model = random_models[family]
    ids, am = batch_tokens
    d64 = svtools.decompose(model, ids, 1, attention_mask=am, dtype=torch.float64)
    assert d64.terms.dtype == torch.float64
    assert d64.max_pattern_error() < 1e-4
    d2 = svtools.decompose(model, ids, 1, head=2, attention_mask=am)
    torch.testing.assert_close(d2.scores[:, 0], d64.scores[:, 2].float(), rtol=1e-4, atol=1e-4)
    assert d2.heads == [2]


def test_exact_on_embedded_minilm(minilm):
    texts = ["The cat sat on the mat because it was warm.",
             "When Mary and John went to the store, John gave a drink to Mary.",
             "Rivers carry sediment to the sea."]
    for layer in range(minilm.cfg.n_layers):
        d = svtools.decompose(minilm, texts, layer)
        assert d.terms.shape[1] == 12 and d.terms.shape[-1] == 32
        torch.testing.assert_close(d.terms.sum(-1), d.scores)
        assert d.max_pattern_error() < 1e-4
        # padding: the shorter rows do not attend to their pad keys
        assert bool((~d.mask[2, 0, :, d.attention_mask[2].sum():]).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_rotated_control_keeps_scores(random_models, batch_tokens, family):
    d = svtools.decompose(random_models[family], batch_tokens[0], 0, attention_mask=batch_tokens[1])
    rot = d.rotated_terms(seed=3)
    torch.testing.assert_close(rot.sum(-1), d.scores, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(rot, d.terms, atol=1e-3)
    torch.testing.assert_close(d.rotated_terms(seed=3), rot)  # seeded


def test_wrong_rotary_layout_is_caught(random_models, batch_tokens, monkeypatch):
    """The runtime check fails loudly when the decomposition does not match the model."""
    import svtools.decomposition as dec
    real = dec.rotary_spec

    def wrong(model, offsets):
        spec = real(model, offsets)
        return type(spec)(spec.rotary_dim, spec.inv_freq, spec.offsets, "gptj", spec.attention_scaling)

    monkeypatch.setattr(dec, "rotary_spec", wrong)
    with pytest.raises(UnsupportedModelError, match="does not reproduce"):
        svtools.decompose(random_models["llama"], batch_tokens[0], 0, attention_mask=batch_tokens[1])


def test_relative_terms_of_decomposition(random_models, batch_tokens):
    d = svtools.decompose(random_models["gpt2"], batch_tokens[0], 1, attention_mask=batch_tokens[1])
    rel = d.relative_terms()
    s = d.scores[0, 0, 5]  # query 5 sees keys 0..5
    expect = s[:6] - (s[:6].sum() - s[:6]) / 5
    torch.testing.assert_close(rel[0, 0, 5, :6].sum(-1), expect, rtol=1e-4, atol=1e-4)
    assert torch.isnan(rel[0, 0, 0]).all()  # query 0 sees one key: no relative score
    assert torch.isnan(rel[0, 0, 5, 6:]).all()  # masked keys


def test_bad_inputs(random_models, batch_tokens):
    model = random_models["gpt2"]
    ids, am = batch_tokens
    with pytest.raises(SVToolsError, match="unknown layer"):
        svtools.decompose(model, ids, 2)
    with pytest.raises(SVToolsError, match="unknown head"):
        svtools.decompose(model, ids, 0, head=4)
    with pytest.raises(SVToolsError, match="unknown head"):
        svtools.decompose(model, ids, 0, head=[0, 9])
    with pytest.raises(SVToolsError, match="integer ids"):
        svtools.decompose(model, ids.float(), 0)
    with pytest.raises(SVToolsError, match="must lie in"):
        svtools.decompose(model, ids + 1000, 0)
    with pytest.raises(SVToolsError, match="right-padded"):
        svtools.decompose(model, ids, 0, attention_mask=am.flip(-1))
    with pytest.raises(SVToolsError, match="shape"):
        svtools.decompose(model, ids, 0, attention_mask=am[:, :5])
    with pytest.raises(SVToolsError, match="no tokenizer"):
        svtools.decompose(model, ["a sentence"], 0)


@pytest.mark.parametrize("family", ["gpt2", "neox"])
def test_decompose_layers_matches_decompose(random_models, batch_tokens, family):
    model = random_models[family]
    ids, am = batch_tokens
    decs = list(svtools.decompose_layers(model, ids, {0: [1, 3], 1: None}, attention_mask=am))
    assert [d.layer for d in decs] == [0, 1] and decs[0].heads == [1, 3] and decs[1].heads == [0, 1, 2, 3]
    for d in decs:
        single = svtools.decompose(model, ids, d.layer, d.heads, attention_mask=am)
        torch.testing.assert_close(d.terms, single.terms)
        torch.testing.assert_close(d.pattern, single.pattern)


def test_rotated_control_of_a_head_does_not_depend_on_its_companions(random_models, batch_tokens):
    model = random_models["neox"]
    ids, am = batch_tokens
    all_heads = svtools.decompose(model, ids, 1, attention_mask=am)
    alone = svtools.decompose(model, ids, 1, head=2, attention_mask=am)
    torch.testing.assert_close(alone.rotated_terms(7)[:, 0], all_heads.rotated_terms(7)[:, 2])
    # different heads and layers get different rotations
    assert not torch.allclose(all_heads.rotated_terms(7)[:, 1], all_heads.rotated_terms(8)[:, 1])
