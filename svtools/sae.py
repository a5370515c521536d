r"""A small sparse autoencoder (SAE): dictionary directions as proxy features of a real model.

Part 2 asks where *real* feature frames sit on the alignment-vs-interference sweep of Theorem 2.
Real features are unknown; the usual proxy is the dictionary of a sparse autoencoder trained on
the model's activations (Bricken et al. 2023, Cunningham et al. 2023). This module trains one,
small enough for a CPU.

Model (one hidden layer, untied, ReLU), on activations :math:`x \in \mathbb{R}^d`:

* inputs are divided by one scalar :math:`c` (``scale``, so that the training activations have
  :math:`\mathbb{E}\,\|x / c - \bar x\|^2 = 1`) and centred by a learned decoder bias
  :math:`b_\text{dec}`;
* :math:`z = \mathrm{ReLU}(W_\text{enc} (x / c - b_\text{dec}) + b_\text{enc})` (``n_features``
  codes, non-negative);
* :math:`\hat x = c\,(W_\text{dec} z + b_\text{dec})` with unit-norm decoder columns;
* the loss is the batch mean of :math:`\|x / c - W_\text{dec} z - b_\text{dec}\|^2 +
  \lambda_1 \sum_k z_k` (:math:`\lambda_1` = ``l1``).

Because inputs are normalised to unit mean energy, ``l1`` is scale-free: the penalty of coding
a component of relative size ``a`` is ``l1 * a``, against a reconstruction gain ``a^2``, so codes
below about ``l1 / 2`` of the token's norm are switched off.

Training: Adam; the decoder columns start at normalised random (centred) training examples and are
renormalised to unit length after every step (the part of the gradient parallel to a column is
removed first, the usual constraint); the encoder starts as the decoder's transpose. A fraction
``held_out`` of the rows is kept aside and never trained on; the returned :class:`SAE` reports
its reconstruction (fraction of variance unexplained) and sparsity (mean active codes) there.
Deterministic given ``seed`` on a given device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor

from svtools._checks import (SVToolsError, as_bool, as_dtype, as_float, as_int, as_seed, as_tensor,
                             check_finite, check_memory)
from svtools.runtime import default_device, tqdm

__all__ = ["SAE", "train"]


@dataclass
class SAE:
    """A trained sparse autoencoder (see the module doc for the model).

    Attributes:
        W_enc: ``(n_features, d)`` encoder.
        b_enc: ``(n_features,)`` encoder bias.
        W_dec: ``(d, n_features)`` decoder; its columns, the dictionary directions, have unit norm.
        b_dec: ``(d,)`` decoder bias (in normalised units).
        scale: the scalar inputs are divided by.
        held_out: metrics on the held-out rows (``fvu``: fraction of variance unexplained,
            ``l0``: mean number of active codes per row, ``dead``: fraction of codes never active,
            ``n``: number of held-out rows); empty if nothing was held out.
        history: per logged step, ``step``, ``loss``, ``mse`` and ``l0`` on the training batches.
    """

    W_enc: Float[Tensor, "n_features d"]
    b_enc: Float[Tensor, "n_features"]
    W_dec: Float[Tensor, "d n_features"]
    b_dec: Float[Tensor, "d"]
    scale: float
    held_out: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)

    @property
    def d(self) -> int:
        return int(self.W_dec.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.W_dec.shape[1])

    def _check(self, x: Tensor, name: str) -> Tensor:
        x = as_tensor(x, name)
        if x.ndim < 1 or x.shape[-1] != self.d:
            raise SVToolsError(f"{name} must have shape (..., d) with d = {self.d}, got {tuple(x.shape)}")
        return x.to(self.W_dec.dtype)

    def encode(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... n_features"]:
        """Codes ``z = ReLU(W_enc (x / scale - b_dec) + b_enc)`` (non-negative)."""
        x = self._check(x, "x")
        return torch.relu((x / self.scale - self.b_dec) @ self.W_enc.T + self.b_enc)

    def decode(self, z: Float[Tensor, "... n_features"]) -> Float[Tensor, "... d"]:
        """Reconstruction ``scale * (W_dec z + b_dec)``, in the units of the input activations."""
        z = as_tensor(z, "z")
        if z.ndim < 1 or z.shape[-1] != self.n_features:
            raise SVToolsError(f"z must have shape (..., n_features) with n_features = {self.n_features}, "
                               f"got {tuple(z.shape)}")
        return self.scale * (z.to(self.W_dec.dtype) @ self.W_dec.T + self.b_dec)

    def reconstruct(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        """``decode(encode(x))``."""
        return self.decode(self.encode(x))

    def evaluate(self, x: Float[Tensor, "n d"]) -> dict[str, float]:
        r"""Reconstruction and sparsity on rows ``x``: ``fvu`` :math:`= \sum \|x - \hat x\|^2 / \sum \|x - \bar x\|^2`
        (fraction of variance unexplained; 0 is perfect), ``l0`` (mean active codes per row),
        ``dead`` (fraction of codes active on no row), ``n`` (rows)."""
        x = self._check(x, "x")
        if x.ndim != 2 or x.shape[0] < 2:
            raise SVToolsError(f"x must have shape (n >= 2, d), got {tuple(x.shape)}")
        with torch.no_grad():
            z = self.encode(x)
            # sums of squares in float64: activations of ~1e20 would overflow float32 (inf / inf)
            x64 = x.double()
            err = ((x64 - self.decode(z).double()) ** 2).sum()
            var = ((x64 - x64.mean(0)) ** 2).sum()
        return {"fvu": float(err / var), "l0": float((z > 0).sum(-1).double().mean()),
                "dead": float(((z > 0).sum(0) == 0).double().mean()), "n": int(x.shape[0])}


def train(activations: Float[Tensor, "n d"], n_features: int, *, l1: float = 0.2, steps: int = 2000,
          batch: int = 256, lr: float = 3e-3, held_out: float = 0.1, seed: int = 0,
          device: Optional[str] = None, dtype: torch.dtype = torch.float32, log_every: int = 0,
          progress: bool = True) -> SAE:
    """Train a sparse autoencoder with ``n_features`` codes on ``activations``.

    Args:
        activations: ``(n, d)`` rows (e.g. residual-stream vectors from
            :func:`svtools.activations.residual_activations`).
        n_features: dictionary size (``n_features >= 1``; typically a few times ``d``).
        l1: sparsity weight, scale-free (inputs are normalised to unit mean energy; see module
            doc). Larger: sparser codes, worse reconstruction.
        steps, batch, lr: Adam steps, rows per step, learning rate (cosine decay to ``lr / 10``).
        held_out: fraction of rows kept aside for :attr:`SAE.held_out` (0 keeps none).
        seed: seeds the split, the initialisation and the batches.
        device: ``None`` picks cuda when available; ``dtype``: float32 default, float64 available.
        log_every: steps between history entries (``0``: about 50 entries).
        progress: show a progress bar.

    On the CPU training runs on one intra-op thread (restored afterwards).

    Returns:
        :class:`SAE` on the CPU. Identity: ``sae.reconstruct(x) == sae.decode(sae.encode(x))`` and
        ``sae.W_dec.norm(dim=0) == 1``.
    """
    x = as_tensor(activations, "activations").detach()  # an activation that requires grad is data here
    if x.ndim != 2:
        raise SVToolsError(f"activations must have shape (n, d), got {tuple(x.shape)}")
    check_finite(x, "activations")
    n_features = as_int(n_features, "n_features", min_value=1)
    l1 = as_float(l1, "l1", lo=0.0)
    steps = as_int(steps, "steps", min_value=1)
    batch = as_int(batch, "batch", min_value=1)
    lr = as_float(lr, "lr", lo=0.0, lo_open=True)
    held_out = as_float(held_out, "held_out", lo=0.0, hi=1.0, hi_open=True)
    seed = as_seed(seed, "seed")
    log_every = as_int(log_every, "log_every", min_value=0)
    progress = as_bool(progress, "progress")
    dtype = as_dtype(dtype, "dtype")
    if dtype not in (torch.float32, torch.float64):
        raise SVToolsError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    n = x.shape[0]
    n_test = int(round(held_out * n))
    if n - n_test < 2:
        raise SVToolsError(f"need at least 2 training rows, got {n} rows with held_out={held_out}")
    dev = default_device(device)
    d, item = x.shape[1], torch.finfo(dtype).bits // 8
    # parameters, their gradients and Adam's two moments (8 copies of the two matrices), and the
    # codes of a batch (forward and backward)
    check_memory((8 * 2 * n_features * d + 4 * batch * n_features) * item, "n_features", device=dev,
                 what=f"a dictionary of {n_features} codes in dimension {d}")
    if dev.type != "cpu":
        return _train(x, n_features, l1, steps, batch, lr, n_test, seed, dev, dtype, log_every, progress)
    # Small matrices: intra-op threads mostly add synchronisation, which costs 10-50x on a busy
    # machine. Train on one thread, restore the caller's setting afterwards.
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(x, n_features, l1, steps, batch, lr, n_test, seed, dev, dtype, log_every, progress)
    finally:
        torch.set_num_threads(n_threads)


def _train(x, n_features, l1, steps, batch, lr, n_test, seed, dev, dtype, log_every, progress) -> SAE:
    n, d = x.shape
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    x = x.to(dtype)
    x_test, x_train = x[perm[:n_test]], x[perm[n_test:]]
    mean = x_train.mean(0)
    scale = float(((x_train - mean) ** 2).sum(-1).mean().sqrt())
    if not (0.0 < scale < math.inf):
        # the energy over- or underflowed in the training dtype (activations beyond ~1e19 or
        # below ~1e-19 in float32): measure it in float64, where such values are harmless
        x64 = x_train.double()
        scale = float(((x64 - x64.mean(0)) ** 2).sum(-1).mean().sqrt())
        if not scale > 0:
            raise SVToolsError("activations are constant: nothing to encode")
        if not math.isfinite(scale):
            raise SVToolsError("activations are too large to normalise even in float64 (energy beyond 1e308)")
        mean = x64.mean(0).to(dtype)
    xt = (x_train / scale).to(dev)
    if not bool(torch.isfinite(xt).all()):
        raise SVToolsError(f"activations cannot be normalised in {dtype} (scale {scale:.3g}): pass them in "
                           "float64 or rescale them")

    # Initialisation: decoder columns = random centred training rows (unit norm), encoder = its
    # transpose, decoder bias = the mean, encoder bias 0.
    pick = torch.randint(0, xt.shape[0], (n_features,), generator=g)
    W_dec = (xt[pick.to(dev)] - mean.to(dev) / scale).T.clone()
    W_dec += 1e-3 * torch.randn(d, n_features, generator=g, dtype=dtype).to(dev)
    W_dec /= W_dec.norm(dim=0, keepdim=True).clamp_min(1e-12)
    W_enc = W_dec.T.clone()
    b_enc = torch.zeros(n_features, dtype=dtype, device=dev)
    b_dec = (mean / scale).to(dev).clone()
    params = [p.requires_grad_(True) for p in (W_enc, b_enc, W_dec, b_dec)]
    opt = torch.optim.Adam(params, lr=lr)
    log_every = log_every or max(1, steps // 50)
    hist: dict[str, list] = {"step": [], "loss": [], "mse": [], "l0": []}
    gb = torch.Generator(device=dev).manual_seed(int(seed) + 1)

    bar = tqdm(range(steps), desc="sparse autoencoder", disable=not progress, mininterval=0.5)
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        xb = xt[torch.randint(0, xt.shape[0], (batch,), generator=gb, device=dev)]
        z = torch.relu((xb - b_dec) @ W_enc.T + b_enc)
        mse = ((xb - z @ W_dec.T - b_dec) ** 2).sum(-1).mean()
        loss = mse + l1 * z.sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():      # keep ||W_dec[:, k]|| = 1: drop the gradient along each column
            W_dec.grad -= W_dec * (W_dec * W_dec.grad).sum(0, keepdim=True)
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=0, keepdim=True).clamp_min(1e-12)
        if not math.isfinite(loss.item()):
            raise SVToolsError(f"sparse autoencoder diverged at step {step}; lower lr")
        if (step + 1) % log_every == 0 or step + 1 == steps:
            hist["step"].append(step + 1)
            hist["loss"].append(loss.item())
            hist["mse"].append(mse.item())
            hist["l0"].append(float((z > 0).sum(-1).double().mean()))
    bar.close()

    sae = SAE(W_enc.detach().cpu(), b_enc.detach().cpu(), W_dec.detach().cpu(), b_dec.detach().cpu(), scale,
              history={k: torch.tensor(v) for k, v in hist.items()})
    if n_test >= 2:
        sae.held_out = sae.evaluate(x_test)
    return sae
