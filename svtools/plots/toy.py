"""Figures of Part 1 (the toy model). Every function returns a matplotlib Figure."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from svtools.plots import FIGURE_IN, book_figure, subplots
from svtools.alignment import PairAlignment
from svtools.geometry import feature_dimensionality, gram

__all__ = ["feature_geometry", "singular_spectrum", "pair_alignment", "pairs_over_seeds", "training_dynamics",
           "sweep", "offset_alignment"]

#: Widest figure (inches): :data:`svtools.plots.FIGURE_IN` (kept under this name for callers).
WIDTH = FIGURE_IN

#: Axis labels of the toy's settings (``ToyConfig`` field -> words and symbol).
PARAM_LABELS = {"lam": r"loss weight $\lambda$", "n_features": r"features $N$", "n_keys": r"keys per query $m$",
                "d_head": r"head dimension $H$", "p_active": r"activation probability $p$",
                "target_scale": r"target sharpness $\beta$", "seed": "seed"}


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _suptitle(fig: Figure, title: Optional[str]) -> None:
    if title:
        import textwrap
        fig.suptitle(textwrap.fill(title, 70))


def _int_ticks(*axes, x: bool = True, y: bool = False, nbins="auto") -> None:
    """Integer tick labels only (indices, counts)."""
    for a in axes:
        if x:
            a.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=nbins))
        if y:
            a.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=nbins))


@book_figure
def feature_geometry(features: Mapping[str, Tensor], attended: Sequence[int] = (),
                     *, title: Optional[str] = None) -> Figure:
    """Cosines between all features (top) and each feature's dimensionality (bottom), one column
    per entry of ``features`` (``name -> W (D, N)``); attended features' bars in red.

    Dimensionality (Elhage et al.): ``D_i = |w_i|^2 / sum_j (w_i_hat . w_j)^2``, 1 when feature
    ``i`` owns a direction, ``1/k`` when ``k`` features share one."""
    names = list(features)
    n = len(names)
    fig, axes = subplots(2, n, width=1.0 if n > 1 else 0.6, height=5.4, squeeze=False,
                         gridspec_kw={"height_ratios": [3, 1.3]}, layout="constrained")
    att = set(int(a) for a in attended)
    letters = "abcdefgh"
    im = None
    for c, name in enumerate(names):
        W = features[name]
        ax = axes[0, c]
        im = ax.imshow(_np(gram(W, normalize=True)), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(f"({letters[c]}) {name}")
        ax.set_xlabel(r"feature $j$")
        if c == 0:
            ax.set_ylabel(r"feature $i$")
        _int_ticks(ax, x=True, y=True, nbins=5)
        dims = _np(feature_dimensionality(W))
        axb = axes[1, c]
        axb.bar(np.arange(len(dims)), dims, color=["tab:red" if i in att else "tab:gray" for i in range(len(dims))])
        axb.set_ylim(0, 1.05)
        axb.set_xlabel(r"feature $i$")
        axb.set_title(f"({letters[n + c]}) dimensionality")
        if c == 0:
            axb.set_ylabel(r"$D_i$")
        _int_ticks(axb, nbins=5)
    fig.colorbar(im, ax=axes[0, :].tolist(), shrink=0.85, label=r"$\cos(w_i, w_j)$")
    _suptitle(fig, title)
    return fig


@book_figure
def singular_spectrum(S: Tensor, al: Optional[PairAlignment] = None, *, n_show: int = 10,
                      title: Optional[str] = None) -> Figure:
    """Singular values of ``Omega`` (top, log scale) and, if ``al`` is given, ``|cos|`` of every
    feature with the first ``n_show`` left (query-side) and right (key-side) singular vectors."""
    S = _np(S)
    fig = subplots(width=1.0, height=2.4 if al is None else 5.6, layout="constrained")[0]
    fig.clf()
    axd = fig.subplot_mosaic([["s"]] if al is None else [["s", "s"], ["u", "v"]],
                             gridspec_kw=None if al is None else {"height_ratios": [1, 1.6]})
    ax = axd["s"]
    ax.bar(np.arange(len(S)), S, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel(r"singular index $k$")
    ax.set_ylabel(r"$\sigma_k$")
    ax.set_title(r"(a) singular values of $\Omega$")
    _int_ticks(ax)
    if al is not None:
        k = min(n_show, al.cos_U.shape[1])
        im = None
        for key, mat, lab in (("u", al.cos_U, r"(b) $|\cos(w_n, u_k)|$, query side"),
                              ("v", al.cos_V, r"(c) $|\cos(w_n, v_k)|$, key side")):
            a = axd[key]
            im = a.imshow(_np(mat[:, :k]), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            a.set_xlabel(r"singular index $k$")
            a.set_title(lab)
            _int_ticks(a, x=True, y=True)
        axd["u"].set_ylabel(r"feature $n$")
        fig.colorbar(im, ax=[axd["u"], axd["v"]], shrink=0.9, label=r"$|\cos|$")
    _suptitle(fig, title)
    return fig


@book_figure
def pair_alignment(al: PairAlignment, strengths: Optional[Sequence[float]] = None, *,
                   n_show: Optional[int] = None, threshold: float = 0.9,
                   title: Optional[str] = None) -> Figure:
    """Many pairs: (a) each pair's score ``|cos(w_i,u_k)| |cos(w_j,v_k)|`` at every singular index
    ``k`` (the assigned index circled); (b) if ``strengths`` is given, the singular value at the
    assigned index against the pair's template strength (pairs below ``threshold`` marked);
    (c) the two cosines of each pair at its index, with chance and the threshold."""
    P = len(al.pairs)
    r = al.cos_U.shape[1]
    n_show = r if n_show is None else min(n_show, r)
    score = _np(al.cos_U[al.pairs[:, 0], :n_show] * al.cos_V[al.pairs[:, 1], :n_show])
    fig = subplots(width=1.0, height=6.0, layout="constrained")[0]
    fig.clf()
    axd = fig.subplot_mosaic([["a", "a"], ["b", "c"]] if strengths is not None else [["a"], ["c"]],
                             gridspec_kw={"height_ratios": [1.15, 1]})
    ax = axd["a"]
    im = ax.imshow(score, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    idx = _np(al.index)
    ok = (idx >= 0) & (idx < n_show)
    ax.scatter(idx[ok], np.arange(P)[ok], s=36, facecolors="none", edgecolors="red", linewidths=1.2,
               label=r"assigned $k$")
    ax.set_xlabel(r"singular index $k$")
    ax.set_ylabel(r"template pair $p$")
    ax.set_title(r"(a) score of pair $p$ at index $k$")
    _int_ticks(ax, x=True, y=True)
    ax.legend(loc="upper right")
    fig.colorbar(im, ax=ax, label=r"$|\cos_q|\,|\cos_k|$")
    worst = np.nan_to_num(_np(al.worst).astype(float), nan=0.0)
    if strengths is not None:
        from scipy.stats import spearmanr
        ax = axd["b"]
        st = np.asarray(strengths, dtype=float)
        sg = _np(al.sigma).astype(float)
        good = np.isfinite(sg)
        yes = good & (worst >= threshold)
        no = good & (worst < threshold)
        ax.scatter(st[yes], sg[yes], s=22, color="tab:blue", label="aligned")
        ax.scatter(st[no], sg[no], s=30, marker="x", color="tab:red", label="not aligned")
        rho = spearmanr(st[good], sg[good]).statistic if good.sum() > 2 else float("nan")
        ax.set_xlabel(r"template strength $T_{ij}$")
        ax.set_ylabel(r"$\sigma_k$ at assigned $k$")
        ax.set_title(rf"(b) Spearman $\rho$ = {rho:.3f}")
        ax.legend(loc="lower right", handletextpad=0.2)
    ax = axd["c"]
    x = np.arange(P)
    ax.bar(x - 0.2, _np(al.cos_q), width=0.4, color="tab:blue", label=r"query $|\cos(w_i, u_k)|$")
    ax.bar(x + 0.2, _np(al.cos_k), width=0.4, color="tab:orange", label=r"key $|\cos(w_j, v_k)|$")
    ax.axhline(al.chance, color="k", ls=":", label=f"chance ({al.chance:.2f})")
    ax.axhline(threshold, color="tab:red", ls="--", label=f"threshold {threshold:g}")
    ax.set_ylim(0, 1.0)
    ax.set_xlim(-0.6, P - 0.4)
    ax.set_xlabel(r"template pair $p$")
    ax.set_ylabel(r"$|\cos|$ at assigned $k$")
    ax.set_title(f"(c) {al.n_aligned(threshold)} of {P} aligned")
    if P <= 8:
        ax.set_xticks(np.arange(P))
    else:
        _int_ticks(ax)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, frameon=False)
    _suptitle(fig, title)
    return fig


@book_figure
def pairs_over_seeds(worst: Tensor, seeds: Sequence[int], strengths: Optional[Sequence[float]] = None, *,
                     threshold: float = 0.9, title: Optional[str] = None) -> Figure:
    """Many pairs over several seeds: (a) number of pairs aligned (both ``|cos| >= threshold``) per
    seed; (b) every pair's smaller cosine on every seed (pairs x seeds), unaligned cells crossed.

    Args:
        worst: ``(n_seeds, P)`` the smaller of ``|cos q|``, ``|cos k|`` of each pair at its assigned
            index (``PairAlignment.worst`` of each run).
        seeds: the ``n_seeds`` seeds, in the order of ``worst``'s rows.
        strengths: optional ``P`` template strengths (the axis then says that they fall).
    """
    w = np.nan_to_num(_np(worst).astype(float), nan=0.0)
    n_seeds, P = w.shape
    fig, (a, b) = subplots(1, 2, height=3.6, gridspec_kw={"width_ratios": [1, 1.35]}, layout="constrained")
    counts = (w >= threshold).sum(1)
    a.bar(np.arange(n_seeds), counts, color="tab:blue")
    for i, c in enumerate(counts):
        a.text(i, c + 0.2, str(int(c)), ha="center", va="bottom")
    a.set_xticks(np.arange(n_seeds), [str(s) for s in seeds])
    a.set_ylim(0, P * 1.15 + 1)
    a.axhline(P, color="k", ls=":", lw=1)
    a.set_xlabel("seed")
    a.set_ylabel(f"pairs aligned (of {P})")
    a.set_title("(a) aligned pairs")
    _int_ticks(a, x=False, y=True)
    im = b.imshow(w.T, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    bad = np.argwhere(w < threshold)
    b.scatter(bad[:, 0], bad[:, 1], marker="x", color="red", s=30)
    b.set_xticks(np.arange(n_seeds), [str(s) for s in seeds])
    b.set_xlabel("seed")
    b.set_ylabel(r"pair $p$" + (" (weaker downwards)" if strengths is not None else ""))
    _int_ticks(b, x=False, y=True)
    b.set_title(rf"(b) $\min(|\cos_q|, |\cos_k|)$; $\times$: < {threshold:g}")
    fig.colorbar(im, ax=b)
    _suptitle(fig, title)
    return fig


_SETTLE = {"alignment": ("tab:green", "alignment"), "interference": ("tab:purple", "interference"),
           "loss_attn": ("tab:orange", r"$L_\mathrm{attn}$"), "loss_recon": ("tab:blue", r"$L_\mathrm{recon}$")}


@book_figure
def training_dynamics(history, settle: Optional[Mapping[str, float]] = None, *,
                      title: Optional[str] = None) -> Figure:
    """Losses (top, log scale) and alignment / interference (bottom) against the training step;
    ``settle`` maps a curve name to the step at which it settled (dotted vertical lines, listed
    in the legend below the panels)."""
    from matplotlib.lines import Line2D

    step = _np(history.step)
    fig, (a1, a2) = subplots(2, 1, height=5.6, sharex=True, layout="constrained")
    a1.plot(step, _np(history.loss_recon), label=r"$L_\mathrm{recon}$", color="tab:blue")
    a1.plot(step, _np(history.loss_attn), label=r"$L_\mathrm{attn}$", color="tab:orange")
    a1.set_yscale("log")
    a1.set_ylabel("loss per example")
    a1.set_title("(a) losses")
    a1.legend(loc="upper right")
    worst = torch.minimum(history.cos_q, history.cos_k)
    a2.plot(step, _np(worst.min(1).values), label=r"alignment, $\min |\cos|$", color="tab:green")
    if worst.shape[1] > 1:
        a2.plot(step, _np(worst.median(1).values), label="alignment, median", color="tab:green", ls="--")
    a2.plot(step, _np(history.interference.max(1).values), label="interference", color="tab:purple")
    a2.set_ylim(0, 1.02)
    a2.set_xlabel("training step")
    a2.set_ylabel(r"$|\cos|$")
    a2.set_title("(b) alignment and interference of the attended features")
    a2.legend(loc="center right")
    handles = []
    for name, s in (settle or {}).items():
        color, label = _SETTLE.get(name, ("k", name))
        for a in (a1, a2):
            a.axvline(s, color=color, ls=":", lw=1.5)
        handles.append(Line2D([], [], color=color, ls=":", lw=1.5, label=f"{label} settles (step {int(s)})"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=2, frameon=False)
    _suptitle(fig, title)
    return fig


@book_figure
def sweep(df, params: Sequence[str], metric: str, *, ylabel: str, ref: Optional[float] = None,
          ref_label: str = "reference", log_x: Sequence[str] = (), higher_is_better: bool = True,
          ylim: Optional[tuple] = None, title: Optional[str] = None) -> Figure:
    """One panel per swept parameter: ``metric``'s mean +- standard deviation over seeds against
    the value, and the worst seed (the minimum when ``higher_is_better``, else the maximum).

    ``df`` has columns ``param``, ``value``, ``seed`` and ``metric`` (as made by
    :func:`svtools.toy.sweep`). ``ref`` draws a horizontal reference line. Ticks sit at the swept
    values; two panels per row, the legend in the last free panel (or below)."""
    ncols = 2 if len(params) > 1 else 1
    nrows = -(-len(params) // ncols)
    fig, axes = subplots(nrows, ncols, height=1.85 * nrows + 0.5, squeeze=False, sharey=True,
                         layout="constrained")
    worst_fn = "min" if higher_is_better else "max"
    for n, p in enumerate(params):
        a = axes[n // ncols, n % ncols]
        d = df[df["param"] == p].groupby("value")[metric].agg(["mean", "std", worst_fn])
        xs = d.index.to_numpy(dtype=float)
        eb = a.errorbar(xs, d["mean"], yerr=d["std"].fillna(0), marker="o", ms=5, capsize=3,
                        label="mean ± sd over seeds")
        for artist in [eb.lines[0], *eb.lines[1], *eb.lines[2]]:
            artist.set_clip_on(False)                      # points at the axis limit (|cos| = 1) stay whole
        a.plot(xs, d[worst_fn], "v" if higher_is_better else "^", color="tab:red", ms=6, label="worst seed",
               clip_on=False)
        if ref is not None:
            a.axhline(ref, color="k", ls=":", label=ref_label)
        if p in log_x:
            a.set_xscale("log")
        a.set_xticks(xs, [f"{v:g}" for v in xs])
        a.minorticks_off()
        a.set_xlabel(PARAM_LABELS.get(p, p))
        if ylim is not None:
            a.set_ylim(*ylim)
        if n % ncols == 0:
            a.set_ylabel(ylabel)
    h, lab = axes[0, 0].get_legend_handles_labels()
    if len(params) < nrows * ncols:
        for n in range(len(params), nrows * ncols):
            axes[n // ncols, n % ncols].axis("off")
        last = axes[-1, -1]
        last.legend(h, lab, loc="center", frameon=False)
    else:
        fig.legend(h, lab, loc="outside lower center", ncol=3, frameon=False)
    _suptitle(fig, title)
    return fig


@book_figure
def offset_alignment(offsets: Sequence[int], cos_q: Tensor, cos_k: Tensor, sigma_ratio: Tensor, *,
                     title: Optional[str] = None) -> Figure:
    """Rotary head: alignment of the template pair(s) with the singular vectors of ``Omega_Delta``
    at each offset ``Delta`` (``cos_q``/``cos_k``: ``(n_offsets, P)``; ``sigma_ratio``:
    ``(n_offsets,)``, the first singular value beyond the ``P`` pairs over the first)."""
    o = np.asarray(offsets)
    wq, wk = _np(cos_q), _np(cos_k)
    P = wq.shape[1] if wq.ndim > 1 else 1
    fig, (a1, a2) = subplots(1, 2, height=2.8, layout="constrained")
    a1.plot(o, wq.min(1), "o-", ms=4, label=r"query $|\cos(w_i, u)|$")
    a1.plot(o, wk.min(1), "s--", ms=4, label=r"key $|\cos(w_j, v)|$")
    a1.set_ylim(0, 1.05)
    a1.set_xlabel(r"offset $\Delta$ (tokens)")
    a1.set_ylabel(r"$|\cos|$" + (" (min over pairs)" if P > 1 else ""))
    a1.set_title("(a) alignment per offset")
    a1.legend(loc="lower left")
    _int_ticks(a1)
    a2.plot(o, _np(sigma_ratio), "o-", ms=4, color="tab:gray")
    a2.set_yscale("log")
    a2.set_xlabel(r"offset $\Delta$ (tokens)")
    a2.set_ylabel(rf"$\sigma_{{{P + 1}}} / \sigma_1$")
    a2.set_title("(b) second singular value")
    _int_ticks(a2)
    _suptitle(fig, title)
    return fig
