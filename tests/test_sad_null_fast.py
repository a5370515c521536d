"""The spectrum null's fast paths against the straightforward reference (:func:`spectrum_null` on full grids).

``rows_null`` (absolute positions) forms null scores only for the rows of rank-matched pairs and terms
only for the pairs; it must give the reference's numbers for the same rotations, in every mode the engine
uses (centred or not, absolute or relative scores, degenerate groups merged or not, matched or not).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from svtools.sad.null import context_mean, key_ranks, null_gaussians, null_rotations, spectrum_null
from svtools.sad.null_fast import keys_of_rank, rotary_rows_null, rows_null, stable_ranks_of


def _problem(seed=0, B=4, H=3, n=11, d=14, r=6, degenerate=False, causal=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, d, generator=g, dtype=torch.float64) + 0.7  # a mean, as in a residual stream
    U = torch.linalg.qr(torch.randn(H, d, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(H, d, r, generator=g, dtype=torch.float64))[0]
    S = torch.sort(torch.rand(H, r, generator=g, dtype=torch.float64) * 3 + 0.1, descending=True).values
    if degenerate:
        S[1, 2:4] = S[1, 2]  # a two-fold group in head 1
    pu, pv = torch.einsum("bnd,hdr->bhnr", x, U), torch.einsum("bnd,hdr->bhnr", x, V)
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[1, 8:] = False  # a padded prompt
    mask = (torch.tril(torch.ones(n, n, dtype=torch.bool)) if causal else torch.ones(n, n, dtype=torch.bool)) \
        & valid[:, None, :]
    eligible = mask & valid[:, :, None]
    eligible[..., 0] = False
    G_q, G_k = null_gaussians(seed, 5, d, r, [(0, h) for h in range(H)])
    O = (null_rotations(U, G_q), null_rotations(V, G_k))  # (draw, head, r, r)
    # pairs: the top eligible key of some rows (rank 0), deeper ranks, and unmatched pairs
    scores = (pu * S[None, :, None, :]) @ pv.transpose(-1, -2)
    _, order = key_ranks(scores, eligible[:, None].expand_as(scores))
    bb, hh, qq = torch.meshgrid(torch.arange(B), torch.arange(H), torch.arange(2, n), indexing="ij")
    ok = valid[bb, qq]
    top = torch.stack([bb[ok], hh[ok], qq[ok], order[bb, hh, qq, 0][ok]], -1)
    deep = torch.stack([bb[ok], hh[ok], qq[ok], order[bb, hh, qq, 1][ok]], -1)[::3]
    rnd = mask[:, None].expand(B, H, n, n).nonzero()
    rnd = rnd[torch.randperm(len(rnd), generator=g)[:60]]
    pairs = torch.cat([top, deep, rnd])
    match = torch.cat([torch.ones(len(top) + len(deep), dtype=torch.bool), torch.zeros(len(rnd), dtype=torch.bool)])
    return pu, pv, S, O, pairs, match, mask, eligible, valid


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("merge", [None, 1e-5])
@pytest.mark.parametrize("causal", [True, False])
def test_rows_null_equals_the_grid_reference(center, relative, merge, causal):
    """Causal masks take the masked path, bidirectional ones (eligibility by key only) the bias column."""
    pu, pv, S, O, pairs, match, mask, eligible, valid = _problem(degenerate=merge is not None, causal=causal)
    ma = context_mean(pu, valid[:, None, :], dims=(-2,))[:, :, 0] if center else None
    mc = context_mean(pv, valid[:, None, :], dims=(-2,))[:, :, 0] if center else None
    csum = torch.einsum("bqk,bhkr->bhqr", mask.double(), pv)
    fast = rows_null(pu, pv, S, O, pairs, mask=mask, eligible=eligible, match=match, mean_a=ma, mean_c=mc,
                     key_sum=csum if relative else None, merge_tol=merge, block_bytes=4096)  # many small blocks
    A, C = pu[:, :, :, None, :], pv[:, :, None, :, :]
    ref = spectrum_null(A, C, S[None, :, None, None, :], pairs, (O[0][:, :, None, None], O[1][:, :, None, None]),
                        mask=mask[:, None], eligible=eligible[:, None], match=match,
                        mean_a=None if ma is None else ma[:, :, None, None], relative=relative,
                        mean_c=None if mc is None else mc[:, :, None, None], merge_tol=merge)
    assert fast["draws"].tolist() == ref["draws"].tolist()
    ok = ~torch.isnan(ref["rolls_tovee"])
    assert bool(ok.float().mean() > 0.8) and torch.equal(ok, ~torch.isnan(fast["rolls_tovee"]))
    np.testing.assert_allclose(fast["rolls_tovee"][ok].numpy(), ref["rolls_tovee"][ok].numpy(), rtol=1e-10)
    np.testing.assert_allclose(fast["n_recon"][ok].numpy(), ref["n_recon"][ok].numpy(), rtol=1e-12)
    # the test can fail: another draw's rotations give other numbers
    other = rows_null(pu, pv, S, (O[0].flip(0), O[1]), pairs, mask=mask, eligible=eligible, match=match,
                      mean_a=ma, mean_c=mc, key_sum=csum if relative else None, merge_tol=merge)
    assert not torch.allclose(other["rolls_tovee"][ok], ref["rolls_tovee"][ok])


def test_rank_helpers_agree_with_a_stable_sort():
    g = torch.Generator().manual_seed(1)
    s = torch.randint(0, 4, (50, 9), generator=g).double()  # many exact ties
    elig = torch.rand(50, 9, generator=g) < 0.7
    rank, order = key_ranks(s, elig)
    key = torch.randint(0, 9, (50,), generator=g)
    assert torch.equal(stable_ranks_of(s, elig, key), rank.gather(-1, key[:, None])[:, 0])
    want = torch.randint(0, 9, (50,), generator=g)
    want[:20] = 0
    assert torch.equal(keys_of_rank(s, elig, want), order.gather(-1, want[:, None])[:, 0])
    want_keys = order.gather(-1, want[:, None])[:, 0]
    assert torch.equal(keys_of_rank(s.expand(3, -1, -1), elig, want), want_keys.expand(3, -1))


def test_the_bidirectional_problem_takes_the_bias_path(monkeypatch):
    """Guard for the test above: without a causal mask the eligibility is the key's alone."""
    from svtools.sad import rotary

    calls = []
    orig = rotary.GroupLayout.matmul_argmax
    def spy(self, X, gather, shut=None, **kw):
        calls.append(shut is None)
        return orig(self, X, gather, shut, **kw)

    monkeypatch.setattr(rotary.GroupLayout, "matmul_argmax", spy)
    for causal in (False, True):
        pu, pv, S, O, pairs, match, mask, eligible, valid = _problem(causal=causal)
        rows_null(pu, pv, S, O, pairs, mask=mask, eligible=eligible, match=match)
    assert calls == [True, False]


