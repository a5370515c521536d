"""The streaming pair engine behind :func:`svtools.sad.head_sparsity`.

:class:`PairEngine` receives each needed layer's projection inputs and attention pattern from
one forward pass (:func:`svtools.decomposition.stream_attention`), selects the pairs in the
pattern (:mod:`svtools.sad.selection`), forms only those pairs' terms from per-head projections
(``x~ U S`` and ``y~ V``; the rotated control: the same projections times ``S^-1/2 Q``) and
checks exactness on every chunk and layer (the reconstructed scores must reproduce the model's
weights, each pair's terms must sum to its score). Each layer's decomposition is built once
per call and reused by every chunk; rotary layers (:mod:`svtools.sad.rotary`) are decomposed only
at the (head, offset) items the measured pairs use (every offset up to the last measured query for
relative attention and the spectrum null), and those are kept across calls by
:data:`svtools.factor_cache.FACTOR_CACHE`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Callable, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from svtools._checks import UnsupportedModelError
from svtools.bridge import model_type
from svtools.decomposition import (attention_scale, head_rotations, head_weights, is_causal, layer_qk, rotary_spec,
                                   stream_attention, visibility_mask)
from svtools.factor_cache import machine_memory
from svtools.rotary import RotaryHeads
from svtools.sad.frame import pair_rows
from svtools.sad.null import canonical_means, context_mean, haar_q, null_gaussians, null_rotations, spectrum_null
from svtools.sad.null_fast import rotary_rows_null, rows_null
from svtools.sad.rotary import RotaryLayer
from svtools.sad.selection import baseline_pairs, select_pairs_unchecked
from svtools.terms import merge_degenerate, relative_pair_terms

__all__ = ["PairEngine", "NULL_GRID_BYTES", "NULL_CACHE_BYTES", "clear_null_cache"]

#: The spectrum null of rotary heads works one head and a block of prompts at a time, the block's scratch
#: under this many bytes: ``(draw, prompt, query, key)`` score bounds with absolute scores
#: (:func:`svtools.sad.null_fast.rotary_rows_null`), per-offset ``(prompt, query, key, r)`` grids with relative ones.
NULL_GRID_BYTES = 64 * 2**20


class _LayerBasis:
    """One layer's decomposition for the pair engine, built once and reused by every chunk.

    Absolute positions: ``U, S, V`` of the chosen heads and the control's rotations ``Q``.
    Rotary: :class:`~svtools.sad.rotary.RotaryLayer` (the offset-free part of the chosen heads'
    decompositions, :class:`~svtools.rotary.RotaryHeads`, with the homogeneous weights ``A, B``;
    the per-offset bases come from the factor cache). ``weights``: :attr:`PairEngine.weights`.
    With ``null_draws``, the spectrum null
    (one random stream per ``(seed, layer, head)``, :func:`svtools.sad.null.null_gaussians`):
    absolute positions keep its rotations ``O = (O_q, O_k)``, each ``(draw, head, 1, 1, r, r)``;
    rotary heads keep ``N = (N_A, N_B)``, each ``(draw, head, d_head, r)``, with which a token's
    null projections are ``(x~ A) N_A`` and ``(y~ B) N_B``: the null basis is one random basis of
    the head's query (key) span, the same at every offset.
    """

    def __init__(self, model: Any, layer: int, heads: list[int], dtype: torch.dtype, seed: int,
                 control: bool, weights: Any, null_draws: int = 0) -> None:
        self.model, self.layer, self.heads, self.dtype, self.seed, self.control = \
            model, layer, heads, dtype, seed, control
        self.rotary = model_type(model) in ("gpt_neox", "llama")
        idx = torch.tensor(heads)
        self.O: Optional[tuple[Tensor, Tensor]] = None
        if not self.rotary:
            qk = layer_qk(model, layer, heads, dtype=dtype)
            self.U, self.S, self.V, self.has_bias = qk.U, qk.S, qk.V, qk.has_bias
            self.Q = head_rotations(seed, layer, heads, (), qk.r, dtype=dtype, device=qk.U.device) if control else None
            self.r = qk.r
            if null_draws:
                def rotations() -> tuple[Tensor, Tensor]:
                    G_q, G_k = null_gaussians(seed, null_draws, qk.d_in, self.r, [(layer, h) for h in heads],
                                              dtype=dtype, device=qk.U.device)
                    return null_rotations(qk.U, G_q)[:, :, None, None], null_rotations(qk.V, G_k)[:, :, None, None]

                self.O = _null_cached(("O", seed, null_draws, layer, tuple(heads), dtype, str(qk.U.device),
                                       _digest(qk.U), _digest(qk.V)), rotations)
            return
        W_Q, W_K, b_Q, b_K = (None if t is None else t[layer] for t in weights[:4])
        sel = lambda t: None if t is None else t.index_select(0, idx.to(t.device))  # noqa: E731
        rh = RotaryHeads.from_weights(sel(W_Q), sel(W_K), sel(b_Q), sel(b_K), weights[4], dtype)
        self.rot = RotaryLayer(rh, layer, heads, seed, control)
        self.A, self.B, self.has_bias, self.r = rh.A, rh.B, rh.has_bias, rh.r
        self.N: Optional[tuple[Tensor, Tensor]] = None
        if null_draws:
            def factors() -> tuple[Tensor, Tensor]:
                G_q, G_k = null_gaussians(seed, null_draws, self.A.shape[-2], self.r, [(layer, h) for h in heads],
                                          dtype=dtype, device=self.A.device)
                return _null_factor(self.A, G_q, layer, "query"), _null_factor(self.B, G_k, layer, "key")

            self.N = _null_cached(("N", seed, null_draws, layer, tuple(heads), dtype, str(self.A.device),
                                   _digest(self.A), _digest(self.B)), factors)


#: Bytes of null rotations (absolute positions: ``O``) and null factors (rotary: ``N``) that
#: :func:`_null_cached` keeps across calls, least recently used out first: a 64th of the machine's
#: memory, at least 64 MB (MiniLM's 72 heads x 16 draws: 9.4 MB in float32; a Pythia-160M-shaped
#: model's 144 heads: 75.5 MB, which a fixed 64 MB could not keep: a repeated call, reading the layers
#: in order, then drew every layer's Gaussians again). 0 keeps nothing.
NULL_CACHE_BYTES = max(64 * 2**20, machine_memory() // 64)
_NULL_CACHE: "OrderedDict[tuple, tuple[Tensor, Tensor]]" = OrderedDict()


def clear_null_cache() -> None:
    """Forget every null rotation and factor kept across calls (:data:`NULL_CACHE_BYTES`)."""
    _NULL_CACHE.clear()


def _digest(t: Tensor) -> str:
    """A digest of a tensor's values, dtype and shape: a cache key that a changed model can never match."""
    x = t.detach().contiguous().cpu()
    h = hashlib.blake2b(f"{x.dtype}{tuple(x.shape)}".encode(), digest_size=16)
    h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()


