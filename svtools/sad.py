"""Sparse attention decomposition (SAD) at scale: every head, every selected pair, with controls.

A head attends from query ``i`` to key ``j`` because of its score ``x_i~^T Omega~ x_j~ =
sum_k sigma_k (u_k . x_i~)(v_k . x_j~)``. If the features the head reads align with its singular
vectors, a pair that the head attends strongly uses only a few terms ``k``: the term vector is
*sparse*. The control splits the same score over a Haar-random rotation of the singular basis
(:meth:`svtools.decomposition.HeadDecomposition.rotated_terms`): low rank alone would keep the
rotated terms sparse too; alignment does not.

This module:

* :func:`select_pairs` — which (query, key) pairs count as "attended": attention >= a threshold
  (the earlier SAD work: 0.5) or the ACC rule (attention >= 1 / number of keys the query sees,
  i.e. ``1 / (query position + 1)`` in a causal model), first key excluded by default.
* :func:`head_sparsity` — for all chosen heads at once, one row per selected pair with N_recon,
  Rolls-Tovee sparseness, the dominant term's singular index, and the same in the rotated control;
  optionally the same for baseline pairs (non-attended, random) of the same heads. It selects
  first and decomposes only the measured pairs (no ``(batch, head, query, key, r)`` tensor),
  streaming layer by layer inside one forward pass that stops after the last layer needed.
* :func:`usage_difference` — whether attended and baseline pairs use different singular vectors.
* :func:`toy_sparsity` — the same measurement on the toy model of Part 1 (features observable).
* :func:`singular_vector_usage`, :func:`reuse` — which singular vectors a head uses across prompts.
* :func:`bootstrap` — summaries with confidence intervals from resampling whole prompts.
* :func:`ioi_tokens`, :func:`label_ioi_roles` — IOI prompts tokenised exactly as
  :func:`svtools.decomposition.tokenize` does, with the name positions, and role labels for pairs.

Devices: everything runs where the model lives. The CUDA path is untested (no GPU was available
while this was written); the benchmarks in ``benchmarks/`` take ``--device cuda``.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Literal, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from svtools.runtime import tqdm

from svtools._checks import (SVToolsError, as_bool, as_choice, as_float, as_indices, as_int, as_names, as_seed,
                             as_tensor, check_columns, check_numeric_columns)
from svtools.qk import QKSVD
from svtools.sparsity import n_recon, rolls_tovee
from svtools.terms import relative_pair_terms, relative_terms, rotated_terms, sad_terms

__all__ = ["select_pairs", "pair_measures", "head_sparsity", "toy_sparsity", "toy_pair_sad", "toy_tokens",
           "singular_vector_usage", "usage_difference", "reuse", "bootstrap", "ioi_tokens", "label_ioi_roles",
           "IOI_HEADS", "ioi_heads", "model_note", "sparsity_over_checkpoints",
           "toy_sparsity_over_training", "format_summary", "COLUMNS", "KINDS",
           "baseline_pairs", "pair_uniform", "compare_kinds", "CHUNK_BYTES", "ROTARY_CACHE_BYTES"]

#: Columns every :func:`head_sparsity` frame has (acceptance checks read these names).
COLUMNS = ("layer", "head", "prompt", "query", "key", "attention", "score", "n_recon", "rolls_tovee",
           "n_recon_rotated", "rolls_tovee_rotated", "dominant_k", "dominant_k_rotated",
           "dominant_sigma", "r", "used", "query_token", "key_token", "kind")

#: Values of the ``kind`` column: the attended pairs and the two nulls that keep the spectrum.
KINDS = ("attended", "non-attended", "random")

Select = Literal["threshold", "acc"]


# ----------------------------------------------------------------------------- pair selection

def select_pairs(
    pattern: Float[Tensor, "... query key"],
    mask: Bool[Tensor, "... query key"],
    *,
    select: Select = "threshold",
    threshold: float = 0.5,
    exclude_first: bool = True,
    query_mask: Optional[Bool[Tensor, "... query"]] = None,
) -> Bool[Tensor, "... query key"]:
    """The (query, key) pairs a head attends, as a boolean mask of ``pattern``'s shape.

    Rules:
        ``"threshold"``: ``pattern >= threshold`` (the earlier SAD work used 0.5).
        ``"acc"``: ``pattern >= 1 / n_visible(query)``, where ``n_visible`` counts the keys
        ``mask`` lets the query see — ``1 / (query position + 1)`` for a causal model, as in ACC;
        for a bidirectional model (BERT) ``1 / (number of real tokens)``: "more than uniform".

    Always: only pairs with ``mask`` True, only queries with ``query_mask`` True (use it to drop
    padding queries); with ``exclude_first`` the key at position 0 ([CLS] / BOS, the usual
    attention sink) is never selected.

    Args:
        pattern: attention weights ``(..., query, key)``, rows summing to 1 over visible keys.
        mask: ``(..., query, key)`` True where the query may attend (broadcastable to pattern).
        query_mask: ``(..., query)`` True for real queries (broadcastable); None = all.
    """
    if select not in ("threshold", "acc"):
        raise SVToolsError(f"unknown pair selection {select!r}: use 'threshold' or 'acc'")
    if select == "threshold":
        threshold = as_float(threshold, "threshold", lo=0.0, hi=1.0, lo_open=True)
    exclude_first = as_bool(exclude_first, "exclude_first")
    pattern = as_tensor(pattern, "pattern")
    if pattern.ndim < 2:
        raise SVToolsError(f"pattern must have shape (..., query, key), got {tuple(pattern.shape)}")
    if bool(torch.isnan(pattern).any()):
        raise SVToolsError("pattern contains NaN")
    mask = torch.as_tensor(mask, device=pattern.device)
    if mask.dtype != torch.bool:
        raise SVToolsError(f"mask must be boolean, got {mask.dtype}")
    try:
        mask = mask.expand(pattern.shape)
    except RuntimeError as exc:
        raise SVToolsError(f"mask of shape {tuple(mask.shape)} does not broadcast to pattern "
                           f"{tuple(pattern.shape)}") from exc
    if query_mask is not None:
        qm = torch.as_tensor(query_mask, device=pattern.device).bool()
        try:
            mask = mask & qm[..., None].expand(pattern.shape)
        except RuntimeError as exc:
            raise SVToolsError(f"query_mask of shape {tuple(qm.shape)} does not broadcast to pattern's "
                               f"(..., query) = {tuple(pattern.shape[:-1])}") from exc
    if select == "threshold" and not (0.0 < float(threshold) <= 1.0):
        raise SVToolsError(f"threshold must be in (0, 1], got {threshold}")
    return _select(pattern, mask, select=select, threshold=threshold, exclude_first=exclude_first)


def _select(pattern: Tensor, mask: Tensor, *, select: str, threshold: float, exclude_first: bool,
            query_mask: Optional[Tensor] = None) -> Tensor:
    """:func:`select_pairs` without the input checks (``mask`` broadcastable, boolean)."""
    if select == "threshold":
        sel = pattern >= float(threshold)
    else:
        n_vis = mask.sum(-1, keepdim=True).clamp_min(1).to(pattern.dtype)
        sel = pattern >= 1.0 / n_vis
    sel &= mask
    if query_mask is not None:
        sel &= query_mask[..., None]
    if exclude_first:
        sel[..., 0] = False
    return sel


# ----------------------------------------------------------------------------- per-pair measures

def pair_measures(terms: Float[Tensor, "pair r"], frac: float = 1.0) -> dict[str, Tensor]:
    """N_recon, Rolls-Tovee sparseness, dominant index and the N_recon set of each pair's terms.

    Returns a dict of ``(pair,)`` tensors ``n_recon``, ``rolls_tovee``, ``dominant_k`` (index of
    the largest term in the direction of the total: ``argmax_k sign(T) t_k``), ``score``
    (``T = sum_k t_k``) and ``order`` ``(pair, r)``: indices sorted by ``sign(T) t_k``
    descending, so ``order[p, :n_recon[p]]`` are the terms that reconstruct the score.
    """
    nr = n_recon(terms, frac)
    rt = rolls_tovee(terms)
    total = terms.sum(-1, keepdim=True)
    s = torch.where(total < 0, -torch.ones_like(total), torch.ones_like(total))
    order = torch.argsort(s * terms, dim=-1, descending=True, stable=True)
    return {"n_recon": nr, "rolls_tovee": rt, "dominant_k": order[:, 0], "score": total[:, 0], "order": order}


def _used_tuples(order: np.ndarray, n: np.ndarray) -> list[tuple[int, ...]]:
    return [tuple(int(k) for k in o[:m]) for o, m in zip(order, n)]


def _heads_by_layer(model: Any, layers, heads) -> dict[int, list[int]]:
    """``layers``/``heads`` of :func:`head_sparsity` -> ``{layer: heads}``.

    ``heads`` is either head indices (an int, a list or 1-D array of ints: the same heads in every
    layer of ``layers``) or a list of ``(layer, head)`` pairs. A bare *tuple* of two ints with no
    ``layers`` (``heads=(9, 6)``) could mean either, so it is an error that names both spellings.
    """
    from svtools._checks import is_index_sequence
    from svtools.decomposition import _check_heads, _check_layer
    from svtools.models import check_bridge

    check_bridge(model)
    n_layers = model.cfg.n_layers
    if heads is not None and is_index_sequence(heads) and not isinstance(heads, (Tensor, np.ndarray)) \
            and len(heads) and all(isinstance(h, (tuple, list)) or (isinstance(h, (Tensor, np.ndarray)) and h.ndim == 1)
                                   for h in heads):
        if layers is not None:
            raise SVToolsError("give either (layer, head) pairs in heads= or layers= with head indices, not both")
        out: dict[int, list[int]] = {}
        for lh in heads:
            if len(lh) != 2:
                raise SVToolsError(f"heads given as pairs must be (layer, head), got {lh!r}")
            layer = _check_layer(model, lh[0])
            out.setdefault(layer, [])
            for h in _check_heads(model, lh[1]):
                if h not in out[layer]:
                    out[layer].append(h)
        return {k: sorted(v) for k, v in sorted(out.items())}
    if isinstance(heads, tuple) and len(heads) == 2 and layers is None:
        a, b = heads
        raise SVToolsError(f"heads={heads!r} is ambiguous: for the single head (layer {a}, head {b}) write "
                           f"heads=[({a}, {b})]; for heads {a} and {b} of every layer write heads=[{a}, {b}]")
    if layers is None:
        layer_list = list(range(n_layers))
    else:
        layer_list = as_indices(layers, "layers", allow_empty=True)
        if not layer_list:
            raise SVToolsError("layers is empty")
    head_list = _check_heads(model, heads)
    return {_check_layer(model, layer): head_list for layer in sorted(set(layer_list))}


#: dtype of each :data:`COLUMNS` entry in a :func:`head_sparsity` frame (also when it is empty)
_COLUMN_DTYPES = {"layer": np.int64, "head": np.int64, "prompt": np.int64, "query": np.int64, "key": np.int64,
                  "attention": np.float32, "score": np.float64, "n_recon": np.int64, "rolls_tovee": np.float64,
                  "n_recon_rotated": np.int64, "rolls_tovee_rotated": np.float64, "dominant_k": np.int64,
                  "dominant_k_rotated": np.int64, "dominant_sigma": np.float64, "r": np.int64, "used": object,
                  "query_token": np.int64, "key_token": np.int64, "kind": str}


def _empty_frame(control: Optional[str] = "rotated") -> pd.DataFrame:
    """A frame with no rows and the same columns and dtypes as a non-empty one."""
    dt = dict(_COLUMN_DTYPES)
    if control is None:  # no control: the rotated columns are NaN, hence float
        dt.update(n_recon_rotated=np.float64, dominant_k_rotated=np.float64)
    return pd.DataFrame({c: pd.Series(dtype=dt[c]) for c in COLUMNS})


# ----------------------------------------------------------------------------- baseline samples

_MASK63 = (1 << 63) - 1


def _mix(x: Tensor) -> Tensor:
    """A 64-bit integer hash (splitmix64 finaliser) on int64 tensors, on any device.

    Multiplication wraps modulo 2^64 in torch; right shifts are made logical by masking.
    """
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9 as a signed int64
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * -7723592293110705685  # 0x94d049bb133111eb
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def pair_uniform(seed: int, stream: int, layer: int, head: Int[Tensor, "..."], prompt: Int[Tensor, "..."],
                 query: Int[Tensor, "..."], key: Int[Tensor, "..."]) -> Float[Tensor, "..."]:
    """A uniform number in ``[0, 1)`` for each (seed, stream, layer, head, prompt, query, key).

    Counter-based: the number of a pair depends on these integers only (broadcast together), not
    on how prompts are chunked, which other heads are measured, or the device. Used to draw the
    baseline samples of :func:`head_sparsity` (``stream`` 1: non-attended, 2: random pairs).
    """
    h = torch.full((), (int(seed) * 0x9E3779B1 + int(stream) * 0x85EBCA77 + int(layer) * 0xC2B2AE3D) & _MASK63,
                   dtype=torch.int64, device=head.device)
    for v in (head, prompt, query, key):
        h = _mix(h ^ v.to(torch.int64))
    return ((h >> 11) & ((1 << 52) - 1)).to(torch.float64) / float(1 << 52)


def _check_fraction_bound(fraction: Any, bound: Any, prefix: str) -> tuple[float, Optional[float]]:
    """The sampling probability (in (0, 1]) and the optional attention bound (in (0, 1]) of a baseline."""
    fraction = as_float(fraction, f"{prefix}fraction", lo=0.0, hi=1.0, lo_open=True)
    bound = None if bound is None else as_float(bound, f"{prefix}bound", lo=0.0, hi=1.0, lo_open=True)
    return fraction, bound


def _check_baseline(baseline: Any, fraction: float, bound: Optional[float]
                    ) -> tuple[tuple[str, ...], float, Optional[float]]:
    """``(kinds, fraction, bound)`` of :func:`head_sparsity`'s baseline arguments, checked."""
    fraction, bound = _check_fraction_bound(fraction, bound, "baseline_")
    if baseline is None:
        return (), fraction, bound
    kinds = (baseline,) if isinstance(baseline, str) else tuple(baseline) if isinstance(baseline, (list, tuple)) \
        else None
    bad = [k for k in kinds if k not in KINDS[1:]] if kinds is not None else [baseline]
    if bad or not kinds:
        raise SVToolsError(f"unknown baseline {bad or baseline!r}: use None, 'non-attended', 'random' "
                           "or a list of them")
    return tuple(dict.fromkeys(kinds)), fraction, bound


