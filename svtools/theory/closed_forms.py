"""The theorems' closed forms: what the least-squares theory of a bilinear head predicts.

Theorem 1 (:func:`whitened_directions`, :func:`probe_directions`, :func:`optimal_omega`,
:func:`attention_loss`), Theorem 2 (:func:`interference_matrix`, :func:`interference`,
:func:`frame_spectrum`, :func:`whitening_alignment`, :func:`alignment_floor`,
:func:`mean_alignment_bound`, :func:`measure_frame`) and the corollary (:func:`unwhiten`), with
the activation law they assume (:class:`Activation`). Conventions in :mod:`svtools.theory`.
Everything is computed in float64 internally and returned in the input's dtype. The input
helpers (:func:`as_frame`, :func:`as_template`, :func:`psd_pinv`, :func:`unit`,
:func:`check_normalise`) are shared with :mod:`svtools.theory.experiments`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from svtools._checks import SVToolsError, as_indices, as_tensor, check_finite, is_index_sequence
from svtools.qk import QKSVD

__all__ = ["Activation", "whitened_directions", "probe_directions", "mean_drift", "optimal_omega", "attention_loss",
           "interference_matrix", "interference", "frame_spectrum", "whitening_alignment", "measure_frame",
           "alignment_floor", "mean_alignment_bound", "unwhiten"]

_F64 = torch.float64
TemplateLike = Union[Tensor, Sequence[Sequence[float]]]


# ----------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class Activation:
    r"""Law of one feature's activation; features are independent and identically distributed.

    :math:`f_k = B_k A_k` with :math:`B_k \sim \mathrm{Bernoulli}(p)` (on/off, :math:`p` =
    ``p_active``) and :math:`A_k \sim \mathrm{Uniform}[a, b]` (magnitude, :math:`a` = ``low``,
    :math:`b` = ``high``; :math:`a = b` gives a constant magnitude). The toy model of Part 1 uses
    :math:`p = 1 - S`, :math:`a = 0`, :math:`b = 1`. ``centered=True`` subtracts the mean,
    :math:`f_k - \mathbb{E} f_k`: the zero-mean assumption of Theorem 1, as a distribution one can
    sample.

    Moments (per feature): mean :math:`\mu = p (a + b) / 2` (0 when centered), variance
    :math:`s^2 = p (a^2 + ab + b^2) / 3 - \mu^2`; the second-moment matrix of
    :math:`f \in \mathbb{R}^N` is :math:`\mathbb{E}[f f^\top] = s^2 I + \mu^2 \mathbf{1}\mathbf{1}^\top`.
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
        r""":math:`\mathbb{E}[f f^\top] = s^2 I + \mu^2 \mathbf{1}\mathbf{1}^\top` for ``n`` features."""
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
def as_frame(X, name: str) -> Tensor:
    """``X`` checked as a feature frame: a finite, non-empty ``(D, N)`` tensor, features as columns."""
    X = as_tensor(X, name)
    if X.ndim != 2:
        raise SVToolsError(f"{name} must be a feature frame of shape (D, N), features as columns, "
                           f"got {tuple(X.shape)}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise SVToolsError(f"{name} is empty: shape {tuple(X.shape)}")
    check_finite(X, name)
    return X


def as_template(template: TemplateLike, n_q: int, n_k: int) -> Tensor:
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


def psd_pinv(S: Tensor) -> Tensor:
    """Pseudo-inverse of symmetric PSD matrices (eigenvalues below ``dim * eps * max`` dropped)."""
    lam, Q = torch.linalg.eigh(S)
    cut = S.shape[-1] * torch.finfo(S.dtype).eps * lam.abs().amax(-1, keepdim=True)
    inv = torch.where(lam > cut, 1.0 / lam.clamp_min(torch.finfo(S.dtype).tiny), torch.zeros_like(lam))
    return (Q * inv[..., None, :]) @ Q.transpose(-1, -2)


def unit(v: Tensor, dim: int = 0) -> Tensor:
    """``v`` scaled to unit norm along ``dim`` (a zero vector stays zero)."""
    return v / v.norm(dim=dim, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


def _index(i, n: int, name: str) -> tuple[Tensor, bool]:
    """Feature index/indices (ints, numpy ints, 1-D int arrays; floats rejected) -> (long tensor, is_scalar)."""
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
    r"""Theorem 1's predicted singular vectors :math:`u = \Sigma_X^+ x_i`, :math:`v = \Sigma_Y^+ y_j`,
    unit norm.

    :math:`\Sigma_X = X X^\top` (:math:`^+`: pseudo-inverse, the inverse when the features span
    :math:`\mathbb{R}^D`). Identity: for independent zero-mean activations of equal variance and
    :math:`T = e_i e_j^\top`, ``optimal_omega(X, Y, T, ...)`` :math:`= s\,u v^\top` with
    :math:`s > 0`, so :math:`(u, v)` is its top singular pair (up to a joint sign).

    Args:
        X, Y: query-side ``(D, N)`` and key-side ``(D', M)`` frames, features as columns.
        i, j: feature indices (ints give ``(D,)`` vectors; 1-D index lists give ``(D, P)``);
            floats are rejected, not truncated. A zero feature column has no direction and
            raises :class:`SVToolsError`.
    """
    X, Y = as_frame(X, "X"), as_frame(Y, "Y")
    ii, si = _index(i, X.shape[1], "i")
    jj, sj = _index(j, Y.shape[1], "j")
    X64, Y64 = X.to(_F64), Y.to(_F64)
    u = _unit_or_raise(psd_pinv(X64 @ X64.T) @ X64[:, ii.to(X.device)], ii.tolist(), "X")
    v = _unit_or_raise(psd_pinv(Y64 @ Y64.T) @ Y64[:, jj.to(Y.device)], jj.tolist(), "Y")
    u = u[:, 0] if si else u
    v = v[:, 0] if sj else v
    return u.to(X.dtype), v.to(Y.dtype)


def probe_directions(X: Float[Tensor, "D N"], Y: Float[Tensor, "D M"], i, j,
                     activation: ActivationLike, key_activation: Optional[ActivationLike] = None
                     ) -> tuple[Float[Tensor, "D *P"], Float[Tensor, "D *P"]]:
    r"""The exact singular vectors of the single-pair optimum without the zero-mean assumption.

    :math:`u \propto (X F X^\top)^+ X F e_i = \mathbb{E}[x x^\top]^+\, \mathbb{E}[x f_i]` (the
    least-squares linear probe of feature :math:`i` from :math:`x`),
    :math:`v \propto (Y G Y^\top)^+ Y G e_j`; unit norm. With :math:`F \propto I` (zero-mean,
    independent, equal variance) this is :func:`whitened_directions`. With an :class:`Activation`
    of mean :math:`\mu` and variance :math:`s^2`, :math:`X F e_i = s^2 x_i + \mu^2 X\mathbf{1}`:
    the mean adds a pull towards the frame's summed direction :math:`X\mathbf{1}`.

    Args:
        activation, key_activation: :class:`Activation` or explicit ``(N, N)`` second moments
            :math:`\mathbb{E}[f f^\top]` (key side defaults to the query side's law).
    """
    X, Y = as_frame(X, "X"), as_frame(Y, "Y")
    ii, si = _index(i, X.shape[1], "i")
    jj, sj = _index(j, Y.shape[1], "j")
    key_activation = activation if key_activation is None else key_activation
    F = _moments(activation, X.shape[1], "activation", X.device)
    G = _moments(key_activation, Y.shape[1], "key_activation", Y.device)
    X64, Y64 = X.to(_F64), Y.to(_F64)
    u = unit(psd_pinv(X64 @ F @ X64.T) @ (X64 @ F[:, ii.to(X.device)]))
    v = unit(psd_pinv(Y64 @ G @ Y64.T) @ (Y64 @ G[:, jj.to(Y.device)]))
    return (u[:, 0] if si else u).to(X.dtype), (v[:, 0] if sj else v).to(Y.dtype)


def mean_drift(X: Float[Tensor, "D N"], activation: ActivationLike) -> Float[Tensor, "N"]:
    r""":math:`|\cos|` between Theorem 1's whitened direction and the exact singular vector
    (:func:`probe_directions`) for every feature, under ``activation`` (query side).

    Identity: 1 for every feature when ``activation`` has zero mean, and also whenever the
    features are linearly independent (:math:`N \le D`): then :math:`X^\top \Sigma_X^+ X = I` and the mean's
    pull cancels.
    """
    X = as_frame(X, "X")
    idx = torch.arange(X.shape[1])
    w, _ = whitened_directions(X, X, idx, idx)
    p, _ = probe_directions(X, X, idx, idx, activation)
    return (w.to(_F64) * p.to(_F64)).sum(0).abs().to(X.dtype)


def optimal_omega(X: Float[Tensor, "D N"], Y: Float[Tensor, "D M"], template: TemplateLike,
                  activation: ActivationLike, key_activation: Optional[ActivationLike] = None
                  ) -> Float[Tensor, "*batch D D"]:
    r"""Closed-form minimiser of :math:`\mathbb{E}[(x^\top \Omega y - f^\top T g)^2]` from the data's
    moments.

    :math:`\Omega^* = (X F X^\top)^+ X F T G Y^\top (Y G Y^\top)^+` with
    :math:`F = \mathbb{E}[f f^\top]`, :math:`G = \mathbb{E}[g g^\top]`; the minimum-norm minimiser
    (unique when both frames span :math:`\mathbb{R}^D`). Assumes the query and key activations
    :math:`f, g` are independent of each other; the features within :math:`f` may be correlated if
    :math:`F` is given as a matrix. Identity (normal equations):
    :math:`X F X^\top\, \Omega^*\, Y G Y^\top = X F T G Y^\top` whenever the frames span
    :math:`\mathbb{R}^D`.

    Args:
        X: ``(D, N)`` query-side frame; Y: ``(D', M)`` key-side frame.
        template: ``(..., N, M)`` tensor (a batch of templates gives a batch of optima) or a
            list of ``(i, j, strength)`` triples.
        activation: :class:`Activation` (i.i.d. features) or an explicit ``(N, N)`` matrix
            :math:`\mathbb{E}[f f^\top]`; key_activation: the same for :math:`g` (default: same law
            as :math:`f`).

    Returns:
        ``(..., D, D')`` in ``X``'s dtype.
    """
    X, Y = as_frame(X, "X"), as_frame(Y, "Y")
    key_activation = activation if key_activation is None else key_activation
    T = as_template(template, X.shape[1], Y.shape[1]).to(X.device)
    F = _moments(activation, X.shape[1], "activation", X.device)
    G = _moments(key_activation, Y.shape[1], "key_activation", Y.device)
    X64, Y64 = X.to(_F64), Y.to(_F64)
    left = psd_pinv(X64 @ F @ X64.T) @ X64 @ F          # (D, N)
    right = G @ Y64.T @ psd_pinv(Y64 @ G @ Y64.T)       # (M, D')
    return (left @ T @ right).to(X.dtype)


def attention_loss(X: Float[Tensor, "D N"], Y: Float[Tensor, "D M"], omega: Float[Tensor, "D D"],
                   template: TemplateLike, activation: ActivationLike,
                   key_activation: Optional[ActivationLike] = None, *, relative: bool = False
                   ) -> Float[Tensor, ""]:
    r"""Exact expected squared-error attention loss :math:`\mathbb{E}[(x^\top \Omega y - f^\top T g)^2]`
    from moments.

    Identity: :math:`= \operatorname{tr}(F R G R^\top)` with :math:`R = X^\top \Omega Y - T`
    (:math:`f, g` independent). With ``relative=True`` it is divided by
    :math:`\mathbb{E}[(f^\top T g)^2] = \operatorname{tr}(F T G T^\top)` (so :math:`\Omega = 0`
    scores 1). Differentiable in ``X``, ``Y`` and ``omega`` (computed in their dtype).
    """
    if not all(isinstance(t, Tensor) for t in (X, Y, omega)):
        raise SVToolsError("X, Y and omega must be tensors")
    if X.ndim != 2 or Y.ndim != 2 or tuple(omega.shape) != (X.shape[0], Y.shape[0]):
        raise SVToolsError(f"need X (D, N), Y (D', M), omega (D, D'); got {tuple(X.shape)}, "
                           f"{tuple(Y.shape)}, {tuple(omega.shape)}")
    key_activation = activation if key_activation is None else key_activation
    dt = X.dtype
    T = as_template(template, X.shape[1], Y.shape[1]).to(device=X.device, dtype=dt)
    F = _moments(activation, X.shape[1], "activation", X.device).to(dt)
    G = _moments(key_activation, Y.shape[1], "key_activation", Y.device).to(dt)
    R = X.transpose(0, 1) @ omega @ Y - T
    loss = ((F @ R @ G) * R).sum()
    if relative:
        loss = loss / ((F @ T @ G) * T).sum().clamp_min(torch.finfo(dt).tiny)
    return loss


# ----------------------------------------------------------------------------- Theorem 2
def check_normalise(normalise: str) -> None:
    """Raise unless ``normalise`` names an interference normalisation (``"trace"`` or ``"none"``)."""
    if normalise not in ("trace", "none"):
        raise SVToolsError(f"normalise must be 'trace' or 'none', got {normalise!r}")


def interference_matrix(X: Float[Tensor, "D N"], normalise: Literal["trace", "none"] = "trace"
                        ) -> Float[Tensor, "D D"]:
    r""":math:`E_X`, the frame's deviation from isotropy.

    ``"trace"`` (default): :math:`E_X = \Sigma_X / c - I` with :math:`\Sigma_X = X X^\top` and
    :math:`c = \operatorname{tr}(\Sigma_X) / D` (the mean eigenvalue; :math:`N / D` for unit-norm
    features). Dimensionless, 0 iff the frame is tight, :math:`\|E_X\|_2 \le D - 1`.
    ``"none"``: :math:`E_X = \Sigma_X - c I` (units of squared feature norm).
    """
    check_normalise(normalise)
    X = as_frame(X, "X")
    X64 = X.to(_F64)
    S = X64 @ X64.T
    c = torch.diagonal(S).sum() / S.shape[0]
    if float(c) <= 0:
        raise SVToolsError("X is all zeros: its interference is undefined")
    I = torch.eye(S.shape[0], dtype=_F64, device=S.device)
    E = S / c - I if normalise == "trace" else S - c * I
    return E.to(X.dtype)


def interference(X: Float[Tensor, "D N"], normalise: Literal["trace", "none"] = "trace") -> float:
    r""":math:`\|E_X\|_2` (largest absolute eigenvalue of :func:`interference_matrix`)."""
    check_normalise(normalise)
    Xf = as_frame(X, "X").to(_F64)
    S = Xf @ Xf.T
    lam = torch.linalg.eigvalsh(S)
    c = lam.mean()
    if float(c) <= 0:
        raise SVToolsError("X is all zeros: its interference is undefined")
    dev = (lam / c - 1) if normalise == "trace" else (lam - c)
    return float(dev.abs().max())


def frame_spectrum(D: int, interference: float, spectrum: Literal["spike", "power"] = "spike"
                   ) -> Float[Tensor, "D"]:
    r"""Eigenvalues (descending, mean 1) of :math:`\Sigma_X / \bar\lambda` with
    :math:`\max_k |\lambda_k - 1| = \epsilon` (:math:`\epsilon` = ``interference``).

    ``"spike"``: one direction carries the excess, :math:`(1 + \epsilon, c, \dots, c)` with
    :math:`c = (D - 1 - \epsilon) / (D - 1)` (a common direction shared by all features, like the
    dominant direction of GPT-2's residual stream). ``"power"``:
    :math:`\lambda_k \propto k^{-\alpha}`, :math:`\alpha` found by bisection (a power-law spectrum,
    as in real activation covariances). Needs :math:`0 \le \epsilon < D - 1`.
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


def whitening_alignment(X: Float[Tensor, "D N"]) -> Float[Tensor, "N"]:
    r""":math:`|\cos(x_i, \Sigma_X^+ x_i)|` for every feature: how well the raw feature matches the
    singular vector Theorem 1 predicts (1 for all features iff the frame is tight)."""
    X = as_frame(X, "X")
    X64 = X.to(_F64)
    Z = psd_pinv(X64 @ X64.T) @ X64
    return ((unit(X64) * unit(Z)).sum(0)).abs().to(X.dtype)


def measure_frame(X: Float[Tensor, "D N"]) -> dict:
    r"""Where a given frame (e.g. a sparse autoencoder's dictionary ``W_dec``) sits on the
    alignment-vs-interference sweep: ``D``, ``N``, ``interference`` (trace-normalised
    :math:`\|E_X\|_2`), ``interference_abs`` (unnormalised), ``cos_raw`` (mean over features of
    :math:`|\cos(x_i, \Sigma_X^+ x_i)|`, the alignment Theorem 1 predicts for a head reading
    feature :math:`i`), ``cos_raw_min``, ``bound_mean`` (:func:`mean_alignment_bound`; meaningful
    for unit-norm columns) and ``lambda_min``, ``lambda_max`` (the extreme eigenvalues of
    :math:`\Sigma_X` over their mean: :math:`\|E_X\|_2` sees only the larger deviation, whitening
    sees both). Columns are used as given (normalise them first if needed)."""
    X = as_frame(X, "X")
    cos = whitening_alignment(X)
    X64 = X.to(_F64)
    lam = torch.linalg.eigvalsh(X64 @ X64.T)
    return {"D": int(X.shape[0]), "N": int(X.shape[1]), "interference": interference(X),
            "interference_abs": interference(X, normalise="none"), "cos_raw": float(cos.mean()),
            "cos_raw_min": float(cos.min()), "bound_mean": float(mean_alignment_bound(X)),
            "lambda_min": float(lam.min() / lam.mean()), "lambda_max": float(lam.max() / lam.mean())}


def alignment_floor(interference: float | Tensor) -> Tensor:
    r"""Theorem 2, worst case: :math:`\cos(x, \Sigma_X^{-1} x) \ge \sqrt{1 - \epsilon^2}` for every
    :math:`x` when :math:`\|E_X\|_2 = \epsilon < 1` (for *any* normalisation
    :math:`E_X = \Sigma_X / c - I`); 0 (no guarantee) for :math:`\epsilon \ge 1`."""
    e = as_tensor(interference if isinstance(interference, Tensor) else
                  torch.as_tensor(interference, dtype=_F64), "interference").to(_F64)
    check_finite(e, "interference")
    if bool((e < 0).any()):
        raise SVToolsError("interference must be >= 0")
    return torch.where(e < 1, (1 - e.clamp(max=1) ** 2).sqrt(), torch.zeros_like(e))


def mean_alignment_bound(X: Optional[Float[Tensor, "D N"]] = None, *,
                         eigenvalues: Optional[Float[Tensor, "... D"]] = None) -> Tensor:
    r"""Theorem 2, on average: the mean over features of :math:`\cos(x_i, \Sigma_X^{-1} x_i)` is at
    least :math:`\operatorname{HM}(\lambda) / \operatorname{AM}(\lambda)`.

    For unit-norm features spanning :math:`\mathbb{R}^D`, with :math:`\lambda` the eigenvalues of
    :math:`\Sigma_X`: :math:`\tfrac1N\sum_i \cos_i \ge \tfrac1N\sum_i \cos_i^2 \ge
    D^2 / (\operatorname{tr}\Sigma_X \operatorname{tr}\Sigma_X^{-1})`, the ratio of the harmonic to
    the arithmetic mean of the spectrum (equality when all cosines are equal). Pass a
    frame ``X`` or its ``eigenvalues`` (any scale, batched over leading dims).
    """
    if (X is None) == (eigenvalues is None):
        raise SVToolsError("give exactly one of X or eigenvalues")
    if X is not None:
        X64 = as_frame(X, "X").to(_F64)
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
    r"""Feature estimates from singular vectors: :math:`\Sigma_X u_k` and :math:`\Sigma_Y v_k`, unit
    norm.

    Inverts Theorem 1: if :math:`u \propto \Sigma_X^{-1} x_i` then :math:`\Sigma_X u \propto x_i`
    exactly. :math:`\Sigma_X` may be the frame's :math:`X X^\top` or, without knowing the features,
    the data's second moment :math:`\mathbb{E}[x x^\top] = X F X^\top` (equal up to scale for
    independent zero-mean activations of equal variance; with a mean :math:`\mu` it returns a
    vector :math:`\propto \mathbb{E}[x f_i] = s^2 x_i + \mu^2 X\mathbf{1}`).

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
