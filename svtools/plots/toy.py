"""Figures of Part 1 (the toy model). Every function returns a matplotlib Figure."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from svtools.plots import subplots
from svtools.alignment import PairAlignment
from svtools.geometry import feature_dimensionality, gram

__all__ = ["feature_geometry", "singular_spectrum", "pair_alignment", "training_dynamics", "sweep",
           "offset_alignment"]




def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def feature_geometry(features: Mapping[str, Tensor], attended: Sequence[int] = (),
                     *, title: Optional[str] = None) -> Figure:
    """Cosine Gram matrices (top) and Elhage et al. dimensionality per feature (bottom), one
    column per entry of ``features`` (``name -> W (D, N)``). Attended features are drawn in red."""
    names = list(features)
    fig, axes = subplots(2, len(names), figsize=(4.6 * len(names), 7.2), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.3]})
    att = set(int(a) for a in attended)
    for c, name in enumerate(names):
        W = features[name]
        G = _np(gram(W, normalize=True))
        ax = axes[0, c]
        im = ax.imshow(G, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}\ncos(w_i, w_j)")
        ax.set_xlabel("feature j (index)")
        ax.set_ylabel("feature i (index)")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine (unitless)")
        dims = _np(feature_dimensionality(W))
        colors = ["tab:red" if i in att else "tab:gray" for i in range(len(dims))]
        axb = axes[1, c]
        axb.bar(np.arange(len(dims)), dims, color=colors)
        axb.set_ylim(0, 1.05)
        axb.set_xlabel("feature (index; red = attended)")
        axb.set_ylabel("dimensionality D_i")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def singular_spectrum(S: Tensor, al: Optional[PairAlignment] = None, *, n_show: int = 10,
                      title: Optional[str] = None) -> Figure:
    """Singular values of ``Omega`` (left, log scale) and, if ``al`` is given, the ``|cos|`` of
    every feature with the first ``n_show`` left (query side) and right (key side) singular vectors."""
    S = _np(S)
    ncols = 1 if al is None else 3
    fig, axes = subplots(1, ncols, figsize=(4.4 * ncols, 3.8), squeeze=False)
    ax = axes[0, 0]
    ax.bar(np.arange(len(S)), S, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("singular index k")
    ax.set_ylabel("singular value sigma_k (logit units per unit activation^2)")
    ax.set_title("spectrum of Omega")
    if al is not None:
        k = min(n_show, al.cos_U.shape[1])
        for c, (mat, side) in enumerate(((al.cos_U, "u_k (query side)"), (al.cos_V, "v_k (key side)")), 1):
            a = axes[0, c]
            im = a.imshow(_np(mat[:, :k]), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                          interpolation="nearest")
            a.set_xlabel("singular index k")
            a.set_ylabel("feature n (index)")
            a.set_title(f"|cos(w_n, {side})|")
            fig.colorbar(im, ax=a, fraction=0.046, pad=0.04, label="|cosine| (unitless)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def pair_alignment(al: PairAlignment, strengths: Optional[Sequence[float]] = None, *,
                   n_show: Optional[int] = None, threshold: float = 0.9,
                   title: Optional[str] = None) -> Figure:
    """Many pairs: (a) per-pair score ``|cos(w_i,u_k)| |cos(w_j,v_k)|`` over singular indices with
    the assigned index circled; (b) the two cosines of each pair at its index, with chance and the
    threshold; (c) if ``strengths`` is given, the assigned singular value against the strength."""
    P = len(al.pairs)
    r = al.cos_U.shape[1]
    n_show = r if n_show is None else min(n_show, r)
    score = _np(al.cos_U[al.pairs[:, 0], :n_show] * al.cos_V[al.pairs[:, 1], :n_show])
    ncols = 3 if strengths is not None else 2
    fig, axes = subplots(1, ncols, figsize=(5.0 * ncols, 4.2), squeeze=False)
    ax = axes[0, 0]
    im = ax.imshow(score, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    idx = _np(al.index)
    ok = (idx >= 0) & (idx < n_show)
    ax.scatter(idx[ok], np.arange(P)[ok], s=40, facecolors="none", edgecolors="red", label="assigned")
    ax.set_xlabel("singular index k")
    ax.set_ylabel("template pair p (index)")
    ax.set_title("|cos(w_i,u_k)| x |cos(w_j,v_k)|")
    ax.legend(loc="lower right", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="product of |cosines| (unitless)")
    ax = axes[0, 1]
    x = np.arange(P)
    ax.bar(x - 0.2, _np(al.cos_q), width=0.4, label="query |cos(w_i, u_k)|")
    ax.bar(x + 0.2, _np(al.cos_k), width=0.4, label="key |cos(w_j, v_k)|")
    ax.axhline(al.chance, color="k", ls=":", label=f"chance ({al.chance:.2f})")
    ax.axhline(threshold, color="tab:red", ls="--", label=f"threshold {threshold}")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("template pair p (index)")
    ax.set_ylabel("|cosine| at the assigned index (unitless)")
    ax.set_title(f"{al.n_aligned(threshold)}/{P} pairs with both >= {threshold}")
    ax.legend(fontsize=7, loc="lower left")
    if strengths is not None:
        from scipy.stats import spearmanr
        ax = axes[0, 2]
        st = np.asarray(strengths, dtype=float)
        sg = _np(al.sigma)
        good = np.isfinite(sg)
        ax.scatter(st[good], sg[good], c=_np(al.worst)[good], cmap="viridis", vmin=0, vmax=1)
        rho = spearmanr(st[good], sg[good]).statistic if good.sum() > 2 else float("nan")
        ax.set_xlabel("template strength T_ij (logit units)")
        ax.set_ylabel("assigned singular value sigma_k")
        ax.set_title(f"Spearman rho = {rho:.3f} (colour: min |cos|)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def training_dynamics(history, settle: Optional[Mapping[str, float]] = None, *,
                      title: Optional[str] = None) -> Figure:
    """Losses (top, log scale) and alignment / interference (bottom) against the training step.
    ``settle`` maps a curve name to the step at which it settled (drawn as vertical lines)."""
    step = _np(history.step)
    fig, (a1, a2) = subplots(2, 1, figsize=(8, 6.4), sharex=True)
    a1.plot(step, _np(history.loss_recon), label="L_recon", color="tab:blue")
    a1.plot(step, _np(history.loss_attn), label="L_attn", color="tab:orange")
    a1.set_yscale("log")
    a1.set_ylabel("loss (per example, log scale)")
    a1.legend()
    worst = torch.minimum(history.cos_q, history.cos_k)
    a2.plot(step, _np(worst.min(1).values), label="alignment: min over pairs of min(|cos q|, |cos k|)",
            color="tab:green")
    if worst.shape[1] > 1:
        a2.plot(step, _np(worst.median(1).values), label="alignment: median over pairs", color="tab:green",
                ls="--")
    a2.plot(step, _np(history.interference.max(1).values),
            label="interference: max |cos| of attended features with any other", color="tab:purple")
    a2.set_ylim(-0.02, 1.05)
    a2.set_xlabel("training step")
    a2.set_ylabel("|cosine| (unitless)")
    colors = {"alignment": "tab:green", "interference": "tab:purple", "loss_attn": "tab:orange",
              "loss_recon": "tab:blue"}
    for name, s in (settle or {}).items():
        for a in (a1, a2):
            a.axvline(s, color=colors.get(name, "k"), ls=":", lw=1.5)
        a2.annotate(f"{name}\nsettles {int(s)}", (s, 0.5), rotation=90, fontsize=7, ha="right",
                    color=colors.get(name, "k"))
    a2.legend(fontsize=7, loc="center right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def sweep(df, params: Sequence[str], metric: str, *, ylabel: str, ref: Optional[float] = None,
          ref_label: str = "paper", log_x: Sequence[str] = (), title: Optional[str] = None) -> Figure:
    """One panel per swept parameter: ``metric`` mean +- std over seeds against the value.

    ``df`` has columns ``param``, ``value``, ``seed`` and ``metric`` (as made by
    :func:`svtools.toy.sweep`). ``ref`` draws a horizontal reference line (the paper's number)."""
    fig, axes = subplots(1, len(params), figsize=(3.4 * len(params), 3.4), squeeze=False, sharey=True)
    for a, p in zip(axes[0], params):
        d = df[df["param"] == p].groupby("value")[metric].agg(["mean", "std", "min"])
        a.errorbar(d.index.to_numpy(dtype=float), d["mean"], yerr=d["std"].fillna(0), marker="o", capsize=3,
                   label="mean +- std")
        a.plot(d.index.to_numpy(dtype=float), d["min"], "v", color="tab:red", ms=5, label="worst seed")
        if ref is not None:
            a.axhline(ref, color="k", ls=":", label=ref_label)
        if p in log_x:
            a.set_xscale("log")
        a.set_xlabel(p)
    axes[0, 0].set_ylabel(ylabel)
    axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def offset_alignment(offsets: Sequence[int], cos_q: Tensor, cos_k: Tensor, sigma_ratio: Tensor, *,
                     title: Optional[str] = None) -> Figure:
    """Rotary head: alignment of the template pair(s) with the decomposition at each offset
    (``cos_q``/``cos_k``: ``(n_offsets, P)``; ``sigma_ratio``: ``(n_offsets,)``)."""
    o = np.asarray(offsets)
    fig, (a1, a2) = subplots(1, 2, figsize=(9, 3.6))
    wq, wk = _np(cos_q), _np(cos_k)
    a1.plot(o, wq.min(1), "o-", label="min over pairs |cos(w_i, u_k)|")
    a1.plot(o, wk.min(1), "s--", label="min over pairs |cos(w_j, v_k)|")
    a1.set_ylim(0, 1.05)
    a1.set_xlabel("offset delta = query position - key position (tokens)")
    a1.set_ylabel("|cosine| (unitless)")
    a1.legend(fontsize=8)
    a2.plot(o, _np(sigma_ratio), "o-", color="tab:gray")
    a2.set_yscale("log")
    a2.set_xlabel("offset delta (tokens)")
    a2.set_ylabel("sigma_(P+1) / sigma_1 (unitless)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
