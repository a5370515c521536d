"""The toy model's objects: its configuration and template, its data, and a trained run.

:class:`ToyConfig` (every knob; the template of attended feature pairs, :func:`linear_template`,
:func:`template_matrix`), :func:`sample_batch` (the data distribution: sparse activations with
planted template pairs), :class:`ToyRun` and :class:`ToyHistory` (what training returns). The
set-up and its conventions are described in :mod:`svtools.toy`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from svtools._checks import SVToolsError, as_float, as_int
from svtools.alignment import PairAlignment, match_pairs
from svtools.qk import QKSVD, RotarySpec

__all__ = ["ToyConfig", "ToyRun", "ToyHistory", "ToyBatch", "sample_batch", "template_matrix", "linear_template",
           "rotary_spec_of"]

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
    r"""Every knob of the toy model (defaults: the single-pair experiment at fast scale).

    Attributes:
        n_features: ``N``, number of features.
        d_model: ``D``, residual dimension.
        d_head: ``H``, head dimension (rank bound of :math:`\Omega`).
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
        init_scale: std of the head's initial weights is ``init_scale`` :math:`/\sqrt{D}`.
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


def _activate_(u: Tensor, p: float) -> Tensor:
    r"""Sparse activations from uniform draws, in place: ``u / p`` where ``u < p``, else 0 (``0 < p <= 1``).

    The same numbers as ``torch.where(u < p, u / p, 0)``, bit for bit (zeros included), in three in-place
    passes and no mask: division is correctly rounded, so ``u < p`` exactly when ``u / p < 1``; ``threshold``
    keeps ``-u / p`` where it is ``> -1`` and writes ``-0.0`` elsewhere, and negating back gives ``u / p``
    or ``+0.0`` (``tests/test_toy.py`` checks every value ``torch.rand`` can draw in float32).
    """
    return torch.threshold_(u.div_(p).neg_(), -1.0, -0.0).neg_()


def sample_batch(cfg: ToyConfig, batch: int, generator: torch.Generator, *,
                 T: Optional[Tensor] = None, device=None, dtype=torch.float32) -> ToyBatch:
    r"""Draw ``batch`` examples of the toy's data distribution (see module doc).

    ``target`` :math:`= \beta\, f_\text{query}^\top T f_{\text{key},j}` for each key :math:`j`
    (:math:`\beta` = ``target_scale``). ``generator`` must live on
    ``device``; the draw is deterministic given its state.
    """
    device = torch.device(device) if device is not None else generator.device
    N, m = cfg.n_features, cfg.n_keys
    T = template_matrix(cfg, dtype=dtype, device=device) if T is None else T

    p = float(cfg.p_active)

    def acts(shape):
        u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
        return u.zero_() if p <= 0 else _activate_(u, p)

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
    r"""A trained toy model.

    Attributes:
        cfg: the :class:`ToyConfig` that produced it.
        features: ``W``, ``(D, N)``, features as columns.
        bias: ``b``, ``(N,)``.
        W_Q, W_K: ``(H, D)`` head weights (``None`` for a run without head).
        omega: :math:`\Omega = W_Q^\top W_K`, ``(D, D)`` (the :math:`\Delta = 0` core for a rotary
            head).
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
        r"""Rotary runs: alignment of the template with the decomposition at every trained offset.

        Returns ``(offsets, cos_q (n_offsets, P), cos_k (n_offsets, P), sigma_ratio (n_offsets,))``
        with ``sigma_ratio`` :math:`= \sigma_{P+1} / \sigma_1` at each offset."""
        qk = self._rot()
        offs = [int(o) for o in qk.rotary.offsets.tolist()]
        P = len(self.cfg.template)
        als = [match_pairs(self.features, qk.at_offset(o), self.cfg.template) for o in offs]
        S = qk.S
        ratio = S[..., P] / S[..., 0] if P < S.shape[-1] else torch.full((len(offs),), float("nan"))
        return offs, torch.stack([a.cos_q for a in als]), torch.stack([a.cos_k for a in als]), ratio

    def rotary_spec(self) -> RotarySpec:
        """The positional rotation used in training (offsets ``1..m``)."""
        return rotary_spec_of(self.cfg)


def rotary_spec_of(cfg: ToyConfig) -> RotarySpec:
    """The positional rotation a rotary toy trains with: offsets ``1..m``, base ``cfg.rotary_base``."""
    return RotarySpec.from_base(cfg.d_head, range(1, cfg.n_keys + 1), base=cfg.rotary_base)
