"""Which pairs SAD measures: the pairs a head attends, and the baseline pairs beside them.

* :func:`select_pairs` — the (query, key) pairs counted as "attended": attention >= a threshold
  (the earlier SAD work: 0.5) or the ACC rule (attention >= 1 / number of keys the query sees,
  i.e. ``1 / (query position + 1)`` in a causal model), first key excluded by default.
* :func:`baseline_pairs` — the seeded samples of non-attended or random pairs of the same heads
  (:data:`KINDS`), drawn with the counter-based :func:`pair_uniform`, so that a sample does not
  depend on chunking, on the other heads measured or on the device.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from svtools._checks import SVToolsError, as_bool, as_choice, as_float, as_indices, as_int, as_tensor

__all__ = ["select_pairs", "baseline_pairs", "pair_uniform", "KINDS"]

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
    return select_pairs_unchecked(pattern, mask, select=select, threshold=threshold, exclude_first=exclude_first)


def select_pairs_unchecked(pattern: Tensor, mask: Tensor, *, select: str, threshold: float, exclude_first: bool,
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


def check_baseline(baseline: Any, fraction: float, bound: Optional[float]
                   ) -> tuple[tuple[str, ...], float, Optional[float]]:
    """The baseline kinds :func:`head_sparsity` is asked for (none, one or a list), checked, with
    the sampling ``fraction`` and the attention ``bound`` of the non-attended pairs (both checked:
    ``(kinds, fraction, bound)``)."""
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
