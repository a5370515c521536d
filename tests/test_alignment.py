"""Tests of svtools.alignment and svtools.geometry: closed forms and constructed cases."""

import math

import pytest
import torch

from svtools import SVToolsError, qk_svd
from svtools.alignment import abs_cosines, chance_cosine, match_pairs
from svtools.geometry import feature_dimensionality, gram, max_interference, outside_energy, span_dims


def _orthonormal(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return Q


def _planted(D=8, P=3, seed=0):
    """Features = orthonormal columns; Omega = sum_p s_p w_{i_p} w_{j_p}^T with shuffled strengths."""
    Q = _orthonormal(D, seed)
    pairs = [(0, 3), (1, 4), (2, 5)][:P]
    strengths = [1.0, 3.0, 2.0][:P]
    omega = sum(s * torch.outer(Q[:, i], Q[:, j]) for (i, j), s in zip(pairs, strengths))
    # factor Omega = A B^T with A, B of shape (D, H): A = Omega, B = I works for qk_svd
    qk = qk_svd(omega, torch.eye(D, dtype=torch.float64))
    return Q, pairs, strengths, qk


def test_chance_cosine_closed_forms():
    assert chance_cosine(2) == pytest.approx(2 / math.pi)
    assert chance_cosine(3) == pytest.approx(0.5)
    assert chance_cosine(1) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200_000, 10, generator=g, dtype=torch.float64)
    mc = (x[:, 0].abs() / x.norm(dim=1)).mean().item()
    assert chance_cosine(10) == pytest.approx(mc, abs=3e-3)
    with pytest.raises(SVToolsError):
        chance_cosine(0)


def test_match_pairs_recovers_planted_pairs_out_of_order():
    Q, pairs, strengths, qk = _planted()
    al = match_pairs(Q, qk, pairs)
    # singular values sorted: 3 (pair 1), 2 (pair 2), 1 (pair 0)
    assert al.index.tolist() == [2, 0, 1]
    assert torch.allclose(al.cos_q, torch.ones(3, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(al.cos_k, torch.ones(3, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(al.sigma, torch.tensor(strengths, dtype=torch.float64), atol=1e-10)
    assert al.n_aligned(0.99) == 3
    assert al.best.tolist() == al.index.tolist()
    assert al.cos_U.shape == (8, 8) and al.chance == pytest.approx(chance_cosine(8))


def test_match_pairs_is_sign_invariant_and_accepts_triples():
    Q, pairs, strengths, qk = _planted()
    flipped = Q * torch.tensor([-1.0, 1, -1, -1, 1, 1, -1, 1], dtype=torch.float64)
    a = match_pairs(Q, qk, pairs)
    b = match_pairs(flipped, qk, [(i, j, s) for (i, j), s in zip(pairs, strengths)])
    assert a.index.tolist() == b.index.tolist()
    assert torch.allclose(a.cos_q, b.cos_q) and torch.allclose(a.cos_k, b.cos_k)


def test_match_pairs_more_pairs_than_rank():
    D = 6
    Q = _orthonormal(D, 3)
    omega = 2.0 * torch.outer(Q[:, 0], Q[:, 3]) + 1.0 * torch.outer(Q[:, 1], Q[:, 4])
    A, B = omega @ Q[:, [3, 4]], Q[:, [3, 4]]           # rank-2 factors, H = 2
    qk = qk_svd(A, B)
    al = match_pairs(Q, qk, [(0, 3), (1, 4), (2, 5)])
    assert al.index.tolist()[:2] == [0, 1] and al.index[2] == -1
    assert math.isnan(al.cos_q[2]) and math.isnan(al.sigma[2])
    assert 0 <= int(al.best[2]) < 2
    assert al.n_aligned(0.9) == 2


def test_match_pairs_rejects_bad_input():
    Q, pairs, _, qk = _planted()
    with pytest.raises(SVToolsError, match="features"):
        match_pairs(Q[:, :, None], qk, pairs)
    with pytest.raises(SVToolsError, match="d_model"):
        match_pairs(Q[:5], qk, pairs)
    with pytest.raises(SVToolsError, match="must lie in"):
        match_pairs(Q, qk, [(0, 99)])
    with pytest.raises(SVToolsError, match="empty"):
        match_pairs(Q, qk, [])
    bad = Q.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(SVToolsError, match="non-finite"):
        match_pairs(bad, qk, pairs)
    with pytest.raises(SVToolsError, match="QKSVD"):
        match_pairs(Q, qk.omega(), pairs)


def test_abs_cosines_scale_invariant():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=g), torch.randn(5, 4, generator=g)
    c = abs_cosines(a, b)
    assert torch.allclose(c, abs_cosines(-3 * a, 0.5 * b), atol=1e-6)
    assert float(c.max()) <= 1 + 1e-6


def test_feature_dimensionality_known_cases():
    Q = _orthonormal(4)
    assert torch.allclose(feature_dimensionality(Q), torch.ones(4, dtype=torch.float64))
    W = torch.stack([Q[:, 0], -Q[:, 0], Q[:, 1], torch.zeros(4, dtype=torch.float64)], dim=1)
    assert torch.allclose(feature_dimensionality(W), torch.tensor([0.5, 0.5, 1.0, 0.0], dtype=torch.float64))
    # three unit vectors at 120 degrees in a plane: each has 1 / (1 + 2 * 1/4) = 2/3
    ang = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3], dtype=torch.float64)
    tri = torch.stack([ang.cos(), ang.sin()])
    assert torch.allclose(feature_dimensionality(tri), torch.full((3,), 2 / 3, dtype=torch.float64))


def test_interference_span_and_outside_energy():
    Q = _orthonormal(5, 2)
    assert torch.allclose(max_interference(Q), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    W = torch.cat([Q, 2 * Q[:, :1]], dim=1)        # feature 5 duplicates feature 0
    mi = max_interference(W, [0, 5, 1])
    assert torch.allclose(mi, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), atol=1e-12)
    mix = Q[:, :3] @ torch.randn(3, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    W2 = torch.cat([Q[:, 3:], mix], dim=1)          # features 2.. live in span(Q[:, :3])
    assert span_dims(W2, range(2, 9)) == 3
    assert float(outside_energy(W2, range(2, 9), [0, 1])) == pytest.approx(0.0, abs=1e-12)
    assert float(outside_energy(W2, [0], [0, 1])) == pytest.approx(1.0)
    assert torch.allclose(gram(Q), torch.eye(5, dtype=torch.float64), atol=1e-12)
    with pytest.raises(SVToolsError, match="which"):
        max_interference(Q, [7])