def baseline_pairs(
    kind: str,
    pattern: Float[Tensor, "batch head query key"],
    mask: Bool[Tensor, "batch 1 query key"],
    selected: Bool[Tensor, "batch head query key"],
    *,
    query_mask: Bool[Tensor, "batch 1 query"],
    layer: int,
    heads: Sequence[int],
    prompt0: int = 0,
    fraction: float = 0.1,
    bound: Optional[float] = None,
    exclude_first: bool = True,
    seed: int = 0,
) -> Bool[Tensor, "batch head query key"]:
    """The baseline pairs :func:`head_sparsity` measures beside the attended ones.

    Eligible pairs: visible keys (``mask``), real queries (``query_mask``), key 0 excluded when
    ``exclude_first`` (the same rules as :func:`select_pairs`), and

    * ``"non-attended"``: not ``selected`` and, with ``bound``, attention ``< bound``;
    * ``"random"``: any eligible pair, whatever its attention (it may also be selected).

    Each eligible pair is kept independently with probability ``fraction``, from
    :func:`pair_uniform` of ``(seed, kind, layer, head, prompt0 + batch row, query, key)``: the
    sample does not depend on chunking or on the other heads measured.
    """
    kind = as_choice(kind, "kind", KINDS[1:])
    fraction, bound = _check_fraction_bound(fraction, bound, "")
    seed, layer = as_int(seed, "seed"), as_int(layer, "layer", min_value=0)
    prompt0 = as_int(prompt0, "prompt0", min_value=0)
    exclude_first = as_bool(exclude_first, "exclude_first")
    heads = as_indices(heads, "heads")
    pattern = as_tensor(pattern, "pattern")
    if pattern.ndim != 4 or pattern.shape[1] != len(heads) or pattern.shape[-1] != pattern.shape[-2]:
        raise SVToolsError(f"pattern must have shape (batch, head={len(heads)}, query, key) with query = key, "
                           f"got {tuple(pattern.shape)}")
    B, H, n, _ = pattern.shape
    dev = pattern.device
    ok = mask & query_mask[..., None]
    if exclude_first:
        ok = ok.clone()
        ok[..., 0] = False
    if kind == "non-attended":
        ok = ok & ~selected
        if bound is not None:
            ok = ok & (pattern < float(bound))
    ok = ok.expand(B, H, n, n)
    b, h, q, k = ok.nonzero().unbind(-1)
    head_t = torch.as_tensor(list(heads), device=dev)
    u = pair_uniform(seed, 1 if kind == "non-attended" else 2, layer, head_t[h], b + prompt0, q, k)
    keep = u < fraction
    out = torch.zeros_like(ok)
    out[b[keep], h[keep], q[keep], k[keep]] = True
    return out


