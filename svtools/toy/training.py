"""Training the toy model: one seed (:func:`train`), many seeds at once (:func:`train_seeds`), sweeps.

Autoencoder and head are trained jointly with Adam(W) on ``L_recon + lambda * L_attn``
(:mod:`svtools.toy`); several seeds train as one batched model with a leading model axis.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from svtools._checks import SVToolsError, as_int
from svtools.alignment import match_pairs
from svtools.geometry import max_interference
from svtools.qk import qk_svd, rotary_matrices
from svtools.runtime import default_device, tqdm
from svtools.toy.model import ToyConfig, ToyHistory, ToyRun, rotary_spec_of, sample_batch, template_matrix
from svtools.toy.summaries import summarize

__all__ = ["train", "train_seeds", "sweep"]


def _scores(q: Tensor, k: Tensor, M: Optional[Tensor]) -> Tensor:
    """``l_j = q . k_j`` or, rotary, ``q^T M_j k_j``; q ``(S, B, H)``, k ``(S, B, m, H)``."""
    if M is not None:
        k = torch.einsum("mhg,sbmg->sbmh", M, k)
    return torch.einsum("sbh,sbmh->sbm", q, k)


def _attn_loss(logits: Tensor, target: Tensor, kind: str) -> Tensor:
    """Per-model attention loss ``(S,)`` from logits and targets ``(S, B, m)``."""
    if kind == "mse":
        return ((logits - target) ** 2).mean(dim=(1, 2))
    p_star = target.softmax(-1)
    return (p_star * (p_star.clamp_min(1e-30).log() - logits.log_softmax(-1))).sum(-1).mean(-1)


class _ReconLoss(torch.autograd.Function):
    r"""Per-model reconstruction loss ``((relu(z) - f) ** 2).sum(-1).mean(dim=(1, 2))``, ``z, f (S, B, T, N)``
    -> ``(S,)``, with the numbers autograd gives that expression, bit for bit, in fewer passes over
    the batch-sized tensors (the toy's step is bound by memory traffic, not arithmetic).

    Forward: ``d = relu(z) - f`` (the subtraction in place), ``(d * d)`` summed (``x ** 2`` is ``x * x``).
    Backward, the chain autograd runs (mean: ``g / (B T)``; pow: ``g * (2 d)``; relu: 0 where
    ``relu(z) <= 0``, i.e. where ``z <= 0``) in two passes: ``d * (2 c)`` in place rounds the same exact
    product as ``c * (2 d)`` (doubling is exact), and relu's own backward kernel (``threshold_backward``
    on the saved ``z``) zeroes it where ``z <= 0`` without a mask pass (a boolean ``masked_fill_`` with
    a mask this irregular ran at a third of memory speed). ``tests/test_toy.py`` compares value and
    gradient with autograd's using ``torch.equal``.
    """

    @staticmethod
    def forward(ctx, z: Tensor, f: Tensor) -> Tensor:
        d = torch.relu(z).sub_(f)
        ctx.save_for_backward(d, z)
        return (d * d).sum(-1).mean(dim=(1, 2))

    @staticmethod
    def backward(ctx, grad: Tensor):
        d, z = ctx.saved_tensors
        c = grad / (d.shape[1] * d.shape[2])  # mean's backward
        g = d.mul_((2 * c)[:, None, None, None])  # d is not used again
        return torch.ops.aten.threshold_backward(g, z, 0), None


def _recon_loss(z: Float[Tensor, "S B T N"], f: Float[Tensor, "S B T N"]) -> Float[Tensor, " S"]:
    """``((relu(z) - f) ** 2).sum(-1).mean(dim=(1, 2))``, gradients to ``z`` only (:class:`_ReconLoss`)."""
    return _ReconLoss.apply(z, f)


def _measure(cfg: ToyConfig, W: Tensor, W_Q: Tensor, W_K: Tensor):
    """Alignment and interference of one model's current weights (CPU, float64 SVD)."""
    qk = qk_svd(W_Q.detach().T.cpu().double(), W_K.detach().T.cpu().double())
    al = match_pairs(W.detach().cpu(), qk, cfg.template)
    inter = max_interference(W.detach().cpu(), cfg.attended)
    return qk, al, inter


def _data_seed(seeds: Sequence[int]) -> int:
    """Seed of the data stream: ``seed + 1`` for one model, a mix of all seeds for an ensemble."""
    if len(seeds) == 1:
        return int(seeds[0]) + 1
    h = 1469598103934665603
    for x in seeds:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 62)
    return h


def train(cfg: ToyConfig, *, progress: bool = True) -> ToyRun:
    r"""Train the toy model of :class:`ToyConfig` and return the weights with their SVD.

    Deterministic for a given ``cfg`` and device: initial weights are drawn on the CPU from
    ``cfg.seed``, data from a generator on the training device seeded with ``cfg.seed + 1``.
    Shows a tqdm progress bar unless ``progress=False``.

    Identity kept by the result: :math:`U \operatorname{diag}(S) V^\top` (``run.qk``) ``== run.omega``
    :math:`= W_Q^\top W_K`.
    """
    if not isinstance(cfg, ToyConfig):
        raise SVToolsError(f"cfg must be a ToyConfig (e.g. ToyConfig(steps=3) or ToyConfig.single_pair()), "
                           f"got {type(cfg).__name__}")
    return train_seeds(cfg, [cfg.seed], progress=progress)[0]


