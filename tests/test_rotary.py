"""Rotary heads offset by offset (svtools.rotary) and the factor cache (svtools.factor_cache).

Against closed forms and the dense SVD: each item's basis is the SVD's (same singular values,
same vectors with the sign convention, the Gram identity), ill-conditioned and rank-deficient
heads included; a pair's terms ``(a^ . v_k)(b^ . v_k)`` equal ``sigma_k (x~ . u_k)(y~ . v_k)`` of
``qk_svd``; an item's numbers do not depend on the items computed with it nor on the threads; the
control's rotations are Haar (moments) and reproducible; the cache serves identical values, stays
within its bound, never serves a stale entry for changed weights, and keeps nothing when a
computation fails; head_sparsity's rows are the same cold, repeated and without a cache.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import svtools.factor_cache as factor_cache
import svtools.rotary as rotary
from svtools.decomposition import head_rotations
from svtools.factor_cache import FactorCache
from svtools.qk import RotarySpec, qk_svd, rotary_matrices
from svtools.rotary import RotaryHeads, offset_eigh, offset_rotations, qk_svd_factored
from svtools.sad import head_sparsity


def _weights(seed=0, H=3, d_model=40, d_head=16, bias=True):
    g = torch.Generator().manual_seed(seed)
    W_Q, W_K = (torch.randn(H, d_model, d_head, generator=g, dtype=torch.float64) for _ in range(2))
    b = tuple(torch.randn(H, d_head, generator=g, dtype=torch.float64) for _ in range(2)) if bias else (None, None)
    return W_Q, W_K, *b


def _items(H, offsets):
    offsets = torch.as_tensor(offsets)
    return torch.arange(H).repeat_interleave(len(offsets)), offsets.repeat(H)


@pytest.mark.parametrize("layout", ["neox", "gptj"])
@pytest.mark.parametrize("bias", [True, False])
def test_items_are_the_svd_of_the_core(layout, bias):
    W_Q, W_K, b_Q, b_K = _weights(bias=bias)
    spec = RotarySpec.from_base(8, [0], layout=layout, attention_scaling=1.2)
    heads = RotaryHeads.from_weights(W_Q, W_K, b_Q, b_K, spec, torch.float64)
    h, o = _items(3, [0, 1, 7, 30, 255])
    V, S = offset_eigh(heads, h, o)
    M = rotary_matrices(replace_offsets(spec, o), 16, dtype=torch.float64)
    C = heads.RA[h] @ M @ heads.RB[h].mT
    Uc, Sc, Vh = torch.linalg.svd(C)
    torch.testing.assert_close(S, Sc, rtol=1e-12, atol=0)
    # the same vectors: |v_k . v'_k| = 1, and Gamma V = V S^2
    torch.testing.assert_close((V * Vh.mT).sum(-2).abs(), torch.ones_like(S), rtol=0, atol=1e-10)
    torch.testing.assert_close(C.mT @ C @ V, V * S[:, None, :] ** 2, rtol=0, atol=1e-9 * float(S.max()) ** 2)
    # sign convention of qk_svd: u_k = A M R_B^T v_k / sigma_k has a non-negative entry sum
    A = heads.A.to(torch.float64)[h]
    u = A @ (M @ heads.RB[h].mT @ V) / S[:, None, :]
    assert bool((u.sum(-2) >= 0).all())


def replace_offsets(spec, offsets):
    return RotarySpec(spec.rotary_dim, spec.inv_freq, offsets, spec.layout, spec.attention_scaling)


@pytest.mark.parametrize("layout", ["neox", "gptj"])
def test_terms_equal_those_of_qk_svd(layout):
    """t_k = (a^ . v_k)(b^ . v_k) with a^ = R_B M^T A^T x~, b^ = R_B^-T B^T y~ equals sigma_k (x~.u_k)(y~.v_k)."""
    W_Q, W_K, b_Q, b_K = _weights(1)
    offs = [0, 2, 9, 40]
    spec = RotarySpec.from_base(8, offs, layout=layout, attention_scaling=0.9)
    dense = qk_svd(W_Q, W_K, b_Q, b_K, rotary=spec)
    heads = RotaryHeads.from_weights(W_Q, W_K, b_Q, b_K, spec, torch.float64)
    h, o = _items(3, offs)
    V, S = offset_eigh(heads, h, o)
    g = torch.Generator().manual_seed(5)
    x, y = (torch.randn(len(h), 41, generator=g, dtype=torch.float64) for _ in range(2))
    qa = torch.einsum("nd,nde->ne", x, heads.A[h])
    kb = torch.einsum("nd,nde->ne", y, heads.B[h])
    ah = heads.whiten_queries(qa, h, o)
    bh = torch.einsum("nd,ndr->nr", kb, heads.key_map[h])
    got = (ah[:, None, :] @ V)[:, 0] * (bh[:, None, :] @ V)[:, 0]
    U, Sd, Vd = (t.reshape((len(h),) + t.shape[2:]) for t in (dense.U, dense.S, dense.V))
    want = Sd * (x[:, None, :] @ U)[:, 0] * (y[:, None, :] @ Vd)[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # qk_svd_factored (built on the same items) reproduces qk_svd
    f = qk_svd_factored(W_Q, W_K, b_Q, b_K, rotary=spec)
    for name in ("U", "S", "V"):
        torch.testing.assert_close(getattr(f.qksvd(), name), getattr(dense, name), rtol=1e-9, atol=1e-10)


def test_ill_conditioned_cores_take_the_svd():
    """A core past EIGH_MAX_CONDITION is decomposed by the SVD: its small singular vectors stay exact."""
    W_Q, W_K, b_Q, b_K = _weights(2, bias=False)
    W_K[..., 3:5] *= 1e-7  # two key directions almost absent: two tiny, close singular values
    spec = RotarySpec.from_base(8, [0, 5, 11])
    heads = RotaryHeads.from_weights(W_Q, W_K, None, None, spec, torch.float64)
    h, o = _items(3, [0, 5, 11])
    V, S = offset_eigh(heads, h, o)
    assert bool((S[:, 0] / S[:, -1] > rotary.EIGH_MAX_CONDITION).all())
    C = heads.RA[h] @ rotary_matrices(replace_offsets(spec, o), 16, dtype=torch.float64) @ heads.RB[h].mT
    _, Sc, Vh = torch.linalg.svd(C)  # C formed another way: equal to rounding, relative to sigma_max
    torch.testing.assert_close(S, Sc, rtol=0, atol=1e-13 * float(S.max()))
    torch.testing.assert_close((V * Vh.mT).sum(-2).abs(), torch.ones_like(S), rtol=0, atol=1e-12)
    f = qk_svd_factored(W_Q, W_K, rotary=spec)
    dense = qk_svd(W_Q, W_K, rotary=spec)
    torch.testing.assert_close(f.qksvd().omega(), dense.omega(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(f.S, dense.S, rtol=0, atol=1e-13 * float(S.max()))
    # why: the eigendecomposition of C^T C alone loses the two smallest singular vectors here
    _, Ve = torch.linalg.eigh(C.mT @ C)
    assert float((Ve.flip(-1) * Vh.mT).sum(-2).abs()[:, -2:].min()) < 1 - 1e-4


def test_rank_deficient_heads_take_the_qr_route():
    W_Q, W_K, b_Q, b_K = _weights(3, bias=False)
    W_K[1, :, :4] = 0  # head 1's key side has rank 12 < 16
    spec = RotarySpec.from_base(8, [0, 3])
    heads = RotaryHeads.from_weights(W_Q, W_K, None, None, spec, torch.float64)
    assert heads.full_rank.tolist() == [True, False, True]
    h, o = _items(3, [0, 3])
    V, S = offset_eigh(heads, h, o)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randn(1, 5, 40, generator=g, dtype=torch.float64) for _ in range(2))
    qa = torch.einsum("bnd,hde->bhne", x, heads.A)
    kb = torch.einsum("bnd,hde->bhne", y, heads.B)
    bh = heads.whiten_keys(kb, y)[0]  # (head, pos, r)
    ah = heads.whiten_queries(qa[0, h, 4], h, o)
    t = (ah[:, None, :] @ V)[:, 0] * (bh[h, 4 - o][:, None, :] @ V)[:, 0]
    dense = qk_svd(W_Q, W_K, rotary=spec)
    want = torch.stack([(x[0, 4] @ dense.omega()[hh, j] @ y[0, 4 - oo]) for hh, j, oo in
                        zip(h.tolist(), [0, 1] * 3, o.tolist())])
    torch.testing.assert_close(t.sum(-1), want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(S[2:4], dense.S[1], rtol=1e-9, atol=1e-9)


def test_items_do_not_depend_on_their_batch_or_threads():
    W_Q, W_K, b_Q, b_K = _weights(4)
    heads = RotaryHeads.from_weights(W_Q, W_K, b_Q, b_K, RotarySpec.from_base(8, [0]), torch.float64)
    h, o = _items(3, range(40))
    V, S = offset_eigh(heads, h, o)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        V1, S1 = offset_eigh(heads, h[[17]], o[[17]])
    finally:
        torch.set_num_threads(n)
    assert torch.equal(V[17], V1[0]) and torch.equal(S[17], S1[0])
    Q = offset_rotations(3, 2, h.tolist(), o.tolist(), 16, dtype=torch.float64)
    assert torch.equal(Q[17], offset_rotations(3, 2, [h[17].item()], [o[17].item()], 16, dtype=torch.float64)[0])
    # head_rotations (the decompose path) draws the same rotations
    grid = head_rotations(3, 2, [0, 1, 2], (), 16, dtype=torch.float64, offsets=list(range(40)))
    assert torch.equal(grid.reshape(-1, 16, 16), Q)


def test_rotations_are_haar():
    """Orthogonal, and the moments of Haar measure on O(8): E tr Q = 0, E (tr Q)^2 = 1, E (tr Q)^4 = 3."""
    Q = offset_rotations(0, 0, [0] * 20000, list(range(20000)), 8, dtype=torch.float64)
    torch.testing.assert_close(Q.mT @ Q, torch.eye(8, dtype=torch.float64).expand_as(Q), rtol=0, atol=1e-13)
    tr = torch.diagonal(Q, dim1=-2, dim2=-1).sum(-1)
    se = 1 / 20000 ** 0.5
    assert abs(float(tr.mean())) < 4 * se
    assert abs(float((tr ** 2).mean()) - 1) < 4 * 2 ** 0.5 * se
    assert abs(float((tr ** 4).mean()) - 3) < 4 * 10 * se
    assert abs(float(torch.linalg.det(Q).mean())) < 4 * se  # both components of O(8), equally
    assert abs(float((Q[:, 0, 0] ** 2).mean()) - 1 / 8) < 0.01


# ----------------------------------------------------------------------------- the cache

def _heads(seed=0, dtype=torch.float32):
    W_Q, W_K, b_Q, b_K = _weights(seed)
    return RotaryHeads.from_weights(W_Q, W_K, b_Q, b_K, RotarySpec.from_base(8, [0]), dtype)


def test_cache_serves_identical_values_and_counts():
    cache = FactorCache(max_bytes=2**24, page_bytes=2**16)
    heads = _heads()
    h, o = _items(3, range(0, 60, 3))
    first = cache.factors(heads, h, o)
    assert (cache.hits, cache.misses) == (0, 60)
    again = cache.factors(heads, h.flip(0), o.flip(0))
    assert (cache.hits, cache.misses) == (60, 60)
    V, S = offset_eigh(heads, h, o)
    assert torch.equal(first.full(0), V.float()) and torch.equal(first.full(1), S.float())
    assert torch.equal(again.full(0), V.float().flip(0))
    Q = cache.rotations(1, 2, h.tolist(), o.tolist(), 16, torch.float32, "cpu").full(0)
    assert torch.equal(Q, offset_rotations(1, 2, h.tolist(), o.tolist(), 16))


def test_cache_is_bounded_least_recently_used_first():
    item = 16 * 16 * 4 + 16 * 4
    cache = FactorCache(max_bytes=4 * 8 * item, page_bytes=8 * item)  # four pages of eight items
    heads = _heads()
    a, b = _items(1, range(0, 24)), _items(1, range(24, 48))
    cache.factors(heads, *a)
    cache.factors(heads, *b)  # needs 24 more slots: the 8 free ones, then 16 of a's, oldest first
    assert cache.nbytes <= cache.max_bytes
    m = cache.misses
    cache.factors(heads, *b)
    assert cache.misses == m  # b is all there
    cache.factors(heads, *a)
    assert cache.misses == m + 16  # a lost 16 entries
    V, _ = offset_eigh(heads, *a)
    assert torch.equal(cache.factors(heads, *a).full(0), V.float())  # whatever came back, the values hold


def test_cache_never_serves_stale_entries_and_overflows_in_full():
    cache = FactorCache(max_bytes=2**24, page_bytes=2**16)
    W_Q, W_K, b_Q, b_K = _weights(5)
    spec = RotarySpec.from_base(8, [0])
    h, o = _items(3, [1, 2, 3])
    cache.factors(RotaryHeads.from_weights(W_Q, W_K, b_Q, b_K, spec, torch.float32), h, o)
    W_K[2, 0, 0] += 1e-3  # one weight of head 2 changes: its entries must be recomputed
    changed = RotaryHeads.from_weights(W_Q, W_K, b_Q, b_K, spec, torch.float32)
    got = cache.factors(changed, h, o).full(0)
    assert (cache.hits, cache.misses) == (6, 12)
    assert torch.equal(got, offset_eigh(changed, h, o)[0].float())
    none = FactorCache(max_bytes=0)
    assert torch.equal(none.factors(changed, h, o).full(0), got) and none.nbytes == 0


def test_cache_keeps_nothing_when_a_computation_fails(monkeypatch):
    cache = FactorCache(max_bytes=2**24, page_bytes=2**16)
    heads = _heads()
    h, o = _items(3, [4, 5])

    def boom(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(rotary, "_eigh_block", boom)
    with pytest.raises(RuntimeError):
        cache.factors(heads, h, o)
    monkeypatch.undo()
    cache.factors(heads, h, o)
    assert cache.hits == 0  # the failed request left no entries behind


@pytest.mark.parametrize("control", ["rotated", "spectrum"])
def test_head_sparsity_rows_cold_repeated_and_uncached(random_models, batch_tokens, monkeypatch, control):
    model = random_models["neox"]
    ids, am = batch_tokens
    kw = dict(attention_mask=am, threshold=0.3, progress=False, baseline="random", baseline_fraction=0.2,
              control=control)
    cache = factor_cache.FACTOR_CACHE
    cache.clear()
    cold = head_sparsity(model, ids, **kw)
    misses, hits = cache.misses, cache.hits
    again = head_sparsity(model, ids, **kw)
    assert cache.misses == misses and cache.hits - hits == misses + hits  # the repeat computes nothing
    pd.testing.assert_frame_equal(cold, again, check_exact=True)
    monkeypatch.setattr(factor_cache, "CACHE_BYTES", 0)
    cache.clear()
    pd.testing.assert_frame_equal(cold, head_sparsity(model, ids, **kw), check_exact=True)
    assert cache.nbytes == 0
