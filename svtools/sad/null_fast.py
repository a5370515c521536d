"""Fast forms of the spectrum null (:mod:`svtools.sad.null`) that :func:`svtools.sad.head_sparsity` uses.

Same numbers as :func:`svtools.sad.null.spectrum_null` on full grids (up to the float rounding of
null scores that tie within rounding; tests compare them), at a fraction of the cost: only what
the measured pairs need is formed.

* :func:`rows_null` (absolute positions): per draw, the null head's scores only for the query rows
  that carry a rank-matched pair, as ``w . (y~_k^T V - m_c)`` with one ``r``-vector ``w`` per row
  and draw; each row reduced to its first largest key as the scores are formed (deeper ranks:
  those rows sorted); the terms only for the pairs; all draws in batched products grouped by head.
* :func:`rotary_rows_null` (rotary heads, absolute scores): the null head's projections do not
  depend on the offset, so its scores are matrix products plus one offset-dependent part that is
  bounded; only keys that can rank first are scored exactly.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from svtools._checks import SVToolsError
from svtools.qk import degenerate_groups
from svtools.sad.null import canonical_means
from svtools.sad.rotary import GroupLayout
from svtools.sparsity import dense_measures
from svtools.terms import merge_groups

__all__ = ["ROWS_BLOCK_BYTES", "rows_null", "rotary_rows_null", "stable_ranks_of", "keys_of_rank"]

#: :func:`rows_null` works on blocks of rows and pairs whose per-draw scratch stays under this many bytes.
ROWS_BLOCK_BYTES = 32 * 2**20


def _grouped(parts: Sequence[Tensor], groups: Sequence[Tensor], n_groups: int,
             gather: Callable[[Tensor], Tensor]) -> list[Tensor]:
    """``parts[i][j] @ gather(g)[0]`` for ``g = groups[i][j]``: each row times its group's matrix, as a few
    batched products over groups of rows (:class:`svtools.sad.rotary.GroupLayout`), each matrix read once."""
    lay = GroupLayout(torch.cat(list(groups)), n_groups)
    Y = lay.matmul(lay.place(list(parts)), gather)
    out, at = [], 0
    for p in parts:
        out.append(lay.rows(Y, at, at + len(p)))
        at += len(p)
    return out


def _by_head(X: Tensor, head: Tensor, mats: Tensor) -> Tensor:
    """``X[d, p] @ mats[d, head[p]]`` for ``X (draw or 1, pair, r)``, ``mats (draw, head, r, s)``: one batched
    product over draws per head (heads are few; no per-pair matrices, no padding)."""
    D = mats.shape[0]
    out = X.new_empty((D, X.shape[1], mats.shape[-1]))
    order = torch.argsort(head, stable=True)
    bounds = torch.cumsum(torch.bincount(head, minlength=mats.shape[1]), 0).tolist()
    s0 = 0
    for h, s1 in enumerate(bounds):
        if s1 > s0:
            idx = order[s0:s1]
            out[:, idx] = torch.matmul(X[:, idx], mats[:, h])
        s0 = s1
    return out


def stable_ranks_of(scores: Float[Tensor, "pair key"], eligible: Bool[Tensor, "pair key"],
                    key: Int[Tensor, "pair"]) -> Int[Tensor, "pair"]:
    """Rank of ``key`` in its row as :func:`key_ranks` gives it (descending, stable, ineligible keys last
    in key order), without sorting: counts of the keys before it."""
    ar = torch.arange(scores.shape[-1], device=scores.device)
    s_k = scores.gather(-1, key[:, None])
    before = ar[None, :] < key[:, None]
    el_k = eligible.gather(-1, key[:, None])[:, 0]
    above = eligible & ((scores > s_k) | ((scores == s_k) & before))
    return torch.where(el_k, above.sum(-1), eligible.sum(-1) + (~eligible & before).sum(-1))


def keys_of_rank(scores: Float[Tensor, "... row key"], eligible: Bool[Tensor, "row key"],
                 rank: Int[Tensor, "row"]) -> Int[Tensor, "... row"]:
    """The key of rank ``rank`` in each row (:func:`key_ranks`' ``order[..., rank]``): the first largest
    eligible score for rank 0 (no sort), a stable sort of the other rows only."""
    s = torch.where(eligible, scores, torch.full((), -float("inf"), dtype=scores.dtype, device=scores.device))
    out = s.argmax(-1)
    deep = (rank > 0).nonzero()[:, 0]
    if len(deep):
        order = torch.sort(s[..., deep, :], dim=-1, descending=True, stable=True).indices
        out[..., deep] = order.gather(-1, rank[deep].expand(order.shape[:-1])[..., None])[..., 0]
    return out


def rows_null(
    pu: Float[Tensor, "batch head pos r"],
    pv: Float[Tensor, "batch head pos r"],
    S: Float[Tensor, "head r"],
    rotations: tuple[Float[Tensor, "draw head r r"], Float[Tensor, "draw head r r"]],
    pairs: Int[Tensor, "pair 4"],
    *,
    mask: Bool[Tensor, "batch query key"],
    eligible: Bool[Tensor, "batch query key"],
    match: Bool[Tensor, "pair"] | bool = True,
    mean_a: Optional[Float[Tensor, "batch head r"]] = None,
    mean_c: Optional[Float[Tensor, "batch head r"]] = None,
    key_sum: Optional[Float[Tensor, "batch head pos r"]] = None,
    frac: float = 1.0,
    merge_tol: Optional[float] = None,
    block_bytes: int = ROWS_BLOCK_BYTES,
) -> dict[str, Tensor]:
    """:func:`spectrum_null` for absolute-position heads, computing only what the measured pairs need.

    The same numbers as :func:`spectrum_null` on the grids ``a = pu[..., :, None, :]``,
    ``c = pv[..., None, :, :]``, ``S[None, :, None, None]`` with rotations
    ``(O_q[:, :, None, None], O_k[:, :, None, None])`` (up to float rounding: a key whose null
    score ties another's within rounding may be ranked the other way), at a fraction of the
    cost: per draw, the null head's scores are formed only for the query rows of rank-matched
    pairs, as ``w . (y~_k^T V - m_c)`` with ``w = (x~'^T S) O_k^T`` one ``r``-vector per row
    (the row's constant ``x~'^T S m_c'`` does not change ranks, so it is left out); the real
    ranks come from the same rows' real scores; the terms only for the pairs; all draws at
    once, in batched products grouped by head (no loop over heads or draws).

    ``pu, pv``: the real projections ``x~^T U``, ``y~^T V`` of every position; ``S (head, r)``;
    ``rotations``: ``(O_q, O_k)``, each ``(draw, head, r, r)`` (:func:`null_rotations`);
    ``pairs``: ``(batch, head, query, key)`` rows; ``mask``/``eligible``: ``(batch, query,
    key)``; ``mean_a``/``mean_c``: the context means kept by centring (None: uncentred);
    ``key_sum``: relative attention, each query's sum of key projections over its visible keys
    (``sum_k mask[q, k] pv[k]``; None: absolute scores); ``frac``, ``merge_tol`` as in
    :func:`spectrum_null`. Memory: blocks of rows and pairs whose scratch stays under
    ``block_bytes``.

    Returns ``rolls_tovee``, ``n_recon`` (float means over draws) and ``draws`` (int), each ``(pair,)``.
    """
    O_q, O_k = (o.to(dtype=pu.dtype, device=pu.device) for o in rotations)
    D, H, r = O_q.shape[0], pu.shape[1], pu.shape[-1]
    if O_q.shape != (D, H, r, r) or O_k.shape != O_q.shape:
        raise SVToolsError(f"rotations must be two (draw, head={H}, r={r}, r) tensors, got "
                           f"{tuple(O_q.shape)} and {tuple(O_k.shape)}")
    B, n, dev, dt = pu.shape[0], pu.shape[2], pu.device, pu.dtype
    P = len(pairs)
    zero = torch.zeros((), dtype=dt, device=dev)
    if mean_a is not None and mean_c is not None:
        ca, cc = canonical_means(mean_a, mean_c, S[None], merge_tol) if merge_tol is not None else (mean_a, mean_c)
        ma, mc = mean_a, mean_c
    else:
        ca = cc = ma = mc = torch.zeros(B, H, r, dtype=dt, device=dev)
    b, h, q, k = pairs.unbind(-1)
    match_t = torch.as_tensor(match, device=dev).expand(P)
    Sd = S.to(dt)
    dd = torch.arange(D, device=dev)[:, None]
    key = k.expand(D, P).clone()  # the null pair's key per draw
    mi = match_t.nonzero()[:, 0]
    if len(mi):
        code = (b[mi] * H + h[mi]) * n + q[mi]
        rows, inv = torch.unique(code, return_inverse=True)
        rb, rh, rq = rows // (H * n), (rows // n) % H, rows % n
        # the keys' deviations from the context mean: null scores are w . (y~_k^T V - m_c) plus a
        # constant per row; real scores (x~^T U S) . (y~_k^T V - m_c) are off by one too (ranks unchanged)
        keys = (pv - mc[:, :, None, :]).reshape(B * H, n, r)
        keys_t = lambda g: keys[g].transpose(-1, -2)  # noqa: E731
        # where a key's eligibility does not depend on the query (no causal mask), it rides in the product:
        # an extra coordinate, 0 for eligible keys and -inf for the others, met by a 1 in every row
        ek = eligible.any(1)  # (batch, key): eligible for some query
        key_only = bool((eligible == (ek[:, None, :] & eligible.any(2, keepdim=True))).all())
        if key_only:  # (checked again on the rows measured: a row without eligible keys takes the other path)
            bias = torch.zeros(B, n, 1, dtype=dt, device=dev).masked_fill_(~ek[..., None], -float("inf"))
            keys_b = torch.cat([keys, bias[:, None].expand(B, H, n, 1).reshape(B * H, n, 1)], -1)
        M = O_q @ (Sd[None, :, :, None] * O_k.transpose(-1, -2))  # (draw, head, r, r): O_q S O_k^T
        W0 = torch.einsum("bhr,dhsr->dbhs", ca * Sd, O_k)  # ca S O_k^T per (draw, batch, head)
        neg = torch.full((), -float("inf"), dtype=dt, device=dev)
        per = max(1, block_bytes // max(1, D * (r + 2) * (pu.element_size() + 1) * 4))
        for r0 in range(0, len(rows), per):
            bb, hh, qq = rb[r0:r0 + per], rh[r0:r0 + per], rq[r0:r0 + per]
            R = len(bb)
            g_bh = bb * H + hh
            sel = (inv >= r0) & (inv < r0 + R)
            pi, ri = mi[sel], inv[sel] - r0
            xa = pu[bb, hh, qq]
            elig = eligible[bb, qq]  # (rows, key)
            # the real ranks of the pairs' keys (from scores off by a constant per row: ranks unchanged)
            real = _grouped([xa * Sd[hh]], [g_bh], B * H, keys_t)[0]
            rk = stable_ranks_of(real[ri], elig[ri], k[pi])
            # w = (ca + (a - m) O_q) S O_k^T, every draw: the null scores of row i are w[d, i] . keys + const
            w = _by_head((xa - ma[bb, hh])[None], hh, M) + W0[:, bb, hh]
            # rank 0: the first largest null score, the scores formed and reduced block by block
            lay = GroupLayout(g_bh.repeat(D), B * H)
            if key_only and bool((elig == ek[bb]).all()):
                top = lay.matmul_argmax(lay.place([torch.cat([w.view(D * R, r), torch.ones(D * R, 1, dtype=dt,
                                                                                           device=dev)], -1)]),
                                        lambda g: keys_b[g].transpose(-1, -2))
            else:
                shut = torch.ones(lay.size, n, dtype=torch.bool, device=dev)  # padding rows stay shut
                shut.index_copy_(0, lay.cell, (~elig).repeat(D, 1))
                top = lay.matmul_argmax(lay.place([w.view(D * R, r)]), keys_t, shut)
                del shut
            pick = top[lay.cell].view(D, R)[:, ri]  # (draw, pair)
            deep = (rk > 0).nonzero()[:, 0]
            if len(deep):  # the other ranks: those rows' scores again, and a stable sort
                rd = ri[deep]
                s = _grouped([w[:, rd].reshape(-1, r)], [g_bh[rd].repeat(D)], B * H, keys_t)[0]
                s = s.view(D, len(rd), n).masked_fill_(~elig[rd], neg)
                order = torch.sort(s, dim=-1, descending=True, stable=True).indices
                pick[:, deep] = order.gather(-1, rk[deep].expand(D, -1)[..., None])[..., 0]
            key[:, pi] = pick
            del w, real, lay
    # the terms of the null pairs, all draws, blocks of pairs
    rt_sum = torch.zeros(P, dtype=torch.float64, device=dev)
    nr_sum = torch.zeros_like(rt_sum)
    cnt_ok = torch.zeros_like(rt_sum)
    per = max(1, block_bytes // max(1, D * r * pu.element_size() * 8))
    relative = key_sum is not None
    first = None
    if merge_tol is not None:
        first = degenerate_groups(Sd, merge_tol)
        if bool((first == torch.arange(r, device=dev)).all()):
            first = None
    if relative:
        nvis = mask.sum(-1).to(dt)  # (batch, query)
    for p0 in range(0, P, per):
        sl = slice(p0, p0 + per)
        pb, ph, pq, pk = b[sl], h[sl], q[sl], key[:, sl]
        m = len(pb)
        xa = (pu[pb, ph, pq] - ma[pb, ph])[None]
        xc = pv[pb[None], ph[None], pk] - mc[pb, ph][None]
        an = ca[pb, ph] + _by_head(xa, ph, O_q)
        cn = cc[pb, ph] + _by_head(xc, ph, O_k)
        if relative:
            cnt = nvis[pb, pq]
            ksum = _by_head((key_sum[pb, ph, pq] - cnt[:, None] * mc[pb, ph])[None], ph, O_k)
        SS = Sd[ph]
        t = an * SS * cn
        if relative:
            tot = an * SS * (cnt[:, None] * cc[pb, ph] + ksum)
            t = t - (tot - t) / (cnt - 1).clamp_min(1)[:, None]
            t = torch.where((cnt >= 2)[:, None], t, torch.full_like(t, float("nan")))
        if first is not None:  # merge_degenerate with each head's groups, found once
            t = merge_groups(t, first[ph].expand(D, m, r))
        t = t.reshape(D * m, r)
        ok = ~torch.isnan(t).any(-1)
        t = torch.where(ok[:, None], t, torch.ones_like(t))
        rt, nr = dense_measures(t, frac)
        rt = rt.double().view(D, m)
        ok = ok.view(D, m) & ~torch.isnan(rt)
        rt_sum[sl] = torch.where(ok, rt, 0.0).sum(0)
        nr_sum[sl] = torch.where(ok, nr.double().view(D, m), 0.0).sum(0)
        cnt_ok[sl] = ok.double().sum(0)
    nan = torch.full_like(cnt_ok, float("nan"))
    return {"rolls_tovee": torch.where(cnt_ok > 0, rt_sum / cnt_ok.clamp_min(1), nan),
            "n_recon": torch.where(cnt_ok > 0, nr_sum / cnt_ok.clamp_min(1), nan), "draws": cnt_ok.to(torch.int64)}


def _after_pad(shape: tuple[int, ...], pad: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """A contiguous tensor of ``shape`` with ``pad`` zeros before it in its storage: ``(flat, out)``, with
    ``flat`` the whole storage. Views that reach up to ``pad`` elements before ``out`` read finite values."""
    flat = like.new_empty(pad + math.prod(shape))
    flat[:pad].zero_()
    return flat, flat[pad:].view(shape)


def _skew_keys(F: Tensor, flat: Tensor, pad: int) -> Tensor:
    """``out[..., q, j] = F[..., q - k, j]`` with ``k = n - 1 - j`` for ``F (..., n, n)`` (offsets by keys in
    reverse order), a strided view; ``F`` is ``flat[pad:]`` (:func:`_after_pad`, ``pad >= (n - 1) n``).
    Where ``k > q`` (offset below 0) it reads the rows before ``F[..., 0, :]``: finite values that mean nothing."""
    n = F.shape[-1]
    return flat.as_strided(F.shape, F.stride()[:-2] + (n, n + 1), pad - (n - 1) * n)  # [q, j] -> F[q + j - (n - 1), j]


def _skew_queries(G: Tensor, flat: Tensor, pad: int) -> Tensor:
    """``out[..., q, j] = G[..., q, q - k]`` with ``k = n - 1 - j`` for ``G (..., n, O)`` (queries by offsets),
    a strided view; ``G`` is ``flat[pad:]`` (:func:`_after_pad`, ``pad >= n - 1``). Where ``k > q`` it reads
    the elements before ``G[..., q, 0]``: finite values that mean nothing."""
    n, O = G.shape[-2], G.shape[-1]
    return flat.as_strided(G.shape[:-1] + (n,), G.stride()[:-2] + (O + 1, 1), pad - (n - 1))  # [q, j] -> G[q, q + j - (n - 1)]


def rotary_rows_null(
    qdev: Float[Tensor, "batch pos d"],
    kdev: Float[Tensor, "batch pos d"],
    N: tuple[Float[Tensor, "draw d r"], Float[Tensor, "draw d r"]],
    mean_a: Float[Tensor, "batch offset r"],
    mean_c: Float[Tensor, "batch offset r"],
    S: Float[Tensor, "offset r"],
    real: Float[Tensor, "batch query key"],
    pairs: Int[Tensor, "pair 3"],
    *,
    eligible: Bool[Tensor, "batch query key"],
    match: Bool[Tensor, "pair"],
    frac: float = 1.0,
    merge_tol: Optional[float] = None,
    margin: float = 1e-3,
) -> dict[str, Tensor]:
    """The spectrum null of one rotary head with absolute scores (:func:`spectrum_null`'s numbers), without
    the per-draw ``(prompt, query, key, r)`` grids.

    The null head's projections are offset-free, ``da = qdev N_A``, ``dc = kdev N_B``, plus the kept
    means' real projections at each offset ``mean_a[o], mean_c[o]`` (zeros uncentred); its score of
    ``(q, k)`` at offset ``o = q - k`` is ``sum_r S_o (mean_a_o + da_q)(mean_c_o + dc_k)``. With
    ``S_o = Sbar + Delta_o`` every part but ``sum_r da_q Delta_o dc_k`` is a matrix product (the
    offset-indexed ones read through strided views), and that part is at most
    ``b_q = |da_q * delta| max_k |dc_k|`` with ``delta = max_o |Delta_o|`` (Cauchy-Schwarz). So only the
    keys whose matrix-product part is within ``2 b_q`` of the row's largest (less ``margin`` times a
    bound on the row's parts, for rounding) can hold rank 0; their scores are formed exactly and the
    first largest wins. Pairs of other ranks get their rows' exact scores and a stable sort. Singular
    values vary little with the offset, so few keys remain (1.67 per row and draw on a Pythia-shaped
    layer, 188,720 rows).

    ``qdev, kdev``: pre-rotary queries and keys minus the kept means (``n`` positions: queries up to
    the last measured one); ``N``: ``(N_A, N_B)``; ``real``: the real scores (for the real ranks);
    ``pairs``: ``(batch, query, key)``; ``eligible``: ``(batch, query, key)``, keys up to their query
    only (causal; an eligible later key raises :class:`~svtools.SVToolsError`). Returns
    ``rolls_tovee, n_recon, draws`` like :func:`spectrum_null`.
    """
    if bool(torch.triu(eligible, 1).any()):
        raise SVToolsError("rotary_rows_null: a key after its query is eligible; rotary heads here are causal "
                           "(keys k <= q only)")
    N_A, N_B = (x.to(qdev) for x in N)
    D, (B, n, _) = N_A.shape[0], qdev.shape
    r = N_A.shape[-1]
    dt, dev = qdev.dtype, qdev.device
    S = S[:n].to(dt)
    mA, mC = mean_a[:, :n].to(dt), mean_c[:, :n].to(dt)
    da = qdev @ N_A[:, None]  # (draw, batch, query, r)
    dc = kdev @ N_B[:, None]  # (draw, batch, key, r)
    b, q, k = pairs.unbind(-1)
    P = len(pairs)
    key = k.expand(D, P).clone()
    mi = match.nonzero()[:, 0]
    ar = torch.arange(n, device=dev)

    def exact(dd, bb, qq, kk):  # the null scores of (draw, batch, query, key) cells, the reference's formula
        o = (qq - kk).clamp_min(0)
        return ((mA[bb, o] + da[dd, bb, qq]) * S[o] * (mC[bb, o] + dc[dd, bb, kk])).sum(-1)

    if len(mi):
        mb, mq, mk = b[mi], q[mi], k[mi]
        el = eligible[mb, mq]
        rk = stable_ranks_of(real[mb, mq], el, mk)
        top = (rk == 0).nonzero()[:, 0]
        if len(top):
            Sbar = (S.amax(0) + S.amin(0)) / 2
            delta = (S.amax(0) - S.amin(0)) / 2
            SmA, SmC = S * mA, S * mC  # (batch, offset, r)
            T1 = (SmA * mC).sum(-1)  # (batch, offset)
            # everything below in reverse key order (j = n - 1 - k): the offset-indexed parts are then views
            # (reading meaningless finite values where k > q, keys that are shut below)
            dcr = dc.flip(-2)
            f2, T2 = _after_pad((D, B, n, n), (n - 1) * n, dc)
            torch.matmul(SmA[None], dcr.transpose(-1, -2), out=T2)  # (draw, batch, offset, j)
            # T3 + T1 in one product: da with a column of ones against (S m_C | T1)
            f3, T3 = _after_pad((D, B, n, n), n - 1, da)
            torch.matmul(torch.cat([da, torch.ones_like(da[..., :1])], -1),
                         torch.cat([SmC, T1[..., None]], -1).transpose(-1, -2)[None], out=T3)  # (draw, batch, query, offset)
            approx = (da * Sbar) @ dcr.transpose(-1, -2)  # (draw, batch, query, j)
            approx += _skew_keys(T2, f2, (n - 1) * n)
            approx += _skew_queries(T3, f3, n - 1)
            del f2, T2, f3, T3
            # the rows of the rank-0 pairs, each once; the grid keeps every row (nearly all are needed) and
            # shuts the keys that cannot be the pair's: ineligible, or in a row no pair needs
            rows, inv = torch.unique(mb[top] * n + mq[top], return_inverse=True)
            rb, rq = rows // n, rows % n
            row_of = torch.full((B, n), -1, dtype=torch.long, device=dev)
            row_of[rb, rq] = torch.arange(len(rows), device=dev)
            open_ = eligible.flip(-1) & (row_of >= 0)[..., None]  # (batch, query, j)
            approx += torch.zeros(B, n, n, dtype=dt, device=dev).masked_fill_(~open_, -float("inf"))
            # |sum_r da_r Delta_o,r dc_r| <= |da * delta| |dc_k| <= |da * delta| max_k |dc_k| (Cauchy-Schwarz), so
            # a key that may be the first largest has approx >= the row's largest approx - 2 bd (less rounding)
            dmax = dcr.norm(dim=-1).amax(-1, keepdim=True)  # (draw, batch, 1)
            bd = (da * delta).norm(dim=-1) * dmax  # (draw, batch, query)
            # rounding: margin times a bound on every |approx| of the row (Cauchy-Schwarz, term by term)
            size = ((da * Sbar).norm(dim=-1) + SmA.norm(dim=-1).amax(-1, keepdim=True)) * dmax \
                + da.norm(dim=-1) * SmC.norm(dim=-1).amax(-1, keepdim=True) + T1.abs().amax(-1, keepdim=True)
            best = approx.amax(-1)  # (draw, batch, query); -inf where every key is shut
            low = (best - 2 * bd - margin * (size + bd)).masked_fill_(best == -float("inf"), float("inf"))
            cand = approx >= low[..., None]  # (draw, batch, query, j): every key that may be the first largest
            del approx
            cd, cb, cq, cj = cand.nonzero().unbind(-1)
            cr = row_of[cb, cq]
            ck = n - 1 - cj
            val = exact(cd, cb, cq, ck)
            flat = torch.full((D * len(rows),), -float("inf"), dtype=dt, device=dev)
            flat.scatter_reduce_(0, cd * len(rows) + cr, val, "amax")
            is_max = val == flat[cd * len(rows) + cr]
            first = torch.full((D * len(rows),), n, dtype=torch.long, device=dev)
            first.scatter_reduce_(0, (cd * len(rows) + cr)[is_max], ck[is_max], "amin")
            first = torch.where(first == n, 0, first)  # no eligible key: the reference's stable order gives key 0
            key[:, mi[top]] = first.view(D, len(rows))[:, inv]
        deep = (rk > 0).nonzero()[:, 0]
        if len(deep):  # other ranks: the rows' exact scores, a stable sort
            db, dq = mb[deep], mq[deep]
            dd = torch.arange(D, device=dev)[:, None, None]
            s = exact(dd, db[None, :, None], dq[None, :, None], ar[None, None, :])  # (draw, pair, key)
            s = s.masked_fill(~el[deep], -float("inf"))
            order = torch.sort(s, dim=-1, descending=True, stable=True).indices
            key[:, mi[deep]] = order.gather(-1, rk[deep].expand(D, -1)[..., None])[..., 0]
    # the null pairs' terms, all draws
    o = (q[None] - key).clamp_min(0)  # (draw, pair)
    dd = torch.arange(D, device=dev)[:, None]
    t = (mA[b[None], o] + da[dd, b[None], q[None]]) * S[o] * (mC[b[None], o] + dc[dd, b[None], key])
    if merge_tol is not None:  # merge_degenerate with each offset's groups, found once
        t = merge_groups(t, degenerate_groups(S, merge_tol)[o])
    t = t.reshape(D * P, r)
    ok = ~torch.isnan(t).any(-1)
    rt, nr = dense_measures(torch.where(ok[:, None], t, torch.ones_like(t)), frac)
    rt = rt.double().view(D, P)
    ok = ok.view(D, P) & ~torch.isnan(rt)
    cnt = ok.double().sum(0)
    nan = torch.full_like(cnt, float("nan"))
    return {"rolls_tovee": torch.where(cnt > 0, torch.where(ok, rt, 0.0).sum(0) / cnt.clamp_min(1), nan),
            "n_recon": torch.where(cnt > 0, torch.where(ok, nr.double().view(D, P), 0.0).sum(0)
                                   / cnt.clamp_min(1), nan), "draws": cnt.to(torch.int64)}
