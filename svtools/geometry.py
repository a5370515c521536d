"""Feature geometry: how the feature directions of a toy model share the residual space.

Features are the columns ``w_i`` of ``W`` (``d_model x N``). In superposition (``N > d_model``)
they cannot all be orthogonal; these measures say how much each one overlaps with the others.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from svtools._checks import SVToolsError, as_indices, as_tensor, check_finite

__all__ = ["gram", "feature_dimensionality", "max_interference", "span_dims", "outside_energy"]


def _features(W) -> Tensor:
    W = as_tensor(W, "features")
    if W.ndim != 2:
        raise SVToolsError(f"features must have shape (d_model, n_features), got {tuple(W.shape)}")
    check_finite(W, "features")
    return W


def _indices(idx, n: int, name: str) -> Tensor:
    """Feature indices (ints, numpy ints, 1-D int arrays/tensors, any iterable of them) in ``[0, n)``."""
    if not isinstance(idx, (Tensor, np.ndarray, list, tuple, range)) and hasattr(idx, "__iter__"):
        idx = list(idx)
    if isinstance(idx, Tensor):
        idx = idx.detach().cpu()
    return torch.tensor(as_indices(idx, name, n=n), dtype=torch.long)


def gram(features: Float[Tensor, "d_model N"], *, normalize: bool = False) -> Float[Tensor, "N N"]:
    r""":math:`W^\top W` (``normalize=True``: cosines :math:`w_i\cdot w_j / (\|w_i\|\,\|w_j\|)`)."""
    W = _features(features)
    if normalize:
        W = W / W.norm(dim=0, keepdim=True).clamp_min(torch.finfo(W.dtype).tiny)
    return W.transpose(0, 1) @ W


def feature_dimensionality(features: Float[Tensor, "d_model N"]) -> Float[Tensor, "N"]:
    r"""Elhage et al. (2022) feature dimensionality :math:`D_i = \|w_i\|^2 / \sum_j (\hat w_i\cdot w_j)^2`.

    :math:`D_i = 1` for a feature orthogonal to all others (it owns a dimension), :math:`1/2` for
    an antipodal pair, :math:`0` for a feature that is not represented (zero column).
    Identity: orthogonal features have :math:`D_i = 1` each.
    """
    W = _features(features)
    norm2 = (W * W).sum(0)                                   # (N,)
    unit = W / norm2.sqrt().clamp_min(torch.finfo(W.dtype).tiny)
    overlap = ((unit.transpose(0, 1) @ W) ** 2).sum(1)       # sum_j (w^_i . w_j)^2
    return torch.where(norm2 > 0, norm2 / overlap.clamp_min(torch.finfo(W.dtype).tiny),
                       torch.zeros_like(norm2))


def max_interference(features: Float[Tensor, "d_model N"],
                     which: Iterable[int] | Tensor | None = None) -> Float[Tensor, "n"]:
    r"""Largest :math:`|\cos(w_i, w_j)|` over :math:`j \ne i` for each feature :math:`i` in ``which``
    (default all).

    0 means ``w_i`` is orthogonal to every other feature; 1 means it duplicates one of them.
    """
    C = gram(features, normalize=True).abs()
    N = C.shape[0]
    C = C.masked_fill(torch.eye(N, dtype=torch.bool, device=C.device), 0.0)
    idx = torch.arange(N) if which is None else _indices(which, N, "which")
    return C[idx.to(C.device)].amax(dim=1)


def span_dims(features: Float[Tensor, "d_model N"], which: Iterable[int] | Tensor,
              *, rel_tol: float = 0.05) -> int:
    """Number of directions the features ``which`` really use: singular values of ``W[:, which]``
    above ``rel_tol`` times the largest. The paper's claim: with a single attended pair the other
    ``N - 2`` features are squeezed into ``d_model - 2`` dimensions."""
    W = _features(features)
    idx = _indices(which, W.shape[1], "which")
    s = torch.linalg.svdvals(W[:, idx.to(W.device)].to(torch.float64))
    return int((s > rel_tol * s.max()).sum()) if float(s.max()) > 0 else 0


def outside_energy(features: Float[Tensor, "d_model N"], which: Iterable[int] | Tensor,
                   away_from: Iterable[int] | Tensor) -> Float[Tensor, ""]:
    r"""Fraction of :math:`\sum_j \|w_j\|^2` over :math:`j` in ``which`` that lies in the span of the features
    ``away_from``: 0 when the ``which`` features avoid those directions entirely."""
    W = _features(features).to(torch.float64)
    idx = _indices(which, W.shape[1], "which").to(W.device)
    away = _indices(away_from, W.shape[1], "away_from").to(W.device)
    Q, _ = torch.linalg.qr(W[:, away])
    X = W[:, idx]
    return ((Q.transpose(0, 1) @ X) ** 2).sum() / (X * X).sum().clamp_min(torch.finfo(W.dtype).tiny)
