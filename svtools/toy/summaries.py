"""What a toy run came to: scalar outcomes, the pairs that failed, and when its curves settled."""

from __future__ import annotations

import torch
from torch import Tensor

from svtools._checks import SVToolsError
from svtools.geometry import max_interference
from svtools.toy.model import ToyHistory, ToyRun

__all__ = ["settle_step", "settle_steps", "summarize", "failing_pairs"]


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
    r"""Scalar outcome of a run: worst and median pair cosine
    (:math:`\min(|\cos_q|, |\cos_k|)`), number of pairs aligned at ``threshold``,
    :math:`\sigma_{P+1} / \sigma_1` (:math:`P` = number of pairs; the single pair's
    :math:`\sigma_2 / \sigma_1`), Spearman correlation of assigned :math:`\sigma` with strength
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
