"""The pair engine's rotary path: terms of measured pairs from per-(head, offset) bases.

For each layer of a chunk the engine hands over the measured pairs ``(batch, head, query, key)``
and the pre-rotary queries and keys; this module finds the (head, offset) items the pairs use,
takes their bases ``V, S`` and the control's rotations from :data:`svtools.factor_cache.FACTOR_CACHE`
(decomposing only the items it lacks) and forms the terms ``t_k = (a^ . v_k)(b^ . v_k)``
(:mod:`svtools.rotary`) with the pairs grouped by item: one small matrix product per item, each
``V`` read once, instead of one gathered ``r x r`` matrix per pair. The rotated control's terms
are ``((a^ V) S^-1/2 Q)_k ((b^ V) S^1/2 Q)_k``, i.e. ``x~^T U S^1/2 Q`` times ``y~^T V S^1/2 Q``
with ``x~ . u_k = (a^ . v_k) / sigma_k``.

Exactness: besides the engine's checks on every pair (the terms sum to the model's score, the
control's terms to the same total) every item's basis must diagonalise its offset's Gram
matrix, ``V^T Gamma_delta z == S^2 (V^T z)`` for a fixed random ``z`` (:func:`check_items`);
the per-pair sums alone cannot see a wrong ``V``, since any orthonormal basis passes them.
``V^T z`` and ``V^T Gamma z`` are two extra rows in each item's matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from svtools._checks import UnsupportedModelError
from svtools.factor_cache import FACTOR_CACHE, Entries
from svtools.rotary import RotaryHeads, cos_sin, rotate_right

__all__ = ["RotaryLayer", "GroupLayout", "check_items"]

_TOTAL_BLOCK = 2**16  # (query, offset) cells per block of the relative totals


class GroupLayout:
    """Rows grouped by item, for one batched matrix product per bucket of group sizes.

    Row ``p`` belongs to group ``group[p]``; groups whose sizes round up to the same power of two
    form a bucket, padded to that size, and the buckets lie one after another in a flat buffer of
    ``size`` rows: row ``p`` sits at ``cell[p]``. :meth:`matmul` multiplies each group's rows by its
    own matrix (``gather(groups)``), reading each matrix once, not once per row.
    """

    def __init__(self, group: Int[Tensor, "p"], n_groups: int) -> None:
        dev = group.device
        order = torch.argsort(group, stable=True)
        gs = group[order]
        counts = torch.bincount(gs, minlength=n_groups)
        rank = torch.arange(len(group), device=dev) - (torch.cumsum(counts, 0) - counts)[gs]
        pad = torch.where(counts > 0, 2 ** torch.ceil(torch.log2(counts.clamp_min(1).double())).long(), 0)
        pad_row = pad[gs]
        self.cell = torch.empty(len(group), dtype=torch.long, device=dev)
        self.buckets: list[tuple[int, Tensor, int]] = []
        start = 0
        for k in torch.unique(pad[pad > 0]).tolist():
            groups = (pad == k).nonzero()[:, 0]
            slot = torch.full((n_groups,), -1, dtype=torch.long, device=dev)
            slot[groups] = torch.arange(len(groups), device=dev)
            sel = (pad_row == k).nonzero()[:, 0]
            self.cell[order[sel]] = start + slot[gs[sel]] * k + rank[sel]
            self.buckets.append((k, groups, start))
            start += len(groups) * k
        self.size = start

    def place(self, parts: list[Tensor]) -> Tensor:
        """The flat buffer holding ``torch.cat(parts)``'s rows at their cells, zeros elsewhere."""
        X = parts[0].new_zeros(self.size, parts[0].shape[-1])
        at = 0
        for x in parts:
            X.index_copy_(0, self.cell[at:at + len(x)], x)
            at += len(x)
        return X

    def matmul(self, X: Tensor, gather: Callable[[Tensor], Tensor]) -> Tensor:
        """Each group's rows of the buffer ``X`` times its matrix ``gather(groups)[g]``."""
        out = None
        for k, groups, start in self.buckets:
            M = gather(groups).to(X.device)
            if out is None:
                out = X.new_empty(self.size, M.shape[-1])
            torch.bmm(X[start:start + len(groups) * k].view(len(groups), k, -1), M,
                      out=out[start:start + len(groups) * k].view(len(groups), k, -1))
        return out

    def matmul_argmax(self, X: Tensor, gather: Callable[[Tensor], Tensor], shut: Optional[Tensor] = None,
                      rows: int = 2048) -> Tensor:
        """``matmul(X, gather).masked_fill(shut, -inf).max(-1).indices`` (the first largest column of each
        row), formed ``rows`` rows at a time so that the product never leaves the cache; ``(size,)``."""
        out = torch.empty(self.size, dtype=torch.long, device=X.device)
        for k, groups, start in self.buckets:
            per = max(1, rows // k)
            for g0 in range(0, len(groups), per):
                gs = groups[g0:g0 + per]
                s0, s1 = start + g0 * k, start + (g0 + len(gs)) * k
                Y = torch.bmm(X[s0:s1].view(len(gs), k, -1), gather(gs).to(X.device))
                Y = Y.view(s1 - s0, -1)
                if shut is not None:
                    Y.masked_fill_(shut[s0:s1], -float("inf"))
                out[s0:s1] = Y.max(-1).indices
        return out

    def rows(self, Y: Tensor, start: int, stop: int) -> Tensor:
        """Rows ``start..stop-1`` (in the order of :meth:`place`'s parts) of a buffer."""
        return Y.index_select(0, self.cell[start:stop])


def gram_z(heads: RotaryHeads, h: Tensor, o: Tensor) -> tuple[Tensor, Tensor]:
    """The check's fixed random ``z (r,)`` and ``Gamma_delta z (n, r)`` of items ``(h[n], o[n])``
    (sorted by head), float64: ``R_B M^T (R_A^T R_A) M R_B^T z``, a few vector products per item."""
    z = torch.randn(heads.r, generator=torch.Generator().manual_seed(12345), dtype=torch.float64)
    c, s = cos_sin(heads.spec, o)
    gam = torch.empty(len(h), heads.r, dtype=torch.float64)
    bounds = torch.searchsorted(h, torch.arange(int(h.max()) + 2)).tolist()  # items come sorted by head
    for hh in range(len(bounds) - 1):
        m = slice(bounds[hh], bounds[hh + 1])
        if m.start == m.stop:
            continue
        RA, RB = heads.RA[hh], heads.RB[hh]
        w = rotate_right((RB.mT @ z).expand(m.stop - m.start, -1), c[m], -s[m], heads.spec)  # M R_B^T z
        g = (w @ RA.mT) @ RA  # R_A^T R_A M R_B^T z
        gam[m] = rotate_right(g, c[m], s[m], heads.spec) @ RB.mT  # R_B M^T (...)
    return z, gam


def check_items(zV: Tensor, gV: Tensor, S: Tensor, layer: int, tol: float) -> None:
    """Raise unless ``V^T Gamma z == S^2 V^T z`` item by item (rows ``zV = z^T V``, ``gV = (Gamma z)^T V``),
    relative to ``sigma_0^2 |z|``."""
    if not len(zV):
        return
    S = S.to(torch.float64)
    err = (gV.double() - S ** 2 * zV.double()).norm(dim=-1) / (S[:, 0] ** 2 * zV.double().norm(dim=-1)).clamp_min(
        torch.finfo(torch.float64).tiny)
    worst = float(err.max())
    if not worst <= tol:
        FACTOR_CACHE.clear()  # whatever produced this basis may have been kept: keep nothing
        raise UnsupportedModelError(
            f"layer {layer}: a per-offset basis does not diagonalise its rotary Gram matrix "
            f"(relative residual {worst:.2e} > {tol:.0e}); the decomposition is not exact here")


@dataclass
class RotaryLayer:
    """One layer's rotary heads for the engine: :class:`~svtools.rotary.RotaryHeads` of the chosen
    heads plus what names their control rotations (``seed``, ``layer``, model head numbers)."""

    heads: RotaryHeads
    layer: int
    head_ids: list[int]
    seed: int
    control: bool

    def bases(self, item_h: Tensor, item_o: Tensor, control: Optional[bool] = None
              ) -> tuple[Entries, Tensor, Optional[Entries]]:
        """Cached entries ``V`` of the items, their ``S (n, r)``, and the control's ``Q`` entries
        (None without the rotated control, or with ``control=False``)."""
        F = FACTOR_CACHE.factors(self.heads, item_h, item_o)
        Q = None
        if self.control and control is not False:
            Q = FACTOR_CACHE.rotations(self.seed, self.layer, [self.head_ids[i] for i in item_h.tolist()],
                                       item_o.tolist(), self.heads.r, self.heads.dtype, self.heads.A.device)
        return F, F.full(1), Q

    def factored(self, head: int, n: int, tol: float) -> tuple[Tensor, Tensor, Tensor]:
        """Head slot ``head``'s decompositions at offsets ``0..n-1`` in the factored form of
        :class:`~svtools.rotary.RotaryFactors`: ``XA, XB (n, d_head, r)``, ``S (n, r)`` (the layer's
        dtype and device), with ``U_o = A XA_o = A M_o R_B^T V_o / S_o`` and ``V_o = B XB_o = B R_B^-1 V_o``
        (full-rank heads; the spectrum null needs no other). Bases checked as in :meth:`pair_terms`."""
        o = torch.arange(n)
        ih = torch.full((n,), head)
        F, S, _ = self.bases(ih, o, control=False)
        V = F.full(0)
        z, gz = gram_z(self.heads, ih, o)
        check_items(torch.einsum("r,ors->os", z.to(V), V), torch.einsum("or,ors->os", gz.to(V), V), S.to(V),
                    self.layer, tol)
        c, s = cos_sin(self.heads.spec, o)
        RBt = self.heads.RB[head].to(V).mT
        XB = self.heads.key_map[head].to(V) @ V
        XA = rotate_right((RBt @ V).mT, c[:, None, :], -s[:, None, :], self.heads.spec).mT  # M R_B^T V
        S = S.to(V)
        XA = XA / torch.where(S > 0, S, torch.ones_like(S))[:, None, :] * (S > 0)[:, None, :]
        return XA, XB, S

    def pair_terms(self, idx: Int[Tensor, "pair 4"], qa: Tensor, bhat: Tensor, tol: float
                   ) -> tuple[Tensor, Optional[Tensor], Tensor]:
        """Terms, control terms and singular values ``(pair, r)`` of pairs ``(batch, head, query, key)``.

        ``qa (batch, head, pos, d_head)``: pre-rotary queries; ``bhat (batch, head, pos, r)``:
        whitened keys (:meth:`~svtools.rotary.RotaryHeads.whiten_keys`).
        """
        b, h, q, k = idx.unbind(-1)
        off = q - k
        span = int(off.max()) + 1
        items, gid = torch.unique(h * span + off, return_inverse=True)
        item_h, item_o = (items // span).cpu(), (items % span).cpu()
        F, S, Qe = self.bases(item_h, item_o)
        S = S.to(qa.device)
        P, G = len(b), len(items)
        z, gz = gram_z(self.heads, item_h, item_o)
        ahat = self.heads.whiten_queries(qa[b, h, q], h, off)
        ar = torch.arange(G, device=qa.device)
        lay = GroupLayout(torch.cat([gid, gid, ar, ar]), G)
        Y = lay.matmul(lay.place([ahat, bhat[b, h, k], z.to(qa).expand(G, -1), gz.to(qa)]), lambda g: F.gather(0, g))
        check_items(lay.rows(Y, 2 * P, 2 * P + G), lay.rows(Y, 2 * P + G, 2 * P + 2 * G), S, self.layer, tol)
        left, right = lay.rows(Y, 0, P), lay.rows(Y, P, 2 * P)
        terms = left * right
        sigma = S[gid]
        rot = None
        if Qe is not None:  # in the same layout: (a^ V) S^-1/2 and (b^ V) S^1/2 times each item's Q
            root = sigma.clamp_min(0).sqrt()
            inv = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))
            Z = lay.matmul(lay.place([left * inv, right * root]), lambda g: Qe.gather(0, g))
            rot = lay.rows(Z, 0, P) * lay.rows(Z, P, 2 * P)
        return terms, rot, sigma

    def totals(self, keys: Tensor, shape: tuple[int, int, int], qa: Tensor, bhat: Tensor, mask: Tensor, tol: float
               ) -> tuple[Tensor, Optional[Tensor]]:
        """Each measured query's sum of terms over every key it sees (offsets ``0..query``).

        ``keys``: sorted flat ``(batch * H + head) * n + query`` codes; returns ``(queries, r)``
        totals and the control's (None without control).
        """
        B, H, n = shape
        b, h, q = keys // (H * n), (keys // n) % H, keys % n
        O = int(q.max()) + 1
        o = torch.arange(O, device=qa.device)
        tot = torch.zeros(len(keys), self.heads.r, dtype=qa.dtype, device=qa.device)
        rtot = torch.zeros_like(tot) if self.control else None
        c, s = cos_sin(self.heads.spec, o.cpu())
        RBt = self.heads.RB.to(qa.device, qa.dtype).mT
        block = max(1, _TOTAL_BLOCK // O)
        for hh in torch.unique(h).tolist():
            ih = torch.full((O,), hh)
            F, S, Qe = self.bases(ih, o.cpu())
            V, S = F.full(0).to(qa.device), S.to(qa.device)
            z, gz = gram_z(self.heads, ih, o.cpu())
            check_items(torch.einsum("r,ors->os", z.to(V), V), torch.einsum("or,ors->os", gz.to(V), V), S,
                        self.layer, tol)
            Q = None if Qe is None else Qe.full(0).to(qa.device)
            root = S.clamp_min(0).sqrt()
            inv = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))
            rows = (h == hh).nonzero()[:, 0]
            for s0 in range(0, len(rows), block):
                rr = rows[s0:s0 + block]
                bq, qq = b[rr], q[rr]
                j = qq[:, None] - o[None, :]  # key position at each offset
                ok = (j >= 0) & mask[bq[:, None], 0, qq[:, None], j.clamp_min(0)]
                ahat = rotate_right(qa[bq, hh, qq][:, None, :], c[None], s[None], self.heads.spec) @ RBt[hh]
                left = torch.einsum("por,ors->pos", ahat, V)
                right = torch.einsum("por,ors->pos", bhat[bq[:, None], hh, j.clamp_min(0)], V)
                right = right * ok[..., None].to(right.dtype)
                tot[rr] = (left * right).sum(1)
                if Q is not None:
                    lq = torch.einsum("por,ors->pos", left * inv[None], Q)
                    rq = torch.einsum("por,ors->pos", right * root[None], Q)
                    rtot[rr] = (lq * rq).sum(1)
        return tot, rtot
