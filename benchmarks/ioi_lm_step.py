"""IOI LM training step: the current loop (data prepared ahead in a thread, foreach AdamW, the fused GELU
of ``svtools.ioi_lm.gelu.NewGELUFunction``) against the previous one (data made inside the step,
AdamW's per-parameter loop, transformers' GELU module), side by side in one process.

The fused GELU alone (forward + backward of the three training buckets' MLPs, one thread, alternating
in one process, 2026-12-06 on a machine running slow that day): 64.7-68.1 ms per step against
67.5-70.9 ms, about 3-4%; weights identical after 300 default-config steps.

Both train the default config for ``--steps`` steps (cache off; the learning-rate schedule of a
run of that length), alternating, best of ``--repeats``; the weights they end with are compared
with ``torch.equal`` (they must be identical: the three default seeds were validated with the
previous loop). Prints ms per step, the ratio and the machine's load beside it.

    python benchmarks/ioi_lm_step.py --steps 200 --repeats 3
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from svtools import ioi_lm  # noqa: E402
from svtools.ioi_lm import training  # noqa: E402
from _common import describe, machine, parser  # noqa: E402


class _Inline:
    """The previous loop's data: each step's batch made inside the step."""

    def __init__(self, fn, items, depth=0):
        self._it = (fn(s) for s in items)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def close(self):
        pass


def run(cfg, device, previous: bool):
    prefetch, kw, gelu = training.Prefetch, training._ADAMW_KW, training._FUSED_GELU
    if previous:
        training.Prefetch, training._ADAMW_KW, training._FUSED_GELU = _Inline, {"foreach": False}, False
    try:
        t = time.perf_counter()
        r = ioi_lm.train(cfg, seed=0, progress=False, cache=False, device=device)
        dt = time.perf_counter() - t
    finally:
        training.Prefetch, training._ADAMW_KW, training._FUSED_GELU = prefetch, kw, gelu
    return dt, load_file(str(r.path / f"step_{cfg.steps:06d}.safetensors"))


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = ioi_lm.IOILMConfig().replace(steps=args.steps, n_checkpoints=2)
    print(describe(device))
    best = {"previous": float("inf"), "current": float("inf")}
    weights = {}
    for i in range(args.repeats):
        for name in ("previous", "current"):
            dt, weights[name] = run(cfg, device, name == "previous")
            best[name] = min(best[name], dt)
            print(f"repeat {i} {name:>8}: {dt / args.steps * 1e3:6.1f} ms/step  ({machine()})", flush=True)
    same = weights["previous"].keys() == weights["current"].keys() and all(
        torch.equal(weights["previous"][k], weights["current"][k]) for k in weights["current"])
    print(f"best of {args.repeats}: previous {best['previous'] / args.steps * 1e3:.1f} ms/step, current "
          f"{best['current'] / args.steps * 1e3:.1f} ms/step; RATIO previous / current "
          f"{best['previous'] / best['current']:.2f}x  ({machine()})")
    print(f"weights after {args.steps} steps bit-identical (torch.equal, {len(weights['current'])} tensors): {same}")


if __name__ == "__main__":
    main()
