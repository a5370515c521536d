"""The numerical experiments that check the closed forms of :mod:`svtools.theory.closed_forms`.

* Theorem 1: sampled token pairs and their least-squares head (:func:`sample_pairs`,
  :func:`least_squares_omega`, :func:`toy_optimal_omega`), a head trained alone on a fixed frame
  (:func:`train_bilinear`), and :func:`head_report` (a head's top singular pair against the
  predictions).
* Theorem 2: random frames of prescribed interference (:func:`frame`) and the sweep of
  alignment against interference (:func:`alignment_sweep`).
* Theorem 3: a frame trained with the head held fixed (:func:`train_frame`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Literal, Optional

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from svtools._checks import SVToolsError, as_float, as_int, as_seed, as_tensor, check_finite
from svtools.qk import QKSVD, qk_svd
from svtools.runtime import default_device, tqdm
from svtools.theory.closed_forms import (Activation, ActivationLike, TemplateLike, alignment_floor, as_frame,
                                         as_template, attention_loss, check_normalise, frame_spectrum, interference,
                                         mean_alignment_bound, optimal_omega, probe_directions, psd_pinv, unit,
                                         unwhiten, whitened_directions, whitening_alignment)
from svtools.toy.model import ToyRun, sample_batch

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "sample_pairs", "least_squares_omega", "toy_optimal_omega", "BilinearRun", "train_bilinear", "frame",
    "FrameRun", "train_frame", "alignment_sweep", "head_report",
]

_F64 = torch.float64


# ----------------------------------------------------------------------------- Theorem 1
def sample_pairs(X: Float[Tensor, "D N"], Y: Float[Tensor, "D M"], template: TemplateLike,
                 activation: Activation, n: int, generator: torch.Generator,
                 key_activation: Optional[Activation] = None
                 ) -> tuple[Float[Tensor, "n D"], Float[Tensor, "n D"], Float[Tensor, "n"]]:
    r"""``n`` independent (query, key) token pairs :math:`x = X f`, :math:`y = Y g` and targets
    :math:`f^\top T g`.

    ``generator`` fixes the draw (its device is used). Returns ``(x, y, target)`` in ``X``'s dtype.
    """
    X, Y = as_frame(X, "X"), as_frame(Y, "Y")
    key_activation = activation if key_activation is None else key_activation
    if not isinstance(activation, Activation) or not isinstance(key_activation, Activation):
        raise SVToolsError("sample_pairs needs Activation laws (a bare second-moment matrix cannot be sampled)")
    if int(n) < 1:
        raise SVToolsError(f"n must be a positive integer, got {n}")
    dev, dt = generator.device, X.dtype
    T = as_template(template, X.shape[1], Y.shape[1]).to(device=dev, dtype=dt)
    f = activation.sample((int(n), X.shape[1]), generator, dtype=dt, device=dev)
    g = key_activation.sample((int(n), Y.shape[1]), generator, dtype=dt, device=dev)
    return f @ X.to(dev).T, g @ Y.to(dev, dt).T, ((f @ T) * g).sum(-1)


def least_squares_omega(x: Float[Tensor, "n D"], y: Float[Tensor, "n Dk"], target: Float[Tensor, "n"],
                        *, ridge: float = 0.0, chunk: int = 65536) -> Float[Tensor, "D Dk"]:
    r"""Sample least squares: :math:`\arg\min_\Omega \sum_n (x_n^\top \Omega y_n - t_n)^2 +
    \rho\,\|\Omega\|_F^2` (:math:`\rho` = ``ridge``).

    Solves the normal equations in :math:`\operatorname{vec}(\Omega)` (:math:`D D'` unknowns, at
    most 4096): :math:`\sum_n z_n z_n^\top \operatorname{vec}(\Omega) = \sum_n t_n z_n` with
    :math:`z_n = \operatorname{vec}(x_n y_n^\top)`; minimum-norm
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
    w = psd_pinv(A) @ b
    return einops.rearrange(w, "(d e) -> d e", d=D).to(x.dtype)


def toy_optimal_omega(run, n_samples: int = 200_000, *, seed: int = 0) -> Float[Tensor, "D D"]:
    r"""Least-squares optimum of a toy model's attention loss *at its learned frame*, from samples.

    Draws ``n_samples`` examples of the toy's own data distribution
    (:func:`svtools.toy.sample_batch`, planted pairs and ``target_scale`` included), forms the
    ``n_samples * m`` (query, key) pairs :math:`x = W f_q`, :math:`y = W f_k` and solves
    :func:`least_squares_omega`. For a toy trained with ``attn_loss="mse"`` this is what its
    :math:`\Omega` should converge to at fixed :math:`W` (:math:`\Omega` enters only the attention loss); for
    ``"ce"`` it shows what the squared-error surrogate would have chosen.
    """

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
    return einops.rearrange(psd_pinv(A) @ b, "(d e) -> d e", d=D).to(run.features.dtype)


