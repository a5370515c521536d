"""Why singular vectors align with features: the least-squares theory of a bilinear head.

Set-up (Part 2 of the book). Feature frames are ``X`` (query side, ``D x N``) and ``Y`` (key
side, ``D x N'``), features as columns. A query token is ``x = X f``, a key token ``y = Y g``, with
activation vectors ``f`` and ``g`` drawn independently of each other. A head scores them with
``l = x^T Omega y``; the target is ``l* = f^T T g`` for a template ``T`` (``N x N'``). The head that
minimises the squared-error surrogate of the attention loss,

    L(Omega) = E[(x^T Omega y - f^T T g)^2] = || F^(1/2) (X^T Omega Y - T) G^(1/2) ||_F^2,

with ``F = E[f f^T]`` and ``G = E[g g^T]`` (second moments, *not* covariances), solves the normal
equations ``(X F X^T) Omega (Y G Y^T) = X F T G Y^T``; the minimum-norm solution is

    Omega* = (X F X^T)^+ X F T G Y^T (Y G Y^T)^+.                                  (closed form)

For a single pair ``T = e_i e_j^T`` the right-hand side has rank one, so ``Omega*`` has rank one
with ``u ∝ (X F X^T)^+ X F e_i``: the least-squares *linear probe* for ``f_i`` from ``x``. With
independent zero-mean activations of equal variance (``F ∝ I``) that is ``Sigma_X^+ x_i`` with
``Sigma_X = X X^T``: the *whitened* feature direction (Theorem 1). Everything here is computed
in float64 internally and returned in the input's dtype.

Interference (deviation of a frame from isotropy). We use the trace-normalised definition::

    E_X = Sigma_X / (tr Sigma_X / D) - I,       ||E_X||_2 = max_k |lambda_k / mean(lambda) - 1|,

which is dimensionless, 0 exactly for tight (isotropic) frames, and at most ``D - 1``
(all of the frame in one direction). ``normalise="none"`` gives ``Sigma_X - (tr Sigma_X / D) I``
in units of squared feature norm instead (``N/D`` times larger for unit-norm features).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Literal, Optional, Sequence, Union

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from svtools.runtime import tqdm

from svtools._checks import SVToolsError, as_float, as_indices, as_int, as_tensor, check_finite
from svtools.qk import QKSVD, qk_svd
from svtools.runtime import default_device

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "Activation", "whitened_directions", "probe_directions", "optimal_omega", "attention_loss",
    "sample_pairs", "least_squares_omega", "toy_optimal_omega", "BilinearRun", "train_bilinear",
    "interference_matrix", "interference", "frame_spectrum", "frame", "whitening_alignment",
    "alignment_floor", "mean_alignment_bound", "unwhiten", "FrameRun", "train_frame",
    "alignment_sweep", "mean_drift", "head_report", "measure_frame",
]

_F64 = torch.float64
TemplateLike = Union[Tensor, Sequence[Sequence[float]]]


# ----------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class Activation:
    """Law of one feature's activation; features are independent and identically distributed.

    ``f_k = B_k A_k`` with ``B_k ~ Bernoulli(p_active)`` (on/off) and ``A_k ~ Uniform[low, high]``
    (magnitude; ``low == high`` gives a constant magnitude). The toy model of Part 1 uses
    ``p_active = 1 - S``, ``low = 0``, ``high = 1``. ``centered=True`` subtracts the mean,
    ``f_k - E f_k``: the zero-mean assumption of Theorem 1, as a distribution one can sample.

    Moments (per feature): ``mean = p (low + high) / 2`` (0 when centered),
    ``variance = p (low^2 + low high + high^2) / 3 - (p (low + high) / 2)^2``; the second-moment
    matrix of ``f`` in ``R^N`` is ``E[f f^T] = variance I + mean^2 1 1^T``.
    """

    p_active: float = 0.1
    low: float = 0.0
    high: float = 1.0
    centered: bool = False

    def __post_init__(self) -> None:
        if not (0.0 < float(self.p_active) <= 1.0):
            raise SVToolsError(f"Activation.p_active must be in (0, 1], got {self.p_active!r}")
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.high < self.low:
            raise SVToolsError(f"Activation needs finite low <= high, got low={self.low!r}, high={self.high!r}")
        if self.variance <= 0:
            raise SVToolsError("Activation has zero variance (p_active=1 with a constant magnitude): "
                               "every feature would be the same constant, nothing to learn")

    @classmethod
    def from_sparsity(cls, S: float, **kw) -> "Activation":
        """The toy's parametrisation: a feature is *off* with probability ``S``."""
        return cls(p_active=1.0 - float(S), **kw)

    @property
    def raw_mean(self) -> float:
        return float(self.p_active) * (self.low + self.high) / 2

    @property
    def mean(self) -> float:
        """``E f_k`` (0 when ``centered``)."""
        return 0.0 if self.centered else self.raw_mean

    @property
    def variance(self) -> float:
        """``Var f_k`` (the same whether centered or not)."""
        m2 = float(self.p_active) * (self.low ** 2 + self.low * self.high + self.high ** 2) / 3
        return m2 - self.raw_mean ** 2

    def second_moment(self, n: int, *, dtype=_F64, device=None) -> Float[Tensor, "n n"]:
        """``E[f f^T] = variance I + mean^2 1 1^T`` for ``n`` features."""
        M = torch.full((n, n), self.mean ** 2, dtype=dtype, device=device)
        return M + self.variance * torch.eye(n, dtype=dtype, device=device)

    def sample(self, shape: Sequence[int], generator: torch.Generator, *, dtype=torch.float32,
               device=None) -> Tensor:
        """Draw activations of the given shape (the last dim indexes features)."""
        device = generator.device if device is None else torch.device(device)
        on = torch.rand(tuple(shape), generator=generator, device=device) < self.p_active
        mag = self.low + (self.high - self.low) * torch.rand(tuple(shape), generator=generator,
                                                            device=device, dtype=dtype)
        f = on.to(dtype) * mag
        return f - self.raw_mean if self.centered else f


ActivationLike = Union[Activation, Tensor]


