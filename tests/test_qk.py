"""qk_svd against dense decompositions and an explicit rotary implementation."""

from __future__ import annotations

import pytest
import torch

import svtools
from svtools import SVToolsError, RotarySpec


def _weights(lead=(2, 3), d_model=24, d_head=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W_Q = torch.randn(*lead, d_model, d_head, generator=g, dtype=dtype)
    W_K = torch.randn(*lead, d_model, d_head, generator=g, dtype=dtype)
    b_Q = torch.randn(*lead, d_head, generator=g, dtype=dtype)
    b_K = torch.randn(*lead, d_head, generator=g, dtype=dtype)
    return W_Q, W_K, b_Q, b_K


def _homog(W, b):
    return torch.cat([W, b[..., None, :]], dim=-2)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_dense_svd(bias, dtype):
    W_Q, W_K, b_Q, b_K = _weights(dtype=dtype)
    qk = svtools.qk_svd(W_Q, W_K, b_Q if bias else None, b_K if bias else None)
    A, B = (_homog(W_Q, b_Q), _homog(W_K, b_K)) if bias else (W_Q, W_K)
    omega = A @ B.transpose(-1, -2)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    assert qk.U.shape == (2, 3, A.shape[-2], 6) and qk.S.shape == (2, 3, 6)
    assert qk.d_in == 24 + bias and qk.has_bias == bias
    torch.testing.assert_close(qk.omega(), omega, rtol=tol, atol=tol * omega.abs().max().item())
    dense_s = torch.linalg.svdvals(omega)[..., :6]
    torch.testing.assert_close(qk.S, dense_s, rtol=tol, atol=tol * dense_s.max().item())
    assert bool((qk.S[..., :-1] >= qk.S[..., 1:]).all())
    eye = torch.eye(6, dtype=dtype).expand(2, 3, 6, 6)
    torch.testing.assert_close(qk.U.transpose(-1, -2) @ qk.U, eye, rtol=tol, atol=tol)
    torch.testing.assert_close(qk.V.transpose(-1, -2) @ qk.V, eye, rtol=tol, atol=tol)


def test_one_bias_only_is_homogeneous():
    W_Q, W_K, b_Q, _ = _weights(lead=(4,))
    qk = svtools.qk_svd(W_Q, W_K, b_Q=b_Q)
    expect = _homog(W_Q, b_Q) @ _homog(W_K, torch.zeros_like(b_Q)).transpose(-1, -2)
    torch.testing.assert_close(qk.omega(), expect)


def test_broadcast_shared_key_weights():
    """Grouped-query style: one key matrix shared by several query heads."""
    W_Q, W_K, _, _ = _weights(lead=(4,))
    qk = svtools.qk_svd(W_Q, W_K[:1])
    torch.testing.assert_close(qk.omega(), W_Q @ W_K[:1].transpose(-1, -2))


def test_never_forms_the_d_model_square():
    """d_model = 200,000: the dense form would need 320 GB in float64; the core route is instant."""
    g = torch.Generator().manual_seed(1)
    W_Q, W_K = (torch.randn(200_000, 4, generator=g, dtype=torch.float64) for _ in range(2))
    qk = svtools.qk_svd(W_Q, W_K)
    x, y = (torch.randn(200_000, generator=g, dtype=torch.float64) for _ in range(2))
    score = (x @ W_Q) @ (y @ W_K)
    torch.testing.assert_close(svtools.sad_terms(qk, x, y).sum(), score)


def _rope(x, pos, spec: RotarySpec):
    """Explicit RoPE on (..., d_head) vectors at integer position ``pos`` (independent of qk.py)."""
    out = x.clone()
    half = spec.rotary_dim // 2
    for p in range(half):
        a, b = (p, p + half) if spec.layout == "neox" else (2 * p, 2 * p + 1)
        ang = pos * spec.inv_freq[p].item()
        c, s = torch.cos(torch.tensor(ang, dtype=x.dtype)), torch.sin(torch.tensor(ang, dtype=x.dtype))
        out[..., a] = x[..., a] * c - x[..., b] * s
        out[..., b] = x[..., b] * c + x[..., a] * s
    return out * 1.0


@pytest.mark.parametrize("layout", ["neox", "gptj"])
@pytest.mark.parametrize("bias", [False, True])
def test_rotary_offsets_match_explicit_rope(layout, bias):
    W_Q, W_K, b_Q, b_K = _weights(lead=(3,), d_model=16, d_head=8)
    if not bias:
        b_Q = b_K = None
    spec = RotarySpec.from_base(4, range(0, 7), base=50.0, layout=layout)  # partial: 4 of 8 dims
    qk = svtools.qk_svd(W_Q, W_K, b_Q, b_K, rotary=spec)
    assert qk.U.shape == (3, 7, 16 + bias, 8)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    q = x @ W_Q + (b_Q if bias else 0)
    k = y @ W_K + (b_K if bias else 0)
    for i, j in [(3, 3), (5, 1), (6, 0), (9, 4)]:  # the score depends on i - j only
        expect = (_rope(q, i, spec) * _rope(k, j, spec)).sum(-1)
        got = svtools.sad_terms(qk, x, y, offset=i - j).sum(-1)
        torch.testing.assert_close(got, expect)
    # each offset is an exact SVD of its own bilinear form
    for o in (0, 4):
        sub = qk.at_offset(o)
        eye = torch.eye(8, dtype=torch.float64).expand(3, 8, 8)
        torch.testing.assert_close(sub.U.transpose(-1, -2) @ sub.U, eye)


def test_offset_required_and_known():
    W_Q, W_K, _, _ = _weights(lead=(2,))
    spec = RotarySpec.from_base(2, range(3))
    qk = svtools.qk_svd(W_Q, W_K, rotary=spec)
    x = torch.randn(24, dtype=torch.float64)
    with pytest.raises(SVToolsError, match="offset"):
        svtools.sad_terms(qk, x, x)
    with pytest.raises(SVToolsError, match="not decomposed"):
        svtools.sad_terms(qk, x, x, offset=5)


def test_bad_inputs():
    W_Q, W_K, b_Q, b_K = _weights(lead=(2,))
    with pytest.raises(SVToolsError, match="W_K must have shape"):
        svtools.qk_svd(W_Q, W_K[..., :5])
    with pytest.raises(SVToolsError, match="b_Q must have shape"):
        svtools.qk_svd(W_Q, W_K, b_Q[..., :3])
    with pytest.raises(SVToolsError, match="broadcast"):
        svtools.qk_svd(W_Q, torch.randn(3, 24, 6, dtype=torch.float64))
    bad = W_Q.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(SVToolsError, match="non-finite"):
        svtools.qk_svd(bad, W_K)
    qk = svtools.qk_svd(W_Q, W_K, b_Q, b_K)
    with pytest.raises(SVToolsError, match="last dimension"):
        svtools.sad_terms(qk, torch.randn(10), torch.randn(24))
    with pytest.raises(SVToolsError, match="non-finite"):
        svtools.sad_terms(qk, torch.full((24,), float("nan")), torch.randn(24))
    with pytest.raises(SVToolsError, match="rotary_dim"):
        RotarySpec.from_base(3, range(2))


def test_random_rotation_is_orthogonal_and_seeded():
    Q = svtools.random_rotation((5,), 7, seed=3, dtype=torch.float64)
    torch.testing.assert_close(Q.transpose(-1, -2) @ Q, torch.eye(7, dtype=torch.float64).expand(5, 7, 7))
    torch.testing.assert_close(Q, svtools.random_rotation((5,), 7, seed=3, dtype=torch.float64))
    assert not torch.allclose(Q, svtools.random_rotation((5,), 7, seed=4, dtype=torch.float64))
