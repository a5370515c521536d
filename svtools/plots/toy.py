"""Figures of Part 1 (the toy model). Every function returns a matplotlib Figure."""

from __future__ import annotations

import warnings
from typing import Mapping, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from svtools.plots import book_figure, subplots
from svtools.alignment import PairAlignment
from svtools.geometry import feature_dimensionality, gram

__all__ = ["feature_geometry", "singular_spectrum", "pair_alignment", "pairs_over_seeds", "training_dynamics",
           "sweep", "offset_alignment"]

#: Widest figure (inches): the book's text column. Figures are drawn at this width or less so
#: that they are shown at 100 % and their 8-10 pt text stays >= 10 px on screen.
WIDTH = 7.0


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _figure(figsize) -> Figure:
    """An empty Figure detached from pyplot (as :func:`svtools.plots.subplots` does)."""
    fig = plt.figure(figsize=figsize)
    plt.close(fig)
    return fig


def _suptitle(fig: Figure, title: Optional[str]) -> None:
    if title:
        import textwrap
        fig.suptitle(textwrap.fill(title, 90), fontsize=10)


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
    """Cosine Gram matrices (top) and Elhage et al. dimensionality per feature (bottom), one
    column per entry of ``features`` (``name -> W (D, N)``). Attended features are drawn in red."""
    names = list(features)
    fig, axes = subplots(2, len(names), figsize=(min(WIDTH, 3.5 * len(names)), 6.4), squeeze=False,
                         gridspec_kw={"height_ratios": [3, 1.4]})
    att = set(int(a) for a in attended)
    for c, name in enumerate(names):
        W = features[name]
        G = _np(gram(W, normalize=True))
        ax = axes[0, c]
        im = ax.imshow(G, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}\ncos(w_i, w_j)", fontsize=10)
        ax.set_xlabel("feature j (index)")
        ax.set_ylabel("feature i (index)")
        _int_ticks(ax, x=True, y=True, nbins=5)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine (unitless)")
        dims = _np(feature_dimensionality(W))
        colors = ["tab:red" if i in att else "tab:gray" for i in range(len(dims))]
        axb = axes[1, c]
        axb.bar(np.arange(len(dims)), dims, color=colors)
        axb.set_ylim(0, 1.0)
        axb.set_xlabel("feature (index; red = attended)")
        axb.set_ylabel("dimensionality D_i")
        _int_ticks(axb)
    _suptitle(fig, title)
    fig.tight_layout()
    return fig