# ----------------------------------------------------------------------------- validation
def _frame(X, name: str) -> Tensor:
    X = as_tensor(X, name)
    if X.ndim != 2:
        raise SVToolsError(f"{name} must be a feature frame of shape (D, N), features as columns, "
                           f"got {tuple(X.shape)}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise SVToolsError(f"{name} is empty: shape {tuple(X.shape)}")
    check_finite(X, name)
    return X


def _template(template: TemplateLike, n_q: int, n_k: int) -> Tensor:
    """Dense ``(..., n_q, n_k)`` float64 template from a tensor or ``(i, j, strength)`` triples."""
    if isinstance(template, Tensor):
        T = as_tensor(template, "template").to(_F64)
        if T.ndim < 2 or tuple(T.shape[-2:]) != (n_q, n_k):
            raise SVToolsError(f"template must have shape (..., {n_q}, {n_k}) (query features x key "
                               f"features), got {tuple(T.shape)}")
        check_finite(T, "template")
        return T
    T = torch.zeros(n_q, n_k, dtype=_F64)
    rows = list(template)
    if not rows:
        raise SVToolsError("template is empty: give a tensor or (i, j, strength) triples")
    for t in rows:
        t = tuple(t)
        if len(t) != 3:
            raise SVToolsError(f"template entries must be (query feature, key feature, strength), got {t!r}")
        i, j, s = int(t[0]), int(t[1]), float(t[2])
        if not (0 <= i < n_q and 0 <= j < n_k):
            raise SVToolsError(f"template pair {(i, j)} out of range for {n_q} query / {n_k} key features")
        if not math.isfinite(s):
            raise SVToolsError(f"template strength for {(i, j)} is not finite")
        T[i, j] += s
    return T


def _moments(act: ActivationLike, n: int, name: str, device) -> Tensor:
    """Second-moment matrix ``E[f f^T]`` (float64) of an :class:`Activation` or an explicit matrix."""
    if isinstance(act, Activation):
        return act.second_moment(n, device=device)
    if isinstance(act, Tensor):
        M = act.to(device=device, dtype=_F64)
        if tuple(M.shape) != (n, n):
            raise SVToolsError(f"{name} as a second-moment matrix must have shape ({n}, {n}), got {tuple(M.shape)}")
        check_finite(M, name)
        if not torch.allclose(M, M.T, atol=1e-10 * float(M.abs().max().clamp_min(1))):
            raise SVToolsError(f"{name} (second-moment matrix E[f f^T]) must be symmetric")
        if float(torch.linalg.eigvalsh(M).min()) < -1e-9 * float(M.abs().max().clamp_min(1e-300)):
            raise SVToolsError(f"{name} (second-moment matrix E[f f^T]) must be positive semi-definite")
        return M
    raise SVToolsError(f"{name} must be an Activation or an (N, N) second-moment tensor, got {type(act).__name__}")


def _psd_pinv(S: Tensor) -> Tensor:
    """Pseudo-inverse of symmetric PSD matrices (eigenvalues below ``dim * eps * max`` dropped)."""
    lam, Q = torch.linalg.eigh(S)
    cut = S.shape[-1] * torch.finfo(S.dtype).eps * lam.abs().amax(-1, keepdim=True)
    inv = torch.where(lam > cut, 1.0 / lam.clamp_min(torch.finfo(S.dtype).tiny), torch.zeros_like(lam))
    return (Q * inv[..., None, :]) @ Q.transpose(-1, -2)


def _unit(v: Tensor, dim: int = 0) -> Tensor:
    return v / v.norm(dim=dim, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


def _index(i, n: int, name: str) -> tuple[Tensor, bool]:
    """Feature index/indices (ints, numpy ints, 1-D int arrays; floats rejected) -> (long tensor, is_scalar)."""
    from svtools._checks import is_index_sequence
    scalar = not is_index_sequence(i)
    idx = as_indices(i.detach().cpu() if isinstance(i, Tensor) else i, name, n=n)
    return torch.tensor(idx, dtype=torch.long), scalar


def _unit_or_raise(v: Tensor, labels: list[int], side: str) -> Tensor:
    """Unit columns of ``v``; a zero column has no direction, so it is an error naming its feature."""
    norm = v.norm(dim=0)
    zero = [labels[k] for k in (norm <= torch.finfo(v.dtype).tiny).nonzero().flatten().tolist()]
    if zero:
        raise SVToolsError(f"{side} feature(s) {zero[:8]} have no whitened direction: the feature column is zero")
    return v / norm


# ----------------------------------------------------------------------------- Theorem 1
def whitened_directions(X: Float[Tensor, "D N"], Y: Float[Tensor, "D M"], i, j
                        ) -> tuple[Float[Tensor, "D *P"], Float[Tensor, "D *P"]]:
    """Theorem 1's predicted singular vectors: ``u = Sigma_X^+ x_i``, ``v = Sigma_Y^+ y_j``, unit norm.

    ``Sigma_X = X X^T`` (``^+``: pseudo-inverse, the inverse when the features span ``R^D``).
    Identity: for independent zero-mean activations of equal variance and ``T = e_i e_j^T``,
    ``optimal_omega(X, Y, T, ...) = s * u v^T`` with ``s > 0``, so ``(u, v)`` is its top singular
    pair (up to a joint sign).

    Args:
        X, Y: query-side ``(D, N)`` and key-side ``(D', M)`` frames, features as columns.
        i, j: feature indices (ints give ``(D,)`` vectors; 1-D index lists give ``(D, P)``);
            floats are rejected, not truncated. A zero feature column has no direction and
            raises :class:`SVToolsError`.
    """
    X, Y = _frame(X, "X"), _frame(Y, "Y")
    ii, si = _index(i, X.shape[1], "i")
    jj, sj = _index(j, Y.shape[1], "j")
    X64, Y64 = X.to(_F64), Y.to(_F64)
    u = _unit_or_raise(_psd_pinv(X64 @ X64.T) @ X64[:, ii.to(X.device)], ii.tolist(), "X")
    v = _unit_or_raise(_psd_pinv(Y64 @ Y64.T) @ Y64[:, jj.to(Y.device)], jj.tolist(), "Y")
    u = u[:, 0] if si else u
    v = v[:, 0] if sj else v
    return u.to(X.dtype), v.to(Y.dtype)


def probe_directions(X: Float[Tensor, "D N"], Y: Float[Tensor, "D M"], i, j,
                     activation: ActivationLike, key_activation: Optional[ActivationLike] = None
                     ) -> tuple[Float[Tensor, "D *P"], Float[Tensor, "D *P"]]:
    """The exact singular vectors of the single-pair optimum without the zero-mean assumption.

    ``u ∝ (X F X^T)^+ X F e_i = E[x x^T]^+ E[x f_i]`` (the least-squares linear probe of feature
    ``i`` from ``x``), ``v ∝ (Y G Y^T)^+ Y G e_j``; unit norm. With ``F ∝ I`` (zero-mean,
    independent, equal variance) this is :func:`whitened_directions`. With an :class:`Activation`
    of mean ``mu`` and variance ``s^2``, ``X F e_i = s^2 x_i + mu^2 X 1``: the mean adds a pull
    towards the frame's summed direction ``X 1``.

    Args:
        activation, key_activation: :class:`Activation` or explicit ``(N, N)`` second moments
            ``E[f f^T]`` (key side defaults to the query side's law).
    """
    X, Y = _frame(X, "X"), _frame(Y, "Y")
    ii, si = _index(i, X.shape[1], "i")
    jj, sj = _index(j, Y.shape[1], "j")
    key_activation = activation if key_activation is None else key_activation
    F = _moments(activation, X.shape[1], "activation", X.device)
    G = _moments(key_activation, Y.shape[1], "key_activation", Y.device)
    X64, Y64 = X.to(_F64), Y.to(_F64)
    u = _unit(_psd_pinv(X64 @ F @ X64.T) @ (X64 @ F[:, ii.to(X.device)]))
    v = _unit(_psd_pinv(Y64 @ G @ Y64.T) @ (Y64 @ G[:, jj.to(Y.device)]))
    return (u[:, 0] if si else u).to(X.dtype), (v[:, 0] if sj else v).to(Y.dtype)


def mean_drift(X: Float[Tensor, "D N"], activation: ActivationLike) -> Float[Tensor, "N"]:
    """``|cos|`` between Theorem 1's whitened direction and the exact singular vector
    (:func:`probe_directions`) for every feature, under ``activation`` (query side).

    Identity: 1 for every feature when ``activation`` has zero mean, and also whenever the
    features are linearly independent (``N <= D``): then ``X^T Sigma_X^+ X = I`` and the mean's
    pull cancels.
    """
    X = _frame(X, "X")
    idx = torch.arange(X.shape[1])
    w, _ = whitened_directions(X, X, idx, idx)
    p, _ = probe_directions(X, X, idx, idx, activation)
    return (w.to(_F64) * p.to(_F64)).sum(0).abs().to(X.dtype)


def head_report(heads: dict, X: Float[Tensor, "D N"], Y: Float[Tensor, "D M"], i: int, j: int, *,
                activation: Optional[ActivationLike] = None) -> "pd.DataFrame":
    """One row per head: how its top singular pair compares with the theory's predictions.

    Args:
        heads: label -> ``(D, D')`` matrix ``Omega`` or a :class:`~svtools.qk.QKSVD`.
        X, Y: the frames; ``i, j``: the template pair.
        activation: if given, also compare with :func:`probe_directions` (exact with a mean).

    Columns: ``method``, ``cos_whitened`` (the worse of the query/key ``|cos|`` with
    :func:`whitened_directions`), ``cos_raw`` (the same with the raw features ``x_i, y_j``),
    ``cos_probe`` (when ``activation`` is given), ``sigma2_over_sigma1``.
    """
    import pandas as pd

    X, Y = _frame(X, "X"), _frame(Y, "Y")
    wu, wv = (t.to(_F64) for t in whitened_directions(X, Y, i, j))
    targets = {"whitened": (wu, wv), "raw": (_unit(X[:, i].to(_F64)), _unit(Y[:, j].to(_F64)))}
    if activation is not None:
        targets["probe"] = tuple(t.to(_F64) for t in probe_directions(X, Y, i, j, activation))
    rows = []
    for label, h in heads.items():
        if isinstance(h, QKSVD):
            U, S, V = h.U.to(_F64), h.S.to(_F64), h.V.to(_F64)
        else:
            om = as_tensor(h, f"heads[{label!r}]").detach().to(_F64).cpu()
            if tuple(om.shape) != (X.shape[0], Y.shape[0]):
                raise SVToolsError(f"heads[{label!r}] must be ({X.shape[0]}, {Y.shape[0]}), got {tuple(om.shape)}")
            U, S, Vh = torch.linalg.svd(om)
            V = Vh.T
        row = {"method": label}
        for name, (a, b) in targets.items():
            row[f"cos_{name}"] = min(float((U[:, 0].cpu() @ a.cpu()).abs()), float((V[:, 0].cpu() @ b.cpu()).abs()))
        row["sigma2_over_sigma1"] = float(S[1] / S[0]) if S.numel() > 1 else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


def optimal_omega(X: Float[Tensor, "D N"], Y: Float[Tensor, "D M"], template: TemplateLike,
                  activation: ActivationLike, key_activation: Optional[ActivationLike] = None
                  ) -> Float[Tensor, "*batch D D"]:
    """Closed-form minimiser of ``E[(x^T Omega y - f^T T g)^2]`` from the data's moments.

    ``Omega* = (X F X^T)^+ X F T G Y^T (Y G Y^T)^+`` with ``F = E[f f^T]``, ``G = E[g g^T]``; the
    minimum-norm minimiser (unique when both frames span ``R^D``). Assumes the query and key
    activations ``f, g`` are independent of each other; the features within ``f`` may be
    correlated if ``F`` is given as a matrix. Identity (normal equations):
    ``X F X^T Omega* Y G Y^T = X F T G Y^T`` whenever the frames span ``R^D``.

    Args:
        X: ``(D, N)`` query-side frame; Y: ``(D', M)`` key-side frame.
        template: ``(..., N, M)`` tensor (a batch of templates gives a batch of optima) or a
            list of ``(i, j, strength)`` triples.
        activation: :class:`Activation` (i.i.d. features) or an explicit ``(N, N)`` matrix
            ``E[f f^T]``; key_activation: the same for ``g`` (default: same law as ``f``).

    Returns:
        ``(..., D, D')`` in ``X``'s dtype.
    """
    X, Y = _frame(X, "X"), _frame(Y, "Y")
    key_activation = activation if key_activation is None else key_activation
    T = _template(template, X.shape[1], Y.shape[1]).to(X.device)
    F = _moments(activation, X.shape[1], "activation", X.device)
    G = _moments(key_activation, Y.shape[1], "key_activation", Y.device)
    X64, Y64 = X.to(_F64), Y.to(_F64)
    left = _psd_pinv(X64 @ F @ X64.T) @ X64 @ F          # (D, N)
    right = G @ Y64.T @ _psd_pinv(Y64 @ G @ Y64.T)       # (M, D')
    return (left @ T @ right).to(X.dtype)


def attention_loss(X: Float[Tensor, "D N"], Y: Float[Tensor, "D M"], omega: Float[Tensor, "D D"],
                   template: TemplateLike, activation: ActivationLike,
                   key_activation: Optional[ActivationLike] = None, *, relative: bool = False
                   ) -> Float[Tensor, ""]:
    """Exact expected squared-error attention loss ``E[(x^T Omega y - f^T T g)^2]`` from moments.

    Identity: ``= tr(F R G R^T)`` with ``R = X^T Omega Y - T`` (``f, g`` independent). With
    ``relative=True`` it is divided by ``E[(f^T T g)^2] = tr(F T G T^T)`` (so ``Omega = 0`` scores
    1). Differentiable in ``X``, ``Y`` and ``omega`` (computed in their dtype).
    """
    if not all(isinstance(t, Tensor) for t in (X, Y, omega)):
        raise SVToolsError("X, Y and omega must be tensors")
    if X.ndim != 2 or Y.ndim != 2 or tuple(omega.shape) != (X.shape[0], Y.shape[0]):
        raise SVToolsError(f"need X (D, N), Y (D', M), omega (D, D'); got {tuple(X.shape)}, "
                           f"{tuple(Y.shape)}, {tuple(omega.shape)}")
    key_activation = activation if key_activation is None else key_activation
    dt = X.dtype
    T = _template(template, X.shape[1], Y.shape[1]).to(device=X.device, dtype=dt)
    F = _moments(activation, X.shape[1], "activation", X.device).to(dt)
    G = _moments(key_activation, Y.shape[1], "key_activation", Y.device).to(dt)
    R = X.transpose(0, 1) @ omega @ Y - T
    loss = ((F @ R @ G) * R).sum()
    if relative:
        loss = loss / ((F @ T @ G) * T).sum().clamp_min(torch.finfo(dt).tiny)
    return loss


def sample_pairs(X: Float[Tensor, "D N"], Y: Float[Tensor, "D M"], template: TemplateLike,
                 activation: Activation, n: int, generator: torch.Generator,
                 key_activation: Optional[Activation] = None
                 ) -> tuple[Float[Tensor, "n D"], Float[Tensor, "n D"], Float[Tensor, "n"]]:
    """``n`` independent (query, key) token pairs ``x = X f``, ``y = Y g`` and targets ``f^T T g``.

    ``generator`` fixes the draw (its device is used). Returns ``(x, y, target)`` in ``X``'s dtype.
    """
    X, Y = _frame(X, "X"), _frame(Y, "Y")
    key_activation = activation if key_activation is None else key_activation
    if not isinstance(activation, Activation) or not isinstance(key_activation, Activation):
        raise SVToolsError("sample_pairs needs Activation laws (a bare second-moment matrix cannot be sampled)")
    if int(n) < 1:
        raise SVToolsError(f"n must be a positive integer, got {n}")
    dev, dt = generator.device, X.dtype
    T = _template(template, X.shape[1], Y.shape[1]).to(device=dev, dtype=dt)
    f = activation.sample((int(n), X.shape[1]), generator, dtype=dt, device=dev)
    g = key_activation.sample((int(n), Y.shape[1]), generator, dtype=dt, device=dev)
    return f @ X.to(dev).T, g @ Y.to(dev, dt).T, ((f @ T) * g).sum(-1)


def least_squares_omega(x: Float[Tensor, "n D"], y: Float[Tensor, "n Dk"], target: Float[Tensor, "n"],
                        *, ridge: float = 0.0, chunk: int = 65536) -> Float[Tensor, "D Dk"]:
    """Sample least squares: ``argmin_Omega sum_n (x_n^T Omega y_n - t_n)^2 + ridge |Omega|_F^2``.

    Solves the normal equations in ``vec(Omega)`` (``D * Dk`` unknowns, at most 4096):
    ``sum_n z_n z_n^T vec(Omega) = sum_n t_n z_n`` with ``z_n = vec(x_n y_n^T)``; minimum-norm
    solution when the system is singular. Converges to :func:`optimal_omega` as ``n`` grows when
    the samples come from :func:`sample_pairs`.
    """
    x, y, t = as_tensor(x, "x"), as_tensor(y, "y"), as_tensor(target, "target")
    if x.ndim != 2 or y.ndim != 2 or t.ndim != 1 or not (x.shape[0] == y.shape[0] == t.shape[0]):
        raise SVToolsError(f"need x (n, D), y (n, D'), target (n,) with the same n; got "
                           f"{tuple(x.shape)}, {tuple(y.shape)}, {tuple(t.shape)}")
    for v, nm in ((x, "x"), (y, "y"), (t, "target")):
        check_finite(v, nm)
    D, Dk = x.shape[1], y.shape[1]
    if D * Dk > 4096:
        raise SVToolsError(f"least_squares_omega solves for D*D' = {D * Dk} unknowns; at most 4096 are supported")
    if ridge < 0:
        raise SVToolsError(f"ridge must be >= 0, got {ridge}")
    A = torch.zeros(D * Dk, D * Dk, dtype=_F64, device=x.device)
    b = torch.zeros(D * Dk, dtype=_F64, device=x.device)
    for s in range(0, x.shape[0], chunk):
        z = einops.rearrange(x[s:s + chunk, :, None].to(_F64) * y[s:s + chunk, None, :].to(_F64),
                             "n d e -> n (d e)")
        A += z.T @ z
        b += z.T @ t[s:s + chunk].to(_F64)
    A += ridge * torch.eye(D * Dk, dtype=_F64, device=x.device)
    w = _psd_pinv(A) @ b
    return einops.rearrange(w, "(d e) -> d e", d=D).to(x.dtype)


def toy_optimal_omega(run, n_samples: int = 200_000, *, seed: int = 0) -> Float[Tensor, "D D"]:
    """Least-squares optimum of a toy model's attention loss *at its learned frame*, from samples.

    Draws ``n_samples`` examples of the toy's own data distribution
    (:func:`svtools.toy.sample_batch`, planted pairs and ``target_scale`` included), forms the
    ``n_samples * m`` (query, key) pairs ``x = W f_q``, ``y = W f_k`` and solves
    :func:`least_squares_omega`. For a toy trained with ``attn_loss="mse"`` this is what its
    ``Omega`` should converge to at fixed ``W`` (``Omega`` enters only the attention loss); for
    ``"ce"`` it shows what the squared-error surrogate would have chosen.
    """
    from svtools.toy import ToyRun, sample_batch

    if not isinstance(run, ToyRun):
        raise SVToolsError(f"run must be a svtools.toy.ToyRun, got {type(run).__name__}")
    W = run.features.to(_F64)
    gen = torch.Generator().manual_seed(int(seed))
    D = W.shape[0]
    A = torch.zeros(D * D, D * D, dtype=_F64)
    b = torch.zeros(D * D, dtype=_F64)
    left, chunk = int(n_samples), 8192
    while left > 0:
        bt = sample_batch(run.cfg, min(chunk, left), gen, dtype=_F64)
        left -= chunk
        m = bt.f_keys.shape[1]
        x = einops.repeat(bt.f_query @ W.T, "b d -> (b m) d", m=m)
        y = einops.rearrange(bt.f_keys @ W.T, "b m d -> (b m) d")
        z = einops.rearrange(x[:, :, None] * y[:, None, :], "n d e -> n (d e)")
        A += z.T @ z
        b += z.T @ bt.target.reshape(-1)
    return einops.rearrange(_psd_pinv(A) @ b, "(d e) -> d e", d=D).to(run.features.dtype)


@dataclass
class BilinearRun:
    """A bilinear head ``Omega = W_Q W_K^T`` trained alone on a fixed frame.

    Attributes:
        W_Q, W_K: ``(D, H)`` factors (TransformerLens layout); omega: ``(D, D')``.
        qk: ``qk_svd(W_Q, W_K)``: ``U (D, r)``, ``S (r,)``, ``V (D', r)``.
        step, loss: ``(L,)`` logged steps and the mean training loss since the previous entry.
    """

    W_Q: Float[Tensor, "D H"]
    W_K: Float[Tensor, "Dk H"]
    omega: Float[Tensor, "D Dk"]
    qk: QKSVD
    step: Int[Tensor, "L"]
    loss: Float[Tensor, "L"]


def train_bilinear(X: Float[Tensor, "D N"], Y: Float[Tensor, "Dk M"], template: TemplateLike,
                   activation: Activation, *, key_activation: Optional[Activation] = None,
                   loss: Literal["mse", "ce"] = "mse", d_head: Optional[int] = None, n_keys: int = 8,
                   target_scale: float = 1.0, steps: int = 2000, batch: int = 4096, lr: float = 1e-2,
                   seed: int = 0, device=None, progress: bool = True) -> BilinearRun:
    """Train a head ``Omega = W_Q W_K^T`` with Adam on a FIXED frame (the frame is not learned).

    This differs from :func:`svtools.toy.train`, which learns the frame and the head together:
    here only ``Omega`` moves, which is the object Theorem 1 speaks about.

    Losses (``beta = target_scale``, targets ``l* = beta f^T T g``):
        ``"mse"``: ``mean (x^T Omega y - l*)^2`` over independent (query, key) pairs: its
            minimiser is :func:`optimal_omega` (times ``beta``), so training should approach it.
        ``"ce"``: each query meets ``n_keys`` keys; KL divergence from ``softmax(l*)`` to
            ``softmax(x^T Omega y_j)`` (the paper's cross-entropy loss, shift-invariant per query).

    Adam with a cosine learning-rate decay to ``lr/10``; initial factors have std
    ``0.1 / sqrt(D)``; ``d_head`` defaults to ``min(D, D')``. Deterministic given ``seed``.
    """
    X, Y = _frame(X, "X"), _frame(Y, "Y")
    key_activation = activation if key_activation is None else key_activation
    if loss not in ("mse", "ce"):
        raise SVToolsError(f"loss must be 'mse' or 'ce', got {loss!r}")
    if loss == "ce" and n_keys < 2:
        raise SVToolsError("loss='ce' needs n_keys >= 2 (softmax over one key is constant)")
    for nm, v in (("steps", steps), ("batch", batch)):
        if int(v) < 1:
            raise SVToolsError(f"{nm} must be a positive integer, got {v}")
    dev = default_device(device)
    dt = X.dtype
    D, Dk = X.shape[0], Y.shape[0]
    H = int(d_head or min(D, Dk))
    g = torch.Generator().manual_seed(int(seed))
    W_Q = (torch.randn(D, H, generator=g, dtype=_F64) * 0.1 / math.sqrt(D)).to(dev, dt).requires_grad_(True)
    W_K = (torch.randn(Dk, H, generator=g, dtype=_F64) * 0.1 / math.sqrt(D)).to(dev, dt).requires_grad_(True)
    Xd, Yd = X.to(dev), Y.to(dev, dt)
    T = (float(target_scale) * _template(template, X.shape[1], Y.shape[1])).to(dev, dt)
    gen = torch.Generator(device=dev).manual_seed(int(seed) + 1)
    opt = torch.optim.Adam([W_Q, W_K], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))
    log_every = max(1, steps // 100)
    steps_log, loss_log, acc = [], [], 0.0
    for s in tqdm(range(steps), desc=f"bilinear head ({loss})", disable=not progress, mininterval=0.5):
        if loss == "mse":
            f = activation.sample((batch, X.shape[1]), gen, dtype=dt)
            k = key_activation.sample((batch, Y.shape[1]), gen, dtype=dt)
            pred = ((f @ Xd.T @ W_Q) * (k @ Yd.T @ W_K)).sum(-1)
            l = ((pred - ((f @ T) * k).sum(-1)) ** 2).mean()
        else:
            f = activation.sample((batch, X.shape[1]), gen, dtype=dt)
            k = key_activation.sample((batch, n_keys, Y.shape[1]), gen, dtype=dt)
            logits = torch.einsum("bh,bmh->bm", f @ Xd.T @ W_Q, k @ Yd.T @ W_K)
            p_star = torch.einsum("bn,nk,bmk->bm", f, T, k).softmax(-1)
            l = (p_star * (p_star.clamp_min(1e-30).log() - logits.log_softmax(-1))).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        l.backward()
        opt.step()
        sched.step()
        acc += float(l.detach())
        if (s + 1) % log_every == 0 or s + 1 == steps:
            n_acc = (s + 1) - (steps_log[-1] if steps_log else 0)
            steps_log.append(s + 1)
            loss_log.append(acc / n_acc)
            acc = 0.0
    Q, K = W_Q.detach().cpu(), W_K.detach().cpu()
    return BilinearRun(Q, K, Q @ K.T, qk_svd(Q, K), torch.tensor(steps_log), torch.tensor(loss_log))


# ----------------------------------------------------------------------------- Theorem 2
def _check_normalise(normalise: str) -> None:
    if normalise not in ("trace", "none"):
        raise SVToolsError(f"normalise must be 'trace' or 'none', got {normalise!r}")


def interference_matrix(X: Float[Tensor, "D N"], normalise: Literal["trace", "none"] = "trace"
                        ) -> Float[Tensor, "D D"]:
    """``E_X``, the frame's deviation from isotropy.

    ``"trace"`` (default): ``E_X = Sigma_X / c - I`` with ``Sigma_X = X X^T`` and
    ``c = tr(Sigma_X) / D`` (mean eigenvalue; ``N / D`` for unit-norm features). Dimensionless,
    ``0`` iff the frame is tight, ``||E_X||_2 <= D - 1``.
    ``"none"``: ``E_X = Sigma_X - c I`` (units of squared feature norm).
    """
    _check_normalise(normalise)
    X = _frame(X, "X")
    X64 = X.to(_F64)
    S = X64 @ X64.T
    c = torch.diagonal(S).sum() / S.shape[0]
    if float(c) <= 0:
        raise SVToolsError("X is all zeros: its interference is undefined")
    I = torch.eye(S.shape[0], dtype=_F64, device=S.device)
    E = S / c - I if normalise == "trace" else S - c * I
    return E.to(X.dtype)


def interference(X: Float[Tensor, "D N"], normalise: Literal["trace", "none"] = "trace") -> float:
    """``||E_X||_2`` (largest absolute eigenvalue of :func:`interference_matrix`)."""
    _check_normalise(normalise)
    Xf = _frame(X, "X").to(_F64)
    S = Xf @ Xf.T
    lam = torch.linalg.eigvalsh(S)
    c = lam.mean()
    if float(c) <= 0:
        raise SVToolsError("X is all zeros: its interference is undefined")
    dev = (lam / c - 1) if normalise == "trace" else (lam - c)
    return float(dev.abs().max())


def frame_spectrum(D: int, interference: float, spectrum: Literal["spike", "power"] = "spike"
                   ) -> Float[Tensor, "D"]:
    """Eigenvalues (descending, mean 1) of ``Sigma_X / mean`` with ``max |lambda - 1| = interference``.

    ``"spike"``: one direction carries the excess, ``(1 + e, c, ..., c)`` with
    ``c = (D - 1 - e) / (D - 1)`` (a common direction shared by all features, like the dominant
    direction of GPT-2's residual stream). ``"power"``: ``lambda_k ∝ k^(-alpha)``, ``alpha`` found
    by bisection (a power-law spectrum, as in real activation covariances). Needs
    ``0 <= interference < D - 1``.
    """
    D, e = int(D), float(interference)
    if D < 2:
        raise SVToolsError(f"D must be >= 2, got {D}")
    if not (0.0 <= e < D - 1):
        raise SVToolsError(f"interference must lie in [0, D - 1) = [0, {D - 1}) for D = {D} with the "
                           f"trace normalisation, got {e}")
    if spectrum == "spike":
        lam = torch.full((D,), (D - 1 - e) / (D - 1), dtype=_F64)
        lam[0] = 1 + e
        return lam
    if spectrum != "power":
        raise SVToolsError(f"spectrum must be 'spike' or 'power', got {spectrum!r}")
    k = torch.arange(1, D + 1, dtype=_F64)

    def lam_of(alpha: float) -> Tensor:
        lam = k ** (-alpha)
        return lam / lam.mean()

    def dev(alpha: float) -> float:
        return float((lam_of(alpha) - 1).abs().max())

    lo, hi = 0.0, 1.0
    while dev(hi) < e:
        hi *= 2
        if hi > 1e4:  # pragma: no cover - e < D - 1 is always reachable
            raise SVToolsError(f"could not reach interference {e} with a power law in D = {D}")
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if dev(mid) < e else (lo, mid)
    return lam_of((lo + hi) / 2)


def frame(N: int, D: int, interference: float, seed: int = 0, *,
          spectrum: Literal["spike", "power"] = "spike", normalise: Literal["trace", "none"] = "trace",
          dtype: torch.dtype = torch.float32, max_iter: int = 1000, tol: float = 1e-9) -> Float[Tensor, "D N"]:
    """A random frame of ``N`` unit-norm features in ``R^D`` with ``||E_X||_2 = interference``.

    ``Sigma_X = X X^T`` gets the eigenvalues ``(N/D) * frame_spectrum(D, interference, spectrum)``
    in a random orthonormal basis; columns have unit norm. Built by alternating projections
    (normalise the columns, then map ``X -> S^(1/2) (X X^T)^(-1/2) X``) until the column norms are
    within ``tol`` of 1; a unit-norm frame with any such spectrum exists when ``N >= D``
    (Schur-Horn). With ``normalise="none"`` ``interference`` is in absolute units (it is divided
    by ``N / D``). Deterministic given ``seed``. Identity:
    ``interference(frame(N, D, e, ...)) == e`` (to about ``1e-6`` in float32).
    """
    N, D = as_int(N, "N"), as_int(D, "D")
    interference = as_float(interference, "interference", lo=0.0)
    if D < 2 or N < D:
        raise SVToolsError(f"frame needs N >= D >= 2 (features spanning R^D), got N={N}, D={D}")
    _check_normalise(normalise)
    e = float(interference) / (N / D if normalise == "none" else 1.0)
    lam = frame_spectrum(D, e, spectrum) * (N / D)
    g = torch.Generator().manual_seed(int(seed))
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=_F64))
    S_half = (Q * lam.sqrt()) @ Q.T
    X = S_half @ torch.randn(D, N, generator=g, dtype=_F64)
    for _ in range(int(max_iter)):
        X = X / X.norm(dim=0, keepdim=True)
        ev, EV = torch.linalg.eigh(X @ X.T)
        X = S_half @ ((EV * ev.clamp_min(1e-300).rsqrt()) @ EV.T) @ X
        if float((X.norm(dim=0) - 1).abs().max()) < tol:
            break
    return (X / X.norm(dim=0, keepdim=True)).to(dtype)


