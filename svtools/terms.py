"""Per-singular-vector terms of attention scores (sparse attention decomposition, SAD).

For one head, ``x~^T Omega~ y~ = sum_k sigma_k (u_k^T x~)(v_k^T y~)``: the ``k``-th *term* of
the score. :func:`sad_terms` computes them, :func:`rotated_terms` computes the same score's
terms in a randomly rotated basis (the earlier work's control; not evidence of alignment, see
there), :func:`relative_terms` removes softmax's shift invariance term by term, and
:func:`merge_degenerate` sums the terms of equal singular values, whose individual terms an SVD
does not determine. The calibrated comparison for sparsity is :mod:`svtools.sad.null`.
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from svtools._checks import SVToolsError, as_int, as_tensor, broadcast_leading, check_finite
from svtools.qk import DEGENERATE_TOL, QKSVD, degenerate_groups, rotated_factors

__all__ = ["sad_terms", "rotated_terms", "relative_terms", "relative_pair_terms", "homogeneous", "merge_degenerate"]


def homogeneous(x: Float[Tensor, "... d"], qk: QKSVD, name: str = "x") -> Float[Tensor, "... d_in"]:
    """Append the constant coordinate when ``qk`` has biases; accept already-homogeneous input.

    ``x`` may have ``d_model`` features (a 1 is appended if ``qk.has_bias``) or ``d_in``.
    """
    x = as_tensor(x, name)
    check_finite(x, name)
    d = x.shape[-1] if x.ndim else -1
    if d == qk.d_in:
        return x.to(qk.U.dtype)
    if qk.has_bias and d == qk.d_model:
        return torch.cat([x.to(qk.U.dtype), torch.ones_like(x[..., :1], dtype=qk.U.dtype)], dim=-1)
    raise SVToolsError(f"{name} must have last dimension d_model={qk.d_model}"
                       + (f" (or d_in={qk.d_in})" if qk.has_bias else "") + f", got shape {tuple(x.shape)}")


def _select_offset(qk: QKSVD, offset: Optional[int]) -> QKSVD:
    if not isinstance(qk, QKSVD):
        raise SVToolsError(f"qk must be a QKSVD (from svtools.qk_svd), got {type(qk).__name__}")
    if qk.rotary is not None:
        if offset is None:
            raise SVToolsError("this decomposition is rotary: pass offset= (query position - key position)")
        return qk.at_offset(as_int(offset, "offset"))
    if offset is not None:
        raise SVToolsError("offset= only applies to rotary decompositions")
    return qk


def _terms_from_factors(left: Tensor, right: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """``(x^T left)_k (y^T right)_k`` with broadcasting over leading dims."""
    broadcast_leading([left.shape[:-2], x.shape[:-1], y.shape[:-1]], ["qksvd", "x_query", "x_key"])
    a = (x[..., None, :] @ left).squeeze(-2)
    b = (y[..., None, :] @ right).squeeze(-2)
    return a * b


def sad_terms(qk: QKSVD, x_query: Float[Tensor, "... d_model"], x_key: Float[Tensor, "... d_model"],
              *, offset: Optional[int] = None) -> Float[Tensor, "... r"]:
    """Terms ``sigma_k (u_k^T x~)(v_k^T y~)`` of the unscaled score of ``x_query`` on ``x_key``.

    Identity: ``sad_terms(qk, x, y).sum(-1) == x~^T Omega~ y~`` (the pre-softmax, pre-``1/sqrt(d_head)``
    score). Leading dims of ``qk`` (e.g. ``head``) and of the inputs broadcast.

    Args:
        qk: from :func:`svtools.qk_svd`.
        x_query, x_key: ``(..., d_model)`` inputs of the query and key projections (a 1 is
            appended when ``qk`` has biases).
        offset: for rotary decompositions, ``query position - key position``.
    """
    qk = _select_offset(qk, offset)
    x = homogeneous(x_query, qk, "x_query")
    y = homogeneous(x_key, qk, "x_key")
    left, right = qk.factors()
    return _terms_from_factors(left, right, x, y)


def rotated_terms(qk: QKSVD, x_query: Float[Tensor, "... d_model"], x_key: Float[Tensor, "... d_model"],
                  *, seed: int = 0, offset: Optional[int] = None) -> Float[Tensor, "... r"]:
    """The earlier SAD work's control: the same score split over a Haar-random rotation of the basis.

    With ``Q`` random orthogonal (one per head, from ``seed``), the ``k``-th term is
    ``(x~^T U S^1/2 Q)_k (y~^T V S^1/2 Q)_k``. Identity: the terms sum to the same score as
    :func:`sad_terms` (``Q Q^T = I``).

    **Not evidence of alignment.** The rotation mixes large and small singular values, so it
    flattens the spectrum: a head whose singular values fall off looks sparser in its own basis
    than in the rotated one for any inputs, including inputs with no features at all
    (Rolls-Tovee real / rotated on i.i.d. Gaussian inputs: about 0.9 for a random-initialisation
    spectrum, 0.13-0.18 for a rank-one head; :func:`svtools.sad.null.featureless_calibration`).
    It is kept to compare with the earlier work; the calibrated comparison, which keeps the
    spectrum, is :mod:`svtools.sad.null` (``head_sparsity(control="spectrum")``).
    """
    qk = _select_offset(qk, offset)
    x = homogeneous(x_query, qk, "x_query")
    y = homogeneous(x_key, qk, "x_key")
    left, right = rotated_factors(qk, seed=as_int(seed, "seed"))
    return _terms_from_factors(left, right, x, y)


def relative_terms(terms: Float[Tensor, "... query key r"],
                   mask: Optional[Bool[Tensor, "... query key"]] = None) -> Float[Tensor, "... query key r"]:
    """Relative-attention terms: each pair's terms minus their mean over the query's other keys.

    ``rel[q, j, k] = terms[q, j, k] - mean_{j' != j, mask[q, j']} terms[q, j', k]``. Summing over
    ``k`` gives the relative score ``l_j - mean_{j' != j} l_j'``, which (unlike ``l_j``) does not
    change when a constant is added to every score of the query.

    Pairs that are masked out, or whose query sees fewer than two keys, have no relative score:
    they are NaN.

    Args:
        terms: ``(..., query, key, r)``, e.g. :attr:`HeadDecomposition.terms`.
        mask: ``(..., query, key)`` boolean, broadcastable; True where the query may attend.
            ``None`` = every key visible.
    """
    terms = as_tensor(terms, "terms")
    if terms.ndim < 3:
        raise SVToolsError(f"terms must have shape (..., query, key, r), got {tuple(terms.shape)}")
    if mask is None:
        mask = torch.ones(terms.shape[-3:-1], dtype=torch.bool, device=terms.device)
    mask = torch.as_tensor(mask, device=terms.device)
    if mask.dtype != torch.bool:
        raise SVToolsError(f"mask must be boolean, got {mask.dtype}")
    try:
        mask = mask.expand(terms.shape[:-1])
    except RuntimeError as exc:
        raise SVToolsError(f"mask of shape {tuple(mask.shape)} does not broadcast to terms' "
                           f"(..., query, key) = {tuple(terms.shape[:-1])}") from exc
    m = mask[..., None].to(terms.dtype)
    masked = torch.where(mask[..., None], terms, torch.zeros((), dtype=terms.dtype, device=terms.device))
    total = masked.sum(dim=-2, keepdim=True)  # (..., query, 1, r)
    count = m.sum(dim=-2, keepdim=True)  # (..., query, 1, 1)
    others = (count - 1).clamp_min(1)
    rel = terms - (total - masked) / others
    valid = mask[..., None] & (count >= 2)
    return torch.where(valid, rel, torch.full((), float("nan"), dtype=terms.dtype, device=terms.device))


def relative_pair_terms(
    terms: Float[Tensor, "pair r"],
    total: Float[Tensor, "pair r"],
    count: Float[Tensor, "pair"] | Tensor,
) -> Float[Tensor, "pair r"]:
    """Relative-attention terms of selected pairs from their query's total, without the full grid.

    ``rel = terms - (total - terms) / (count - 1)``, where ``total[p] = sum_{j' visible} terms[q, j']``
    is the sum of the query's terms over every key it sees (``count`` keys, the pair's own key
    included). For a bilinear score ``t[q, j] = a_q * c_j`` the total is ``a_q * sum_j' c_j'``:
    each query needs only the sum (or mean) of its keys' projections, so relative terms cost
    ``O(pairs * r)`` instead of ``O(query * key * r)``.

    Identity: equals ``relative_terms(grid, mask)[pair]`` for the grid the pairs come from. Pairs
    whose query sees fewer than two keys are NaN (as in :func:`relative_terms`).
    """
    terms = as_tensor(terms, "terms")
    total = as_tensor(total, "total").to(terms.dtype)
    count = torch.as_tensor(count, device=terms.device).to(terms.dtype)
    if terms.shape != total.shape or count.shape != terms.shape[:-1]:
        raise SVToolsError(f"terms {tuple(terms.shape)}, total {tuple(total.shape)} and count "
                           f"{tuple(count.shape)} must be (pair, r), (pair, r), (pair,)")
    rel = terms - (total - terms) / (count - 1).clamp_min(1)[..., None]
    return torch.where((count >= 2)[..., None], rel, torch.full((), float("nan"), dtype=terms.dtype,
                                                               device=terms.device))


def merge_degenerate(terms: Float[Tensor, "... r"], S: Float[Tensor, "... r"],
                     tol: float = DEGENERATE_TOL) -> Float[Tensor, "... r"]:
    """Terms with each (near-)degenerate group of singular values summed into its first index.

    ``out[..., g] = sum_{k in G} terms[..., k]`` for the first index ``g`` of each group ``G`` of
    :func:`svtools.qk.degenerate_groups` (``S`` broadcasts against ``terms``), and 0 at the
    group's other indices. The group sums are functions of ``Omega`` alone, so N_recon and the
    Rolls-Tovee sparseness of the merged terms do not depend on which basis of a degenerate
    subspace the SVD returned (a group counts as one term; its other slots as zero terms, so the
    number of terms ``r`` is unchanged and heads without degeneracy are untouched). Identity:
    ``merge_degenerate(t, S).sum(-1) == t.sum(-1)``.
    """
    terms = as_tensor(terms, "terms")
    S = as_tensor(S, "S").to(terms.device)
    try:
        first = degenerate_groups(S, tol).expand(terms.shape)
    except RuntimeError as exc:
        raise SVToolsError(f"S of shape {tuple(S.shape)} does not broadcast to terms {tuple(terms.shape)}") from exc
    return merge_groups(terms, first)


def merge_groups(terms: Float[Tensor, "... r"], first: Int[Tensor, "... r"]) -> Float[Tensor, "... r"]:
    """:func:`merge_degenerate` with the groups already found (``first`` of :func:`svtools.qk.degenerate_groups`,
    shaped like ``terms``): callers that find them once per head or offset, not per row, index them
    here. ``terms`` itself when no group has two members."""
    if bool((first == torch.arange(terms.shape[-1], device=terms.device)).all()):
        return terms
    return torch.zeros_like(terms).scatter_add_(-1, first, terms)