# ----------------------------------------------------------------------------- the pair engine

#: Prompts per forward pass are cut so that one layer's ``(batch, head, query, key)`` tensor of the
#: decomposition dtype stays under this many bytes (the model's own attention, the scores of the
#: exactness check and the selection masks are tensors of this size).
CHUNK_BYTES = 32 * 2**20
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
        from svtools.decomposition import _model_type, head_rotations, head_weights, layer_qk

        self.model, self.layer, self.heads, self.dtype, self.seed, self.control = \
            model, layer, heads, dtype, seed, control
        self.cache = cache
        self.rotary = _model_type(model) in ("gpt_neox", "llama")
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
        from svtools.qk import _homogeneous
        self.A = _homogeneous(self.W[0], self.W[2], self.has_bias)
        self.B = _homogeneous(self.W[1], self.W[3], self.has_bias)
        self.r = min(self.A.shape[-1], self.A.shape[-2])
        self.offsets = torch.zeros(0, dtype=torch.long)
        self.F: Any = None
        self.Qo: Optional[Tensor] = None

    def at_offsets(self, needed: Tensor) -> tuple[Any, Optional[Tensor], Tensor]:
        """Factors and rotations covering ``needed`` offsets, and the slot of each offset."""
        from svtools.decomposition import head_rotations, rotary_spec
        from svtools.qk import RotaryFactors, qk_svd_factored

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
    from svtools.models import UnsupportedModelError

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
    from svtools.models import UnsupportedModelError

    if not len(t):
        return
    bad = (t.sum(-1) - want).abs() > tol * (1 + t.abs().sum(-1))
    if bool(bad.any()):
        raise UnsupportedModelError(f"layer {layer}: {what} of {int(bad.sum())} pair(s) do not sum to the "
                                    "score; the decomposition is not exact here")