def whitening_alignment(X: Float[Tensor, "D N"]) -> Float[Tensor, "N"]:
    """``|cos(x_i, Sigma_X^+ x_i)|`` for every feature: how well the raw feature matches the
    singular vector Theorem 1 predicts (1 for all features iff the frame is tight)."""
    X = _frame(X, "X")
    X64 = X.to(_F64)
    Z = _psd_pinv(X64 @ X64.T) @ X64
    return ((_unit(X64) * _unit(Z)).sum(0)).abs().to(X.dtype)


def measure_frame(X: Float[Tensor, "D N"]) -> dict:
    """Where a given frame (e.g. a sparse autoencoder's dictionary ``W_dec``) sits on the
    alignment-vs-interference sweep: ``D``, ``N``, ``interference`` (trace-normalised
    ``||E_X||_2``), ``interference_abs`` (unnormalised), ``cos_raw`` (mean over features of
    ``|cos(x_i, Sigma_X^+ x_i)|``, the alignment Theorem 1 predicts for a head reading feature
    ``i``), ``cos_raw_min``, ``bound_mean`` (:func:`mean_alignment_bound`; meaningful for
    unit-norm columns) and ``lambda_min``, ``lambda_max`` (the extreme eigenvalues of
    ``Sigma_X`` over their mean: ``||E_X||_2`` sees only the larger deviation, whitening sees
    both). Columns are used as given (normalise them first if needed)."""
    X = _frame(X, "X")
    cos = whitening_alignment(X)
    X64 = X.to(_F64)
    lam = torch.linalg.eigvalsh(X64 @ X64.T)
    return {"D": int(X.shape[0]), "N": int(X.shape[1]), "interference": interference(X),
            "interference_abs": interference(X, normalise="none"), "cos_raw": float(cos.mean()),
            "cos_raw_min": float(cos.min()), "bound_mean": float(mean_alignment_bound(X)),
            "lambda_min": float(lam.min() / lam.mean()), "lambda_max": float(lam.max() / lam.mean())}


