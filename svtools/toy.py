"""The paper's toy model: a tied autoencoder with observable features plus one attention head.

Set-up (Part 1 of the book; conventions of the toy):

* ``N`` feature directions ``w_i`` in ``R^D`` are the columns of ``W`` (``D x N``). A token with
  activations ``f`` (``N``) is ``r = W f``.
* A tied autoencoder reads the features back: ``f' = ReLU(W^T r + b)``,
  ``L_recon = mean_tokens |f - f'|^2``.
* One attention head with ``W_Q, W_K`` of shape ``(H, D)`` (``H = d_head``; note: the *toy* stores
  them as ``(d_head, d_model)``, the transpose of TransformerLens' layout) scores a query token
  ``r`` against ``m`` key tokens ``s_1..s_m``: ``l_j = (W_Q r) . (W_K s_j) = r^T Omega s_j`` with
  ``Omega = W_Q^T W_K`` (``D x D``). No ``1/sqrt(H)`` scale is applied.
* A template ``T`` (``N x N``, from a list of ``(query feature, key feature, strength)``) defines
  the target logit ``l*_j = beta * f(r)^T T f(s_j)`` (``beta`` = :attr:`ToyConfig.target_scale`,
  the target's sharpness). ``L_attn`` is either the KL divergence (= cross-entropy minus the
  target's entropy) from ``softmax(l*)`` to ``softmax(l)`` (``attn_loss="ce"``) or the squared error
  ``mean_j (l_j - l*_j)^2`` (``attn_loss="mse"``).
* ``L = L_recon + lambda * L_attn``; ``W, b, W_Q, W_K`` are trained jointly with Adam.

Data: each feature is active with probability ``p_active`` (the paper's ``1 - S``), with value
Uniform[0, 1]. With probability ``p_plant`` an example has one template pair planted: a pair is
drawn (uniformly, or by strength), its query feature is switched on in the query token and its key
feature in one random key token. Planting makes the attention signal frequent; without it a pair
co-occurs with probability ``~ p_active^2 * m`` per example.

Rotary option: the query sits at position ``m``, the keys at positions ``0..m-1``; the score is
``l_j = (W_Q r)^T M_(m-j) (W_K s_j)`` with ``M_delta`` from :func:`svtools.qk.rotary_matrices`
(all ``H`` dims rotate, GPT-NeoX layout). ``ToyRun.qk`` is then the Delta = 0 core ``Omega``;
``ToyRun.qk_rotary`` has one decomposition per offset ``1..m``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal, Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from svtools._checks import SVToolsError, as_float, as_int
from svtools.alignment import PairAlignment, match_pairs
from svtools.geometry import max_interference
from svtools.qk import QKSVD, RotarySpec, qk_svd, rotary_matrices
from svtools.runtime import default_device, tqdm

__all__ = ["ToyConfig", "ToyRun", "ToyHistory", "ToyBatch", "train", "train_seeds", "sample_batch",
           "settle_step", "settle_steps", "summarize", "sweep",
           "template_matrix", "linear_template", "failing_pairs"]

Pair = tuple[int, int, float]


def linear_template(n_pairs: int, offset: int, *, lo: Optional[float] = None) -> list[Pair]:
    """Pairs ``(i, i + offset, s_i)`` for ``i < n_pairs`` with strengths decaying linearly from 1
    to ``lo`` (default ``1 / n_pairs``): ``s_i = 1 - i (1 - lo) / (n_pairs - 1)``."""
    if n_pairs < 1:
        raise SVToolsError(f"n_pairs must be >= 1, got {n_pairs}")
    lo = 1.0 / n_pairs if lo is None else float(lo)
    if n_pairs == 1:
        return [(0, offset, 1.0)]
    return [(i, i + offset, 1.0 - i * (1.0 - lo) / (n_pairs - 1)) for i in range(n_pairs)]


@dataclass
class ToyConfig:
    """Every knob of the toy model (defaults: the single-pair experiment at fast scale).

    Attributes:
        n_features: ``N``, number of features.
        d_model: ``D``, residual dimension.
        d_head: ``H``, head dimension (rank bound of ``Omega``).
        n_keys: ``m``, key tokens per query.
        p_active: probability that a feature is active (the paper's ``1 - S``).
        p_plant: probability that an example gets one template pair planted (see module doc).
        plant_by_strength: draw the planted pair with probability proportional to strength.
        template: list of ``(query feature i, key feature j, strength T_ij)``.
        lam: ``lambda``, weight of ``L_attn``.
        attn_loss: ``"ce"`` (KL from softmax of the target logits) or ``"mse"`` (on logits).
        target_scale: ``beta``, multiplies the target logits (sharpness of ``softmax(l*)``).
        head: ``False`` trains the autoencoder alone (no attention head, ``L = L_recon``).
        rotary: rotate queries and keys by position (see module doc).
        rotary_base: RoPE base for the frequencies ``base^(-2p/H)``.
        steps, batch, lr: training length, examples per step, Adam learning rate.
        optimizer: ``"adam"`` or ``"adamw"``; ``betas``, ``weight_decay``.
        lr_schedule: ``"constant"`` or ``"cosine"`` (decay to ``lr / 10``), after ``warmup`` steps.
        init_scale: std of the head's initial weights is ``init_scale / sqrt(D)``.
        log_every: steps between history entries (``0``: about 50 entries).
        seed: seeds initialisation and data.
        device: ``None`` picks cuda when available; ``dtype``: ``"float32"`` or ``"float64"``.
    """

    n_features: int = 20
    d_model: int = 10
    d_head: int = 10
    n_keys: int = 8
    p_active: float = 0.1
    p_plant: float = 0.5
    plant_by_strength: bool = False
    template: list = field(default_factory=lambda: [(0, 1, 1.0)])
    lam: float = 1.0
    attn_loss: Literal["ce", "mse"] = "ce"
    target_scale: float = 10.0
    head: bool = True
    rotary: bool = False
    rotary_base: float = 10000.0
    steps: int = 3000
    batch: int = 512
    lr: float = 3e-3
    optimizer: Literal["adam", "adamw"] = "adam"
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup: int = 0
    init_scale: float = 1.0
    log_every: int = 0
    seed: int = 0
    device: Optional[str] = None
    dtype: Literal["float32", "float64"] = "float32"

    @classmethod
    def single_pair(cls, **overrides) -> "ToyConfig":
        """The paper's single pair: ``N=20, D=10, H=10``, ``T_01 = 1``."""
        base = dict(n_features=20, d_model=10, d_head=10, template=[(0, 1, 1.0)])
        base.update(overrides)
        return cls(**base)

    @classmethod
    def many_pairs(cls, **overrides) -> "ToyConfig":
        """The paper's many pairs: ``N=100, D=H=50``, 20 pairs ``(i, i+20)``, strengths decaying
        linearly from 1 to 1/20. The rest are our choices (the paper's are not known to us), from
        the search in Part 1, chapter 2: ``lam=10`` (with ``lam=1`` the reconstruction loss wins and
        attended features stay in superposition), a template pair planted in every example
        (``p_plant=1``, so weak pairs get as much signal as strong ones), ``n_keys=16`` keys per
        query, target sharpness ``target_scale=15``, ``lr=1e-2`` with cosine decay, 3,000 steps."""
        base = dict(n_features=100, d_model=50, d_head=50, template=linear_template(20, 20),
                    p_active=0.05, lam=10.0, lr=1e-2, batch=256, steps=3000, n_keys=16, p_plant=1.0,
                    target_scale=15.0)
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes) -> "ToyConfig":
        """A copy with some fields changed."""
        return replace(self, **changes)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """Template pairs ``(i, j)`` without strengths."""
        return [(int(i), int(j)) for i, j, _ in self.template]

    @property
    def strengths(self) -> list[float]:
        return [float(s) for _, _, s in self.template]

    @property
    def attended(self) -> list[int]:
        """Features named by the template (query and key sides), in order of first appearance."""
        out: list[int] = []
        for i, j in self.pairs:
            for f in (i, j):
                if f not in out:
                    out.append(f)
        return out

    def validate(self) -> None:
        """Raise :class:`SVToolsError` naming the first bad setting."""
        for name in ("n_features", "d_model", "d_head", "n_keys", "steps", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SVToolsError(f"ToyConfig.{name} must be a positive integer, got {v!r}")
        as_int(self.seed, "ToyConfig.seed", min_value=0, max_value=2**62)
        as_int(self.warmup, "ToyConfig.warmup", min_value=0)
        as_int(self.log_every, "ToyConfig.log_every", min_value=0)
        as_float(self.target_scale, "ToyConfig.target_scale")
        as_float(self.init_scale, "ToyConfig.init_scale", lo=0.0, lo_open=True)
        as_float(self.weight_decay, "ToyConfig.weight_decay", lo=0.0)
        if self.rotary:
            as_float(self.rotary_base, "ToyConfig.rotary_base", lo=0.0, lo_open=True)
        if len(tuple(self.betas)) != 2:
            raise SVToolsError(f"ToyConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        for k, b in enumerate(self.betas):
            as_float(b, f"ToyConfig.betas[{k}]", lo=0.0, hi=1.0, hi_open=True)
        if self.n_keys < 2 and self.attn_loss == "ce":
            raise SVToolsError("ToyConfig.n_keys must be >= 2 for attn_loss='ce' (softmax over one key is constant)")
        for name in ("p_active", "p_plant"):
            v = getattr(self, name)
            if not 0.0 <= float(v) <= 1.0:
                raise SVToolsError(f"ToyConfig.{name} must be a probability in [0, 1], got {v!r}")
        if self.attn_loss not in ("ce", "mse"):
            raise SVToolsError(f"ToyConfig.attn_loss must be 'ce' or 'mse', got {self.attn_loss!r}")
        if self.optimizer not in ("adam", "adamw"):
            raise SVToolsError(f"ToyConfig.optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise SVToolsError(f"ToyConfig.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.dtype not in ("float32", "float64"):
            raise SVToolsError(f"ToyConfig.dtype must be 'float32' or 'float64', got {self.dtype!r}")
        as_float(self.lr, "ToyConfig.lr", lo=0.0, lo_open=True)
        as_float(self.lam, "ToyConfig.lam", lo=0.0)
        if self.rotary and self.d_head % 2:
            raise SVToolsError(f"ToyConfig.rotary needs an even d_head, got {self.d_head}")
        if self.head and not self.template:
            raise SVToolsError("ToyConfig.template is empty; give at least one (i, j, strength) or set head=False")
        for t in self.template:
            if len(t) != 3:
                raise SVToolsError(f"template entries must be (query feature, key feature, strength), got {t!r}")
            i, j, s = t
            i, j = as_int(i, f"template query feature in {t!r}"), as_int(j, f"template key feature in {t!r}")
            if not (0 <= i < self.n_features and 0 <= j < self.n_features):
                raise SVToolsError(f"template pair {(i, j)} out of range for n_features={self.n_features}")
            as_float(s, f"template strength for {(i, j)}")


def template_matrix(cfg: ToyConfig, *, dtype=torch.float32, device=None) -> Float[Tensor, "N N"]:
    """Dense ``T`` (``N x N``) with ``T[i, j] = strength`` (repeated pairs add up)."""
    T = torch.zeros(cfg.n_features, cfg.n_features, dtype=dtype, device=device)
    for i, j, s in cfg.template:
        T[int(i), int(j)] += float(s)
    return T


@dataclass
class ToyBatch:
    """One batch of examples: activations of the query token and of the ``m`` key tokens.

    Shapes: ``f_query (B, N)``, ``f_keys (B, m, N)``; target logits ``(B, m)``.
    """

    f_query: Float[Tensor, "B N"]
    f_keys: Float[Tensor, "B m N"]
    target: Float[Tensor, "B m"]


def sample_batch(cfg: ToyConfig, batch: int, generator: torch.Generator, *,
                 T: Optional[Tensor] = None, device=None, dtype=torch.float32) -> ToyBatch:
    """Draw ``batch`` examples of the toy's data distribution (see module doc).

    ``target = target_scale * f_query^T T f_key_j`` for each key ``j``. ``generator`` must live on
    ``device``; the draw is deterministic given its state.
    """
    device = torch.device(device) if device is not None else generator.device
    N, m = cfg.n_features, cfg.n_keys
    T = template_matrix(cfg, dtype=dtype, device=device) if T is None else T

    p = float(cfg.p_active)

    def acts(shape):
        # one uniform draw u: active iff u < p, and then u / p is Uniform[0, 1]
        u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
        return torch.where(u < p, u / p, torch.zeros((), dtype=dtype, device=device)) if p > 0 \
            else torch.zeros_like(u)

    fq, fk = acts((batch, N)), acts((batch, m, N))
    if cfg.head and cfg.p_plant > 0 and cfg.template:
        pairs = torch.tensor(cfg.pairs, device=device)
        w = torch.tensor(cfg.strengths, device=device, dtype=torch.float64).abs() if cfg.plant_by_strength \
            else torch.ones(len(pairs), device=device, dtype=torch.float64)
        if float(w.sum()) <= 0:
            w = torch.ones_like(w)
        which = torch.multinomial(w, batch, replacement=True, generator=generator)   # (B,)
        plant = torch.rand(batch, generator=generator, device=device) < cfg.p_plant
        key = torch.randint(0, m, (batch,), generator=generator, device=device)
        vq = torch.rand(batch, generator=generator, device=device, dtype=dtype)
        vk = torch.rand(batch, generator=generator, device=device, dtype=dtype)
        b = torch.arange(batch, device=device)[plant]
        qi, kj = pairs[which[plant], 0], pairs[which[plant], 1]
        fq[b, qi] = vq[plant]
        fk[b, key[plant], kj] = vk[plant]
    target = cfg.target_scale * torch.einsum("bn,nk,bmk->bm", fq, T, fk)
    return ToyBatch(fq, fk, target)


@dataclass
class ToyHistory:
    """Training curves at logged steps (``L`` entries, ``P`` template pairs, ``r`` singular values).

    ``loss_recon``/``loss_attn`` are averages over the steps since the previous entry; the
    alignment columns are measured on the weights at ``step`` with :func:`~svtools.alignment.match_pairs`.
    ``interference``: largest ``|cos|`` of each attended feature with any other feature
    (``(L, n_attended)``, order of :attr:`ToyConfig.attended`).
    """

    step: Tensor
    loss_recon: Tensor
    loss_attn: Tensor
    cos_q: Tensor
    cos_k: Tensor
    sigma: Tensor
    interference: Tensor

    def frame(self):
        """Scalar curves as a pandas DataFrame indexed by step (worst/median pair cosines)."""
        import pandas as pd
        d = {"loss_recon": self.loss_recon.numpy(), "loss_attn": self.loss_attn.numpy()}
        if self.cos_q.numel():
            worst = torch.minimum(self.cos_q, self.cos_k)
            d["cos_worst_min"] = worst.min(1).values.numpy()
            d["cos_worst_median"] = worst.median(1).values.numpy()
            d["interference_max"] = self.interference.max(1).values.numpy()
        return pd.DataFrame(d, index=pd.Index(self.step.numpy(), name="step"))


@dataclass
class ToyRun:
    """A trained toy model.

    Attributes:
        cfg: the :class:`ToyConfig` that produced it.
        features: ``W``, ``(D, N)``, features as columns.
        bias: ``b``, ``(N,)``.
        W_Q, W_K: ``(H, D)`` head weights (``None`` for a run without head).
        omega: ``Omega = W_Q^T W_K``, ``(D, D)`` (the Delta = 0 core for a rotary head).
        qk: ``qk_svd(W_Q^T, W_K^T)``: ``U`` (query side), ``V`` (key side), ``(D, r)``.
        qk_rotary: rotary runs only, one decomposition per offset ``1..m`` (``qk_rotary.at_offset(d)``).
        history: :class:`ToyHistory`.
    All tensors are detached, on the CPU.
    """

    cfg: ToyConfig
    features: Float[Tensor, "D N"]
    bias: Float[Tensor, "N"]
    W_Q: Optional[Float[Tensor, "H D"]]
    W_K: Optional[Float[Tensor, "H D"]]
    omega: Optional[Float[Tensor, "D D"]]
    qk: Optional[QKSVD]
    history: ToyHistory
    qk_rotary: Optional[QKSVD] = None

    def alignment(self, offset: Optional[int] = None) -> PairAlignment:
        """:func:`~svtools.alignment.match_pairs` of the template pairs (rotary: at ``offset``,
        default the Delta = 0 core)."""
        if self.qk is None:
            raise SVToolsError("this run has no attention head (cfg.head=False)")
        qk = self.qk if offset is None else self._rot().at_offset(offset)
        return match_pairs(self.features, qk, self.cfg.template)

    def _rot(self) -> QKSVD:
        if self.qk_rotary is None:
            raise SVToolsError("offsets exist only for a rotary run (cfg.rotary=True)")
        return self.qk_rotary

    def offset_alignment(self) -> tuple[list[int], Tensor, Tensor, Tensor]:
        """Rotary runs: alignment of the template with the decomposition at every trained offset.

        Returns ``(offsets, cos_q (n_offsets, P), cos_k (n_offsets, P), sigma_ratio (n_offsets,))``
        with ``sigma_ratio = sigma_(P+1) / sigma_1`` at each offset."""
        qk = self._rot()
        offs = [int(o) for o in qk.rotary.offsets.tolist()]
        P = len(self.cfg.template)
        als = [match_pairs(self.features, qk.at_offset(o), self.cfg.template) for o in offs]
        S = qk.S
        ratio = S[..., P] / S[..., 0] if P < S.shape[-1] else torch.full((len(offs),), float("nan"))
        return offs, torch.stack([a.cos_q for a in als]), torch.stack([a.cos_k for a in als]), ratio

    def rotary_spec(self) -> RotarySpec:
        """The positional rotation used in training (offsets ``1..m``)."""
        return _rotary_spec(self.cfg)


def _rotary_spec(cfg: ToyConfig) -> RotarySpec:
    return RotarySpec.from_base(cfg.d_head, range(1, cfg.n_keys + 1), base=cfg.rotary_base)


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
    """Train the toy model of :class:`ToyConfig` and return the weights with their SVD.

    Deterministic for a given ``cfg`` and device: initial weights are drawn on the CPU from
    ``cfg.seed``, data from a generator on the training device seeded with ``cfg.seed + 1``.
    Shows a tqdm progress bar unless ``progress=False``.

    Identity kept by the result: ``run.qk.U diag(run.qk.S) run.qk.V^T == run.omega == W_Q^T W_K``.
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
    M = rotary_matrices(_rotary_spec(cfg), H, dtype=dtype, device=device) if (cfg.head and cfg.rotary) else None
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
        recon = torch.relu(torch.einsum("sbtd,sdn->sbtn", r_all, W) + b[:, None, None, :])
        loss_r = ((recon - f_all) ** 2).sum(-1).mean(dim=(1, 2))                          # (S,)
        if cfg.head:
            q = torch.einsum("sbd,shd->sbh", r_all[:, :, 0], W_Q)                        # (S, B, H)
            k = torch.einsum("sbmd,shd->sbmh", r_all[:, :, 1:], W_K)                     # (S, B, m, H)
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
        qk_rot = qk_svd(Qc.T, Kc.T, rotary=_rotary_spec(cfg)) if cfg.rotary else None
        runs.append(ToyRun(cfg_s, Wc, bc, Qc, Kc, Qc.T @ Kc, qk, history, qk_rot))
    return runs


def settle_step(steps: Tensor, values: Tensor, *, frac: float = 0.1) -> int:
    """First logged step after which a curve stays within ``frac`` of its total change from its
    final value: the smallest ``steps[t]`` with ``|values[t'] - values[-1]| <= frac * range``
    for every ``t' >= t`` (``range = max - min`` of the curve). Threshold-free, so curves in
    different units compare."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    st = torch.as_tensor(steps).flatten()
    if v.numel() == 0 or v.numel() != st.numel():
        raise SVToolsError(f"steps and values must be non-empty and equally long, got {st.numel()} and {v.numel()}")
    if not 0 < frac < 1:
        raise SVToolsError(f"frac must be in (0, 1), got {frac}")
    span = float(v.max() - v.min())
    far = (v - v[-1]).abs() > frac * span
    if not bool(far.any()):
        return int(st[0])
    last_far = int(torch.nonzero(far).max())
    return int(st[min(last_far + 1, len(st) - 1)])


def settle_steps(history: ToyHistory, *, frac: float = 0.1) -> dict[str, int]:
    """:func:`settle_step` of the alignment (min over pairs of the worst cosine), the interference
    (max over attended features) and both losses (losses on a log scale)."""
    worst = torch.minimum(history.cos_q, history.cos_k).min(1).values
    return {
        "alignment": settle_step(history.step, worst, frac=frac),
        "interference": settle_step(history.step, history.interference.max(1).values, frac=frac),
        "loss_attn": settle_step(history.step, history.loss_attn.clamp_min(1e-12).log(), frac=frac),
        "loss_recon": settle_step(history.step, history.loss_recon.clamp_min(1e-12).log(), frac=frac),
    }


def summarize(run: ToyRun, threshold: float = 0.9) -> dict[str, float]:
    """Scalar outcome of a run: worst and median pair cosine (``min(|cos q|, |cos k|)``), number of
    pairs aligned at ``threshold``, ``sigma_(P+1) / sigma_1`` (``P`` = number of pairs; the
    single pair's ``sigma_2 / sigma_1``), Spearman correlation of assigned sigma with strength
    (NaN for fewer than 3 pairs), the final losses and the attended features' largest interference."""
    from scipy.stats import spearmanr
    al = run.alignment()
    P = len(run.cfg.template)
    S = run.qk.S
    worst = al.worst.nan_to_num(0.0)
    good = torch.isfinite(al.sigma)
    rho = float(spearmanr(al.sigma[good].numpy(), torch.tensor(run.cfg.strengths)[good].numpy()).statistic) \
        if int(good.sum()) >= 3 and len(set(run.cfg.strengths)) > 1 else float("nan")
    return {
        "cos_min": float(worst.min()), "cos_median": float(worst.median()),
        "n_aligned": al.n_aligned(threshold), "n_pairs": P,
        "sigma_ratio": float(S[P] / S[0]) if P < len(S) and float(S[0]) > 0 else float("nan"),
        "spearman": rho, "loss_recon": float(run.history.loss_recon[-1]),
        "loss_attn": float(run.history.loss_attn[-1]),
        "interference": float(max_interference(run.features, run.cfg.attended).max()),
    }


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
    """
    import pandas as pd
    rows = []
    todo = [(k, v) for k, vals in grid.items() for v in vals]
    for name, value in tqdm(todo, desc="sweep", disable=not progress):
        if not hasattr(cfg, name):
            raise SVToolsError(f"ToyConfig has no field {name!r}")
        c = cfg.replace(**{name: value})
        if adapt is not None:
            c = adapt(c, name, value)
        for run in train_seeds(c, seeds, progress=False):
            rows.append({"param": name, "value": value, "seed": run.cfg.seed, **summarize(run)})
    return pd.DataFrame(rows)


def failing_pairs(run: ToyRun, threshold: float = 0.9):
    """Why the unaligned template pairs of a run fail, read off the run itself.

    For every pair ``p = (i, j)`` whose smaller cosine at its assigned index is below
    ``threshold``: its strength, that cosine, the singular index ``best`` it would take on its own
    (sharing allowed), the other template pair ``q = (i', j')`` the assignment gave that index to
    (if any), and the cosines ``cos(w_i, w_i')``, ``cos(w_j, w_j')`` between the two pairs'
    features (near ``-1``: the antipodal sharing the chapter describes), plus ``w_i``'s
    largest ``|cos|`` with any other feature and which feature that is.

    Returns:
        pandas DataFrame, one row per failing pair (empty if every pair is aligned).
    """
    import pandas as pd

    al = run.alignment()
    W = run.features.double()
    Wn = W / W.norm(dim=0, keepdim=True).clamp_min(1e-12)
    C = Wn.T @ Wn
    C.fill_diagonal_(0.0)
    owner = {int(k): p for p, k in enumerate(al.index.tolist()) if k >= 0}
    worst = al.worst.nan_to_num(0.0)
    rows = []
    for p, (i, j) in enumerate(run.cfg.pairs):
        if float(worst[p]) >= threshold:
            continue
        k = int(al.best[p])
        q = owner.get(k)
        q = None if q == p else q
        i2, j2 = run.cfg.pairs[q] if q is not None else (None, None)
        partner = int(C[i].abs().argmax())
        rows.append({"pair": p, "features (i, j)": (i, j), "strength": run.cfg.strengths[p],
                     "min |cos|": float(worst[p]), "assigned k": int(al.index[p]), "best k": k,
                     "k owned by pair": q,
                     "cos(w_i, w_i')": float(C[i, i2]) if q is not None else float("nan"),
                     "cos(w_j, w_j')": float(C[j, j2]) if q is not None else float("nan"),
                     "w_i's closest feature": partner, "cos with it": float(C[i, partner])})
    return pd.DataFrame(rows)