@pytest.mark.parametrize("merge", [None, 1e-5])
@pytest.mark.parametrize("spread", [0.01, 0.5])
def test_rotary_rows_null_equals_the_grid_reference(merge, spread):
    """One rotary head: offset-dependent spectra (nearly constant, and varying by half, which leaves many
    candidate keys), kept means per offset, rank-0, deeper and unmatched pairs, a padded prompt."""
    g = torch.Generator().manual_seed(5)
    B, n, d, r, D = 3, 10, 6, 5, 4
    S = torch.sort(torch.rand(r, generator=g, dtype=torch.float64) + 0.5, descending=True).values
    S = S * (1 + spread * torch.rand(n, r, generator=g, dtype=torch.float64))  # (offset, r)
    if merge is not None:
        S[:, 1] = S[:, 2]  # a degenerate pair at every offset
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    qdev, kdev = rnd(B, n, d), rnd(B, n, d)
    N = (rnd(D, d, r), rnd(D, d, r))
    mA, mC = rnd(B, n, r), rnd(B, n, r)
    pos = torch.arange(n)
    off = (pos[:, None] - pos[None, :]).clamp_min(0)
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[2, 7:] = False
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool)) & valid[:, None, :]
    eligible = mask & valid[:, :, None]
    eligible[..., 0] = False
    A = torch.randn(B, n, n, r, generator=g, dtype=torch.float64)  # any real projections: only their ranks matter
    C = torch.randn(B, n, n, r, generator=g, dtype=torch.float64)
    real = (A * S[off] * C).sum(-1)
    _, order = key_ranks(real, eligible)
    bq = [(b_, q_) for b_ in range(B) for q_ in range(2, n) if valid[b_, q_]]
    top = torch.tensor([(b_, q_, int(order[b_, q_, 0])) for b_, q_ in bq])
    deep = torch.tensor([(b_, q_, int(order[b_, q_, 1])) for b_, q_ in bq[::2]])
    rnd = mask.nonzero()[torch.randperm(int(mask.sum()), generator=g)[:25]]
    pairs = torch.cat([top, deep, rnd])
    match = torch.arange(len(pairs)) < len(top) + len(deep)
    fast = rotary_rows_null(qdev, kdev, N, mA, mC, S, real, pairs, eligible=eligible, match=match, merge_tol=merge)
    da, dc = qdev @ N[0][:, None], kdev @ N[1][:, None]
    ref = spectrum_null(A, C, S[off], pairs, draws=D,
                        projections=lambda i: (mA[:, off] + da[i][:, :, None], mC[:, off] + dc[i][:, None]),
                        mask=mask, eligible=eligible, match=match, merge_tol=merge)
    ok = ~torch.isnan(ref["rolls_tovee"])
    assert bool(ok.all()) and fast["draws"].tolist() == ref["draws"].tolist()
    np.testing.assert_allclose(fast["rolls_tovee"].numpy(), ref["rolls_tovee"].numpy(), rtol=1e-10)
    np.testing.assert_allclose(fast["n_recon"].numpy(), ref["n_recon"].numpy(), rtol=1e-12)