def _null_cached(key: tuple, make: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The spectrum null's rotations or factors of one layer's heads, kept across calls.

    They depend only on the seed, the draws, the layer, the heads (one random stream per ``(seed, layer,
    head)``, :func:`svtools.sad.null.null_gaussians`) and the head's weights (``U, V`` or ``A, B``, in
    ``key`` as digests), never on the prompts, so a second call on the same model skips drawing the
    Gaussians (float64, ``draws x 2 x d_in x r`` per head) and their QR. Copies are returned (a caller
    can never change a kept entry)."""
    hit = _NULL_CACHE.get(key)
    if hit is None:
        hit = make()
        size = sum(t.numel() * t.element_size() for t in hit)
        if size <= NULL_CACHE_BYTES:
            _NULL_CACHE[key] = hit
            while sum(sum(t.numel() * t.element_size() for t in v) for v in _NULL_CACHE.values()) > NULL_CACHE_BYTES:
                _NULL_CACHE.popitem(last=False)
        return tuple(t.clone() for t in hit)  # type: ignore[return-value]
    _NULL_CACHE.move_to_end(key)
    return tuple(t.clone() for t in hit)  # type: ignore[return-value]


def _null_factor(A: Tensor, G: Tensor, layer: int, side: str) -> Tensor:
    """``N = R_A^-1 haar_q(Q_A^T G)`` for ``A = Q_A R_A`` (``diag(R_A) > 0``): then ``(x~ A) N`` is the
    projection of ``x~`` onto the null basis ``Q_A haar_q(Q_A^T G) = haar_q(P_A G)`` of the span of
    ``A`` (:func:`svtools.sad.null.null_rotations`; every offset's ``U`` spans it)."""
    QA = haar_q(A)
    RA = QA.transpose(-1, -2) @ A  # upper triangular, positive diagonal
    d = torch.diagonal(RA, dim1=-2, dim2=-1)
    if not bool((d > 1e-6 * d.amax(-1, keepdim=True)).all()):
        raise UnsupportedModelError(f"layer {layer}: a head's {side} weights are rank-deficient; the spectrum "
                                    "null of rotary heads needs full-rank query and key maps")
    M = haar_q(QA.transpose(-1, -2)[None] @ G)  # (draw, head, d_head, r)
    return torch.linalg.solve_triangular(RA[None], M, upper=True)


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


def _pair_dot(left: Tensor, right: Tensor) -> Any:
    """``score_of(b, h, q, k) = (left[b, h, q] * right[b, h, k]).sum(-1)`` for ``(batch, head, pos, r)``
    tensors, gathering rows of their flat views (one index per row instead of three)."""
    B, H, n, r = left.shape
    lf, rf = left.reshape(-1, r), right.reshape(-1, r)

    def score_of(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        row = (b * H + h) * n
        return (lf.index_select(0, row + q) * rf.index_select(0, row + k)).sum(-1)

    return score_of


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
                 exclude_first: bool, attention: str, controls: tuple[str, ...], seed: int, frac: float,
                 dtype: torch.dtype, kinds: tuple[str, ...], baseline_fraction: float,
                 baseline_bound: Optional[float], baseline_seed: int, check_tol: float = 1e-3,
                 pattern_tol: Optional[float] = None, null_draws: int = 0, null_center: bool = True,
                 degenerate_tol: Optional[float] = None) -> None:
        self.model, self.plan = model, plan
        self.select, self.threshold, self.exclude_first = select, threshold, exclude_first
        self.relative, self.controls, self.seed, self.frac = attention == "relative", controls, seed, frac
        self.null_draws = null_draws if "spectrum" in controls else 0
        self.null_center, self.degenerate_tol = null_center, degenerate_tol
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
                                            "rotated" in self.controls, self.weights, self.null_draws)
        return self.bases[layer]

    @property
    def weights(self) -> tuple:
        """Every layer's ``W_Q, W_K, b_Q, b_K`` and the rotary spec, once per call (the bridge stacks
        all layers for each weight, and finding the rotary module walks the whole model)."""
        if not hasattr(self, "_weights"):
            spec = _spec_of(self.model) if model_type(self.model) in ("gpt_neox", "llama") else None
            self._weights = head_weights(self.model) + (spec,)
        return self._weights

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
            spec = basis.rot.heads.spec
            qr, kr = _rotate_positions(qa, spec), _rotate_positions(kb, spec)
            score_of = _pair_dot(qr, kr)
        else:
            pu = torch.einsum("bnd,hdr->bhnr", xq, basis.U)
            pv = torch.einsum("bnd,hdr->bhnr", xk, basis.V)
            a = pu * basis.S[None, :, None, :]
            score_of = _pair_dot(a, pv)
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
            live = [k for k, i in idx_all.items() if len(i)]
            if not live:
                return
            bhat = basis.rot.heads.whiten_keys(kb, xk)
            allidx = torch.cat([idx_all[k] for k in live])
            t_all, rot_all, sig_all = basis.rot.pair_terms(allidx, qa, bhat, self.check_tol)
            cut = dict(zip(live, torch.tensor([len(idx_all[k]) for k in live]).cumsum(0).tolist()))
            if self.relative:  # each measured query's total over every key it sees
                B_, H_, n_ = pattern.shape[:3]
                tkeys = torch.unique((allidx[:, 0] * H_ + allidx[:, 1]) * n_ + allidx[:, 2])
                ttot, rtot = basis.rot.totals(tkeys, (B_, H_, n_), qa, bhat, mask, self.check_tol)
        else:
            if basis.Q is not None:  # the control's projections: r x r rotations of the singular ones
                root = basis.S.clamp_min(0).sqrt()[None, :, None, :]
                arot = (pu * root) @ basis.Q[None]
                crot = (pv * root) @ basis.Q[None]
            if self.relative:
                csum = torch.einsum("bqk,bhkr->bhqr", maskf, pv)  # each query's sum of key projections
                if basis.Q is not None:
                    crotsum = (csum * root) @ basis.Q[None]
        null: dict[str, dict[str, Tensor]] = {}
        if self.null_draws and any(len(i) for i in idx_all.values()):
            eligible = mask & qvalid[..., None]
            if self.exclude_first:
                eligible = eligible.clone()
                eligible[..., 0] = False
            null = self._null_rotary(idx_all, qa, kb, basis, mask, eligible, qvalid, qr, kr) if basis.rotary else \
                self._null_absolute(idx_all, pu, pv, basis, mask, eligible, qvalid,
                                    csum if self.relative else None)
        for kind, idx in idx_all.items():
            if not len(idx):
                continue
            b, h, q, k = idx.unbind(-1)
            if basis.rotary:
                e = cut[kind]
                t, sigma = t_all[e - len(idx):e], sig_all[e - len(idx):e]
                rot = None if rot_all is None else rot_all[e - len(idx):e]
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
                    pos = torch.searchsorted(tkeys, (b * pattern.shape[1] + h) * pattern.shape[2] + q)
                    t = relative_pair_terms(t, ttot[pos], cnt)
                    rot = None if rot is None else relative_pair_terms(rot, rtot[pos], cnt)
                else:
                    t = relative_pair_terms(t, a[b, h, q] * csum[b, h, q], cnt)
                    rot = None if rot is None else relative_pair_terms(rot, arot[b, h, q] * crotsum[b, h, q], cnt)
            if self.degenerate_tol is not None:
                t = merge_degenerate(t, sigma, self.degenerate_tol)
            cols = pair_rows(layer, heads, idx, t, rot, attn[kind], sigma, ids, start, kind, self.frac,
                             null=null.get(kind))
            if cols is not None:
                self.frames.append(cols)

    def _null_pairs(self, idx_all: dict[str, Tensor]) -> tuple[Tensor, Tensor, list[tuple[str, int]]]:
        """All measured pairs in one tensor, whether each is rank-matched (not for random pairs),
        and the kinds' sizes (to split the results back)."""
        kinds = [(k, len(i)) for k, i in idx_all.items()]
        pairs = torch.cat([i for i in idx_all.values()])
        match = torch.cat([torch.full((len(i),), k != "random", dtype=torch.bool, device=i.device)
                           for k, i in idx_all.items()])
        return pairs, match, kinds

    @staticmethod
    def _split(res: dict[str, Tensor], kinds: list[tuple[str, int]]) -> dict[str, dict[str, Tensor]]:
        out, s = {}, 0
        for k, n in kinds:
            out[k] = {name: v[s:s + n] for name, v in res.items()}
            s += n
        return out

    def _null_absolute(self, idx_all, pu, pv, basis, mask, eligible, qvalid, csum=None) -> dict[str, dict[str, Tensor]]:
        """The spectrum null (:mod:`svtools.sad.null`) of absolute-position heads: the real
        projections ``x~ U``, ``y~ V`` rotated per draw, centred on each prompt's mean, formed only
        for the rows and pairs the measured pairs need (:func:`svtools.sad.null_fast.rows_null`)."""
        pairs, match, kinds = self._null_pairs(idx_all)
        valid = qvalid[:, 0]  # (batch, pos): real tokens
        mean_a = context_mean(pu, valid[:, None, :], dims=(-2,))[:, :, 0] if self.null_center else None
        mean_c = context_mean(pv, valid[:, None, :], dims=(-2,))[:, :, 0] if self.null_center else None
        res = rows_null(pu, pv, basis.S, (basis.O[0][:, :, 0, 0], basis.O[1][:, :, 0, 0]), pairs, mask=mask[:, 0],
                        eligible=eligible[:, 0], match=match, mean_a=mean_a, mean_c=mean_c,
                        key_sum=csum if self.relative else None, frac=self.frac, merge_tol=self.degenerate_tol)
        return self._split(res, kinds)

    def _null_rotary(self, idx_all, qf, kf, basis, mask, eligible, qvalid, qr=None, kr=None
                     ) -> dict[str, dict[str, Tensor]]:
        """The spectrum null of rotary heads. Absolute scores: :meth:`_null_rotary_rows`. Relative scores
        (each query's mean term over its keys needs every key's terms at its own offset): per-offset
        projections ``(x~ A) XA_o``, ``(y~ B) XB_o`` and values ``S_o`` laid out as ``(prompt, query,
        key, r)`` grids (pair ``(q, k)`` at offset ``q - k``), one head and a block of prompts at a time
        (:data:`NULL_GRID_BYTES`)."""
        pairs, match, kinds = self._null_pairs(idx_all)
        B, H, _, _ = qf.shape
        n = int(pairs[:, 2].max()) + 1  # queries up to the last measured one (and their keys) suffice
        dev = qf.device
        qpos = torch.arange(n, device=dev)
        off = (qpos[:, None] - qpos[None, :]).clamp_min(0)  # (query, key) offset; future keys are masked
        w = qvalid[:, 0].to(qf.dtype)
        w = w / w.sum(-1, keepdim=True).clamp_min(1)  # each prompt's mean over its real tokens
        block = max(1, NULL_GRID_BYTES // max(1, 6 * n * n * basis.r * qf.element_size()))
        out = {name: torch.full((len(pairs),), float("nan"), dtype=torch.float64, device=dev)
               for name in ("rolls_tovee", "n_recon")}
        out["draws"] = torch.zeros(len(pairs), dtype=torch.int64, device=dev)
        if not self.relative:  # absolute scores: no per-draw grids (svtools.sad.null_fast.rotary_rows_null)
            return self._split(self._null_rotary_rows(pairs, match, qf, kf, qr, kr, basis, eligible, w, n), kinds)
        for hh in range(H):
            XA, XB, S = basis.rot.factored(hh, n, self.check_tol)  # (offset, d_head, r), (offset, r)
            for b0 in range(0, B, block):
                sel = (pairs[:, 1] == hh) & (pairs[:, 0] >= b0) & (pairs[:, 0] < b0 + block)
                if not bool(sel.any()):
                    continue
                bb = slice(b0, b0 + block)
                Aall = torch.einsum("bnd,odr->bnor", qf[bb, hh, :n], XA)  # query q at offset o
                Call = torch.einsum("bnd,odr->bnor", kf[bb, hh, :n], XB)  # key k at offset o
                A, C = Aall[:, qpos[:, None], off], Call[:, qpos[None, :], off]  # (prompt, query, key, r)
                qh, kh = qf[bb, hh, :n], kf[bb, hh, :n]
                zero = torch.zeros((), dtype=qf.dtype, device=dev)
                mean_a = mean_c = zero
                qbar = kbar = zero
                if self.null_center:  # the prompt's mean input: its projection at each offset is kept
                    qbar = torch.einsum("bn,bnd->bd", w[bb], qf[bb, hh])[:, None]
                    kbar = torch.einsum("bn,bnd->bd", w[bb], kf[bb, hh])[:, None]
                    mean_a = torch.einsum("bxd,odr->bor", qbar, XA)[:, off]
                    mean_c = torch.einsum("bxd,odr->bor", kbar, XB)[:, off]
                    if self.degenerate_tol is not None:  # basis-free inside degenerate groups
                        mean_a, mean_c = canonical_means(mean_a, mean_c, S[off], self.degenerate_tol)
                N_A, N_B = basis.N[0][:, hh], basis.N[1][:, hh]

                def projections(d: int, qh=qh, kh=kh, qbar=qbar, kbar=kbar, mean_a=mean_a, mean_c=mean_c,
                                N_A=N_A, N_B=N_B) -> tuple[Tensor, Tensor]:
                    return (mean_a + ((qh - qbar) @ N_A[d])[:, :, None, :],
                            mean_c + ((kh - kbar) @ N_B[d])[:, None, :, :])

                p = pairs[sel]
                res = spectrum_null(A, C, S[off], torch.stack([p[:, 0] - b0, p[:, 2], p[:, 3]], -1),
                                    projections=projections, draws=N_A.shape[0], mask=mask[bb, 0, :n, :n],
                                    eligible=eligible[bb, 0, :n, :n], match=match[sel],
                                    relative=self.relative, frac=self.frac, merge_tol=self.degenerate_tol)
                for name, v in res.items():
                    out[name][sel] = v.to(out[name].dtype)
        return self._split(out, kinds)

    def _null_rotary_rows(self, pairs, match, qf, kf, qr, kr, basis, eligible, w, n) -> dict[str, Tensor]:
        """The rotary spectrum null with absolute scores, head by head and in blocks of prompts whose
        ``(draw, prompt, query, key)`` scratch stays under :data:`NULL_GRID_BYTES`."""
        B, H = qf.shape[:2]
        dev = qf.device
        D = basis.N[0].shape[0]
        block = max(1, NULL_GRID_BYTES // max(1, 6 * D * n * n * qf.element_size()))
        out = {name: torch.full((len(pairs),), float("nan"), dtype=torch.float64, device=dev)
               for name in ("rolls_tovee", "n_recon")}
        out["draws"] = torch.zeros(len(pairs), dtype=torch.int64, device=dev)
        for hh in range(H):
            sel_h = pairs[:, 1] == hh
            if not bool(sel_h.any()):
                continue
            XA, XB, S = basis.rot.factored(hh, n, self.check_tol)  # (offset, d_head, r), (offset, r)
            if self.null_center:  # the prompt's mean input: its projection at each offset is kept
                qbar = torch.einsum("bn,bnd->bd", w, qf[:, hh])
                kbar = torch.einsum("bn,bnd->bd", w, kf[:, hh])
                mean_a = torch.einsum("bd,odr->bor", qbar, XA)
                mean_c = torch.einsum("bd,odr->bor", kbar, XB)
                if self.degenerate_tol is not None:  # basis-free inside degenerate groups
                    mean_a, mean_c = canonical_means(mean_a, mean_c, S[None], self.degenerate_tol)
            else:
                qbar = kbar = torch.zeros(B, qf.shape[-1], dtype=qf.dtype, device=dev)
                mean_a = mean_c = torch.zeros(B, n, basis.r, dtype=qf.dtype, device=dev)
            for b0 in range(0, B, block):
                sel = sel_h & (pairs[:, 0] >= b0) & (pairs[:, 0] < b0 + block)
                if not bool(sel.any()):
                    continue
                bb = slice(b0, b0 + block)
                p = pairs[sel]
                real = qr[bb, hh, :n] @ kr[bb, hh, :n].transpose(-1, -2)
                res = rotary_rows_null(qf[bb, hh, :n] - qbar[bb, None], kf[bb, hh, :n] - kbar[bb, None],
                                       (basis.N[0][:, hh], basis.N[1][:, hh]), mean_a[bb], mean_c[bb], S, real,
                                       torch.stack([p[:, 0] - b0, p[:, 2], p[:, 3]], -1),
                                       eligible=eligible[bb, 0, :n, :n], match=match[sel], frac=self.frac,
                                       merge_tol=self.degenerate_tol)
                for name, v in res.items():
                    out[name][sel] = v.to(out[name].dtype)
        return out