def alignment_floor(interference: float | Tensor) -> Tensor:
    """Theorem 2, worst case: ``cos(x, Sigma_X^{-1} x) >= sqrt(1 - e^2)`` for every ``x`` when
    ``||E_X||_2 = e < 1`` (for *any* normalisation ``E_X = Sigma_X / c - I``); 0 (no guarantee)
    for ``e >= 1``."""
    e = as_tensor(interference if isinstance(interference, Tensor) else
                  torch.as_tensor(interference, dtype=_F64), "interference").to(_F64)
    check_finite(e, "interference")
    if bool((e < 0).any()):
        raise SVToolsError("interference must be >= 0")
    return torch.where(e < 1, (1 - e.clamp(max=1) ** 2).sqrt(), torch.zeros_like(e))


def mean_alignment_bound(X: Optional[Float[Tensor, "D N"]] = None, *,
                         eigenvalues: Optional[Float[Tensor, "... D"]] = None) -> Tensor:
    """Theorem 2, on average: ``mean_i cos(x_i, Sigma_X^{-1} x_i) >= HM(lambda) / AM(lambda)``.

    For unit-norm features spanning ``R^D``, with ``lambda`` the eigenvalues of ``Sigma_X``:
    ``mean_i cos_i >= mean_i cos_i^2 >= D^2 / (tr Sigma_X * tr Sigma_X^{-1})``, the ratio of the
    harmonic to the arithmetic mean of the spectrum (equality when all cosines are equal). Pass a
    frame ``X`` or its ``eigenvalues`` (any scale, batched over leading dims).
    """
    if (X is None) == (eigenvalues is None):
        raise SVToolsError("give exactly one of X or eigenvalues")
    if X is not None:
        X64 = _frame(X, "X").to(_F64)
        lam = torch.linalg.eigvalsh(X64 @ X64.T)
    else:
        lam = as_tensor(eigenvalues, "eigenvalues").to(_F64)
        check_finite(lam, "eigenvalues")
    if bool((lam <= 0).any()):
        return torch.zeros(lam.shape[:-1], dtype=_F64)
    return 1.0 / (lam.mean(-1) * (1.0 / lam).mean(-1))


