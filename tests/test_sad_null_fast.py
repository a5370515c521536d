"""The spectrum null's fast paths against the straightforward reference (:func:`spectrum_null` on full grids).

``rows_null`` (absolute positions) forms null scores only for the rows of rank-matched pairs and terms
only for the pairs; it must give the reference's numbers for the same rotations, in every mode the engine
uses (centred or not, absolute or relative scores, degenerate groups merged or not, matched or not).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from svtools.sad.null import (context_mean, haar_q, key_ranks, keys_of_rank, null_gaussians, null_rotations,
                              rows_null, spectrum_null, stable_ranks_of)


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
    assert torch.equal(keys_of_rank(s.expand(3, -1, -1), elig, want), order.gather(-1, want[:, None])[:, 0].expand(3, -1))


def test_the_bidirectional_problem_takes_the_bias_path(monkeypatch):
    """Guard for the test above: without a causal mask the eligibility is the key's alone."""
    from svtools.sad import rotary

    calls = []
    orig = rotary.GroupLayout.matmul_argmax
    monkeypatch.setattr(rotary.GroupLayout, "matmul_argmax",
                        lambda self, X, gather, shut=None, **kw: calls.append(shut is None) or orig(self, X, gather, shut, **kw))
    for causal in (False, True):
        pu, pv, S, O, pairs, match, mask, eligible, valid = _problem(causal=causal)
        rows_null(pu, pv, S, O, pairs, mask=mask, eligible=eligible, match=match)
    assert calls == [True, False]
