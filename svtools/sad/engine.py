"""The streaming pair engine behind :func:`svtools.sad.head_sparsity`.

:class:`PairEngine` receives each needed layer's projection inputs and attention pattern from
one forward pass (:func:`svtools.decomposition.stream_attention`), selects the pairs in the
pattern (:mod:`svtools.sad.selection`), forms only those pairs' terms from per-head projections
(``x~ U S`` and ``y~ V``; the rotated control: the same projections times ``S^-1/2 Q``) and
checks exactness on every chunk and layer (the reconstructed scores must reproduce the model's
weights, each pair's terms must sum to its score). Each layer's decomposition is built once
per call and reused by every chunk; rotary layers are decomposed only at the offsets the measured
pairs use, in factored form, and cached across chunks up to :data:`ROTARY_CACHE_BYTES`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from svtools._checks import UnsupportedModelError
from svtools.bridge import model_type
from svtools.decomposition import (attention_scale, head_rotations, head_weights, is_causal, layer_qk, rotary_spec,
                                   stream_attention, visibility_mask)
from svtools.qk import RotaryFactors, homogeneous_weights, qk_svd_factored
from svtools.sad.frame import pair_rows
from svtools.sad.selection import baseline_pairs, select_pairs_unchecked
from svtools.terms import relative_pair_terms

__all__ = ["PairEngine", "ROTARY_CACHE_BYTES"]

#: Rotary layers keep their per-offset factors across chunks up to this many bytes in all.
ROTARY_CACHE_BYTES = 2**30
_PAIR_BLOCK = 4096  # pairs per gathered block of rotary factors


class _LayerBasis:
    """One layer's decomposition for the pair engine, built once and reused by every chunk.

    Absolute positions: ``U, S, V`` of the chosen heads and the control's rotations ``Q``.
    Rotary: the homogeneous weights ``A, B`` (the model's own pre-rotary query and key maps) and,
    per offset actually needed, :class:`~svtools.qk.RotaryFactors` (``XA, S, XB``) and ``Q``,
    computed on demand and kept while the cache allows.
    """

    def __init__(self, model: Any, layer: int, heads: list[int], dtype: torch.dtype, seed: int,
                 control: bool, cache: dict) -> None:
        self.model, self.layer, self.heads, self.dtype, self.seed, self.control = \
            model, layer, heads, dtype, seed, control
        self.cache = cache
        self.rotary = model_type(model) in ("gpt_neox", "llama")
        idx = torch.tensor(heads)
        if not self.rotary:
            qk = layer_qk(model, layer, heads, dtype=dtype)
            self.U, self.S, self.V, self.has_bias = qk.U, qk.S, qk.V, qk.has_bias
            self.Q = head_rotations(seed, layer, heads, (), qk.r, dtype=dtype, device=qk.U.device) if control else None
            self.r = qk.r
            return
        W_Q, W_K, b_Q, b_K = head_weights(model, layer)
        sel = lambda t: None if t is None else t.index_select(0, idx.to(t.device)).to(dtype)  # noqa: E731
        self.W = (sel(W_Q), sel(W_K), sel(b_Q), sel(b_K))
        self.has_bias = b_Q is not None or b_K is not None
        self.A = homogeneous_weights(self.W[0], self.W[2], self.has_bias)
        self.B = homogeneous_weights(self.W[1], self.W[3], self.has_bias)
        self.r = min(self.A.shape[-1], self.A.shape[-2])
        self.offsets = torch.zeros(0, dtype=torch.long)
        self.F: Any = None
        self.Qo: Optional[Tensor] = None

    def at_offsets(self, needed: Tensor) -> tuple[Any, Optional[Tensor], Tensor]:
        """Factors and rotations covering ``needed`` offsets, and the slot of each offset."""

        needed = torch.unique(needed.cpu())
        missing = needed[~torch.isin(needed, self.offsets)]
        F, Qo, offsets = self.F, self.Qo, self.offsets
        if len(missing):
            Fm = qk_svd_factored(*self.W, rotary=rotary_spec(self.model, missing), dtype=self.dtype)
            Qm = head_rotations(self.seed, self.layer, self.heads, (), self.r, dtype=self.dtype,
                                device=Fm.S.device, offsets=missing) if self.control else None
            if F is None:
                F, Qo, offsets = Fm, Qm, missing
            else:
                cat = lambda a, b: torch.cat([a, b], dim=1)  # noqa: E731
                offsets = torch.cat([offsets, missing])
                F = RotaryFactors(A=F.A, B=F.B, XA=cat(F.XA, Fm.XA), S=cat(F.S, Fm.S), XB=cat(F.XB, Fm.XB),
                                  has_bias=F.has_bias, rotary=rotary_spec(self.model, offsets))
                Qo = None if Qo is None else cat(Qo, Qm)
            other = sum(_nbytes(getattr(b, 'F', None), getattr(b, 'Qo', None)) for b in self.cache.values()
                        if b is not self)
            if other + _nbytes(F, Qo) <= ROTARY_CACHE_BYTES:  # else: use now, do not keep
                self.F, self.Qo, self.offsets = F, Qo, offsets
        lut = torch.full((int(offsets.max()) + 1,), -1, dtype=torch.long)
        lut[offsets] = torch.arange(len(offsets))
        return F, Qo, lut


def _nbytes(F: Any, Qo: Optional[Tensor]) -> int:
    if F is None:
        return 0
    return sum(t.numel() * t.element_size() for t in (F.XA, F.XB, F.S) + (() if Qo is None else (Qo,)))


def _rotate_positions(x: Float[Tensor, "... pos d_head"], spec: Any) -> Tensor:
    """Apply each position's rotary rotation (times ``attention_scaling``) to ``x``."""
    n = x.shape[-2]
    half = spec.rotary_dim // 2
    ang = torch.arange(n, dtype=torch.float64)[:, None] * spec.inv_freq.to(torch.float64)[None, :]
    c = torch.cos(ang).to(x.dtype).to(x.device) * spec.attention_scaling
    s = torch.sin(ang).to(x.dtype).to(x.device) * spec.attention_scaling
    p = torch.arange(half, device=x.device)
    ia, ib = (p, p + half) if spec.layout == "neox" else (2 * p, 2 * p + 1)
    xa, xb = x[..., ia], x[..., ib]
    out = x.clone()
    out[..., ia] = xa * c - xb * s
    out[..., ib] = xa * s + xb * c
    return out


def _hom(x: Tensor, has_bias: bool, dtype: torch.dtype) -> Tensor:
    x = x.to(dtype)
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1) if has_bias else x


