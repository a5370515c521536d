"""Benchmark: how head_sparsity's time grows with the number of prompts (target: exponent <= 1.05).

The embedded MiniLM, ``--length``-token prompts of the book's plain sentences, every head,
rotated control on; prompt counts 32 -> 512. Prints each time beside the model's own forward
pass (``output_attentions=True``), and the least-squares slope of log(time) against log(prompts)
for both (1 = linear).

    python benchmarks/prompts_exponent.py [--device cuda] [--counts 32 64 128 256 512] [--length 20]

Measured on the project's shared, heavily loaded 2-core CPU (``OMP_WAIT_POLICY=PASSIVE``); compare
ratios and slopes. CUDA: untested (no GPU was available).

Measured 2026-11-28 (loaded 2-core CPU, 20 tokens, 32 -> 512 prompts, one run each): exponent 0.90 for
head_sparsity, 0.97 for the forward pass; head_sparsity / forward 1.09, 1.00, 1.01, 0.88, 0.93.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import describe, gb, hf_forward, machine, parser, text_ids, timed  # noqa: E402


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--counts", type=int, nargs="*", default=[32, 64, 128, 256, 512])
    ap.add_argument("--length", type=int, default=20)
    args = ap.parse_args()
    import svtools
    from svtools.sad import head_sparsity

    device = torch.device(args.device)
    model = svtools.load_model("minilm", device=device)
    print(describe(device), f"| OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"{'prompts':>8}{'forward s':>11}{'h_s s':>9}{'ratio':>8}{'pairs':>8}{'peak h_s':>10}")
    tf, th = [], []
    for n in args.counts:
        ids, am = text_ids(model, n, args.length)
        ids, am = ids.to(device), am.to(device)
        t_f, _, _ = timed(lambda: hf_forward(model, ids, am), args.repeats, device)
        t_h, m_h, df = timed(lambda: head_sparsity(model, ids, attention_mask=am, progress=False), args.repeats,
                             device)
        tf.append(t_f)
        th.append(t_h)
        print(f"{n:>8}{t_f:>11.2f}{t_h:>9.2f}{t_h / t_f:>8.2f}{len(df):>8}{gb(m_h):>10}  {machine()}", flush=True)
    x = np.log(np.array(args.counts, dtype=float))
    print(f"exponent (slope of log time vs log prompts): head_sparsity {np.polyfit(x, np.log(th), 1)[0]:.3f}, "
          f"forward {np.polyfit(x, np.log(tf), 1)[0]:.3f}  ({machine()})")


if __name__ == "__main__":
    main()