@dataclass
class BilinearRun:
    r"""A bilinear head :math:`\Omega = W_Q W_K^\top` trained alone on a fixed frame.

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
    r"""Train a head :math:`\Omega = W_Q W_K^\top` with Adam on a FIXED frame (the frame is not
    learned).

    This differs from :func:`svtools.toy.train`, which learns the frame and the head together:
    here only :math:`\Omega` moves, which is the object Theorem 1 speaks about.

    Losses (:math:`\beta` = ``target_scale``, targets :math:`\ell^* = \beta f^\top T g`):
        ``"mse"``: the mean of :math:`(x^\top \Omega y - \ell^*)^2` over independent (query, key)
            pairs: its minimiser is :func:`optimal_omega` (times :math:`\beta`), so training should
            approach it.
        ``"ce"``: each query meets ``n_keys`` keys; KL divergence from
            :math:`\operatorname{softmax}(\ell^*)` to :math:`\operatorname{softmax}_j(x^\top \Omega
            y_j)` (the paper's cross-entropy loss, shift-invariant per query).

    Adam with a cosine learning-rate decay to ``lr/10``; initial factors have standard deviation
    :math:`0.1/\sqrt{D}`; ``d_head`` defaults to :math:`\min(D, D')`. Deterministic given ``seed``.
    """
    X, Y = as_frame(X, "X"), as_frame(Y, "Y")
    key_activation = activation if key_activation is None else key_activation
    if loss not in ("mse", "ce"):
        raise SVToolsError(f"loss must be 'mse' or 'ce', got {loss!r}")
    n_keys = as_int(n_keys, "n_keys", min_value=1)
    if loss == "ce" and n_keys < 2:
        raise SVToolsError("loss='ce' needs n_keys >= 2 (softmax over one key is constant)")
    steps, batch = as_int(steps, "steps", min_value=1), as_int(batch, "batch", min_value=1)
    lr, seed = as_float(lr, "lr", lo=0.0, lo_open=True), as_seed(seed, "seed")
    target_scale = as_float(target_scale, "target_scale")
    dev = default_device(device)
    dt = X.dtype
    D, Dk = X.shape[0], Y.shape[0]
    H = int(d_head or min(D, Dk))
    g = torch.Generator().manual_seed(int(seed))
    W_Q = (torch.randn(D, H, generator=g, dtype=_F64) * 0.1 / math.sqrt(D)).to(dev, dt).requires_grad_(True)
    W_K = (torch.randn(Dk, H, generator=g, dtype=_F64) * 0.1 / math.sqrt(D)).to(dev, dt).requires_grad_(True)
    Xd, Yd = X.to(dev), Y.to(dev, dt)
    T = (float(target_scale) * as_template(template, X.shape[1], Y.shape[1])).to(dev, dt)
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
        if not math.isfinite(float(l.detach())):  # the finite-loss guard: never return NaN weights
            raise SVToolsError(f"training diverged at step {s} (loss {float(l.detach())}); lower lr (now {lr}) or "
                               "target_scale")
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

    X, Y = as_frame(X, "X"), as_frame(Y, "Y")
    wu, wv = (t.to(_F64) for t in whitened_directions(X, Y, i, j))
    targets = {"whitened": (wu, wv), "raw": (unit(X[:, i].to(_F64)), unit(Y[:, j].to(_F64)))}
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


# ----------------------------------------------------------------------------- Theorem 2
def frame(N: int, D: int, interference: float, seed: int = 0, *,
          spectrum: Literal["spike", "power"] = "spike", normalise: Literal["trace", "none"] = "trace",
          dtype: torch.dtype = torch.float32, max_iter: int = 1000, tol: float = 1e-9) -> Float[Tensor, "D N"]:
    r"""A random frame of :math:`N` unit-norm features in :math:`\mathbb{R}^D` with
    :math:`\|E_X\|_2` = ``interference``.

    :math:`\Sigma_X = X X^\top` gets the eigenvalues :math:`N/D` times
    ``frame_spectrum(D, interference, spectrum)`` in a random orthonormal basis; columns have unit
    norm. Built by alternating projections (normalise the columns, then map
    :math:`X \mapsto S^{1/2} (X X^\top)^{-1/2} X`) until the column norms are
    within ``tol`` of 1; a unit-norm frame with any such spectrum exists when ``N >= D``
    (Schur-Horn). With ``normalise="none"`` ``interference`` is in absolute units (it is divided
    by ``N / D``). Deterministic given ``seed``. Identity:
    ``interference(frame(N, D, e, ...)) == e`` (to about ``1e-6`` in float32).
    """
    N, D = as_int(N, "N"), as_int(D, "D")
    interference = as_float(interference, "interference", lo=0.0)
    if D < 2 or N < D:
        raise SVToolsError(f"frame needs N >= D >= 2 (features spanning R^D), got N={N}, D={D}")
    check_normalise(normalise)
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


# ----------------------------------------------------------------------------- Theorem 3
@dataclass
class FrameRun:
    r"""A frame trained with the head :math:`\Omega` held fixed (Theorem 3's experiment).

    Attributes (``L`` logged steps):

    - features: ``(D, N)`` final frame; bias: ``(N,)``; omega: the fixed ``(D, D)`` head.
    - step: ``(L,)``; loss_recon, loss_attn: ``(L,)`` mean reconstruction loss and relative
      attention loss (:func:`attention_loss` with ``relative=True``) since the last entry.
    - overlap_u, overlap_v: ``(L,)`` largest :math:`|\cos(w_k, u)|`, :math:`|\cos(w_k, v)|` over
      the non-target features :math:`k`, with :math:`(u, v)` the top singular pair of ``omega``.
    - cos_target: ``(L, 2)`` :math:`|\cos(w_i, u)|` and :math:`|\cos(w_j, v)|` for the target pair.
    - interference_target: ``(L, 2)`` largest :math:`|\cos(w_i, w_k)|` over :math:`k \ne i` (and
      for :math:`j`).
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
    r"""Train the frame :math:`W` (query and key side shared, as in the toy) with :math:`\Omega`
    FIXED.

    Loss: :math:`L_\text{recon} + \lambda L_\text{attn}` (:math:`\lambda` = ``lam``) where
    :math:`L_\text{attn}` is the exact relative squared-error attention loss of the fixed head for
    the single pair :math:`T = e_i e_j^\top` (from moments, no sampling noise), and
    :math:`L_\text{recon}` is sampled:

    - ``"relu"``: the toy's tied autoencoder :math:`\|f - \mathrm{ReLU}(W^\top W f + b)\|^2`
      (bias learned);
    - ``"linear"``: :math:`\|f - W^\top W f\|^2` (the surrogate Theorem 3 (c) is proved for);
    - ``"none"``: attention only (isolates Theorem 3 (b)).

    Adam, constant ``lr``; deterministic given ``seed``; ``init`` is copied, not modified.
    """
    W0 = as_frame(init, "init")
    om = as_tensor(omega, "omega")
    D, N = W0.shape
    if tuple(om.shape) != (D, D):
        raise SVToolsError(f"omega must have shape ({D}, {D}) to match init, got {tuple(om.shape)}")
    check_finite(om, "omega")
    if recon not in ("relu", "linear", "none"):
        raise SVToolsError(f"recon must be 'relu', 'linear' or 'none', got {recon!r}")
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise SVToolsError(f"pair must be two feature indices (i, j), got {pair!r}")
    i, j = (as_int(p, "pair") for p in pair)
    steps, batch = as_int(steps, "steps", min_value=1), as_int(batch, "batch", min_value=1)
    lr, seed, lam = as_float(lr, "lr", lo=0.0, lo_open=True), as_seed(seed, "seed"), as_float(lam, "lam")
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
        if not math.isfinite(float(loss.detach())):  # the finite-loss guard: never return NaN weights
            raise SVToolsError(f"training diverged at step {s} (loss {float(loss.detach())}); lower lr (now {lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc_r += float(l_r.detach())
        acc_a += float(l_a.detach())
        if (s + 1) % log_every == 0 or s + 1 == steps or s == 0:
            with torch.no_grad():
                Wn = unit(W.detach())
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
    r"""Alignment of raw and un-whitened singular vectors against the frame's interference.

    For each level ``e`` and seed: build :func:`frame` ``(N, D, e)``, then
      * ``cos_raw``: mean over all features of :math:`|\cos(x_i, u_i)|` where :math:`u_i` is the
        top left singular vector of the single-pair optimum (by Theorem 1
        :math:`u_i \propto \Sigma_X^{-1} x_i`);
      * ``svd_check``: largest :math:`1 - |\cos|` between that prediction and the singular vector
        actually computed by SVD of :func:`optimal_omega` for ``n_check`` pairs (zero-mean
        activations): should be at round-off level;
      * ``bound_mean`` (:func:`mean_alignment_bound`) and ``bound_worst`` (:func:`alignment_floor`);
      * ``cos_unwhitened_est``: mean :math:`|\cos|` after :func:`unwhiten` with the second moment
        :math:`\mathbb{E}[x x^\top]` estimated from ``n_cov`` samples of :math:`x = X f` (zero-mean
        activations), on the ``n_check`` computed singular vectors. With the exact
        :math:`\Sigma_X` un-whitening
        is exact (Theorem 1), so only the estimate is interesting.

    ``n_check=0`` skips the SVD check and the un-whitening (frame quantities only: much faster,
    for the spread over many frames). ``tol`` is passed to :func:`frame`.

    Returns a pandas DataFrame with one row per (level, seed), columns ``level, seed, D, N,
    spectrum, interference`` (measured, trace-normalised), ``interference_abs`` (the same frame's
    :math:`\|E_X\|_2` without normalisation, :func:`interference` with ``normalise="none"``) and the
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
        cos_est = (U_est[:, :, 0] * unit(X[:, idx]).T).sum(-1).abs()
        rows.append(dict(base, cos_raw_checked=float((Uc[:, :, 0] * unit(X[:, idx]).T).sum(-1).abs().mean()),
                         svd_check=float(check.max()), cos_unwhitened_est=float(cos_est.mean())))
    return pd.DataFrame(rows)
