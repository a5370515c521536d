"""Benchmark: rotary qk_svd at 128 and 1024 offsets — factored form vs dense U, V vs dense per-offset SVD.

One Pythia-160M-shaped layer (12 heads, d_model 768 (+1 homogeneous), d_head 64, rotary_dim 16,
GPT-NeoX layout), random weights (seeded), float32. Methods, side by side in one run:

* ``qk_svd_factored`` (:mod:`svtools.rotary`): per-offset ``d_head x d_head`` cores decomposed
  through the eigendecomposition of their Gram matrices, kept in factored form (``U_o = A XA_o``);
  head_sparsity uses the same per-offset bases, for the (head, offset) items it needs;
* ``qk_svd(rotary=...)``: the same SVDs with the dense ``U, V (head, offset, d_in, r)``;
* dense per-offset SVD: ``torch.linalg.svd`` of every ``Omega~_delta`` (769 x 769), timed on
  ``--dense-sample`` offsets and scaled linearly to all offsets (stated as such).

Prints times, ratios, peak memory above the start and the size of each result, and the largest
singular-value disagreement (factored vs dense SVD on the sampled offsets).

    python benchmarks/rotary_qk_svd.py [--device cuda] [--offsets 128 1024]

Measured on the project's shared, heavily loaded 2-core CPU (``OMP_WAIT_POLICY=PASSIVE``); compare
ratios. CUDA: untested (no GPU was available).

Measured 2026-11-28 (loaded 2-core CPU, one run each): 128 offsets: factored 3.3 s (peak 0.40 GB,
result 0.05 GB), qk_svd with dense U, V 6.9 s (1.35 GB, result 0.56 GB): 2.1x faster, 10.9x smaller;
dense per-offset SVD ~446 s extrapolated: 135x. 1024 offsets: factored 22 s in one block (peak
2.7 GB; with the offsets now done in blocks, 47-63 s under heavier load, peak 0.5 GB above the
0.38 GB result); dense per-offset SVD ~2650 s extrapolated: 57-119x.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from _common import describe, gb, machine, parser, timed  # noqa: E402


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--offsets", type=int, nargs="*", default=[128, 1024])
    ap.add_argument("--dense-sample", type=int, default=4)
    ap.add_argument("--dense-uv-max", type=int, default=256,
                    help="skip qk_svd with dense U, V above this many offsets (1024 offsets: ~5 GB result, "
                         "~11 GB peak)")
    args = ap.parse_args()
    from svtools.qk import RotarySpec, qk_svd, rotary_matrices
    from svtools.rotary import qk_svd_factored

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    H, D, dh = 12, 768, 64
    W_Q, W_K = (torch.randn(H, D, dh, generator=g) / D ** 0.5 for _ in range(2))
    b_Q, b_K = (torch.randn(H, dh, generator=g) * 0.1 for _ in range(2))
    W_Q, W_K, b_Q, b_K = (t.to(device) for t in (W_Q, W_K, b_Q, b_K))
    print(describe(device), f"| OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"one layer: {H} heads, d_model {D} (+1), d_head {dh}, rotary_dim 16, float32")
    for n_off in args.offsets:
        spec = RotarySpec.from_base(16, range(n_off))
        t_f, m_f, f = timed(lambda: qk_svd_factored(W_Q, W_K, b_Q, b_K, rotary=spec), args.repeats, device)
        size_f = sum(t.numel() * t.element_size() for t in (f.A, f.B, f.XA, f.XB, f.S))
        del f
        S_fact = qk_svd_factored(W_Q, W_K, b_Q, b_K, rotary=spec).S
        t_d = m_d = size_d = float("nan")
        if n_off <= args.dense_uv_max:
            t_d, m_d, d = timed(lambda: qk_svd(W_Q, W_K, b_Q, b_K, rotary=spec), 1, device)
            size_d = sum(t.numel() * t.element_size() for t in (d.U, d.V, d.S))
            del d
        sample = torch.linspace(0, n_off - 1, args.dense_sample).long()
        A = torch.cat([W_Q, b_Q[:, None, :]], 1)
        B = torch.cat([W_K, b_K[:, None, :]], 1)
        M = rotary_matrices(RotarySpec.from_base(16, sample.tolist()), dh, device=device)

        def dense():
            return torch.linalg.svd(A[:, None] @ M[None] @ B.transpose(-1, -2)[:, None], full_matrices=False)[1]

        t_s, m_s, S_dense = timed(dense, 1, device)
        t_s *= n_off / len(sample)
        err = float(((S_dense[..., :dh] - S_fact[:, sample]).abs() / S_dense[..., :1]).max())
        print(f"\n{n_off} offsets:")
        print(f"  qk_svd_factored      {t_f:9.2f} s  peak {gb(m_f)}  result {gb(size_f)}")
        if n_off <= args.dense_uv_max:
            print(f"  qk_svd (dense U, V)  {t_d:9.2f} s  peak {gb(m_d)}  result {gb(size_d)}")
        else:
            print(f"  qk_svd (dense U, V)  skipped above --dense-uv-max={args.dense_uv_max} offsets "
                  f"(result would be {gb(2 * H * n_off * (D + 1) * dh * 4)})")
        print(f"  dense per-offset SVD {t_s:9.2f} s  (extrapolated from {len(sample)} offsets; peak of those "
              f"{gb(m_s)})")
        print(f"  speed-up factored vs qk_svd: {t_d / t_f:.1f}x; vs dense SVD: {t_s / t_f:.1f}x; "
              f"result vs qk_svd's {size_d / size_f:.1f}x smaller; max rel. sigma diff {err:.1e}")
        print(f"  ({machine()})")


if __name__ == "__main__":
    main()
