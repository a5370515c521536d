"""Inputs to qk_svd, RotarySpec, QKSVD and the sparsity measures (issue 11, items 4, 10, 11, 12, 13)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from svtools import QKSVD, RotarySpec, SVToolsError, n_recon, qk_svd, rolls_tovee, sad_terms


def _w(*shape, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# ----------------------------------------------------------------------------- item 4: dtype argument

def test_integer_dtype_is_refused_not_truncated():
    W_Q, W_K = _w(8, 4, seed=1), _w(8, 4, seed=2)
    with pytest.raises(SVToolsError, match="floating dtype"):
        qk_svd(W_Q, W_K, dtype=torch.int64)
    with pytest.raises(SVToolsError, match="floating dtype"):
        qk_svd(W_Q, W_K, dtype=torch.bool)
    with pytest.raises(SVToolsError, match="complex"):
        qk_svd(W_Q.to(torch.complex64), W_K)


def test_dtype_given_by_name():
    W_Q, W_K = _w(8, 4, seed=1), _w(8, 4, seed=2)
    for name, dt in (("float64", torch.float64), ("torch.float32", torch.float32), ("double", torch.float64)):
        assert qk_svd(W_Q, W_K, dtype=name).S.dtype == dt
    ref = torch.linalg.svdvals(W_Q.double() @ W_K.double().T)[:4]
    assert torch.allclose(qk_svd(W_Q, W_K, dtype="float64").S, ref)
    with pytest.raises(SVToolsError, match="dtype"):
        qk_svd(W_Q, W_K, dtype="cuda")


# ----------------------------------------------------------------------------- item 10: float16 overflow

def test_float16_weights_with_large_singular_values():
    W_Q, W_K = _w(16, 4, seed=1, scale=200.0, dtype=torch.float16), _w(16, 4, seed=2, scale=200.0,
                                                                          dtype=torch.float16)
    ref = torch.linalg.svdvals(W_Q.double() @ W_K.double().T)[:4]
    assert float(ref[0]) > 65504  # beyond float16's range
    qk = qk_svd(W_Q, W_K)
    assert qk.S.dtype == torch.float32  # half inputs give float32 results
    assert torch.isfinite(qk.S).all() and torch.isfinite(qk.U).all()
    assert torch.allclose(qk.S.double(), ref, rtol=1e-5)
    assert torch.allclose(qk.omega().double(), W_Q.double() @ W_K.double().T, rtol=1e-4,
                          atol=1e-5 * float(ref[0]))
    with pytest.raises(SVToolsError, match="does not fit in dtype=torch.float16"):
        qk_svd(W_Q, W_K, dtype=torch.float16)
    small = qk_svd(W_Q / 100, W_K / 100, dtype=torch.float16)  # fits: the explicit dtype is honoured
    assert small.S.dtype == torch.float16 and torch.isfinite(small.S).all()


# ----------------------------------------------------------------------------- item 11: rolls_tovee range

def test_rolls_tovee_large_tiny_and_half():
    exact = lambda v: (np.mean(np.abs(v)) ** 2) / np.mean(np.square(v))  # noqa: E731
    got = rolls_tovee(torch.tensor([300.0, 1.0, 0.5], dtype=torch.float16))
    assert got.dtype == torch.float16
    assert float(got) == pytest.approx(exact(np.array([300.0, 1.0, 0.5])), rel=2e-3)
    for v in ([1e20, 1e20, 0.0], [1e-30, 1e-30, 0.0], [3e38, -3e38, 1e38]):
        assert float(rolls_tovee(torch.tensor(v))) == pytest.approx(exact(np.array(v) / max(np.abs(v))), rel=1e-6)
    assert torch.isnan(rolls_tovee(torch.zeros(4)))  # documented: no sparseness for an all-zero vector


def test_n_recon_large_and_half():
    t = torch.tensor([3e38, -3e38, 2e38, 1e38])
    assert int(n_recon(t)) == int(n_recon(t.double() / 1e38))
    h = torch.tensor([300.0, 250.0, -100.0, 1.0], dtype=torch.float16)
    assert int(n_recon(h)) == int(n_recon(h.double())) == 2
    with pytest.raises(SVToolsError, match="frac"):
        n_recon(h, frac=None)
    with pytest.raises(SVToolsError, match="frac"):
        n_recon(h, frac=float("nan"))


# ----------------------------------------------------------------------------- item 12: RotarySpec

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_rotary_spec_rejects_non_finite_frequencies(bad):
    with pytest.raises(SVToolsError, match="inv_freq"):
        RotarySpec(4, torch.tensor([1.0, bad]), torch.arange(3))


@pytest.mark.parametrize("base", [0.0, -10.0, float("nan"), float("inf"), None])
def test_rotary_spec_rejects_bad_base(base):
    with pytest.raises(SVToolsError, match="base"):
        RotarySpec.from_base(4, range(3), base=base)


def test_rotary_spec_argument_types():
    spec = RotarySpec.from_base(np.int64(4), np.arange(3))
    assert spec.rotary_dim == 4 and spec.offsets.tolist() == [0, 1, 2]
    assert RotarySpec(4, [1.0, 0.5], [0, 1]).inv_freq.shape == (2,)
    with pytest.raises(SVToolsError, match="rotary_dim"):
        RotarySpec.from_base(4.0, range(3))
    with pytest.raises(SVToolsError, match="offsets"):
        RotarySpec.from_base(4, [0.5, 1.5])
    with pytest.raises(SVToolsError, match="attention_scaling"):
        RotarySpec(4, [1.0, 0.5], [0, 1], attention_scaling=float("nan"))
    with pytest.raises(SVToolsError, match="RotarySpec"):
        qk_svd(_w(8, 4), _w(8, 4), rotary="neox")


def test_offset_index_memory_does_not_grow_with_the_span():
    # a lookup table over the span [0, 1e12] would need 8 TB: the lookup must not build one
    spec = RotarySpec.from_base(4, [0, 10**12])
    idx = spec.offset_index(torch.tensor([[10**12, 0], [0, 0]]))
    assert idx.tolist() == [[1, 0], [0, 0]]
    with pytest.raises(SVToolsError, match=r"offset\(s\) \[5\]"):
        spec.offset_index(5)
    with pytest.raises(SVToolsError, match="integers"):
        spec.offset_index(torch.tensor([0.5]))
    # unsorted offsets map back to their own positions
    un = RotarySpec.from_base(4, [7, -3, 2])
    assert un.offset_index(torch.tensor([2, 7, -3])).tolist() == [2, 0, 1]


# ----------------------------------------------------------------------------- item 13: shapes, indexing

def test_bias_with_more_batch_dims_than_weights_broadcasts():
    W_Q, W_K = _w(3, 8, 4, seed=1), _w(3, 8, 4, seed=2)
    b_Q = _w(5, 3, 4, seed=3)
    qk = qk_svd(W_Q, W_K, b_Q=b_Q, dtype=torch.float64)
    assert qk.batch_shape == (5, 3)
    A = torch.cat([W_Q.double().expand(5, 3, 8, 4), b_Q.double()[..., None, :]], -2)
    B = torch.cat([W_K.double().expand(5, 3, 8, 4), torch.zeros(5, 3, 1, 4, dtype=torch.float64)], -2)
    assert torch.allclose(qk.omega(), A @ B.transpose(-1, -2), atol=1e-10)
    with pytest.raises(SVToolsError, match="broadcast"):
        qk_svd(W_Q, W_K, b_Q=_w(2, 4))


def test_qksvd_index_out_of_range():
    qk = qk_svd(_w(3, 8, 4), _w(3, 8, 4, seed=1))
    with pytest.raises(SVToolsError, match=r"out of range.*\(3,\)"):
        qk[7]
    with pytest.raises(SVToolsError, match="too many"):
        qk[0, 0]
    assert isinstance(qk[np.int64(2)], QKSVD)


def test_complex_inputs_refused():
    qk = qk_svd(_w(8, 4), _w(8, 4, seed=1))
    with pytest.raises(SVToolsError, match="complex"):
        sad_terms(qk, torch.ones(8, dtype=torch.complex64), torch.ones(8))
    with pytest.raises(SVToolsError, match="complex"):
        rolls_tovee(torch.ones(3, dtype=torch.complex64))