def _spec_of(model: Any) -> Any:
    return rotary_spec(model, [0])


def _check_softmax(pattern: Tensor, mask: Tensor, qvalid: Tensor, idx_all: dict[str, Tensor],
                   pair_scores: dict[str, Tensor], score_of: Any, scale: float, layer: int, tol: float) -> None:
    """The exactness check, on the pairs that matter, at ``O(batch * head * query)`` cost.

    Softmax is shift-invariant per query, so the reconstructed scores reproduce the model's
    weights iff, for a reference key ``k*`` of the query (its largest weight),
    ``p[k] == p[k*] * exp(scale * (s[k] - s[k*]))``. Checked for every measured pair and, so
    that no query escapes, for the second-largest weight of every real query of every head.
    Raises :class:`~svtools.models.UnsupportedModelError` when any ``|predicted - p| > tol``
    (the same tolerance, on the same probability scale, as ``decompose``'s full check).
    """

    top, arg = pattern.topk(min(2, pattern.shape[-1]), dim=-1)  # (batch, head, query, 2)
    B, H, n, _ = pattern.shape
    groups = list(idx_all.items())
    if top.shape[-1] == 2:  # a single key (one-token prompts) has no second weight to check
        bb, hh, qq = torch.meshgrid(torch.arange(B, device=pattern.device), torch.arange(H, device=pattern.device),
                                    torch.arange(n, device=pattern.device), indexing="ij")
        second = qvalid[:, 0][bb, qq] & mask[bb, 0, qq, arg[..., 1]] & (top[..., 1] > 0)
        idx2 = torch.stack([bb[second], hh[second], qq[second], arg[..., 1][second]], -1)
        groups.append(("top-2", idx2))
    err = 0.0
    for kind, idx in groups:
        if not len(idx):
            continue
        b, h, q, k = idx.unbind(-1)
        s = pair_scores[kind] if kind in pair_scores else score_of(b, h, q, k)
        kref = arg[b, h, q, 0]
        s_ref = score_of(b, h, q, kref)
        p_ref = top[b, h, q, 0].to(s.dtype)
        pred = p_ref * torch.exp((scale * (s - s_ref)).clamp(max=60.0))
        err = max(err, float((pred - pattern[b, h, q, k].to(s.dtype)).abs().max()))
    if not err <= tol:
        raise UnsupportedModelError(
            f"decomposition does not reproduce the model's attention at layer {layer} "
            f"(max |softmax - pattern| = {err:.2e} > tolerance {tol:.2e}, see svtools.models.pattern_tolerance); "
            "this model's attention has a mechanism svtools does not model")


