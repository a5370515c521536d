"""Freed memory returned to the system against kept for reuse (glibc's allocator), side by side.

glibc hands blocks above its mmap threshold back to the system when they are freed, so the next
tensor of that size faults every page in again; ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` (the Makefile and ``scripts/book_exec.py`` set both to 4 GiB) keep freed
memory for reuse. glibc reads them when a process starts, so each case runs in a fresh child process,
the two settings alternating, best of ``--repeats``:

* ``op``: ``x * 2`` on a fresh 100 MB float32 tensor (after 3 warm-up runs), with the minor page faults per op;
* ``toy``: 100 steps of the toy trainer, the many-pairs config, 5 seeds batched (Part 1, chapter 2's run);
* ``forward``: MiniLM's HF forward with ``output_attentions=True``, 32 prompts x 256 tokens (the
  baseline of ``head_sparsity_vs_forward.py``), its second call in the process (the first printed beside).

Results do not depend on the setting (the toy's weights are compared with ``torch.equal``).

    python benchmarks/page_faults.py [--repeats 2] [--cases op toy forward]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "scripts"))

from _common import machine, parser  # noqa: E402
from book_exec import MEMORY_ENV as KEEP  # noqa: E402  (the setting the book's kernels run with)


def child(case: str) -> dict:
    import resource
    import time

    import torch

    torch.manual_seed(0)
    if case == "op":
        x = torch.randn(32, 12, 256, 256)
        for _ in range(3):
            x * 2
        r0, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        for _ in range(10):
            x * 2
        dt = (time.perf_counter() - t) / 10
        return {"seconds": dt, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 10}
    if case == "toy":
        from svtools.toy import ToyConfig, train_seeds

        cfg = ToyConfig.many_pairs(steps=100, log_every=1000)
        t = time.perf_counter()
        runs = train_seeds(cfg, list(range(5)), progress=False)
        dt = time.perf_counter() - t
        return {"seconds": dt, "check": float(torch.stack([r.features for r in runs]).double().sum())}
    if case == "forward":
        import svtools
        from _common import hf_forward, text_ids

        model = svtools.load_model("minilm")
        ids, am = text_ids(model, 32, 256)
        times = []
        for _ in range(2):  # the second call: what a chapter that calls the model again pays
            t = time.perf_counter()
            hf_forward(model, ids, am)
            times.append(time.perf_counter() - t)
        return {"seconds": times[-1], "first": times[0]}
    raise ValueError(case)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2])))
        return
    ap = parser(__doc__)
    ap.add_argument("--cases", nargs="*", default=["op", "toy", "forward"])
    args = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in KEEP}
    envs = {"returned": base, "kept": {**base, **KEEP}}
    print(f"CPU, {machine()}; each case in a fresh process per setting, best of {args.repeats}")
    for case in args.cases:
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for name, env in envs.items():
                out = subprocess.run([sys.executable, __file__, "--child", case], env=env, capture_output=True,
                                     text=True, check=True)
                res = json.loads(out.stdout.strip().splitlines()[-1])
                if name not in best or res["seconds"] < best[name]["seconds"]:
                    best[name] = res
        r, k = best["returned"], best["kept"]
        extra = f", page faults per op {r['faults']:.0f} vs {k['faults']:.0f}" if case == "op" else ""
        if case == "forward":
            extra = f" (first call in the process: {r['first']:.2f} s vs {k['first']:.2f} s)"
        if case == "toy":
            extra = f", same weights: {r['check'] == k['check']}"
        print(f"{case:>8}: returned {r['seconds'] * 1e3:8.1f} ms, kept {k['seconds'] * 1e3:8.1f} ms; "
              f"RATIO returned / kept {r['seconds'] / k['seconds']:.2f}x{extra}  ({machine()})", flush=True)


if __name__ == "__main__":
    main()
