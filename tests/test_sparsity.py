"""N_recon, Rolls-Tovee, relative terms and the rotated control on hand-worked cases."""

from __future__ import annotations

import math

import pytest
import torch

import svtools
from svtools import SVToolsError, n_recon, rolls_tovee


def T(*v):
    return torch.tensor(v, dtype=torch.float64)


@pytest.mark.parametrize("terms,expect_n,expect_rt", [
    (T(0, 0, 2.5, 0), 1, 0.25),                # one-hot: one term, sparseness 1/r
    (T(1, 1, 1, 1), 4, 1.0),                   # uniform: all terms, sparseness 1
    (T(-3, 1, 0, 0), 1, 0.4),                  # negative total -2: -3 alone reaches it
    (T(5, -4, 1, 0), 1, 2.5 ** 2 / 10.5),      # total 2: the 5 overshoots; (10/4)^2 / (42/4)
    (T(1, 1, -1, 0.5), 2, (3.5 / 4) ** 2 / (3.25 / 4)),  # total 1.5 needs 1 + 1 (the 0.5 alone is not enough)
    (T(-1, -1, 1, -0.5), 2, (3.5 / 4) ** 2 / (3.25 / 4)),  # the mirror image
])
def test_hand_worked(terms, expect_n, expect_rt):
    assert int(n_recon(terms)) == expect_n
    assert math.isclose(float(rolls_tovee(terms)), expect_rt, rel_tol=1e-12)


def test_fraction():
    t = T(4, 3, 2, 1)
    assert int(n_recon(t, frac=0.5)) == 2  # 4 < 5 <= 7
    assert int(n_recon(t, frac=0.4)) == 1  # 4 >= 4
    assert int(n_recon(t, frac=1.0)) == 4


def test_zero_total():
    # nothing to reconstruct: the empty sum already equals the total
    assert int(n_recon(T(1, -1, 0, 0))) == 0
    assert int(n_recon(T(0, 0, 0))) == 0
    assert math.isclose(float(rolls_tovee(T(1, -1, 0, 0))), 0.5)
    assert math.isnan(float(rolls_tovee(T(0, 0, 0))))  # all-zero: undefined


def test_rounding_does_not_add_terms():
    t = torch.full((64,), 0.1, dtype=torch.float32)  # float32 partial sums fall short by rounding
    assert int(n_recon(t)) == 64
    one = torch.zeros(64, dtype=torch.float32)
    one[7] = 1.0
    one[8] = 1e-9  # well below float resolution of the total
    assert int(n_recon(one)) == 1


def test_batched_shapes_and_bounds():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 5, 16, generator=g)
    n, rt = n_recon(t), rolls_tovee(t)
    assert n.shape == (3, 5) and rt.shape == (3, 5)
    assert bool(((n >= 1) & (n <= 16)).all())
    assert bool(((rt >= 1 / 16 - 1e-6) & (rt <= 1 + 1e-6)).all())


def test_errors():
    with pytest.raises(SVToolsError, match="NaN"):
        n_recon(T(1, float("nan")))
    with pytest.raises(SVToolsError, match="NaN"):
        rolls_tovee(T(1, float("nan")))
    with pytest.raises(SVToolsError, match="frac"):
        n_recon(T(1, 2), frac=0)
    with pytest.raises(SVToolsError, match="r >= 1"):
        n_recon(torch.zeros(3, 0))