def _check_sums(t: Tensor, want: Tensor, what: str, layer: int, tol: float) -> None:
    if not len(t):
        return
    bad = (t.sum(-1) - want).abs() > tol * (1 + t.abs().sum(-1))
    if bool(bad.any()):
        raise UnsupportedModelError(f"layer {layer}: {what} of {int(bad.sum())} pair(s) do not sum to the "
                                    "score; the decomposition is not exact here")


class PairEngine:
    """Selects pairs in each layer's pattern and decomposes only those (see :func:`head_sparsity`)."""

    def __init__(self, model: Any, plan: dict[int, list[int]], *, select: str, threshold: float,
                 exclude_first: bool, attention: str, control: Optional[str], seed: int, frac: float,
                 dtype: torch.dtype, kinds: tuple[str, ...], baseline_fraction: float,
                 baseline_bound: Optional[float], baseline_seed: int, check_tol: float = 1e-3,
                 pattern_tol: Optional[float] = None) -> None:
        self.model, self.plan = model, plan
        self.select, self.threshold, self.exclude_first = select, threshold, exclude_first
        self.relative, self.control, self.seed, self.frac = attention == "relative", control, seed, frac
        self.dtype, self.kinds, self.check_tol = dtype, kinds, check_tol
        # tolerance of the pattern check: svtools.models.pattern_tolerance of the model's dtype
        self.pattern_tol = check_tol if pattern_tol is None else pattern_tol
        self.bfrac, self.bbound, self.bseed = baseline_fraction, baseline_bound, baseline_seed
        self.scale = {l: attention_scale(model, l) for l in plan}
        self.causal = is_causal(model)
        self.bases: dict[int, _LayerBasis] = {}
        self.frames: list[dict[str, Any]] = []

    def basis(self, layer: int) -> _LayerBasis:
        if layer not in self.bases:
            self.bases[layer] = _LayerBasis(self.model, layer, self.plan[layer], self.dtype, self.seed,
                                            self.control == "rotated", self.bases)
        return self.bases[layer]

    def run_chunk(self, ids: Tensor, am: Tensor, start: int, bar: Any) -> None:
        mask = visibility_mask(self.model, am)
        qvalid = am.bool()[:, None, :]

        def on_layer(layer: int, xq: Tensor, xk: Tensor, pattern_all: Tensor) -> None:
            self.layer_rows(layer, xq, xk, pattern_all, ids, mask, qvalid, start)
            bar.update(1)

        stream_attention(self.model, ids, am, list(self.plan), on_layer)

    # -- one layer of one chunk
    def layer_rows(self, layer: int, xq: Tensor, xk: Tensor, pattern_all: Tensor, ids: Tensor, mask: Tensor,
                   qvalid: Tensor, start: int) -> None:
        heads = self.plan[layer]
        basis = self.basis(layer)
        dev = pattern_all.device
        pattern = pattern_all if heads == list(range(pattern_all.shape[1])) else \
            pattern_all.index_select(1, torch.tensor(heads, device=dev))
        xq, xk = _hom(xq, basis.has_bias, self.dtype), _hom(xk, basis.has_bias, self.dtype)
        if basis.rotary:
            qa = torch.einsum("bnd,hde->bhne", xq, basis.A)  # pre-rotary queries and keys
            kb = torch.einsum("bnd,hde->bhne", xk, basis.B)
            spec = _spec_of(self.model)
            qr, kr = _rotate_positions(qa, spec), _rotate_positions(kb, spec)
            score_of = lambda b, h, q, k: (qr[b, h, q] * kr[b, h, k]).sum(-1)  # noqa: E731
        else:
            pu = torch.einsum("bnd,hdr->bhnr", xq, basis.U)
            pv = torch.einsum("bnd,hdr->bhnr", xk, basis.V)
            a = pu * basis.S[None, :, None, :]
            score_of = lambda b, h, q, k: (a[b, h, q] * pv[b, h, k]).sum(-1)  # noqa: E731
        sel = select_pairs_unchecked(pattern, mask, select=self.select, threshold=self.threshold,
                      exclude_first=self.exclude_first, query_mask=qvalid)
        picks = {"attended": sel}
        for kind in self.kinds[1:]:
            picks[kind] = baseline_pairs(kind, pattern, mask, sel, query_mask=qvalid, layer=layer, heads=heads,
                                         prompt0=start, fraction=self.bfrac, bound=self.bbound,
                                         exclude_first=self.exclude_first, seed=self.bseed)
        del sel
        idx_all = {k: p.nonzero() for k, p in picks.items()}
        del picks
        attn = {k: pattern[tuple(i.unbind(-1))] for k, i in idx_all.items()}
        pair_scores = {k: score_of(*i.unbind(-1)) for k, i in idx_all.items()}
        # the exactness check: softmax(scale * scores) must give the model's pattern, tested on every
        # measured pair and on the two largest weights of every real query of every head
        _check_softmax(pattern, mask, qvalid, idx_all, pair_scores, score_of, self.scale[layer], layer,
                       self.pattern_tol)
        if self.relative:
            maskf = mask[:, 0].to(self.dtype)  # (batch, query, key)
            count = maskf.sum(-1)  # (batch, query)
        if basis.rotary:
            needed = torch.cat([(i[:, 2] - i[:, 3]) for i in idx_all.values()])
            if self.relative and len(needed):  # a query's total needs every offset up to its position
                needed = torch.arange(int(max(int(i[:, 2].max()) for i in idx_all.values() if len(i))) + 1)
            if not len(needed):
                return
            F, Qo, lut = basis.at_offsets(needed)
            qf = qa if F.A is basis.A else torch.einsum("bnd,hde->bhne", xq, F.A)
            kf = kb if F.B is basis.B else torch.einsum("bnd,hde->bhne", xk, F.B)
            if self.relative:
                totals = self._rotary_totals(idx_all, qf, kf, F, Qo, lut, mask)
        else:
            if basis.Q is not None:  # the control's projections: r x r rotations of the singular ones
                root = basis.S.clamp_min(0).sqrt()[None, :, None, :]
                arot = (pu * root) @ basis.Q[None]
                crot = (pv * root) @ basis.Q[None]
            if self.relative:
                csum = torch.einsum("bqk,bhkr->bhqr", maskf, pv)  # each query's sum of key projections
                if basis.Q is not None:
                    crotsum = (csum * root) @ basis.Q[None]
        for kind, idx in idx_all.items():
            if not len(idx):
                continue
            b, h, q, k = idx.unbind(-1)
            if basis.rotary:
                slot = lut[(q - k).cpu()].to(dev)
                t, rot = self._rotary_pair_terms(b, h, q, k, slot, qf, kf, F, Qo)
                sigma = F.S[h, slot]
            else:
                t = a[b, h, q] * pv[b, h, k]
                rot = None if basis.Q is None else arot[b, h, q] * crot[b, h, k]
                sigma = basis.S[h]
            _check_sums(t, pair_scores[kind], "the terms", layer, self.check_tol)
            if rot is not None:
                _check_sums(rot, t.sum(-1), "the rotated control's terms", layer, self.check_tol)
            if self.relative:
                cnt = count[b, q]
                if basis.rotary:
                    (tkeys, ttot), rtot = totals
                    pos = torch.searchsorted(tkeys, (b * pattern.shape[1] + h) * pattern.shape[2] + q)
                    t = relative_pair_terms(t, ttot[pos], cnt)
                    rot = None if rot is None else relative_pair_terms(rot, rtot[pos], cnt)
                else:
                    t = relative_pair_terms(t, a[b, h, q] * csum[b, h, q], cnt)
                    rot = None if rot is None else relative_pair_terms(rot, arot[b, h, q] * crotsum[b, h, q], cnt)
            cols = pair_rows(layer, heads, idx, t, rot, attn[kind], sigma, ids, start, kind, self.frac)
            if cols is not None:
                self.frames.append(cols)

    def _rotary_pair_terms(self, b, h, q, k, slot, qf, kf, F, Qo) -> tuple[Tensor, Optional[Tensor]]:
        """Terms (and rotated terms) of rotary pairs: ``(q XA_o S_o) * (k XB_o)``, blocks of pairs."""
        ts, rs = [], []
        for s in range(0, len(b), _PAIR_BLOCK):
            e = slice(s, s + _PAIR_BLOCK)
            hh, ss = h[e], slot[e]
            left = (qf[b[e], hh, q[e]][:, None, :] @ F.XA[hh, ss])[:, 0]  # (pairs, r)
            right = (kf[b[e], hh, k[e]][:, None, :] @ F.XB[hh, ss])[:, 0]
            S = F.S[hh, ss]
            ts.append(left * S * right)
            if Qo is not None:
                root = S.clamp_min(0).sqrt()
                Q = Qo[hh, ss]
                rs.append(((left * root)[:, None, :] @ Q)[:, 0] * ((right * root)[:, None, :] @ Q)[:, 0])
        return torch.cat(ts), (torch.cat(rs) if Qo is not None else None)

    def _rotary_totals(self, idx_all, qf, kf, F, Qo, lut, mask) -> tuple[tuple[Tensor, Tensor], Optional[Tensor]]:
        """Each measured query's sum of terms over every key it sees (offset-dependent bases).

        Returns ``((keys, totals), rotated_totals)``: ``keys`` sorted flat (batch, head, query)
        indices, ``totals (queries, r)``.
        """
        B, H, n, _ = qf.shape
        allq = torch.cat([i[:, :3] for i in idx_all.values() if len(i)])
        keys = torch.unique((allq[:, 0] * H + allq[:, 1]) * n + allq[:, 2])  # sorted
        b, h, q = keys // (H * n), (keys // n) % H, keys % n
        O = int(q.max()) + 1  # offsets 0..O-1 cover every visible key of every query
        o = torch.arange(O, device=qf.device)
        lut = lut[:O].to(qf.device)
        XA, XB, S = F.XA[:, lut], F.XB[:, lut], F.S[:, lut]  # (head, offset, ...) in offset order 0..O-1
        Qs = None if Qo is None else Qo[:, lut]
        tot = torch.zeros(len(keys), F.r, dtype=qf.dtype, device=qf.device)
        rtot = None if Qo is None else torch.zeros_like(tot)
        block = max(1, _PAIR_BLOCK * 16 // max(O, 1))
        for hh in torch.unique(h).tolist():
            rows = (h == hh).nonzero()[:, 0]
            for s in range(0, len(rows), block):
                rr = rows[s:s + block]
                bq, qq = b[rr], q[rr]
                j = qq[:, None] - o[None, :]  # key position at each offset
                ok = (j >= 0) & mask[bq[:, None], 0, qq[:, None], j.clamp_min(0)]
                left = torch.einsum("pd,odr->por", qf[bq, hh, qq], XA[hh])
                right = torch.einsum("pod,odr->por", kf[bq[:, None], hh, j.clamp_min(0)], XB[hh])
                right = right * ok[..., None].to(right.dtype)
                tot[rr] = (left * S[hh][None] * right).sum(1)
                if Qs is not None:
                    root = S[hh].clamp_min(0).sqrt()[None]
                    lr = torch.einsum("por,ors->pos", left * root, Qs[hh])
                    rr_ = torch.einsum("por,ors->pos", right * root, Qs[hh])
                    rtot[rr] = (lr * rr_).sum(1)
        return (keys, tot), rtot