def test_rotary_rows_null_refuses_keys_after_their_query():
    """Its offset-indexed views read meaningless values where k > q: such keys must not be eligible."""
    from svtools import SVToolsError

    g = torch.Generator().manual_seed(0)
    B, n, d, r, D = 1, 5, 3, 3, 2
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    args = (rnd(B, n, d), rnd(B, n, d), (rnd(D, d, r), rnd(D, d, r)), rnd(B, n, r), rnd(B, n, r),
            torch.ones(n, r), rnd(B, n, n), torch.tensor([[0, 3, 1]]))
    causal = torch.tril(torch.ones(B, n, n, dtype=torch.bool))
    out = rotary_rows_null(*args, eligible=causal, match=torch.tensor([True]))
    assert out["draws"].tolist() == [D]
    with pytest.raises(SVToolsError, match="after its query"):
        rotary_rows_null(*args, eligible=torch.ones(B, n, n, dtype=torch.bool), match=torch.tensor([True]))


def test_null_cache_keeps_copies_and_keys_on_weights():
    from svtools.sad import engine

    engine.clear_null_cache()
    calls = []

    def make():
        calls.append(1)
        return torch.randn(2, 3, generator=torch.Generator().manual_seed(len(calls))), torch.zeros(2)

    U = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    a = engine._null_cached(("O", 0, 16, 1, (0,), torch.float32, "cpu", engine._digest(U)), make)
    a[0].fill_(7.0)  # a caller's copy: the kept entry is unchanged
    b = engine._null_cached(("O", 0, 16, 1, (0,), torch.float32, "cpu", engine._digest(U)), make)
    assert len(calls) == 1 and not bool((b[0] == 7.0).any())
    U2 = U.clone()
    U2[0, 0] += 1e-6  # other weights: another key, computed again
    assert engine._digest(U2) != engine._digest(U)
    engine._null_cached(("O", 0, 16, 1, (0,), torch.float32, "cpu", engine._digest(U2)), make)
    assert len(calls) == 2
    engine.clear_null_cache()
    engine._null_cached(("O", 0, 16, 1, (0,), torch.float32, "cpu", engine._digest(U)), make)
    assert len(calls) == 3
    engine.clear_null_cache()