def test_relative_terms_identity_and_shift_invariance():
    g = torch.Generator().manual_seed(0)
    terms = torch.randn(2, 5, 5, 4, generator=g, dtype=torch.float64)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    rel = svtools.relative_terms(terms, mask)
    s = terms.sum(-1)
    q = 3
    expect = s[:, q, : q + 1] - (s[:, q, : q + 1].sum(-1, keepdim=True) - s[:, q, : q + 1]) / q
    torch.testing.assert_close(rel[:, q, : q + 1].sum(-1), expect)
    # adding the same vector to every key's terms of a query changes nothing
    shifted = terms + torch.randn(2, 5, 1, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(svtools.relative_terms(shifted, mask)[:, 1:][mask[1:].expand(2, 4, 5)],
                               rel[:, 1:][mask[1:].expand(2, 4, 5)])
    assert torch.isnan(rel[:, 0]).all() and torch.isnan(rel[:, 2, 3:]).all()
    with pytest.raises(SVToolsError, match="broadcast"):
        svtools.relative_terms(terms, torch.ones(4, 4, dtype=torch.bool))


def test_rotated_control_on_aligned_example():
    """A head whose features are its singular vectors: real terms one-hot, rotated ones dense."""
    d_model, d_head = 32, 8
    g = torch.Generator().manual_seed(5)
    basis, _ = torch.linalg.qr(torch.randn(d_model, 2 * d_head, generator=g, dtype=torch.float64))
    U0, V0 = basis[:, :d_head], basis[:, d_head:]
    sigma = torch.linspace(4.0, 0.5, d_head, dtype=torch.float64)
    qk = svtools.qk_svd(U0 * sigma, V0)  # Omega = U0 diag(sigma) V0^T
    idx = torch.arange(d_head)
    x, y = U0[:, idx].T, V0[:, idx].T  # query feature k meets key feature k, for each k
    real = svtools.sad_terms(qk, x, y)
    torch.testing.assert_close(real.sum(-1), sigma)
    assert bool((n_recon(real) == 1).all())
    torch.testing.assert_close(rolls_tovee(real), torch.full((d_head,), 1 / d_head, dtype=torch.float64))
    rt_rot = []
    for seed in range(5):
        rot = svtools.rotated_terms(qk, x, y, seed=seed)
        torch.testing.assert_close(rot.sum(-1), real.sum(-1))  # totals unchanged
        rt_rot.append(rolls_tovee(rot))
    rt_rot = torch.stack(rt_rot)
    # a random direction's squared coordinates have sparseness about (r + 2) / (3 r) = 0.42 here
    assert float(rt_rot.mean()) > 3 / d_head
    assert float(n_recon(svtools.rotated_terms(qk, x, y, seed=0)).float().mean()) > 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("frac", [1.0, 0.7])
def test_term_measures_equal_the_separate_measures(dtype, frac):
    """One check and one sort: the same n_recon and rolls_tovee as the functions, the stable order,
    its first index the dominant term; ties, zero rows and negative totals included; past the
    4096-row blocks too."""
    from svtools.sparsity import term_measures

    g = torch.Generator().manual_seed(0)
    t = (torch.randn(9000, 16, generator=g) * torch.rand(9000, 1, generator=g) ** 4).to(dtype)
    t[:500] = t[:500].round()  # many exact ties
    t[500:520] = 0  # no total at all
    t[520:540, :2] = torch.tensor([1.0, -1.0], dtype=dtype)  # totals within rounding of zero
    m = term_measures(t, frac)
    assert torch.equal(m["n_recon"], n_recon(t, frac))
    torch.testing.assert_close(m["rolls_tovee"], rolls_tovee(t), equal_nan=True, rtol=0, atol=0)
    sgn = torch.where(t.sum(-1, keepdim=True) < 0, -1.0, 1.0).to(dtype)
    order = torch.argsort(sgn * t, dim=-1, descending=True, stable=True)
    assert torch.equal(m["order"], order) and torch.equal(m["dominant_k"], order[:, 0])
    assert torch.equal(m["score"], t.sum(-1))
    short = term_measures(t, frac, order=False)
    assert "order" not in short and torch.equal(short["dominant_k"], order[:, 0])
    assert torch.equal(short["n_recon"], m["n_recon"])


@pytest.mark.parametrize("frac", [1.0, 0.6])
def test_term_measures_partial_n_recon_matches_full_sort(frac):
    """order=False reads the largest terms first (topk) and sorts only rows that need more: the same N_recon."""
    from svtools.sparsity import _PARTIAL_K, term_measures

    g = torch.Generator().manual_seed(1)
    t = torch.randn(6000, 32, generator=g).abs() + 0.1  # dense rows of one sign: N_recon above _PARTIAL_K
    t[3000:] = t[3000:] ** 3  # heavy tails: mostly below
    t[:300] = t[:300].round()  # ties
    t[300:320] = 0
    t[320:400] -= t[320:400].mean(-1, keepdim=True)  # totals near zero
    got = term_measures(t, frac, order=False)["n_recon"]
    want = n_recon(t, frac)
    assert bool((want <= _PARTIAL_K).any()) and bool((want > _PARTIAL_K).any())
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("frac", [1.0, 0.6])
def test_dense_measures_equal_term_measures(dtype, frac):
    """The spectrum null's measures: rolls_tovee and n_recon bit for bit as term_measures gives them,
    for rows that need fewer and more than the r // 4 largest terms it reads first, ties, zero rows, totals near
    zero, past the 4096-row blocks; a wrong shape is named."""
    from svtools.sparsity import dense_measures, term_measures

    _DENSE_K = 64 // 4  # the largest terms dense_measures reads first at r = 64

    g = torch.Generator().manual_seed(2)
    t = (torch.randn(9000, 64, generator=g) + 0.3).to(dtype)  # mixed signs
    t[:3000] = t[:3000].abs() + 0.1  # dense rows of one sign: N_recon above _DENSE_K
    t[4500:] = t[4500:] ** 3  # heavy tails: mostly below
    t[:300] = t[:300].round()
    t[300:320] = 0
    t[320:400] -= t[320:400].mean(-1, keepdim=True)
    rt, nr = dense_measures(t, frac)
    want = term_measures(t, frac, order=False)
    assert bool((want["n_recon"] <= _DENSE_K).any()) and bool((want["n_recon"] > _DENSE_K).any())
    assert torch.equal(nr, want["n_recon"]) and torch.equal(nr, n_recon(t, frac))
    torch.testing.assert_close(rt, want["rolls_tovee"], equal_nan=True, rtol=0, atol=0)
    assert rt.dtype == dtype
    with pytest.raises(SVToolsError, match="shape"):
        dense_measures(t[0], frac)