def train_seeds(cfg: ToyConfig, seeds: Sequence[int], *, progress: bool = True) -> list[ToyRun]:
    """Train one independent model per seed at once (batched over a leading model axis).

    Each model's initial weights come from its own seed exactly as in :func:`train`, and each
    model sees its own data (independent slices of one stream). With a single seed this *is*
    :func:`train`; with several, the data stream is seeded from all of them, so a model is not
    bitwise identical to a separate ``train`` call, only statistically equivalent.

    On the CPU, training runs on one intra-op thread (restored afterwards): the tensors are small
    and thread synchronisation dominates otherwise.

    Returns:
        one :class:`ToyRun` per seed, in order, each with ``cfg.seed`` set to its seed.
    """
    if not isinstance(cfg, ToyConfig):
        raise SVToolsError(f"cfg must be a ToyConfig, got {type(cfg).__name__}")
    cfg.validate()
    if default_device(cfg.device).type != "cpu":
        return _train_seeds(cfg, seeds, progress)
    # The toy's tensors are tiny: intra-op threads only add synchronisation, which costs 10-20x
    # on a busy machine. Train on one thread and restore the caller's setting afterwards.
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_seeds(cfg, seeds, progress)
    finally:
        torch.set_num_threads(n_threads)


def _train_seeds(cfg: ToyConfig, seeds: Sequence[int], progress: bool) -> list[ToyRun]:
    seeds = [as_int(x, "seed", min_value=0, max_value=2**62) for x in seeds]
    if not seeds:
        raise SVToolsError("seeds is empty")
    if len(set(seeds)) != len(seeds):
        raise SVToolsError(f"seeds must be distinct, got {seeds}")
    device = default_device(cfg.device)
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    D, N, H, S, B = cfg.d_model, cfg.n_features, cfg.d_head, len(seeds), cfg.batch

    inits = []
    for sd in seeds:
        g = torch.Generator().manual_seed(sd)
        W0 = torch.randn(D, N, generator=g, dtype=torch.float64) * math.sqrt(2.0 / (D + N))
        Q0 = torch.randn(H, D, generator=g, dtype=torch.float64) * cfg.init_scale / math.sqrt(D)
        K0 = torch.randn(H, D, generator=g, dtype=torch.float64) * cfg.init_scale / math.sqrt(D)
        inits.append((W0, Q0, K0))
    W = torch.stack([x[0] for x in inits]).to(device=device, dtype=dtype).requires_grad_(True)   # (S, D, N)
    b = torch.zeros(S, N, device=device, dtype=dtype, requires_grad=True)                        # (S, N)
    params = [W, b]
    if cfg.head:
        W_Q = torch.stack([x[1] for x in inits]).to(device=device, dtype=dtype).requires_grad_(True)  # (S, H, D)
        W_K = torch.stack([x[2] for x in inits]).to(device=device, dtype=dtype).requires_grad_(True)
        params += [W_Q, W_K]

    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if cfg.warmup and step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        if cfg.lr_schedule == "constant":
            return cfg.lr
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    data_gen = torch.Generator(device=device).manual_seed(_data_seed(seeds))
    T = template_matrix(cfg, dtype=dtype, device=device)
    M = rotary_matrices(rotary_spec_of(cfg), H, dtype=dtype, device=device) if (cfg.head and cfg.rotary) else None
    log_every = cfg.log_every or max(1, cfg.steps // 50)

    keys = ("loss_recon", "loss_attn", "cos_q", "cos_k", "sigma", "interference")
    hist: list[dict[str, list]] = [{k: [] for k in keys} for _ in seeds]
    steps_logged: list[int] = []
    acc_r = torch.zeros(S, dtype=torch.float64)
    acc_a = torch.zeros(S, dtype=torch.float64)
    n_acc = 0

    def log(step: int) -> None:
        nonlocal acc_r, acc_a, n_acc
        steps_logged.append(step)
        for s in range(S):
            hist[s]["loss_recon"].append(float(acc_r[s]) / max(n_acc, 1))
            hist[s]["loss_attn"].append(float(acc_a[s]) / max(n_acc, 1))
            if cfg.head:
                _, al, inter = _measure(cfg, W[s], W_Q[s], W_K[s])
                hist[s]["cos_q"].append(al.cos_q)
                hist[s]["cos_k"].append(al.cos_k)
                hist[s]["sigma"].append(al.S)
                hist[s]["interference"].append(inter)
        acc_r.zero_()
        acc_a.zero_()
        n_acc = 0

    desc = ("toy head" if cfg.head else "toy autoencoder") + (f" x{S} seeds" if S > 1 else "")
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, mininterval=0.5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        batch = sample_batch(cfg, S * B, data_gen, T=T, device=device, dtype=dtype)
        f_all = torch.cat([batch.f_query[:, None, :], batch.f_keys], dim=1).view(S, B, 1 + cfg.n_keys, N)
        r_all = torch.einsum("sbtn,sdn->sbtd", f_all, W)                                 # (S, B, 1+m, D)
        # the bias added in place to the product (not used again; a plain tensor, not a view, so autograd's
        # backward of the add stays a pass-through): the same numbers as `... + b`, one batch-sized tensor fewer
        z = torch.bmm(r_all.view(S, -1, D), W).add_(b[:, None, :]).view(S, B, 1 + cfg.n_keys, N)
        loss_r = _recon_loss(z, f_all)                        # ((relu(z) - f) ** 2) summed over N, mean: (S,)
        if cfg.head:
            # split, not two slices: the backward is one concatenation instead of two zero-filled
            # copies of r_all added up (the same numbers: the two parts are disjoint)
            r_q, r_k = r_all.split([1, cfg.n_keys], dim=2)
            q = torch.einsum("sbd,shd->sbh", r_q.squeeze(2), W_Q)                         # (S, B, H)
            k = torch.einsum("sbmd,shd->sbmh", r_k, W_K)                                  # (S, B, m, H)
            loss_a = _attn_loss(_scores(q, k, M), batch.target.view(S, B, cfg.n_keys), cfg.attn_loss)
            loss = (loss_r + cfg.lam * loss_a).sum()
        else:
            loss_a = torch.zeros_like(loss_r)
            loss = loss_r.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_d, la_d = loss_r.detach().double().cpu(), loss_a.detach().double().cpu()
        if not bool(torch.isfinite(lr_d).all() and torch.isfinite(la_d).all()):
            raise SVToolsError(f"training diverged at step {step} (non-finite loss); lower cfg.lr")
        acc_r += lr_d
        acc_a += la_d
        n_acc += 1
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            log(step + 1)
            if progress:
                bar.set_postfix(recon=f"{hist[0]['loss_recon'][-1]:.3g}",
                                attn=f"{hist[0]['loss_attn'][-1]:.3g}", refresh=False)
    bar.close()

    P = len(cfg.template) if cfg.head else 0
    runs = []
    for s, sd in enumerate(seeds):
        h = hist[s]

        def stack(key: str, width: int) -> Tensor:
            return torch.stack(h[key]).float() if h[key] else torch.zeros(len(steps_logged), width)

        history = ToyHistory(
            step=torch.tensor(steps_logged), loss_recon=torch.tensor(h["loss_recon"]),
            loss_attn=torch.tensor(h["loss_attn"]), cos_q=stack("cos_q", P), cos_k=stack("cos_k", P),
            sigma=stack("sigma", 0), interference=stack("interference", 0))
        cfg_s = cfg.replace(seed=sd)
        Wc, bc = W[s].detach().cpu(), b[s].detach().cpu()
        if not cfg.head:
            runs.append(ToyRun(cfg_s, Wc, bc, None, None, None, None, history))
            continue
        Qc, Kc = W_Q[s].detach().cpu(), W_K[s].detach().cpu()
        qk = qk_svd(Qc.T, Kc.T)
        qk_rot = qk_svd(Qc.T, Kc.T, rotary=rotary_spec_of(cfg)) if cfg.rotary else None
        runs.append(ToyRun(cfg_s, Wc, bc, Qc, Kc, Qc.T @ Kc, qk, history, qk_rot))
    return runs


def sweep(cfg: ToyConfig, grid: dict[str, Sequence], seeds: Sequence[int], *,
          adapt=None, progress: bool = True):
    """Train ``cfg`` with one field changed at a time and summarise every run.

    Args:
        cfg: the base configuration.
        grid: ``field -> values``; each value is trained for every seed (one batched
            :func:`train_seeds` call per value).
        seeds: seeds (the issue asks for at least 5).
        adapt: optional ``f(cfg, field, value) -> cfg`` applied after the change (e.g. to
            rebuild the template when ``n_features`` changes).

    Returns:
        pandas DataFrame with columns ``param, value, seed`` and those of :func:`summarize`.

    A configuration that several grid entries produce (typically the base one: ``lam=1`` in the
    ``lam`` row equals ``n_keys=8`` in the ``n_keys`` row when both are the base's values) is
    trained once and its summaries repeated: training is deterministic in the configuration and
    seed, so the rows are the ones separate runs give (checked in the tests).
    """
    import pandas as pd
    rows = []
    todo = [(k, v) for k, vals in grid.items() for v in vals]
    for name, _ in todo:
        if not hasattr(cfg, name):
            raise SVToolsError(f"ToyConfig has no field {name!r}")
    done: list[tuple[ToyConfig, list[dict]]] = []  # (config, summaries per seed); configs are unhashable
    for name, value in tqdm(todo, desc="sweep", disable=not progress):
        c = cfg.replace(**{name: value})
        if adapt is not None:
            c = adapt(c, name, value)
        summaries = next((s for d, s in done if d == c), None)
        if summaries is None:
            summaries = [{"seed": run.cfg.seed, **summarize(run)} for run in train_seeds(c, seeds, progress=False)]
            done.append((c, summaries))
        rows.extend({"param": name, "value": value, **s} for s in summaries)
    return pd.DataFrame(rows)
