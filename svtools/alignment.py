r"""Which singular vectors of a head belong to which feature pair: sign-invariant matching.

A head's bilinear form :math:`\Omega = U \operatorname{diag}(S) V^\top` scores a query token
:math:`r` against a key token :math:`s` as :math:`r^\top \Omega s = \sum_k S_k\,(u_k\cdot r)(v_k
\cdot s)`. If the head attends because query-side feature :math:`w_i` meets key-side feature
:math:`w_j`, the paper's claim is that some singular pair :math:`(u_k, v_k)` lines up with
:math:`(w_i, w_j)`: :math:`|\cos(w_i, u_k)| \approx 1` and :math:`|\cos(w_j, v_k)| \approx 1`.
Singular vectors are defined only up to a joint sign flip of :math:`(u_k, v_k)`, so every measure here
uses absolute cosines, and the index ``k`` is found by an assignment over *all* indices: nothing
assumes that the strongest template pair sits at ``k = 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from jaxtyping import Float, Int
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from svtools._checks import SVToolsError, as_int, as_tensor, check_finite
from svtools.qk import QKSVD

__all__ = ["PairAlignment", "abs_cosines", "chance_cosine", "match_pairs"]


def chance_cosine(dim: int) -> float:
    r""":math:`\mathbb{E}\,|\cos(a, b)|` for a fixed unit vector and a uniformly random direction in
    :math:`\mathbb{R}^d` (:math:`d` = ``dim``).

    Closed form: :math:`\Gamma(d/2) / (\sqrt\pi\,\Gamma((d+1)/2))` (:math:`2/\pi` for
    :math:`d = 2`, :math:`1/2` for :math:`d = 3`, :math:`\approx\sqrt{2/(\pi d)}` for large
    :math:`d`).
    """
    d = as_int(dim, "dim", min_value=1)
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)


def abs_cosines(a: Float[Tensor, "d n"], b: Float[Tensor, "d r"]) -> Float[Tensor, "n r"]:
    """``|cos|`` between every column of ``a`` and every column of ``b`` (zero columns give 0)."""
    a, b = as_tensor(a, "a"), as_tensor(b, "b")
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise SVToolsError(f"a and b must be (d, n) and (d, r) with the same d, got {tuple(a.shape)} and {tuple(b.shape)}")
    an = a / a.norm(dim=0, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    bn = b / b.norm(dim=0, keepdim=True).clamp_min(torch.finfo(b.dtype).tiny)
    return (an.transpose(0, 1) @ bn).abs()


@dataclass(frozen=True)
class PairAlignment:
    """How each template pair ``(i, j)`` lines up with the singular pairs of ``Omega``.

    Shapes (``P`` pairs, ``N`` features, ``r`` singular pairs):

    - pairs: ``(P, 2)`` query feature ``i``, key feature ``j``.
    - index: ``(P,)`` singular index assigned to each pair (one pair per index; ``-1`` when
      there are more pairs than indices and the pair lost the assignment).
    - best: ``(P,)`` the index that maximises the pair's score on its own (pairs may share it:
      this is how "several pairs share one singular vector" shows up).
    - cos_q: ``(P,)`` ``|cos(w_i, u_index)|`` (NaN where ``index = -1``).
    - cos_k: ``(P,)`` ``|cos(w_j, v_index)|``.
    - sigma: ``(P,)`` the singular value at the assigned index (NaN where ``index = -1``).
    - chance: expected ``|cos|`` of a random direction in ``d_model`` dimensions.
        cos_U: ``(N, r)`` ``|cos(w_n, u_k)|`` for every feature (heatmaps).
        cos_V: ``(N, r)`` ``|cos(w_n, v_k)|``.
        S: ``(r,)`` all singular values.
    """

    pairs: Int[Tensor, "P 2"]
    index: Int[Tensor, "P"]
    best: Int[Tensor, "P"]
    cos_q: Float[Tensor, "P"]
    cos_k: Float[Tensor, "P"]
    sigma: Float[Tensor, "P"]
    chance: float
    cos_U: Float[Tensor, "N r"]
    cos_V: Float[Tensor, "N r"]
    S: Float[Tensor, "r"]

    @property
    def worst(self) -> Float[Tensor, "P"]:
        """``min(cos_q, cos_k)`` per pair: a pair is aligned only if both sides are."""
        return torch.minimum(self.cos_q, self.cos_k)

    def n_aligned(self, threshold: float = 0.9) -> int:
        """Number of pairs whose query *and* key cosines are at least ``threshold``."""
        return int((self.worst >= threshold).sum())


def _as_pairs(pairs, n_features: int) -> Tensor:
    rows = []
    for p in pairs:
        if isinstance(p, Tensor):
            p = p.tolist()
        p = tuple(p)
        if len(p) not in (2, 3):
            raise SVToolsError(f"each pair must be (query feature, key feature[, strength]), got {p!r}")
        rows.append((as_int(p[0], f"query feature of pair {p!r}"), as_int(p[1], f"key feature of pair {p!r}")))
    if not rows:
        raise SVToolsError("pairs is empty: give at least one (query feature, key feature) pair")
    t = torch.tensor(rows, dtype=torch.long)
    if int(t.min()) < 0 or int(t.max()) >= n_features:
        raise SVToolsError(f"pair feature indices must lie in [0, {n_features}), got {rows}")
    return t


def match_pairs(
    features: Float[Tensor, "d_model n_features"],
    qk: QKSVD,
    pairs: Iterable[Sequence[float]],
) -> PairAlignment:
    """Assign every template pair to a singular index and measure the fit, sign-invariantly.

    The score of pair ``p = (i, j)`` at index ``k`` is ``|cos(w_i, u_k)| * |cos(w_j, v_k)|``;
    the indices are chosen by a maximum-weight assignment (Hungarian algorithm) over all ``r``
    indices, so pairs need not follow the template's order. ``best`` gives each pair's own
    maximiser, ignoring the others. Identity: for features equal to the singular vectors
    (``w_i = +-u_k``, ``w_j = +-v_k``) both cosines are exactly 1.

    Args:
        features: ``(d_model, N)`` feature directions as columns (the toy's ``W``).
        qk: a :class:`~svtools.qk.QKSVD` of one head without biases, ``U, V: (d_model, r)``
            (for a rotary head pick one offset first with ``qk.at_offset(delta)``).
        pairs: ``(query feature, key feature)`` or template triples ``(i, j, strength)``.

    Returns:
        :class:`PairAlignment` (tensors on the CPU).
    """
    W = as_tensor(features, "features")
    if W.ndim != 2:
        raise SVToolsError(f"features must have shape (d_model, n_features), got {tuple(W.shape)}")
    check_finite(W, "features")
    if not isinstance(qk, QKSVD):
        raise SVToolsError(f"qk must be a QKSVD (from svtools.qk_svd), got {type(qk).__name__}")
    if qk.U.ndim != 2:
        raise SVToolsError(f"qk must describe one head with U of shape (d_model, r), got U {tuple(qk.U.shape)}"
                           + ("; pick an offset with qk.at_offset(delta)" if qk.rotary is not None else ""))
    if qk.has_bias:
        raise SVToolsError("qk has a bias coordinate; match_pairs compares feature directions in d_model")
    if qk.d_model != W.shape[0]:
        raise SVToolsError(f"features have d_model={W.shape[0]} but qk has d_model={qk.d_model}")
    P = _as_pairs(pairs, W.shape[1])
    W = W.detach().cpu().to(torch.float64)
    U, V, S = (x.detach().cpu().to(torch.float64) for x in (qk.U, qk.V, qk.S))
    cos_U, cos_V = abs_cosines(W, U), abs_cosines(W, V)            # (N, r)
    score = cos_U[P[:, 0]] * cos_V[P[:, 1]]                         # (P, r)
    rows, cols = linear_sum_assignment(score.numpy(), maximize=True)
    index = torch.full((len(P),), -1, dtype=torch.long)
    index[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    ok = index >= 0
    safe = index.clamp_min(0)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    cos_q = torch.where(ok, cos_U[P[:, 0], safe], nan)
    cos_k = torch.where(ok, cos_V[P[:, 1], safe], nan)
    sigma = torch.where(ok, S[safe], nan)
    return PairAlignment(pairs=P, index=index, best=score.argmax(dim=1), cos_q=cos_q, cos_k=cos_k,
                         sigma=sigma, chance=chance_cosine(W.shape[0]), cos_U=cos_U, cos_V=cos_V, S=S)
