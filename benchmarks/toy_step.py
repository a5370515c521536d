"""Toy model training step (Part 1's many-pairs run: 5 seeds batched, 256 examples each, 17 tokens,
N = 100 features): the current trainer's ms per step, and each rewritten piece against the
formulation it replaced, side by side in one process, with the outputs compared bit for bit.

The step is bound by memory traffic over tensors of the batch's size (5 x 256 x 17 x 100 floats,
8.7 MB), not by arithmetic; the rewrites take passes and fresh tensors away without changing a number:

- activations: ``u.div_(p).masked_fill_(u >= p, 0)`` -> ``threshold_`` on the negated quotient (no mask;
  a boolean ``masked_fill_`` is slow);
- reconstruction loss: relu's zero pattern kept as a boolean mask and applied with ``masked_fill_`` ->
  relu's own backward kernel (``threshold_backward``) on the saved pre-activation;
- (in the trainer, not timed separately here) the bias added in place to the decoder's product, and
  the query/key tokens taken with one ``split`` instead of two slices (one concatenation in the backward
  instead of two zero-filled copies).

Measured on this project's 2-core VM, quiet, one thread, before/after these changes (the same script
on both trees): 53.5 -> 44 ms per step (``python benchmarks/toy_step.py``), weights bit-identical after
150 steps for seven configurations (many pairs, single pair, rotary, MSE loss with AdamW, no head,
float64); Part 1 chapter 2's own run (3,000 steps, 5 seeds, ``train_seeds(ToyConfig.many_pairs(), range(5))``)
took 179 s with the previous code and 149 s with this one, run side by side, with bit-identical weights,
loss curves and alignment histories. Prints the machine's load and thread count beside every ratio.

    python benchmarks/toy_step.py --steps 200 --repeats 3
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from svtools.toy import ToyConfig, train_seeds  # noqa: E402
from svtools.toy.model import _activate_  # noqa: E402
from svtools.toy.training import _recon_loss  # noqa: E402
from _common import describe, machine, parser  # noqa: E402


def previous_activations(u: torch.Tensor, p: float) -> torch.Tensor:
    off = u >= p
    return u.div_(p).masked_fill_(off, 0.0)


class PreviousRecon(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, f):
        d = torch.relu(z)
        off = d <= 0
        d.sub_(f)
        ctx.save_for_backward(d, off)
        return (d * d).sum(-1).mean(dim=(1, 2))

    @staticmethod
    def backward(ctx, grad):
        d, off = ctx.saved_tensors
        c = grad / (d.shape[1] * d.shape[2])
        return d.mul_((2 * c)[:, None, None, None]).masked_fill_(off, 0.0), None


def best_of(fn, repeats: int, inner: int = 20) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            out = fn()
        best = min(best, (time.perf_counter() - t) / inner)
    return best, out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    print(describe(device))
    cfg = ToyConfig.many_pairs(steps=args.steps, log_every=10**9, device=str(device))
    S, B, T, N = 5, cfg.batch, 1 + cfg.n_keys, cfg.n_features

    g = torch.Generator(device=device).manual_seed(0)
    u = torch.rand(S * B, cfg.n_keys, N, generator=g, device=device)
    t_old, a_old = best_of(lambda: previous_activations(u.clone(), cfg.p_active), args.repeats)
    t_new, a_new = best_of(lambda: _activate_(u.clone(), cfg.p_active), args.repeats)
    same = torch.equal(a_old.view(torch.int32), a_new.view(torch.int32))
    print(f"activations ({S * B} x {cfg.n_keys} x {N}): previous {t_old * 1e3:.2f} ms, current {t_new * 1e3:.2f} ms; "
          f"RATIO {t_old / t_new:.2f}x, bit-identical: {same}  ({machine()})")

    z0 = torch.randn(S, B, T, N, generator=g, device=device)
    f = _activate_(torch.rand(S, B, T, N, generator=g, device=device), cfg.p_active)

    def recon(fn):
        z = z0.clone().requires_grad_(True)
        fn(z, f).sum().backward()
        return z.grad

    t_old, g_old = best_of(lambda: recon(PreviousRecon.apply), args.repeats)
    t_new, g_new = best_of(lambda: recon(_recon_loss), args.repeats)
    print(f"reconstruction loss, forward + backward ({S} x {B} x {T} x {N}): previous {t_old * 1e3:.2f} ms, current "
          f"{t_new * 1e3:.2f} ms; RATIO {t_old / t_new:.2f}x, gradients equal: {torch.equal(g_old, g_new)}  ({machine()})")

    train_seeds(cfg.replace(steps=10), list(range(S)), progress=False)  # warm-up
    best = float("inf")
    for i in range(args.repeats):
        t = time.perf_counter()
        train_seeds(cfg, list(range(S)), progress=False)
        best = min(best, time.perf_counter() - t)
    print(f"current trainer: {best / args.steps * 1e3:.1f} ms per step (best of {args.repeats}, {args.steps} steps, "
          f"{S} seeds)  ({machine()})")


if __name__ == "__main__":
    main()
