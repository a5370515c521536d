"""The pair engine behind head_sparsity: row-by-row agreement with the full (batch, head, query, key, r)
view of ``decompose`` on every supported family, the factored rotary SVD, relative terms from query
totals, the streamed forward pass, and the exactness checks that must fire."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import svtools
from svtools.decomposition import cache_attention_inputs as _run_once
from svtools.decomposition import decompose_layers, stream_attention
from svtools.models import UnsupportedModelError
from svtools.qk import RotarySpec, qk_svd
from svtools.rotary import qk_svd_factored
from svtools.sad import COLUMNS, head_sparsity, pair_measures, select_pairs
from svtools.sad.engine import PairEngine as _PairEngine
from svtools.sad.measure import _heads_by_layer
from svtools.terms import relative_pair_terms, relative_terms

KEY = ["layer", "head", "prompt", "query", "key"]


def _full_view(model, ids, am, *, threshold, attention="absolute", seed=0, dtype=torch.float64, select="threshold"):
    """head_sparsity as it was before the pair engine: every pair's terms from decompose, then selection."""
    rows = []
    for dec in decompose_layers(model, ids, attention_mask=am, dtype=dtype):
        sel = select_pairs(dec.pattern, dec.mask, select=select, threshold=threshold,
                           query_mask=dec.attention_mask.bool()[:, None, :])
        terms = dec.terms if attention == "absolute" else dec.relative_terms()
        rot = dec.rotated_terms(seed)
        if attention == "relative":
            rot = relative_terms(rot, dec.mask)
        t, r, idx = terms[sel], rot[sel], sel.nonzero()
        ok = ~torch.isnan(t).any(-1)
        t, r, idx = t[ok], r[ok], idx[ok]
        if not len(t):
            continue
        m, mr = pair_measures(t), pair_measures(r)
        b, h, q, k = idx.unbind(-1)
        rows.append(pd.DataFrame({
            "layer": dec.layer, "head": h.numpy(), "prompt": b.numpy(), "query": q.numpy(), "key": k.numpy(),
            "attention": dec.pattern[sel][ok].double().numpy(), "score": m["score"].double().numpy(),
            "n_recon": m["n_recon"].numpy(), "rolls_tovee": m["rolls_tovee"].double().numpy(),
            "dominant_k": m["dominant_k"].numpy(), "n_recon_rotated": mr["n_recon"].numpy(),
            "rolls_tovee_rotated": mr["rolls_tovee"].double().numpy()}))
    return pd.concat(rows, ignore_index=True).sort_values(KEY).reset_index(drop=True)


def _compare(got, ref, *, exact_ints=True, rtol=1e-6, atol=1e-6):
    got = got.sort_values(KEY).reset_index(drop=True)
    assert len(got) == len(ref) and len(ref) > 5
    assert got[KEY].values.tolist() == ref[KEY].values.tolist()
    for c in ("attention", "score", "rolls_tovee", "rolls_tovee_rotated"):
        np.testing.assert_allclose(got[c].to_numpy(float), ref[c].to_numpy(float), rtol=rtol, atol=atol, err_msg=c)
    ints = ("n_recon", "dominant_k", "n_recon_rotated")
    for c in ints:
        same = (got[c].to_numpy() == ref[c].to_numpy()).mean()
        assert same == 1.0 if exact_ints else same > 0.99, (c, same)


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama", "bert"])
@pytest.mark.parametrize("attention", ["absolute", "relative"])
def test_engine_matches_full_view(random_models, batch_tokens, family, attention):
    model = random_models[family]
    ids, am = batch_tokens
    got = head_sparsity(model, ids, attention_mask=am, threshold=0.3, attention=attention, seed=2, control="rotated",
                        dtype=torch.float64, progress=False)
    assert tuple(got.columns) == COLUMNS
    _compare(got, _full_view(model, ids, am, threshold=0.3, attention=attention, seed=2))


@pytest.mark.parametrize("family", ["neox", "llama"])
def test_engine_float32_and_acc_rule(random_models, batch_tokens, family):
    model = random_models[family]
    ids, am = batch_tokens
    got = head_sparsity(model, ids, attention_mask=am, select="acc", progress=False, seed=1, control="rotated")
    ref = _full_view(model, ids, am, threshold=0.5, select="acc", seed=1, dtype=torch.float32)
    _compare(got, ref, exact_ints=False, rtol=1e-3, atol=1e-3)


def test_engine_on_minilm(minilm):
    texts = ["The quick brown fox jumps over the lazy dog.", "When Mary and John went to the store, John gave "
             "a drink to Mary.", "Singular vectors of attention heads align with features."]
    ids, am = svtools.decomposition.tokenize(minilm, texts)
    got = head_sparsity(minilm, texts, threshold=0.3, dtype=torch.float64, progress=False, seed=4, control="rotated")
    _compare(got, _full_view(minilm, ids, am, threshold=0.3, seed=4))
    rel = head_sparsity(minilm, texts, threshold=0.3, attention="relative", dtype=torch.float64, progress=False,
                        control="rotated")
    _compare(rel, _full_view(minilm, ids, am, threshold=0.3, attention="relative"))