# ----------------------------------------------------------------------------- corollary
def unwhiten(qk: QKSVD, Sigma_X: Float[Tensor, "D D"], Sigma_Y: Optional[Float[Tensor, "Dk Dk"]] = None
             ) -> tuple[Float[Tensor, "... D r"], Float[Tensor, "... Dk r"]]:
    """Feature estimates from singular vectors: ``Sigma_X u_k`` and ``Sigma_Y v_k``, unit norm.

    Inverts Theorem 1: if ``u ∝ Sigma_X^{-1} x_i`` then ``Sigma_X u ∝ x_i`` exactly. ``Sigma_X``
    may be the frame's ``X X^T`` or, without knowing the features, the data's second moment
    ``E[x x^T] = X F X^T`` (equal up to scale for independent zero-mean activations of equal
    variance; with a mean ``mu`` it returns ``∝ E[x f_i] = s^2 x_i + mu^2 X 1``).

    Args:
        qk: a :class:`~svtools.qk.QKSVD` without bias coordinate, ``U (..., D, r)``, ``V (..., D', r)``.
        Sigma_X, Sigma_Y: symmetric ``(D, D)``, ``(D', D')``; ``Sigma_Y`` defaults to ``Sigma_X``.

    Returns:
        ``(U_est, V_est)`` with unit columns, shapes as ``qk.U`` and ``qk.V``. A column whose
        ``Sigma u_k`` is zero (``u_k`` in the null space of a singular ``Sigma``) has no feature
        estimate and is NaN. Raises :class:`SVToolsError` for a ``Sigma`` that is not symmetric
        positive semi-definite.
    """
    if not isinstance(qk, QKSVD):
        raise SVToolsError(f"qk must be a QKSVD, got {type(qk).__name__}")
    if qk.has_bias:
        raise SVToolsError("qk has a bias coordinate; un-whitening acts on d_model directions")
    Sigma_Y = Sigma_X if Sigma_Y is None else Sigma_Y
    out = []
    for S, B, nm in ((Sigma_X, qk.U, "Sigma_X"), (Sigma_Y, qk.V, "Sigma_Y")):
        S = as_tensor(S, nm)
        d = B.shape[-2]
        if tuple(S.shape) != (d, d):
            raise SVToolsError(f"{nm} must have shape ({d}, {d}) to match the singular vectors, got {tuple(S.shape)}")
        check_finite(S, nm)
        if not torch.allclose(S, S.T, rtol=1e-5, atol=1e-6 * float(S.abs().max().clamp_min(1e-30))):
            raise SVToolsError(f"{nm} must be symmetric (a covariance or second-moment matrix)")
        S64 = S.to(_F64)
        lam = torch.linalg.eigvalsh((S64 + S64.T) / 2)
        if float(lam.min()) < -1e-6 * float(lam.abs().max().clamp_min(1e-300)):
            raise SVToolsError(f"{nm} must be positive semi-definite (a covariance or second-moment matrix); "
                               f"its smallest eigenvalue is {float(lam.min()):.3g}")
        est = S.to(B.device, B.dtype) @ B
        norm = est.norm(dim=-2, keepdim=True)
        # a singular vector in Sigma's null space has no feature estimate: NaN, not a zero "unit" vector
        out.append(torch.where(norm > torch.finfo(est.dtype).tiny, est / norm.clamp_min(torch.finfo(est.dtype).tiny),
                               torch.full_like(est, float("nan"))))
    return out[0], out[1]