class _PairEngine:
    """Selects pairs in each layer's pattern and decomposes only those (see :func:`head_sparsity`)."""

    def __init__(self, model: Any, plan: dict[int, list[int]], *, select: str, threshold: float,
                 exclude_first: bool, attention: str, control: Optional[str], seed: int, frac: float,
                 dtype: torch.dtype, kinds: tuple[str, ...], baseline_fraction: float,
                 baseline_bound: Optional[float], baseline_seed: int, check_tol: float = 1e-3,
                 pattern_tol: Optional[float] = None) -> None:
        from svtools.decomposition import attention_scale, is_causal

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
        from svtools.decomposition import _mask, stream_attention

        mask = _mask(self.model, am)
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
        sel = _select(pattern, mask, select=self.select, threshold=self.threshold,
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
            cols = _pair_rows(layer, heads, idx, t, rot, attn[kind], sigma, ids, start, kind, self.frac)
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


def _spec_of(model: Any) -> Any:
    from svtools.decomposition import rotary_spec

    return rotary_spec(model, [0])


def head_sparsity(
    model: Any,
    tokens: Any,
    *,
    layers: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | Sequence[tuple[int, int]] | None = None,
    select: Select = "threshold",
    threshold: float = 0.5,
    exclude_first: bool = True,
    attention: Literal["absolute", "relative"] = "absolute",
    control: Optional[Literal["rotated"]] = "rotated",
    seed: int = 0,
    frac: float = 1.0,
    attention_mask: Optional[Tensor] = None,
    batch_size: int = 32,
    dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    baseline: Optional[str | Sequence[str]] = None,
    baseline_fraction: float = 0.1,
    baseline_bound: Optional[float] = None,
    baseline_seed: int = 0,
) -> pd.DataFrame:
    """Per-pair sparseness of the chosen heads' decompositions, with the controls and the nulls.

    Select first, decompose only what is measured. For each chunk of prompts, one forward pass
    (:func:`svtools.decomposition.stream_attention`) hands each needed layer's projection
    inputs and attention pattern over as soon as they exist and stops after the last layer
    needed. In each layer the pattern chooses the pairs (:func:`select_pairs`, padding queries
    excluded, plus the baseline samples); only those pairs' terms are formed, from per-head
    projections ``x~ U S`` and ``y~ V`` (rotated control: the same projections times
    ``S^-1/2 Q``, an ``r x r`` product); relative terms use each query's sum of key
    projections (:func:`svtools.terms.relative_pair_terms`). Rotary heads are decomposed only
    at the offsets the measured pairs use, in factored form (:func:`svtools.qk.qk_svd_factored`:
    shared projections, one ``d_head x d_head`` factor pair per offset). No
    ``(batch, head, query, key, r)`` tensor is ever built (:func:`svtools.decompose` still gives
    that full view, for every pair). Exactness is checked on every chunk and layer: the
    reconstructed scores must reproduce the model's weights (``softmax``, tolerance 1e-3) on
    every measured pair and on the two largest weights of every query of every head, and each
    pair's terms (real and rotated) must sum to its score; a failure raises
    :class:`~svtools.models.UnsupportedModelError`.

    Rows (one per measured pair), columns (:data:`COLUMNS`):
        ``layer, head, prompt`` (row of ``tokens``), ``query, key`` (positions), ``attention``
        (the model's own weight), ``score`` (sum of the terms: unscaled score, or relative score
        with ``attention="relative"``), ``n_recon, rolls_tovee`` of the terms over the singular
        basis, ``n_recon_rotated, rolls_tovee_rotated`` of the same score over a random rotation
        of it (NaN with ``control=None``), ``dominant_k`` (singular index of the largest term in
        the direction of the score; singular values are descending, so 0 = largest sigma),
        ``dominant_k_rotated``, ``dominant_sigma`` (``sigma_dominant / sigma_0``), ``r``
        (number of terms), ``used`` (tuple: the ``n_recon`` indices that reconstruct the score,
        largest first), ``query_token, key_token`` (ids), ``kind`` (``"attended"`` for the
        selected pairs, else the baseline the row belongs to).

    Rows are ordered by ``kind`` (attended first), then layer, head, prompt, query, key; the
    attended rows are the same whether or not baselines are asked for.

    Controls and nulls, and what each can and cannot rule out:
        * the **rotated control** (columns ``*_rotated``, every row): the same score split over
          ``U S^1/2 Q``, ``V S^1/2 Q`` with ``Q`` Haar-random. It rules out that the sparsity is
          an artefact of the score being a sum of few *large-norm* directions in any basis
          (e.g. a nearly rank-one head read in a random basis). It cannot separate alignment
          from an uneven spectrum: the rotation mixes large and small singular values, so a head
          whose ``sigma_k`` fall off steeply looks sparse in its singular basis for *every* pair,
          attended or not (see PAPER.md, part 3, caution).
        * ``baseline="non-attended"`` (``kind="non-attended"``): a seeded sample of the same
          heads' pairs on the same prompts that the head does *not* select (attention below
          ``baseline_bound`` when given, else simply not selected by the rule; visible keys,
          real queries, the same ``exclude_first`` rule). Same basis and spectrum as the
          attended pairs, so a difference between the two is not the spectrum. It cannot rule
          out that the difference comes from the score itself: non-attended pairs mostly have
          large *negative* scores, and N_recon / Rolls-Tovee depend on the total's sign and size;
          compare like with like (relative attention, or pairs matched on score) before reading
          a difference as alignment. Which singular vectors each kind uses:
          :func:`usage_difference`.
        * ``baseline="random"`` (``kind="random"``): a seeded sample of all eligible pairs of
          the head, whatever their attention (a random pair may also be attended). It keeps the
          spectrum and the token statistics and answers "is an attended pair sparser than a
          typical pair of this head?"; it cannot say why (a head sparse for every pair is sparse
          for random pairs too, and attended pairs differ from random ones in score as well).

        ``baseline`` may list both. Baseline rows carry the rotated control too.

    Identities: terms sum to the score in both bases, so the score column is basis-free (and the
    same for a pair whatever its kind); the rows agree with :func:`svtools.sad_terms` /
    :func:`svtools.n_recon` applied pair by pair (tested). Rotary models (Pythia, Llama) have
    one basis per offset ``query - key``, so index ``k`` names a different vector at different
    offsets.

    Args:
        model: a ``TransformerBridge`` from :func:`svtools.load_model` (runs where it lives: GPU
            if the model is there).
        tokens: list of strings (tokenised once by :func:`svtools.decomposition.tokenize`), or
            ``(batch, pos)`` ids with ``attention_mask``.
        layers, heads: which heads. ``heads`` may be head indices (used in every layer of
            ``layers``, default all) or a list of ``(layer, head)`` pairs such as the IOI heads
            (``heads=[(9, 6)]``). A bare tuple of two ints without ``layers`` (``heads=(9, 6)``)
            is ambiguous and raises :class:`SVToolsError` naming both spellings. Python and numpy
            integers are accepted alike (a frame row's ``row.layer`` round-trips).
        select, threshold, exclude_first: pair selection, see :func:`select_pairs`.
        attention: ``"absolute"`` decomposes scores; ``"relative"`` decomposes relative scores
            (each term minus its mean over the query's other visible keys,
            :func:`svtools.relative_terms`); pairs whose query sees a single key are dropped.
        control: ``"rotated"`` (default) or None.
        seed: seed of the rotated control (one Haar rotation per head (and offset) of a layer;
            the draw depends on which heads are decomposed together).
        frac: N_recon fraction (paper: 1.0).
        batch_size: at most this many prompts per forward pass; fewer when prompts are long, so
            that one layer's ``(batch, head, query, key)`` tensor stays under :data:`CHUNK_BYTES`
            (32 MB). The rows do not depend on it.
        dtype: decomposition dtype (float32 default).
        baseline: None (attended pairs only), ``"non-attended"``, ``"random"`` or a list of them.
        baseline_fraction: probability with which each eligible baseline pair is sampled
            (independently per pair; SAD 2024 used a 10% sample of non-firing pairs).
        baseline_bound: non-attended pairs must have attention ``< baseline_bound`` (e.g. 0.02);
            None = every pair the selection rule leaves out.
        baseline_seed: seed of the baseline samples (:func:`baseline_pairs`): the same pairs
            whatever ``batch_size`` or the other heads measured.

    Memory and time: the model's own attention for one chunk (bounded by ``CHUNK_BYTES``), the
    per-head projections ``(batch, head, pos, r)``, and the measured pairs' terms; rotary layers
    add their per-offset factors (``2 * heads * offsets * d_head * r`` numbers, cached across
    chunks up to :data:`ROTARY_CACHE_BYTES`). Measured on the loaded shared 2-core CPU
    (``benchmarks/``, ``OMP_WAIT_POLICY=PASSIVE``): MiniLM, 32 prompts x 256 tokens, peak
    memory above the model 0.23 GB in a fresh process (the HF forward with
    ``output_attentions=True`` alone: 1.6 GB), time 0.67x that forward pass (128 x 20: 0.90x);
    time grows with the number of prompts as prompts^0.90. See benchmarks/ for the figures. CUDA: the code
    is device-agnostic but untested on a GPU.

    Returns:
        ``pandas.DataFrame`` with the columns above (integers as int64).
    """
    from svtools._checks import as_dtype
    from svtools.decomposition import _decomposition_dtype, _prepare
    from svtools.models import check_bridge, resolve_check_tol

    check_bridge(model)
    if attention not in ("absolute", "relative"):
        raise SVToolsError(f"unknown attention {attention!r}: use 'absolute' or 'relative'")
    if control not in ("rotated", None):
        raise SVToolsError(f"unknown control {control!r}: use 'rotated' or None")
    batch_size = as_int(batch_size, "batch_size", min_value=1)
    if select not in ("threshold", "acc"):
        raise SVToolsError(f"unknown pair selection {select!r}: use 'threshold' or 'acc'")
    if select == "threshold":
        threshold = as_float(threshold, "threshold", lo=0.0, hi=1.0, lo_open=True)
    frac = as_float(frac, "frac", lo=0.0, hi=1.0, lo_open=True)
    seed = as_int(seed, "seed")
    exclude_first = as_bool(exclude_first, "exclude_first")
    baseline_seed = as_int(baseline_seed, "baseline_seed")
    as_dtype(dtype)
    kinds, baseline_fraction, baseline_bound = _check_baseline(baseline, baseline_fraction, baseline_bound)
    kinds = ("attended",) + kinds
    plan = _heads_by_layer(model, layers, heads)
    # the same input checks as decompose (supported model, eval mode, 0/1 mask, max positions),
    # the same dtype rule (half precision decomposed in float32) and the same exactness tolerance
    ids, am = _prepare(model, tokens, attention_mask)
    dtype = _decomposition_dtype(dtype)
    pattern_tol = resolve_check_tol(model, "auto")
    engine = _PairEngine(model, plan, select=select, threshold=threshold, exclude_first=exclude_first,
                         attention=attention, control=control, seed=seed, frac=frac, dtype=dtype, kinds=kinds,
                         baseline_fraction=baseline_fraction, baseline_bound=baseline_bound,
                         baseline_seed=baseline_seed, pattern_tol=pattern_tol)
    # prompts per forward pass: at most batch_size, and few enough that one layer's
    # (batch, head, query, key) tensor stays under CHUNK_BYTES
    per_prompt = model.cfg.n_heads * ids.shape[1] ** 2 * max(torch.finfo(dtype).bits // 8, 4)
    chunk = max(1, min(batch_size, CHUNK_BYTES // per_prompt))
    starts = range(0, ids.shape[0], chunk)
    bar = tqdm(total=len(plan) * len(starts), desc="head_sparsity (chunks x layers)", disable=not progress)
    for start in starts:
        engine.run_chunk(ids[start:start + chunk], am[start:start + chunk], start, bar)
    bar.close()
    return _assemble(engine.frames, control)


def _pair_rows(layer: int, heads: Sequence[int], idx: Int[Tensor, "pair 4"], t: Float[Tensor, "pair r"],
               rot: Optional[Float[Tensor, "pair r"]], attn: Float[Tensor, "pair"], sigma: Float[Tensor, "pair r"],
               tokens: Int[Tensor, "batch pos"], start: int, kind: str, frac: float) -> Optional[dict[str, Any]]:
    """The :data:`COLUMNS` of the pairs ``idx`` = (batch row, head slot, query, key) of one chunk.

    ``t``, ``rot``: each pair's terms in the singular basis and in the control; ``sigma``: the
    singular values they use. Pairs with NaN terms (no relative score) are dropped.
    """
    keep = ~torch.isnan(t).any(-1)
    if not bool(keep.all()):
        t, idx, attn, sigma = t[keep], idx[keep], attn[keep], sigma[keep]
        rot = None if rot is None else rot[keep]
    if not len(t):
        return None
    b, hi, qi, ki = idx.unbind(-1)
    head_t = torch.tensor(list(heads))
    m = pair_measures(t, frac)
    dom = m["dominant_k"]
    cols: dict[str, Any] = {
        "layer": np.full(len(t), layer, dtype=np.int64),
        "head": head_t[hi.cpu()].numpy().astype(np.int64),
        "prompt": (b + start).cpu().numpy().astype(np.int64),
        "query": qi.cpu().numpy().astype(np.int64), "key": ki.cpu().numpy().astype(np.int64),
        "attention": attn.float().cpu().numpy(),
        "score": m["score"].double().cpu().numpy(), "n_recon": m["n_recon"].cpu().numpy(),
        "rolls_tovee": m["rolls_tovee"].double().cpu().numpy(),
        "dominant_k": dom.cpu().numpy(),
        "dominant_sigma": (sigma.gather(-1, dom[:, None])[:, 0] / sigma[:, 0]).double().cpu().numpy(),
        "r": np.full(len(t), t.shape[-1], dtype=np.int64),
        "used": _used_tuples(m["order"].cpu().numpy(), m["n_recon"].cpu().numpy()),
        "query_token": tokens[b, qi].cpu().numpy(), "key_token": tokens[b, ki].cpu().numpy(),
        "kind": np.full(len(t), kind, dtype=object)}
    if rot is not None:
        mr = pair_measures(rot, frac)
        cols.update(n_recon_rotated=mr["n_recon"].cpu().numpy().astype(np.float64),
                    rolls_tovee_rotated=mr["rolls_tovee"].double().cpu().numpy(),
                    dominant_k_rotated=mr["dominant_k"].cpu().numpy().astype(np.float64))
    else:
        nan = np.full(len(t), np.nan)
        cols.update(n_recon_rotated=nan, rolls_tovee_rotated=nan, dominant_k_rotated=nan)
    return cols


def _assemble(frames: list[dict[str, Any]], control: Optional[str]) -> pd.DataFrame:
    """One frame from the per-chunk columns, typed and ordered (kind, layer, head, prompt, query, key)."""
    if not frames:
        return _empty_frame(control)
    df = pd.concat([pd.DataFrame(c) for c in frames], ignore_index=True)
    if control == "rotated":
        df["n_recon_rotated"] = df["n_recon_rotated"].astype(np.int64)
        df["dominant_k_rotated"] = df["dominant_k_rotated"].astype(np.int64)
    df["_kind"] = df["kind"].map({k: i for i, k in enumerate(KINDS)})
    df = df.sort_values(["_kind", "layer", "head", "prompt", "query", "key"], kind="stable")
    return df[list(COLUMNS)].reset_index(drop=True)


# ----------------------------------------------------------------------------- toy model

def toy_tokens(run: Any, n: int, *, seed: int = 0) -> tuple[Float[Tensor, "n D"], Float[Tensor, "n m D"], Float[Tensor, "n m"], Int[Tensor, "n"]]:
    """Toy examples ``r = W f``: query tokens, key tokens, the head's attention, planted key.

    Draws ``n`` examples of the run's own data distribution (:func:`svtools.toy.sample_batch`,
    generator seeded with ``seed``) and returns ``(x_query (n, D), x_keys (n, m, D),
    attention (n, m), planted (n,))``; ``planted`` is the key index holding the key feature of a
    template pair whose query feature is active in the query, or -1 when none does.
    """
    from svtools.toy import sample_batch, template_matrix

    cfg = run.cfg
    if run.qk is None:
        raise SVToolsError("this toy run has no attention head (cfg.head=False)")
    g = torch.Generator().manual_seed(int(seed))
    batch = sample_batch(cfg, int(n), g, device="cpu", dtype=run.features.dtype)
    W = run.features
    xq = batch.f_query @ W.T
    xk = batch.f_keys @ W.T
    q = xq @ run.W_Q.T
    k = xk @ run.W_K.T
    if cfg.rotary:
        from svtools.qk import rotary_matrices
        M = rotary_matrices(run.rotary_spec(), cfg.d_head, dtype=q.dtype)
        k = torch.einsum("mhg,bmg->bmh", M, k)
    attn = torch.einsum("bh,bmh->bm", q, k).softmax(-1)
    T = template_matrix(cfg, dtype=W.dtype)
    hit = torch.einsum("bn,nk,bmk->bm", (batch.f_query > 0).to(W.dtype), (T != 0).to(W.dtype),
                       (batch.f_keys > 0).to(W.dtype)) > 0
    planted = torch.where(hit.any(-1), hit.to(torch.int64).argmax(-1), torch.full((int(n),), -1))
    return xq, xk, attn, planted


def toy_pair_sad(run: Any) -> pd.DataFrame:
    """SAD of each template pair's *clean* score beside its measured alignment, one row per pair.

    For template pair ``p = (i, j)`` of a trained toy run, the terms are
    ``sad_terms(run.qk, w_i, w_j)`` (features as query and key; they sum to ``w_i^T Omega w_j``).
    Columns: ``pair``, ``cos`` (the pair's worst ``|cos|`` at its matched singular index,
    ``run.alignment()``), ``cos_q, cos_k``, ``score``, ``n_recon``, ``rolls_tovee``,
    ``dominant_k`` (index of the largest ``|term|``), ``assigned_k`` (matched index),
    ``cos_at_dominant`` (the pair's smaller ``|cos|`` with ``u_k, v_k`` at the dominant index) and
    ``dominant_shared`` (the dominant index is matched to another pair).
    """
    a, W = run.alignment(), run.features
    assigned = [int(x) for x in a.index.tolist()]
    rows = []
    for p, (i, j, _) in enumerate(run.cfg.template):
        t = sad_terms(run.qk, W[:, i], W[:, j])
        kd = int(t.abs().argmax())
        cq = torch.nn.functional.cosine_similarity(W[:, i], run.qk.U[:, kd], dim=0).abs()
        ck = torch.nn.functional.cosine_similarity(W[:, j], run.qk.V[:, kd], dim=0).abs()
        rows.append({"pair": p, "cos": float(a.worst[p]), "cos_q": float(a.cos_q[p]), "cos_k": float(a.cos_k[p]),
                     "score": float(t.sum()), "n_recon": int(n_recon(t)), "rolls_tovee": float(rolls_tovee(t)),
                     "dominant_k": kd, "assigned_k": assigned[p], "cos_at_dominant": float(min(cq, ck)),
                     "dominant_shared": kd in [x for q, x in enumerate(assigned) if q != p]})
    return pd.DataFrame(rows)


def toy_sparsity(
    run: Any,
    n: int = 512,
    *,
    select: Select = "threshold",
    threshold: float = 0.5,
    attention: Literal["absolute", "relative"] = "absolute",
    seed: int = 0,
    control_seed: int = 0,
    frac: float = 1.0,
) -> pd.DataFrame:
    """SAD of the toy head's attended pairs (the toy analogue of :func:`head_sparsity`).

    Draws ``n`` toy examples (:func:`toy_tokens`), selects the (query, key ``j``) pairs the head
    attends (:func:`select_pairs`; ``"acc"`` means ``>= 1/m``; no key is excluded: the toy has no
    attention sink), splits each pair's score ``r^T Omega s_j`` over the singular vectors
    (:func:`svtools.sad_terms`) and over a random rotation of them (:func:`svtools.rotated_terms`).
    ``attention="relative"``: each pair's terms minus their mean over the example's other keys.

    Returns a DataFrame with one row per selected pair: ``prompt`` (example), ``key``,
    ``attention``, ``planted`` (the key holds the query's template partner), ``score``,
    ``n_recon, rolls_tovee, n_recon_rotated, rolls_tovee_rotated, dominant_k, dominant_k_rotated,
    dominant_sigma, r, used``.
    """
    if attention not in ("absolute", "relative"):
        raise SVToolsError(f"unknown attention {attention!r}: use 'absolute' or 'relative'")
    xq, xk, attn, planted = toy_tokens(run, n, seed=seed)
    m = xk.shape[1]
    sel = select_pairs(attn[:, None, :], torch.ones(1, 1, m, dtype=torch.bool), select=select,
                       threshold=threshold, exclude_first=False)[:, 0]
    b, j = sel.nonzero().unbind(-1)
    # terms of every (example, key) pair: (n, m, r); rotary heads have one basis per offset m - j
    if run.cfg.rotary:
        qk_rot = run.qk_rotary
        per_key = [(sad_terms(qk_rot, xq, xk[:, jj], offset=m - jj),
                    rotated_terms(qk_rot, xq, xk[:, jj], offset=m - jj, seed=control_seed),
                    qk_rot.at_offset(m - jj).S) for jj in range(m)]  # m is small
        T_all = torch.stack([p[0] for p in per_key], 1)
        R_all = torch.stack([p[1] for p in per_key], 1)
        sig = torch.stack([p[2] for p in per_key], 0)[j]
    else:
        T_all = sad_terms(run.qk, xq[:, None, :], xk)
        R_all = rotated_terms(run.qk, xq[:, None, :], xk, seed=control_seed)
        sig = run.qk.S.expand(len(b), -1)
    if attention == "relative":
        T_all = relative_terms(T_all[:, None])[:, 0]
        R_all = relative_terms(R_all[:, None])[:, 0]
    t, tr = T_all[b, j], R_all[b, j]
    cols = {"prompt": b.numpy(), "key": j.numpy(), "attention": attn[b, j].double().numpy(),
            "planted": (planted[b] == j).numpy()}
    if len(b) == 0:
        return pd.DataFrame(cols)
    mr, mc = pair_measures(t, frac), pair_measures(tr, frac)
    dom = mr["dominant_k"]
    cols.update(score=mr["score"].double().numpy(), n_recon=mr["n_recon"].numpy(),
                rolls_tovee=mr["rolls_tovee"].double().numpy(), n_recon_rotated=mc["n_recon"].numpy(),
                rolls_tovee_rotated=mc["rolls_tovee"].double().numpy(), dominant_k=dom.numpy(),
                dominant_k_rotated=mc["dominant_k"].numpy(),
                dominant_sigma=(sig.gather(-1, dom[:, None])[:, 0] / sig[:, 0]).double().numpy(),
                r=np.full(len(b), t.shape[-1]),
                used=_used_tuples(mr["order"].numpy(), mr["n_recon"].numpy()))
    return pd.DataFrame(cols)


# ----------------------------------------------------------------------------- usage across prompts

def _check_columns(df: pd.DataFrame, cols: Iterable[str], what: str) -> None:
    check_columns(df, cols, what)


def _used_tuples_of(df: pd.DataFrame, what: str) -> pd.DataFrame:
    """``df`` with its ``used`` column as tuples of ints. A frame read back from a CSV file holds
    their text (``"(3, 0)"``, ``"(5,)"``, ``"()"``): parsed back; anything else is an error."""
    col = df["used"]
    if all(isinstance(u, (tuple, list)) for u in col):
        return df
    out = []
    for u in col:
        if isinstance(u, (tuple, list)):
            out.append(tuple(int(k) for k in u))
            continue
        text = u.strip() if isinstance(u, str) else None
        if text is None or not re.fullmatch(r"[(\[]\s*(\d+\s*(,\s*\d+\s*)*,?\s*)?[)\]]", text):
            raise SVToolsError(f"{what}: column 'used' must hold tuples of singular indices (as head_sparsity "
                               f"writes them, or their text read back from a CSV file), got {u!r}")
        out.append(tuple(int(k) for k in re.findall(r"\d+", text)))
    return df.assign(used=out)


def singular_vector_usage(df: pd.DataFrame, *, by: Sequence[str] = ("layer", "head")) -> pd.DataFrame:
    """How often each singular index ``k`` is among the terms a head's pairs need.

    For each group (default: each head) and each ``k`` used at least once: ``n_pairs`` (pairs
    whose N_recon set, column ``used``, contains ``k``), ``frac_pairs = n_pairs / pairs of the
    group``, ``n_prompts`` (distinct prompts with such a pair), ``frac_prompts``,
    ``frac_dominant`` (fraction of the group's pairs whose dominant term is ``k``), ``mass``
    (the usage distribution of :func:`usage_difference`: each pair spreads 1 evenly over its
    N_recon set; sums to 1 over ``k``). A head that reuses the same singular vectors across
    prompts has a few ``k`` with ``frac_prompts`` near 1. With baselines, group by
    ``("layer", "head", "kind")`` to compare attended and non-attended pairs.
    """
    by = as_names(by, "by")
    _check_columns(df, by + ["prompt", "used", "dominant_k"], "singular_vector_usage")
    df = _used_tuples_of(df, "singular_vector_usage")
    if df.empty:
        return pd.DataFrame(columns=by + ["k", "n_pairs", "frac_pairs", "n_prompts", "frac_prompts",
                                          "frac_dominant", "mass"])
    ex = df[by + ["prompt", "used"]].assign(w=1.0 / df["used"].map(len).clip(lower=1).to_numpy()) \
        .explode("used").dropna(subset=["used"]).rename(columns={"used": "k"})
    ex["k"] = ex["k"].astype(np.int64)
    g = ex.groupby(by + ["k"])
    out = pd.DataFrame({"n_pairs": g.size(), "n_prompts": g["prompt"].nunique()})
    sizes = df.groupby(by).agg(pairs=("prompt", "size"), prompts=("prompt", "nunique"))
    out = out.reset_index().merge(sizes.reset_index(), on=by)
    dom = df.groupby(by + ["dominant_k"]).size().rename("n_dom").reset_index().rename(columns={"dominant_k": "k"})
    out = out.merge(dom, on=by + ["k"], how="left").fillna({"n_dom": 0})
    out["frac_pairs"] = out["n_pairs"] / out["pairs"]
    out["frac_prompts"] = out["n_prompts"] / out["prompts"]
    out["frac_dominant"] = out["n_dom"] / out["pairs"]
    # usage mass: each pair spreads 1 evenly over its N_recon set (the distribution compared by
    # usage_difference); sums to 1 over k within a group (less when some scores are exactly zero)
    mass = ex.groupby(by + ["k"])["w"].sum().rename("mass").reset_index()
    out = out.merge(mass, on=by + ["k"], how="left")
    out["mass"] = out["mass"] / out["pairs"]
    return out[by + ["k", "n_pairs", "frac_pairs", "n_prompts", "frac_prompts", "frac_dominant", "mass"]] \
        .sort_values(by + ["k"]).reset_index(drop=True)


def _usage_weights(g: pd.DataFrame, r: int, on: str) -> np.ndarray:
    """``(pairs, r)`` usage of each pair: its N_recon set with mass 1/N_recon each (``on="used"``),
    or a one-hot at its dominant index (``on="dominant"``); rows sum to 1 (0 for a zero score)."""
    W = np.zeros((len(g), r), dtype=np.float64)
    if on == "dominant":
        W[np.arange(len(g)), g["dominant_k"].to_numpy(dtype=np.int64)] = 1.0
        return W
    used = g["used"].tolist()
    lens = np.fromiter((len(u) for u in used), dtype=np.int64, count=len(used))
    if lens.sum():
        rows = np.repeat(np.arange(len(used)), lens)
        cols = np.fromiter((k for u in used for k in u), dtype=np.int64, count=int(lens.sum()))
        W[rows, cols] = 1.0 / lens[rows]
    return W


def _distance(P: np.ndarray, Q: np.ndarray, measure: str) -> np.ndarray:
    """Total-variation or Jensen-Shannon distance (base 2, in [0, 1]) between rows of P and Q."""
    if measure == "tv":
        return 0.5 * np.abs(P - Q).sum(-1)
    M = 0.5 * (P + Q)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = lambda A: np.where(A > 0, A * np.log2(np.where(A > 0, A, 1.0) / np.where(M > 0, M, 1.0)), 0.0)  # noqa: E731
        js = 0.5 * kl(P).sum(-1) + 0.5 * kl(Q).sum(-1)
    return np.sqrt(np.clip(js, 0.0, 1.0))


def usage_difference(
    df: pd.DataFrame,
    *,
    by: Sequence[str] = ("layer", "head"),
    kinds: tuple[str, str] = ("attended", "non-attended"),
    on: Literal["used", "dominant"] = "used",
    measure: Literal["js", "tv"] = "js",
    n_perm: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Do two kinds of pairs of a head use *different* singular vectors? Distance and permutation null.

    For each group (default: each head) and each kind, the *usage distribution* over singular
    indices ``k``: ``P(k) = mean over the kind's pairs of w_pair(k)``, where a pair spreads a mass
    of 1 evenly over its N_recon set (column ``used``; ``on="used"``) or puts it on its dominant
    index (``on="dominant"``). So ``P(k)`` is the chance that a term drawn from the set of a
    random pair of that kind is ``k``; pairs with a zero score (empty set) are left out.

    ``distance``: Jensen-Shannon distance (``measure="js"``: square root of the base-2
    JS divergence, in [0, 1]) or total variation (``"tv"``: ``1/2 sum_k |P_a(k) - P_b(k)|``, in
    [0, 1]) between the two kinds. What "different" means: the same distance after shuffling
    the kind labels among the group's pairs (``n_perm`` permutations, group sizes kept; seeded).
    Finite samples make the distance positive even when both kinds use the same vectors; the
    null says how large it gets by chance. ``p_value = (1 + #{null >= distance}) / (1 + n_perm)``.
    Pairs of one prompt are not independent, so treat the p-value as a screen, not a test of a
    hypothesis about prompts.

    Rotary heads: index ``k`` is the ``k``-th singular vector *at the pair's offset*, a different
    vector at each offset; compare usage within an offset range, or read it as "which rank".

    Args:
        df: a :func:`head_sparsity` frame with baseline rows (column ``kind``).
        by: grouping columns.
        kinds: the two kinds to compare (values of the ``kind`` column).
        on, measure, n_perm, seed: as above.

    Returns:
        One row per group with both kinds present: ``by...``, ``kind_a, kind_b, pairs_a,
        pairs_b, distance, null_mean, null_q95, p_value, top_k_a, top_k_b`` (the index with
        the largest usage mass in each kind), ``measure``, ``on``.
    """
    by = as_names(by, "by")
    _check_columns(df, by + ["kind", "used", "dominant_k"], "usage_difference")
    on = as_choice(on, "on", ("used", "dominant"))
    measure = as_choice(measure, "measure", ("js", "tv"))
    n_perm = as_int(n_perm, "n_perm", min_value=1)
    seed = as_seed(seed, "seed")
    kinds = tuple(as_names(kinds, "kinds"))
    if len(kinds) != 2 or kinds[0] == kinds[1]:
        raise SVToolsError(f"kinds must name two different kinds, got {kinds!r}")
    df = _used_tuples_of(df, "usage_difference")
    present = set(df["kind"].unique())
    missing = [k for k in kinds if k not in present]
    if missing:
        raise SVToolsError(f"the frame has no rows of kind {missing}: run head_sparsity with "
                           f"baseline= (it has {sorted(present)})")
    rng = np.random.default_rng(seed)
    sub = df[df["kind"].isin(kinds)]
    if on == "used":
        sub = sub[sub["used"].map(len) > 0]
    rows = []
    for key, g in (sub.groupby(by, sort=True) if by else [((), sub)]):
        key = key if isinstance(key, tuple) else (key,)
        is_a = (g["kind"] == kinds[0]).to_numpy()
        n_a, n = int(is_a.sum()), len(g)
        if n_a == 0 or n_a == n:
            continue
        r = int(g["r"].max()) if "r" in g.columns else 1 + max(max(u) for u in g["used"] if len(u))
        W = _usage_weights(g, r, on)
        total = W.sum(0)
        Pa, Pb = W[is_a].mean(0), W[~is_a].mean(0)
        dist = float(_distance(Pa[None], Pb[None], measure)[0])
        null = []
        chunk = max(1, min(n_perm, 2_000_000 // max(n, 1)))
        for s in range(0, n_perm, chunk):
            m = min(chunk, n_perm - s)
            u = rng.random((m, n))
            cut = np.partition(u, n_a - 1, axis=1)[:, n_a - 1:n_a]
            L = (u <= cut).astype(np.float64)  # (m, n): n_a ones per row
            Sa = L @ W
            null.append(_distance(Sa / n_a, (total - Sa) / (n - n_a), measure))
        null = np.concatenate(null)
        rows.append(dict(zip(by, key)) | {
            "kind_a": kinds[0], "kind_b": kinds[1], "pairs_a": n_a, "pairs_b": n - n_a, "distance": dist,
            "null_mean": float(null.mean()), "null_q95": float(np.quantile(null, 0.95)),
            "p_value": float((1 + (null >= dist - 1e-12).sum()) / (1 + n_perm)),
            "top_k_a": int(np.argmax(Pa)), "top_k_b": int(np.argmax(Pb)), "measure": measure, "on": on})
    cols = by + ["kind_a", "kind_b", "pairs_a", "pairs_b", "distance", "null_mean", "null_q95", "p_value",
                 "top_k_a", "top_k_b", "measure", "on"]
    return pd.DataFrame(rows, columns=cols)


def reuse(df: pd.DataFrame, *, by: Sequence[str] = ("layer", "head")) -> pd.DataFrame:
    """Concentration of each head's dominant term across its pairs, in both bases.

    ``top_share``: fraction of the group's pairs whose dominant term is the group's most common
    dominant index (1 = every prompt uses the same singular vector); ``top_share_rotated``: the
    same in the rotated basis (the control: a fixed random basis per head); ``top_k``: that most
    common singular index; ``pairs``, ``prompts``.
    """
    by = as_names(by, "by")
    _check_columns(df, by + ["prompt", "dominant_k", "dominant_k_rotated"], "reuse")

    def share(s: pd.Series) -> float:
        return float(s.value_counts().iloc[0] / len(s)) if len(s) else float("nan")

    g = df.groupby(by)
    out = pd.DataFrame({
        "pairs": g.size(), "prompts": g["prompt"].nunique(),
        "top_k": g["dominant_k"].agg(lambda s: int(s.value_counts().index[0])),
        "top_share": g["dominant_k"].agg(share), "top_share_rotated": g["dominant_k_rotated"].agg(share)})
    return out.reset_index()


# ----------------------------------------------------------------------------- bootstrap

def _weighted_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Lower weighted median of ``values (n,)`` under each row of ``weights (B, n)``."""
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[:, order]
    c = np.cumsum(w, axis=1)
    half = c[:, -1:] / 2.0
    idx = (c < half).sum(axis=1)
    return v[np.minimum(idx, len(v) - 1)]


def bootstrap(
    df: pd.DataFrame,
    columns: str | Sequence[str] = ("rolls_tovee", "rolls_tovee_rotated", "n_recon", "n_recon_rotated"),
    *,
    by: Sequence[str] = ("layer",),
    stat: Literal["mean", "median"] = "mean",
    unit: str = "prompt",
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """``stat`` of each column per group, with a percentile bootstrap CI over prompts.

    Pairs from one prompt are not independent, so the resampling unit is the prompt (column
    ``unit``): each replicate draws the prompts with replacement and pools all their pairs (a
    prompt drawn twice counts twice). Vectorised: prompt multiplicities become row weights.

    Returns a long DataFrame: ``by...``, ``column``, ``estimate`` (on the data), ``lo``, ``hi``
    (the ``(1 - ci)/2`` and ``(1 + ci)/2`` quantiles of the replicates), ``pairs``, ``prompts``.
    """
    columns = as_names(columns, "columns", allow_empty=False)
    by = as_names(by, "by")
    if not isinstance(unit, str):
        raise SVToolsError(f"unit must be a column name, got {unit!r}")
    _check_columns(df, by + columns + [unit], "bootstrap")
    check_numeric_columns(df, columns, "bootstrap")
    stat = as_choice(stat, "stat", ("mean", "median"))
    ci = as_float(ci, "ci", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    n_boot = as_int(n_boot, "n_boot", min_value=1)
    seed = as_seed(seed, "seed")
    if df.empty:
        raise SVToolsError("bootstrap: the frame has no rows (no pairs were selected?): nothing to summarise")
    rng = np.random.default_rng(seed)
    rows = []
    groups = df.groupby(by, sort=True) if by else [((), df)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        units, inv = np.unique(g[unit].to_numpy(), return_inverse=True)
        counts = rng.multinomial(len(units), np.full(len(units), 1.0 / len(units)), size=n_boot)  # (B, U)
        w = counts[:, inv].astype(np.float64)  # (B, rows)
        for col in columns:
            v = g[col].to_numpy(dtype=np.float64)
            ok = ~np.isnan(v)
            if not ok.any():
                est, lo, hi = np.nan, np.nan, np.nan
            else:
                vv, ww = v[ok], w[:, ok]
                if stat == "mean":
                    tot = ww.sum(1)
                    reps = np.where(tot > 0, (ww * vv).sum(1) / np.where(tot > 0, tot, 1), np.nan)
                    est = vv.mean()
                else:
                    reps = _weighted_median(vv, ww)
                    est = _weighted_median(vv, np.ones((1, len(vv))))[0]
                lo, hi = np.nanquantile(reps, [(1 - ci) / 2, (1 + ci) / 2])
            rows.append(dict(zip(by, key)) | {"column": col, "stat": stat, "estimate": float(est),
                                               "lo": float(lo), "hi": float(hi), "pairs": int(ok.sum()),
                                               "prompts": len(units)})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- IOI helpers

def ioi_tokens(model: Any, dataset: Any) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Any]:
    """IOI prompts as :func:`svtools.decomposition.tokenize` feeds them, with name positions.

    Tokenises ``dataset.texts`` with ``tokenize`` (the one tokenisation path), asks
    :meth:`~svtools.data.IOIDataset.positions` for the same layout (BOS prepended exactly when
    :func:`~svtools.decomposition.prepends_bos` says so) and checks the identity
    ``ids[i, positions.io[i]] == positions.io_id[i]`` (same for S1, S2).

    Returns ``(ids, attention_mask, positions)`` (an :class:`~svtools.data.IOIPositions`).
    """
    from svtools.data.ioi import IOIDataset
    from svtools.decomposition import prepends_bos, tokenize
    from svtools.models import check_bridge

    check_bridge(model)
    if not isinstance(dataset, IOIDataset):
        raise SVToolsError(f"dataset must be an IOIDataset (svtools.data.ioi_prompts, or run.prompts for the IOI "
                           f"language model), got {type(dataset).__name__}")
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise SVToolsError("this model has no tokenizer; IOI prompts need one")
    ids, am = tokenize(model, dataset.texts)
    pos = dataset.positions(tok, prepend_bos=prepends_bos(model))
    if not torch.equal(am.sum(1).cpu(), pos.length.cpu()):
        raise SVToolsError("tokenize() and the IOI positions disagree on prompt lengths")
    r = torch.arange(len(ids))
    for name, p, want in (("IO", pos.io, pos.io_id), ("S1", pos.s1, pos.s_id), ("S2", pos.s2, pos.s_id)):
        if not torch.equal(ids[r, p.cpu()], want.cpu()):
            raise SVToolsError(f"IOI {name} positions do not point at the name tokens in tokenize()'s ids")
    return ids, am, pos


def label_ioi_roles(df: pd.DataFrame, positions: Any) -> pd.DataFrame:
    """Add ``query_role`` and ``key_role`` columns (IO, S1, S2, END or "other") to a pair frame.

    ``positions``: the :class:`~svtools.data.IOIPositions` of the prompts the frame was made on
    (row ``prompt`` of the frame = row of the positions). Returns a new frame.
    """
    _check_columns(df, ["prompt", "query", "key"], "label_ioi_roles")
    p = df["prompt"].to_numpy()
    n = len(positions.io)
    if len(p) and (p.min() < 0 or p.max() >= n):
        raise SVToolsError(f"frame has prompt indices up to {p.max()} but positions cover {n} prompts")
    out = df.copy()
    for col in ("query", "key"):
        pos = out[col].to_numpy()
        role = np.full(len(out), "other", dtype=object)
        for name, t in (("END", positions.end), ("S2", positions.s2), ("S1", positions.s1), ("IO", positions.io)):
            role[t.cpu().numpy()[p] == pos] = name
        out[f"{col}_role"] = role
    return out


# ----------------------------------------------------------------------------- models and training

#: IOI heads (layer, head) studied in the earlier papers, per hub model name.
IOI_HEADS: dict[str, list[tuple[int, int]]] = {
    "gpt2": [(3, 0), (4, 11), (8, 6), (9, 6), (9, 9), (10, 0)],
    "EleutherAI/pythia-160m": [(2, 6), (4, 11), (7, 9), (8, 2), (8, 10), (10, 7)],
}


def ioi_heads(name: str) -> Optional[list[tuple[int, int]]]:
    """The IOI heads of :data:`IOI_HEADS` for a model name (case-insensitive; ``"gpt2-small"``
    and ``"pythia-160m"`` also match), or None when none are known for it."""
    key = str(name).lower().replace("gpt2-small", "gpt2")
    for k, v in IOI_HEADS.items():
        if key in (k.lower(), k.lower().split("/")[-1]):
            return list(v)
    return None


def model_note(requested: str, model: Any) -> tuple[str, bool]:
    """A one-line statement of which model actually ran, and whether it replaced ``requested``.

    ``load_model(..., fallback=True)`` loads the embedded all-MiniLM-L6-v2 when a hub model is
    unreachable; chapters print this line so that a fallback is never hidden.
    """
    from svtools.models import MINILM_ALIASES

    ran = str(getattr(model.cfg, "model_name", "")) or type(model).__name__
    wanted_minilm = str(requested).lower() in MINILM_ALIASES
    fell_back = (not wanted_minilm) and ran == "all-MiniLM-L6-v2"
    if fell_back:
        return (f"MODEL RUN: {ran} -- FALLBACK: {requested!r} was requested but could not be loaded "
                "(hub unreachable); every number below is for all-MiniLM-L6-v2, not for "
                f"{requested!r}.", True)
    return f"MODEL RUN: {ran} (requested {requested!r})", False


def sparsity_over_checkpoints(
    name: str,
    steps: Sequence[int],
    texts: Sequence[str],
    *,
    heads: Sequence[tuple[int, int]],
    progress: bool = True,
    **kwargs: Any,
) -> pd.DataFrame:
    """:func:`head_sparsity` of ``heads`` at each training checkpoint of a hub model (Pythia).

    Loads ``load_model(name, checkpoint=step)`` for each step (needs the hub; raises
    :class:`svtools.HubUnavailableError` otherwise — no fallback: a checkpoint series of another
    model would be meaningless), runs :func:`head_sparsity` on ``texts`` and adds a ``step``
    column. ``kwargs`` go to :func:`head_sparsity` (e.g. ``attention="relative"``).
    """
    from svtools.models import load_model

    steps = [int(s) for s in steps]
    if not steps:
        raise SVToolsError("steps is empty")
    frames = []
    for step in tqdm(steps, desc=f"{name} checkpoints", disable=not progress):
        model = load_model(name, checkpoint=step)
        df = head_sparsity(model, list(texts), heads=list(heads), progress=False, **kwargs)
        df.insert(0, "step", step)
        frames.append(df)
        del model
    return pd.concat(frames, ignore_index=True)


def toy_sparsity_over_training(
    cfg: Any,
    steps: Sequence[int],
    *,
    n: int = 512,
    progress: bool = True,
    **kwargs: Any,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`toy_sparsity` at several points of one toy training run.

    :func:`svtools.toy.train` is deterministic and, with a constant learning rate and no warmup,
    training for ``s`` steps gives exactly the first ``s`` steps of a longer run; so the model
    at each step is obtained by training to it (cost: the sum of ``steps``). ``cfg`` must
    therefore have ``lr_schedule="constant"`` and ``warmup=0`` (else :class:`SVToolsError`).

    Returns ``(pairs, runs)``: the :func:`toy_sparsity` rows with a ``step`` column, and one row
    per step with the alignment of the template pairs (``cos_worst``: the smallest of the query
    and key cosines of the worst pair) and the final losses.
    """
    from svtools.toy import train

    if cfg.lr_schedule != "constant" or cfg.warmup:
        raise SVToolsError("toy_sparsity_over_training needs cfg.lr_schedule='constant' and warmup=0, so "
                           "that shorter runs are exact prefixes of the longest one")
    steps = sorted({int(s) for s in steps})
    if not steps or steps[0] < 1:
        raise SVToolsError(f"steps must be positive integers, got {steps}")
    frames, runs = [], []
    for s in tqdm(steps, desc="toy checkpoints", disable=not progress):
        run = train(cfg.replace(steps=s, log_every=s), progress=False)
        df = toy_sparsity(run, n, **kwargs)
        df.insert(0, "step", s)
        frames.append(df)
        al = run.alignment()
        runs.append({"step": s, "cos_worst": float(torch.minimum(al.cos_q, al.cos_k).min()),
                     "loss_attn": float(run.history.loss_attn[-1]),
                     "loss_recon": float(run.history.loss_recon[-1]), "pairs": len(df)})
    return pd.concat(frames, ignore_index=True), pd.DataFrame(runs)


def format_summary(summary: pd.DataFrame, *, digits: int = 2) -> pd.DataFrame:
    """A :func:`bootstrap` result as a readable wide table: one row per group, one column per
    measure, cells ``"estimate [lo, hi]"``, plus the number of pairs and prompts."""
    _check_columns(summary, ["column", "estimate", "lo", "hi", "pairs", "prompts"], "format_summary")
    digits = as_int(digits, "digits", min_value=0, max_value=15)
    by = [c for c in summary.columns if c not in ("column", "stat", "estimate", "lo", "hi", "pairs", "prompts")]
    cell = summary.apply(lambda r: f"{r.estimate:.{digits}f} [{r.lo:.{digits}f}, {r.hi:.{digits}f}]", axis=1)
    wide = summary.assign(cell=cell).pivot_table(index=by or None, columns="column", values="cell",
                                                 aggfunc="first", sort=False) if by else \
        pd.DataFrame([dict(zip(summary["column"], cell))])
    counts = summary.groupby(by, sort=False)[["pairs", "prompts"]].max() if by else \
        summary[["pairs", "prompts"]].max().to_frame().T
    order = list(dict.fromkeys(summary["column"]))
    return wide[order].join(counts) if by else pd.concat([wide[order], counts], axis=1)


def compare_kinds(summary: pd.DataFrame, a: str = "attended", b: str = "non-attended", *,
                  column: str = "rolls_tovee", column_b: Optional[str] = None) -> pd.DataFrame:
    """Compare two kinds of pairs group by group in a :func:`bootstrap` summary grouped by ``kind``.

    For each group (the summary's other ``by`` columns): the estimates of ``column`` for kind
    ``a`` and of ``column_b`` (default ``column``; e.g. ``"rolls_tovee_rotated"`` to compare with
    the control) for kind ``b``, and ``verdict``: ``"lower"`` when ``a``'s interval lies entirely
    below ``b``'s, ``"higher"`` when entirely above, else ``"overlap"``. For Rolls-Tovee and
    N_recon, "lower" means sparser.
    """
    _check_columns(summary, ["kind", "column", "estimate", "lo", "hi"], "compare_kinds")
    column_b = column if column_b is None else column_b
    kinds, cols = sorted(map(str, summary["kind"].unique())), sorted(map(str, summary["column"].unique()))
    for arg, value in (("a", a), ("b", b)):
        if value not in kinds:
            raise SVToolsError(f"compare_kinds: {arg}={value!r} is not a kind of this summary; it has {kinds}")
    for arg, value in (("column", column), ("column_b", column_b)):
        if value not in cols:
            raise SVToolsError(f"compare_kinds: {arg}={value!r} is not a column of this summary; it has {cols}")
    if (a, column) == (b, column_b):
        raise SVToolsError(f"compare_kinds: a and b are the same ({a!r}, {column!r}); compare two kinds or two columns")
    # groups: the summary's other columns, and the statistic (a mean is compared with a mean only)
    by = [c for c in summary.columns if c not in ("kind", "column", "estimate", "lo", "hi", "pairs", "prompts")]
    A = summary[(summary["kind"] == a) & (summary["column"] == column)]
    B = summary[(summary["kind"] == b) & (summary["column"] == column_b)]
    keep = by + ["estimate", "lo", "hi"]
    m = A[keep].merge(B[keep], on=by, suffixes=("_a", "_b")) if by else \
        pd.concat([A[keep].add_suffix("_a").reset_index(drop=True), B[keep].add_suffix("_b").reset_index(drop=True)], axis=1)
    m["verdict"] = np.where(m["hi_a"] < m["lo_b"], "lower", np.where(m["lo_a"] > m["hi_b"], "higher", "overlap"))
    return m.rename(columns={"estimate_a": a, "estimate_b": f"{b} ({column_b})" if column_b != column else b})