def test_chunk_size_does_not_change_rows(random_models, batch_tokens, monkeypatch):
    model = random_models["neox"]
    ids, am = batch_tokens
    kw = dict(attention_mask=am, threshold=0.3, progress=False, dtype=torch.float64, attention="relative",
              baseline="non-attended", baseline_fraction=0.3)
    one = head_sparsity(model, ids, batch_size=8, **kw)
    import svtools.factor_cache as factor_cache
    factor_cache.FACTOR_CACHE.clear()
    monkeypatch.setattr(factor_cache, "CACHE_BYTES", 0)  # nothing cached: every chunk decomposes its items
    pd.testing.assert_frame_equal(one, head_sparsity(model, ids, batch_size=1, **kw), check_exact=False, rtol=1e-9)


# ----------------------------------------------------------------------------- building blocks

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["neox", "gptj"])
def test_qk_svd_factored_equals_qk_svd(bias, layout):
    g = torch.Generator().manual_seed(0)
    W_Q, W_K = (torch.randn(3, 40, 16, generator=g, dtype=torch.float64) for _ in range(2))
    b = tuple(torch.randn(3, 16, generator=g, dtype=torch.float64) for _ in range(2)) if bias else (None, None)
    spec = RotarySpec.from_base(8, [0, 3, 17, 5], layout=layout, attention_scaling=1.3)
    want = qk_svd(W_Q, W_K, *b, rotary=spec)
    f = qk_svd_factored(W_Q, W_K, *b, rotary=spec)
    assert f.XA.shape == (3, 4, 16, 16) and f.A.shape == (3, 40 + bias, 16)
    got = f.qksvd()
    for name in ("U", "S", "V"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-9, atol=1e-10)
    # rank-deficient sides take the dense route, still in the same container
    W_Q[..., :8] = 0
    f = qk_svd_factored(W_Q, W_K, rotary=spec)
    torch.testing.assert_close(f.qksvd().omega(), qk_svd(W_Q, W_K, rotary=spec).omega(), rtol=1e-9, atol=1e-9)


def test_relative_pair_terms_equals_grid():
    g = torch.Generator().manual_seed(0)
    a, c = torch.randn(2, 5, 3, generator=g, dtype=torch.float64), torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    grid = a[:, :, None, :] * c[:, None, :, :]  # (batch, query, key, r)
    mask = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 5, 5).clone()
    mask[1, :, 3:] = False  # padding keys
    want = relative_terms(grid, mask)
    b, q, k = mask.nonzero().unbind(-1)
    total = a[b, q] * torch.einsum("bqk,bkr->bqr", mask.double(), c)[b, q]
    got = relative_pair_terms(grid[b, q, k], total, mask.sum(-1)[b, q])
    torch.testing.assert_close(got, want[b, q, k], equal_nan=True)
    assert torch.isnan(got[q == 0]).all()


def test_stream_attention_stops_after_last_layer(random_models, batch_tokens):
    model = random_models["gpt2"]
    ids, am = batch_tokens
    seen, later = [], []
    ref = _run_once(model, ids, am, [0])
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", lambda t, hook: later.append(1))]):
        stream_attention(model, ids, am, [0], lambda l, xq, xk, p: seen.append((l, xq, xk, p)))
    assert [s[0] for s in seen] == [0] and not later  # layer 1 never ran
    assert torch.equal(seen[0][3], ref["blocks.0.attn.hook_pattern"])
    assert torch.equal(seen[0][1], ref["blocks.0.attn.q.hook_in"])


@pytest.mark.parametrize("family", ["gpt2", "neox"])
def test_exactness_checks_fire(random_models, batch_tokens, family, monkeypatch):
    """A wrong decomposition must raise, not produce rows: the softmax check (absolute positions)
    and the per-pair sum check (rotary: the scores come from the weights, the terms from the SVD)."""
    model = random_models[family]
    ids, am = batch_tokens
    plan = _heads_by_layer(model, [0], None)
    eng = _PairEngine(model, plan, select="threshold", threshold=0.3, exclude_first=True, attention="absolute",
                      controls=("rotated",), seed=0, frac=1.0, dtype=torch.float64, kinds=("attended",),
                      baseline_fraction=0.1, baseline_bound=None, baseline_seed=0)
    basis = eng.basis(0)
    if family == "gpt2":
        basis.S = basis.S * torch.linspace(1.0, 1.5, basis.S.shape[-1], dtype=basis.S.dtype)
        match = "does not reproduce"
    else:  # two singular vectors swapped: still an orthonormal basis, so every pair's terms still sum
        # to its score; the check that each basis diagonalises its offset's Gram matrix must fire
        import svtools.factor_cache as factor_cache
        import svtools.rotary as rotary
        real = rotary._eigh_block

        def swapped(*args):
            V, S = real(*args)
            return V[..., [1, 0] + list(range(2, V.shape[-1]))], S

        factor_cache.FACTOR_CACHE.clear()
        monkeypatch.setattr(rotary, "_eigh_block", swapped)
        match = "does not diagonalise"
    from svtools.runtime import tqdm
    with pytest.raises(UnsupportedModelError, match=match):
        eng.run_chunk(ids, am, 0, tqdm(disable=True))
