"""Property-based tests (Hypothesis) over shapes, dtypes, ranks and scales (issue 11, targets).

For ``qk_svd``, ``sad_terms``, ``n_recon`` and ``rolls_tovee``: on every drawn input either the
documented identity holds or an :class:`SVToolsError` is raised; never another exception, never a
NaN the docstrings do not promise. Inputs are never modified. Small example counts keep the suite
fast on 2 cores.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from svtools import SVToolsError, n_recon, qk_svd, rolls_tovee, rotated_terms, sad_terms

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=True)
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# what the float64 reference is compared with: the result's rounding plus float32 internal work
REL = {torch.float16: 1e-4, torch.bfloat16: 1e-4, torch.float32: 1e-4, torch.float64: 1e-9}


@st.composite
def head_weights(draw):
    """W_Q, W_K (and maybe biases) of random batch shape, size, rank, scale and dtype."""
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    d_model = draw(st.integers(1, 9))
    d_head = draw(st.integers(1, 6))
    rank = draw(st.integers(0, min(d_model, d_head)))
    dtype = draw(st.sampled_from(DTYPES))
    log_scale = draw(st.sampled_from([-3, 0, 2]))  # 1e2 puts float16 singular values past 65504
    seed = draw(st.integers(0, 2**16))
    bias = draw(st.sampled_from(["none", "q", "both"]))
    g = torch.Generator().manual_seed(seed)

    def weight():
        L = torch.randn(batch + (d_model, rank), generator=g, dtype=torch.float64)
        R = torch.randn(batch + (rank, d_head), generator=g, dtype=torch.float64)
        return (L @ R * 10.0 ** log_scale).to(dtype)

    W_Q, W_K = weight(), weight()
    b_Q = torch.randn(batch + (d_head,), generator=g, dtype=torch.float64).to(dtype) if bias != "none" else None
    b_K = torch.randn(d_head, generator=g, dtype=torch.float64).to(dtype) if bias == "both" else None
    return W_Q, W_K, b_Q, b_K


def _homog64(W, b, bias):
    W = W.to(torch.float64)
    if not bias:
        return W
    b = torch.zeros(W.shape[:-2] + W.shape[-1:], dtype=torch.float64) if b is None else b.to(torch.float64)
    lead = torch.broadcast_shapes(W.shape[:-2], b.shape[:-1])
    return torch.cat([W.expand(lead + W.shape[-2:]), b.expand(lead + b.shape[-1:])[..., None, :]], -2)


@SETTINGS
@given(head_weights(), st.sampled_from([None, "float64", torch.float32]))
def test_qk_svd_identity(weights, out_dtype):
    W_Q, W_K, b_Q, b_K = weights
    copies = [None if t is None else t.clone() for t in weights]
    qk = qk_svd(W_Q, W_K, b_Q, b_K, dtype=out_dtype)
    for t, c in zip(weights, copies):  # inputs untouched
        assert t is None or torch.equal(t, c)
    bias = b_Q is not None or b_K is not None
    A, B = _homog64(W_Q, b_Q, bias), _homog64(W_K, b_K, bias)
    ref = A @ B.transpose(-1, -2)
    lead = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    d_in = A.shape[-2]
    r = min(W_Q.shape[-1], d_in)
    assert qk.U.shape == lead + (d_in, r) and qk.S.shape == lead + (r,)
    expect_dtype = {None: None, "float64": torch.float64}.get(out_dtype, out_dtype) or \
        (torch.float32 if W_Q.dtype in (torch.float16, torch.bfloat16) else W_Q.dtype)
    assert qk.S.dtype == expect_dtype
    for t in (qk.U, qk.S, qk.V):
        assert torch.isfinite(t).all()
    S = qk.S.to(torch.float64)
    assert (S >= 0).all() and (S[..., :-1] >= S[..., 1:] - 1e-6 * S[..., :1]).all()
    scale = float(A.norm() * B.norm()) + 1e-300
    err = float((qk.omega().to(torch.float64) - ref).abs().max())
    assert err <= REL[qk.S.dtype] * scale + 1e-300, (err, scale)
    # singular vectors of the non-zero singular values are orthonormal
    keep = S > 1e-6 * S[..., :1].clamp_min(1e-300)
    U = qk.U.to(torch.float64) * keep[..., None, :]
    gram = U.transpose(-1, -2) @ U
    eye = torch.diag_embed(keep.to(torch.float64))
    assert float((gram - eye).abs().max()) < (1e-3 if qk.S.dtype != torch.float64 else 1e-8)


@SETTINGS
@given(head_weights(), st.integers(0, 2**16), st.sampled_from(DTYPES), st.lists(st.integers(1, 3), max_size=2))
def test_sad_terms_sum_to_the_score(weights, seed, x_dtype, x_batch):
    W_Q, W_K, b_Q, b_K = weights
    qk = qk_svd(W_Q, W_K, b_Q, b_K)
    g = torch.Generator().manual_seed(seed)
    d_model = W_Q.shape[-2]
    xb = tuple(x_batch) + tuple(qk.batch_shape)
    x = torch.randn(xb + (d_model,), generator=g, dtype=torch.float64).to(x_dtype)
    y = torch.randn(xb + (d_model,), generator=g, dtype=torch.float64).to(x_dtype)
    x0, y0 = x.clone(), y.clone()
    terms = sad_terms(qk, x, y)
    rot = rotated_terms(qk, x, y, seed=seed)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert terms.shape == xb + (qk.r,) and torch.isfinite(terms).all() and torch.isfinite(rot).all()
    bias = qk.has_bias
    one = torch.ones(xb + (1,), dtype=torch.float64)
    xh = torch.cat([x.double(), one], -1) if bias else x.double()
    yh = torch.cat([y.double(), one], -1) if bias else y.double()
    A, B = _homog64(W_Q, b_Q, bias), _homog64(W_K, b_K, bias)
    score = ((xh[..., None, :] @ A).squeeze(-2) * (yh[..., None, :] @ B).squeeze(-2)).sum(-1)
    bound = (xh.norm(dim=-1) * yh.norm(dim=-1) * A.norm(dim=(-2, -1)) * B.norm(dim=(-2, -1)))
    tol = (1e-4 if terms.dtype != torch.float64 else 1e-9) * bound + 1e-300
    assert ((terms.double().sum(-1) - score).abs() <= tol).all()
    assert ((rot.double().sum(-1) - score).abs() <= tol).all()


@st.composite
def term_vectors(draw):
    """Term vectors of random batch shape, length, dtype, scale and sign pattern (zeros included)."""
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    r = draw(st.integers(1, 12))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    log_scale = draw(st.sampled_from([-30, -3, 0, 3, 20, 37]))
    zero_frac = draw(st.sampled_from([0.0, 0.3, 1.0]))
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(batch + (r,), generator=g, dtype=torch.float64) * 10.0 ** log_scale
    t = torch.where(torch.rand(t.shape, generator=g, dtype=torch.float64) < zero_frac, torch.zeros_like(t), t)
    t = t.to(dtype)
    if not torch.isfinite(t).all():  # past the dtype's range: not a valid input
        t = t.nan_to_num(posinf=0.0, neginf=0.0)
    return t


@SETTINGS
@given(term_vectors(), st.sampled_from([1.0, 0.9, 0.5, 1e-3]))
def test_n_recon_definition(t, frac):
    t0 = t.clone()
    n = n_recon(t, frac)
    assert torch.equal(t, t0)
    assert n.dtype == torch.int64 and n.shape == t.shape[:-1]
    r = t.shape[-1]
    assert ((n >= 0) & (n <= r)).all()
    # the defining property, checked in float64 on the same (exactly representable) values
    t64 = t.to(torch.float64)
    m = t64.abs().amax(-1, keepdim=True)
    u = t64 / torch.where(m > 0, m, torch.ones_like(m))
    total = u.sum(-1, keepdim=True)
    s = torch.where(total < 0, -1.0, 1.0)
    part = torch.cat([torch.zeros_like(total), torch.cumsum(torch.sort(s * u, -1, descending=True).values, -1)], -1)
    target = frac * total.abs()
    tol = 16 * torch.finfo(torch.float32).eps * u.abs().sum(-1, keepdim=True)
    reached = part.gather(-1, n[..., None])
    assert (reached >= target - tol).all()
    before = part.gather(-1, (n - 1).clamp_min(0)[..., None])
    assert ((n[..., None] == 0) | (before < target + tol)).all()
    # scale invariance (powers of two are exact)
    if t.dtype == torch.float64 or float(t.abs().max()) < 1e3:
        assert torch.equal(n_recon(t * 4, frac), n)


@SETTINGS
@given(term_vectors())
def test_rolls_tovee_range_and_value(t):
    t0 = t.clone()
    rt = rolls_tovee(t)
    assert torch.equal(t, t0)
    assert rt.dtype == t.dtype and rt.shape == t.shape[:-1]
    r = t.shape[-1]
    zero = (t == 0).all(-1)
    assert torch.equal(torch.isnan(rt), zero)  # NaN exactly for all-zero vectors, as documented
    v = rt.to(torch.float64)[~zero]
    eps = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(t.dtype, 1e-6)
    assert ((v >= 1 / r - eps) & (v <= 1 + eps)).all()
    t64 = t.to(torch.float64)[~zero]
    if t64.numel():
        u = t64 / t64.abs().amax(-1, keepdim=True)
        ref = u.abs().mean(-1) ** 2 / (u * u).mean(-1)
        assert torch.allclose(v, ref, rtol=eps, atol=0)


@SETTINGS
@given(st.sampled_from([float("nan"), float("inf"), -float("inf")]), st.integers(1, 5))
def test_non_finite_terms_raise(bad, r):
    t = torch.ones(r)
    t[0] = bad
    for f in (n_recon, rolls_tovee):
        with pytest.raises(SVToolsError):
            f(t)


def test_qk_svd_non_finite_and_shape_errors():
    W = torch.ones(4, 2)
    for bad in (float("nan"), float("inf")):
        Wb = W.clone()
        Wb[0, 0] = bad
        with pytest.raises(SVToolsError, match="non-finite"):
            qk_svd(Wb, W)
    with pytest.raises(SVToolsError, match="shape"):
        qk_svd(torch.ones(4), W)
    with pytest.raises(SVToolsError, match="shape"):
        qk_svd(W, torch.ones(5, 2))
    with pytest.raises(SVToolsError, match="too large"):
        qk_svd(torch.full((4, 2), 1e200, dtype=torch.float64), W.double())
    assert math.isfinite(float(qk_svd(W, W).S[0]))