# ----------------------------------------------------------------------------- Theorem 3
@dataclass
class FrameRun:
    """A frame trained with the head ``Omega`` held fixed (Theorem 3's experiment).

    Attributes (``L`` logged steps):

    - features: ``(D, N)`` final frame; bias: ``(N,)``; omega: the fixed ``(D, D)`` head.
    - step: ``(L,)``; loss_recon, loss_attn: ``(L,)`` mean reconstruction loss and relative
      attention loss (:func:`attention_loss` with ``relative=True``) since the last entry.
    - overlap_u, overlap_v: ``(L,)`` largest ``|cos(w_k, u)|``, ``|cos(w_k, v)|`` over the
      non-target features ``k``, with ``(u, v)`` the top singular pair of ``omega``.
    - cos_target: ``(L, 2)`` ``|cos(w_i, u)|`` and ``|cos(w_j, v)|`` for the target pair.
    - interference_target: ``(L, 2)`` largest ``|cos(w_i, w_k)|`` over ``k != i`` (and for ``j``).
    """

    features: Float[Tensor, "D N"]
    bias: Float[Tensor, "N"]
    omega: Float[Tensor, "D D"]
    step: Int[Tensor, "L"]
    loss_recon: Float[Tensor, "L"]
    loss_attn: Float[Tensor, "L"]
    overlap_u: Float[Tensor, "L"]
    overlap_v: Float[Tensor, "L"]
    cos_target: Float[Tensor, "L 2"]
    interference_target: Float[Tensor, "L 2"]


