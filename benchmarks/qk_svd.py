"""Benchmark: svtools.qk_svd against a dense SVD of every head and TransformerLens' FactoredMatrix.

GPT-2 small shapes (12 layers x 12 heads, d_model 768, d_head 64, with biases: d_in = 769),
random weights (seeded). Prints each method's time, the speed-up ratios measured in this one run,
and the largest relative disagreement of singular values.

    python benchmarks/qk_svd.py [--device cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

import svtools
from _common import machine  # noqa: E402


def timed(fn, repeats: int, device: torch.device):
    best, out = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs per method")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--d-head", type=int, default=64)
    args = ap.parse_args()
    device = svtools.runtime.default_device(args.device)
    g = torch.Generator().manual_seed(0)
    L, H, D, dh = args.layers, args.heads, args.d_model, args.d_head
    W_Q, W_K = (torch.randn(L, H, D, dh, generator=g) / D ** 0.5 for _ in range(2))
    b_Q, b_K = (torch.randn(L, H, dh, generator=g) * 0.1 for _ in range(2))
    W_Q, W_K, b_Q, b_K = (t.to(device) for t in (W_Q, W_K, b_Q, b_K))
    A = torch.cat([W_Q, b_Q[..., None, :]], dim=-2)  # (L, H, D+1, dh)
    B = torch.cat([W_K, b_K[..., None, :]], dim=-2)

    from transformer_lens import FactoredMatrix

    t_core, qk = timed(lambda: svtools.qk_svd(W_Q, W_K, b_Q, b_K), args.repeats, device)
    t_fm, fm = timed(lambda: FactoredMatrix(A, B.transpose(-1, -2)).svd(), max(1, args.repeats - 1), device)
    t_dense, s_dense = timed(lambda: torch.linalg.svdvals(A @ B.transpose(-1, -2))[..., :dh], 1, device)

    def rel_err(s):
        return float(((s - s_dense).abs() / s_dense[..., :1]).max())

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device} ({where}); torch {torch.__version__}")
    print(f"shapes: {L} layers x {H} heads, d_model {D} (+1 homogeneous), d_head {dh}, float32")
    print(f"{'method':<34}{'time (s)':>10}{'max rel. sigma diff':>22}")
    print(f"{'svtools.qk_svd (d_head core)':<34}{t_core:>10.4f}{rel_err(qk.S):>22.2e}")
    print(f"{'TransformerLens FactoredMatrix.svd':<34}{t_fm:>10.4f}{rel_err(fm[1][..., :dh]):>22.2e}")
    print(f"{'dense SVD of every Omega~':<34}{t_dense:>10.4f}{'(reference)':>22}")
    print(f"speed-up vs dense SVD:      {t_dense / t_core:8.1f}x   ({machine()})")
    print(f"speed-up vs FactoredMatrix: {t_fm / t_core:8.1f}x   ({machine()})")


if __name__ == "__main__":
    main()