@book_figure
def singular_spectrum(S: Tensor, al: Optional[PairAlignment] = None, *, n_show: int = 10,
                      title: Optional[str] = None) -> Figure:
    """Singular values of ``Omega`` (left, log scale) and, if ``al`` is given, the ``|cos|`` of
    every feature with the first ``n_show`` left (query side) and right (key side) singular vectors."""
    S = _np(S)
    fig = _figure((WIDTH, 3.2 if al is None else 6.6))
    axd = fig.subplot_mosaic([["s"]] if al is None else [["s", "s"], ["u", "v"]],
                             gridspec_kw=None if al is None else {"height_ratios": [1, 1.5]})
    ax = axd["s"]
    ax.bar(np.arange(len(S)), S, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("singular index k")
    ax.set_ylabel("sigma_k (logit units)")
    ax.set_title("spectrum of Omega", fontsize=10)
    _int_ticks(ax)
    if al is not None:
        k = min(n_show, al.cos_U.shape[1])
        for key, mat, side in (("u", al.cos_U, "u_k (query side)"), ("v", al.cos_V, "v_k (key side)")):
            a = axd[key]
            im = a.imshow(_np(mat[:, :k]), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                          interpolation="nearest")
            a.set_xlabel("singular index k")
            a.set_ylabel("feature n (index)")
            a.set_title(f"|cos(w_n, {side})|", fontsize=10)
            _int_ticks(a, x=True, y=True)
            fig.colorbar(im, ax=a, fraction=0.06, pad=0.03, label="|cosine| (unitless)")
    _suptitle(fig, title)
    fig.tight_layout()
    return fig


@book_figure
def pair_alignment(al: PairAlignment, strengths: Optional[Sequence[float]] = None, *,
                   n_show: Optional[int] = None, threshold: float = 0.9,
                   title: Optional[str] = None) -> Figure:
    """Many pairs: (a) per-pair score ``|cos(w_i,u_k)| |cos(w_j,v_k)|`` over singular indices with
    the assigned index circled; (b) if ``strengths`` is given, the assigned singular value against
    the strength, coloured by the pair's smaller cosine (with a colour bar); (c) the two cosines of
    each pair at its index, with chance and the threshold."""
    P = len(al.pairs)
    r = al.cos_U.shape[1]
    n_show = r if n_show is None else min(n_show, r)
    score = _np(al.cos_U[al.pairs[:, 0], :n_show] * al.cos_V[al.pairs[:, 1], :n_show])
    fig = _figure((WIDTH, 6.6))
    layout = [["a", "c"], ["b", "b"]] if strengths is not None else [["a", "a"], ["b", "b"]]
    axd = fig.subplot_mosaic(layout, gridspec_kw={"height_ratios": [1.1, 1], "wspace": 0.45})
    ax = axd["a"]
    im = ax.imshow(score, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    idx = _np(al.index)
    ok = (idx >= 0) & (idx < n_show)
    ax.scatter(idx[ok], np.arange(P)[ok], s=30, facecolors="none", edgecolors="red", label="assigned")
    ax.set_xlabel("singular index k")
    ax.set_ylabel("template pair p")
    ax.set_title("(a) |cos(w_i,u_k)| |cos(w_j,v_k)|", fontsize=10)
    _int_ticks(ax, x=True, y=True)
    fig.colorbar(im, ax=ax, fraction=0.06, pad=0.03, label="product")
    ax = axd["b"]
    x = np.arange(P)
    ax.bar(x - 0.2, _np(al.cos_q), width=0.4, label="query |cos(w_i, u_k)|")
    ax.bar(x + 0.2, _np(al.cos_k), width=0.4, label="key |cos(w_j, v_k)|")
    ax.axhline(al.chance, color="k", ls=":", label=f"chance ({al.chance:.2f})")
    ax.axhline(threshold, color="tab:red", ls="--", label=f"threshold {threshold}")
    ax.set_ylim(0, 1.0)
    ax.set_xlim(-0.6, P - 0.4)
    ax.set_xlabel("template pair p (index; no bar: the pair got no singular index)")
    ax.set_ylabel("|cosine| at assigned k")
    ax.set_title(f"(c) {al.n_aligned(threshold)}/{P} pairs with both >= {threshold}", fontsize=10)
    if P <= 25:
        ax.set_xticks(np.arange(P))
    else:
        _int_ticks(ax)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    if strengths is not None:
        from scipy.stats import spearmanr
        ax = axd["c"]
        st = np.asarray(strengths, dtype=float)
        sg = _np(al.sigma)
        good = np.isfinite(sg)
        sc = ax.scatter(st[good], sg[good], c=_np(al.worst)[good], cmap="viridis", vmin=0, vmax=1, s=18)
        rho = spearmanr(st[good], sg[good]).statistic if good.sum() > 2 else float("nan")
        ax.set_xlabel("template strength T_ij")
        ax.set_ylabel("sigma_k")
        ax.set_title(f"(b) Spearman rho = {rho:.3f}", fontsize=10)
        fig.colorbar(sc, ax=ax, fraction=0.06, pad=0.03, label="pair's min |cos|")
    _suptitle(fig, title)
    with warnings.catch_warnings():
        # the colour bars' axes are outside tight_layout's grid; they keep the place colorbar() gave them
        warnings.filterwarnings("ignore", message="This figure includes Axes that are not compatible")
        fig.tight_layout()
    return fig


@book_figure
def pairs_over_seeds(worst: Tensor, seeds: Sequence[int], strengths: Optional[Sequence[float]] = None, *,
                     threshold: float = 0.9, title: Optional[str] = None) -> Figure:
    """Many pairs over several seeds: (a) number of pairs aligned (both ``|cos| >= threshold``) per
    seed; (b) every pair's smaller cosine on every seed (pairs x seeds, colour bar), unaligned
    cells marked with a cross.

    Args:
        worst: ``(n_seeds, P)`` the smaller of ``|cos q|``, ``|cos k|`` of each pair at its assigned
            index (``PairAlignment.worst`` of each run).
        seeds: the ``n_seeds`` seeds, in the order of ``worst``'s rows.
        strengths: optional ``P`` template strengths, shown in the pair labels.
    """
    w = np.nan_to_num(_np(worst).astype(float), nan=0.0)
    n_seeds, P = w.shape
    fig, (a, b) = subplots(1, 2, figsize=(WIDTH, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    counts = (w >= threshold).sum(1)
    a.bar(np.arange(n_seeds), counts, color="tab:blue")
    for i, c in enumerate(counts):
        a.text(i, c + 0.1, str(int(c)), ha="center", va="bottom", fontsize=9)
    a.set_xticks(np.arange(n_seeds))
    a.set_xticklabels([str(s) for s in seeds])
    a.set_ylim(0, P + 1.5)
    a.axhline(P, color="k", ls=":", lw=1)
    a.set_xlabel("seed")
    a.set_ylabel(f"pairs aligned (of {P})")
    a.set_title(f"(a) pairs with both |cos| >= {threshold}", fontsize=10)
    _int_ticks(a, x=False, y=True)
    im = b.imshow(w.T, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    bad = np.argwhere(w < threshold)
    b.scatter(bad[:, 0], bad[:, 1], marker="x", color="red", s=30, label=f"below {threshold}")
    b.set_xticks(np.arange(n_seeds))
    b.set_xticklabels([str(s) for s in seeds])
    b.set_xlabel("seed")
    b.set_ylabel("template pair p" + (" (strength falls down the axis)" if strengths is not None else ""))
    _int_ticks(b, x=False, y=True)
    b.set_title("(b) each pair's min |cos|", fontsize=10)
    fig.colorbar(im, ax=b, fraction=0.06, pad=0.03, label="min(|cos q|, |cos k|)")
    if len(bad):
        b.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    _suptitle(fig, title)
    fig.tight_layout()
    return fig


@book_figure
def training_dynamics(history, settle: Optional[Mapping[str, float]] = None, *,
                      title: Optional[str] = None) -> Figure:
    """Losses (top, log scale) and alignment / interference (bottom) against the training step.
    ``settle`` maps a curve name to the step at which it settled (drawn as vertical lines).
    Legends sit beside the axes, not over the curves."""
    step = _np(history.step)
    fig, (a1, a2) = subplots(2, 1, figsize=(WIDTH, 6.0), sharex=True)
    a1.plot(step, _np(history.loss_recon), label="L_recon", color="tab:blue")
    a1.plot(step, _np(history.loss_attn), label="L_attn", color="tab:orange")
    a1.set_yscale("log")
    a1.set_ylabel("loss per example\n(log scale)")
    worst = torch.minimum(history.cos_q, history.cos_k)
    a2.plot(step, _np(worst.min(1).values), label="alignment\n(min |cos|)", color="tab:green")
    if worst.shape[1] > 1:
        a2.plot(step, _np(worst.median(1).values), label="alignment\n(median)", color="tab:green", ls="--")
    a2.plot(step, _np(history.interference.max(1).values),
            label="interference\n(max |cos| of an\nattended feature\nwith any other)", color="tab:purple")
    a2.set_ylim(0, 1.0)
    a2.set_xlabel("training step")
    a2.set_ylabel("|cosine| (unitless)")
    colors = {"alignment": "tab:green", "interference": "tab:purple", "loss_attn": "tab:orange",
              "loss_recon": "tab:blue"}
    for name, s in (settle or {}).items():
        for a in (a1, a2):
            a.axvline(s, color=colors.get(name, "k"), ls=":", lw=1.5)
    if settle:
        from matplotlib.lines import Line2D
        a1.add_artist(a1.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False))
        a1.legend(handles=[Line2D([], [], color=colors.get(n, "k"), ls=":", label=f"{n} settles\n(step {int(s)})")
                           for n, s in settle.items()], fontsize=8, loc="lower left",
                  bbox_to_anchor=(1.01, -0.35), frameon=False)
    else:
        a1.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    a2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 0.75), frameon=False)
    _suptitle(fig, title)
    fig.tight_layout()
    return fig


@book_figure
def sweep(df, params: Sequence[str], metric: str, *, ylabel: str, ref: Optional[float] = None,
          ref_label: str = "paper", log_x: Sequence[str] = (), higher_is_better: bool = True,
          ylim: Optional[tuple] = None, title: Optional[str] = None) -> Figure:
    """One panel per swept parameter: ``metric`` mean +- std over seeds against the value, and the
    worst seed (the minimum when ``higher_is_better``, else the maximum).

    ``df`` has columns ``param``, ``value``, ``seed`` and ``metric`` (as made by
    :func:`svtools.toy.sweep`). ``ref`` draws a horizontal reference line. Ticks sit at the swept
    values."""
    ncols = min(3, len(params))
    nrows = -(-len(params) // ncols)
    fig, axes = subplots(nrows, ncols, figsize=(WIDTH, 2.6 * nrows + 0.6), squeeze=False, sharey=True)
    worst_fn = "min" if higher_is_better else "max"
    for n, p in enumerate(params):
        a = axes[n // ncols, n % ncols]
        d = df[df["param"] == p].groupby("value")[metric].agg(["mean", "std", worst_fn])
        xs = d.index.to_numpy(dtype=float)
        eb = a.errorbar(xs, d["mean"], yerr=d["std"].fillna(0), marker="o", capsize=3, label="mean +- std")
        for artist in [eb.lines[0], *eb.lines[1], *eb.lines[2]]:
            artist.set_clip_on(False)                      # points at the axis limit (|cos| = 1) stay whole
        a.plot(xs, d[worst_fn], "v" if higher_is_better else "^", color="tab:red", ms=6, label="worst seed",
               clip_on=False)
        if ref is not None:
            a.axhline(ref, color="k", ls=":", label=ref_label)
        if p in log_x:
            a.set_xscale("log")
        a.set_xticks(xs)
        a.set_xticklabels([f"{v:g}" for v in xs])
        a.minorticks_off()
        a.set_xlabel(p)
        if ylim is not None:
            a.set_ylim(*ylim)
        if n % ncols == 0:
            a.set_ylabel(ylabel)
    for n in range(len(params), nrows * ncols):
        axes[n // ncols, n % ncols].axis("off")
    h, lab = axes[0, 0].get_legend_handles_labels()
    fig.legend(h, lab, fontsize=8, loc="lower center", ncol=3, frameon=False)
    _suptitle(fig, title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


@book_figure
def offset_alignment(offsets: Sequence[int], cos_q: Tensor, cos_k: Tensor, sigma_ratio: Tensor, *,
                     title: Optional[str] = None) -> Figure:
    """Rotary head: alignment of the template pair(s) with the decomposition at each offset
    (``cos_q``/``cos_k``: ``(n_offsets, P)``; ``sigma_ratio``: ``(n_offsets,)``)."""
    o = np.asarray(offsets)
    fig, (a1, a2) = subplots(1, 2, figsize=(WIDTH, 3.4))
    wq, wk = _np(cos_q), _np(cos_k)
    a1.plot(o, wq.min(1), "o-", ms=4, label="|cos(w_i, u_k)|")
    a1.plot(o, wk.min(1), "s--", ms=4, label="|cos(w_j, v_k)|")
    a1.set_ylim(0, 1.0)
    a1.set_xlabel("offset (query - key position)")
    a1.set_ylabel("|cosine| (min over pairs)")
    a1.legend(fontsize=8, loc="lower left")
    _int_ticks(a1)
    a2.plot(o, _np(sigma_ratio), "o-", ms=4, color="tab:gray")
    a2.set_yscale("log")
    a2.set_xlabel("offset (tokens)")
    a2.set_ylabel("sigma_(P+1) / sigma_1")
    _int_ticks(a2)
    _suptitle(fig, title)
    fig.tight_layout()
    return fig