def train_frame(init: Float[Tensor, "D N"], omega: Float[Tensor, "D D"], pair: tuple[int, int],
                activation: Activation, *, lam: float = 1.0, recon: Literal["relu", "linear", "none"] = "relu",
                steps: int = 1500, batch: int = 1024, lr: float = 1e-2, seed: int = 0, device=None,
                progress: bool = True) -> FrameRun:
    """Train the frame ``W`` (query and key side shared, as in the toy) with ``Omega`` FIXED.

    Loss: ``L_recon + lam * L_attn`` where ``L_attn`` is the exact relative squared-error
    attention loss of the fixed head for the single pair ``T = e_i e_j^T`` (from moments, no
    sampling noise), and ``L_recon`` is sampled:

    - ``"relu"``: the toy's tied autoencoder ``|f - ReLU(W^T W f + b)|^2`` (bias learned);
    - ``"linear"``: ``|f - W^T W f|^2`` (the surrogate Theorem 3 (c) is proved for);
    - ``"none"``: attention only (isolates Theorem 3 (b)).

    Adam, constant ``lr``; deterministic given ``seed``; ``init`` is copied, not modified.
    """
    W0 = _frame(init, "init")
    om = as_tensor(omega, "omega")
    D, N = W0.shape
    if tuple(om.shape) != (D, D):
        raise SVToolsError(f"omega must have shape ({D}, {D}) to match init, got {tuple(om.shape)}")
    check_finite(om, "omega")
    if recon not in ("relu", "linear", "none"):
        raise SVToolsError(f"recon must be 'relu', 'linear' or 'none', got {recon!r}")
    i, j = (int(p) for p in pair)
    if not (0 <= i < N and 0 <= j < N):
        raise SVToolsError(f"pair {pair} out of range for {N} features")
    dev = default_device(device)
    dt = W0.dtype
    W = W0.detach().clone().to(dev).requires_grad_(True)
    b = torch.zeros(N, dtype=dt, device=dev, requires_grad=True)
    om = om.detach().to(dev, dt)
    T = torch.zeros(N, N, dtype=dt, device=dev)
    T[i, j] = 1.0
    U, _, Vh = torch.linalg.svd(om.to(_F64))
    u, v = U[:, 0].to(dt), Vh[0].to(dt)
    others = torch.ones(N, dtype=torch.bool, device=dev)
    others[[i, j]] = False
    params = [W, b] if recon == "relu" else [W]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    log_every = max(1, steps // 100)
    rec: dict[str, list] = {k: [] for k in ("step", "lr", "la", "ou", "ov", "ct", "it")}
    acc_r = acc_a = 0.0
    for s in tqdm(range(steps), desc="frame with fixed head", disable=not progress, mininterval=0.5):
        f = activation.sample((batch, N), gen, dtype=dt)
        if recon == "relu":
            l_r = ((torch.relu(f @ W.T @ W + b) - f) ** 2).sum(-1).mean()
        elif recon == "linear":
            l_r = ((f @ W.T @ W - f) ** 2).sum(-1).mean()
        else:
            l_r = torch.zeros((), dtype=dt, device=dev)
        l_a = attention_loss(W, W, om, T, activation, relative=True)
        loss = l_r + lam * l_a
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc_r += float(l_r.detach())
        acc_a += float(l_a.detach())
        if (s + 1) % log_every == 0 or s + 1 == steps or s == 0:
            with torch.no_grad():
                Wn = _unit(W.detach())
                C = (Wn.T @ Wn).abs().fill_diagonal_(0)
                n_acc = (s + 1) - (rec["step"][-1] if rec["step"] else 0)
                rec["step"].append(s + 1)
                rec["lr"].append(acc_r / n_acc)
                rec["la"].append(acc_a / n_acc)
                rec["ou"].append(float((Wn[:, others].T @ u).abs().max()))
                rec["ov"].append(float((Wn[:, others].T @ v).abs().max()))
                rec["ct"].append([float((Wn[:, i] @ u).abs()), float((Wn[:, j] @ v).abs())])
                rec["it"].append([float(C[i].max()), float(C[j].max())])
            acc_r = acc_a = 0.0
    ft = lambda k: torch.tensor(rec[k], dtype=torch.float64)  # noqa: E731
    return FrameRun(W.detach().cpu(), b.detach().cpu(), om.cpu(), torch.tensor(rec["step"]), ft("lr"), ft("la"),
                    ft("ou"), ft("ov"), ft("ct"), ft("it"))


# ----------------------------------------------------------------------------- sweeps
def alignment_sweep(levels: Iterable[float], *, N: int, D: int, spectrum: Literal["spike", "power"] = "spike",
                    seeds: Iterable[int] = (0,), n_check: int = 8, n_cov: int = 20_000,
                    tol: float = 1e-9, progress: bool = True) -> "pd.DataFrame":
    """Alignment of raw and un-whitened singular vectors against the frame's interference.

    For each level ``e`` and seed: build :func:`frame` ``(N, D, e)``, then
      * ``cos_raw``: mean over all features of ``|cos(x_i, u_i)|`` where ``u_i`` is the top left
        singular vector of the single-pair optimum (by Theorem 1 ``u_i ∝ Sigma_X^{-1} x_i``);
      * ``svd_check``: largest ``1 - |cos|`` between that prediction and the singular vector
        actually computed by SVD of :func:`optimal_omega` for ``n_check`` pairs (zero-mean
        activations): should be at round-off level;
      * ``bound_mean`` (:func:`mean_alignment_bound`) and ``bound_worst`` (:func:`alignment_floor`);
      * ``cos_unwhitened_est``: mean ``|cos|`` after :func:`unwhiten` with the second moment
        ``E[x x^T]`` estimated from ``n_cov`` samples of ``x = X f`` (zero-mean activations), on
        the ``n_check`` computed singular vectors. With the exact ``Sigma_X`` un-whitening
        is exact (Theorem 1), so only the estimate is interesting.

    ``n_check=0`` skips the SVD check and the un-whitening (frame quantities only: much faster,
    for the spread over many frames). ``tol`` is passed to :func:`frame`.

    Returns a pandas DataFrame with one row per (level, seed), columns ``level, seed, D, N,
    spectrum, interference`` (measured, trace-normalised), ``interference_abs`` (the same frame's
    ``||E_X||_2`` without normalisation, :func:`interference` with ``normalise="none"``) and the
    quantities above.
    """
    import pandas as pd

    levels, seeds = [float(e) for e in levels], [int(s) for s in seeds]
    if n_check < 0:
        raise SVToolsError(f"n_check must be >= 0, got {n_check}")
    act = Activation(centered=True)
    rows = []
    grid = [(e, s) for e in levels for s in seeds]
    for e, seed in tqdm(grid, desc=f"sweep D={D} {spectrum}", disable=not progress):
        X = frame(N, D, e, seed, spectrum=spectrum, dtype=_F64, tol=tol)
        cos = whitening_alignment(X)
        base = dict(level=e, seed=seed, D=D, N=N, spectrum=spectrum, interference=interference(X),
                    interference_abs=interference(X, normalise="none"),
                    cos_raw=float(cos.mean()), cos_raw_min=float(cos.min()),
                    bound_mean=float(mean_alignment_bound(X)), bound_worst=float(alignment_floor(interference(X))))
        if n_check == 0:
            rows.append(base)
            continue
        g = torch.Generator().manual_seed(seed + 12345)
        idx = torch.randperm(N, generator=g)[:n_check]
        T = torch.zeros(len(idx), N, N, dtype=_F64)
        T[torch.arange(len(idx)), idx, idx] = 1.0
        Om = optimal_omega(X, X, T, act)                                   # (P, D, D)
        Uc, _, _ = torch.linalg.svd(Om)
        u_pred, _ = whitened_directions(X, X, idx, idx)                     # (D, P)
        check = 1 - (Uc[:, :, 0] * u_pred.T).sum(-1).abs()
        qk = QKSVD(U=Uc[:, :, :1], S=torch.ones(len(idx), 1, dtype=_F64), V=Uc[:, :, :1])
        M2 = torch.zeros(D, D, dtype=_F64)
        for start in range(0, n_cov, 8192):                       # chunked: memory O(8192 N)
            xs = act.sample((min(8192, n_cov - start), N), g, dtype=_F64) @ X.T
            M2 += xs.T @ xs
        U_est, _ = unwhiten(qk, M2 / n_cov)
        cos_est = (U_est[:, :, 0] * _unit(X[:, idx]).T).sum(-1).abs()
        rows.append(dict(base, cos_raw_checked=float((Uc[:, :, 0] * _unit(X[:, idx]).T).sum(-1).abs().mean()),
                         svd_check=float(check.max()), cos_unwhitened_est=float(cos_est.mean())))
    return pd.DataFrame(rows)
