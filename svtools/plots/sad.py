"""Figures of Part 3: sparse attention decomposition (SAD) and its rotated control.

Every function returns a matplotlib Figure. Inputs are the frames of :mod:`svtools.sad`
(:func:`~svtools.sad.head_sparsity`, :func:`~svtools.sad.toy_sparsity`,
:func:`~svtools.sad.bootstrap`, :func:`~svtools.sad.singular_vector_usage`) or plain arrays.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from svtools.plots import subplots
from svtools._checks import SVToolsError

__all__ = ["plot_n_recon_distribution", "plot_pair_terms", "plot_n_recon_per_head", "plot_sparseness_map",
           "plot_dominant_index", "plot_usage", "plot_summary", "plot_emergence"]

REAL, ROT = "tab:blue", "tab:gray"


def _values(x: Any, name: str) -> np.ndarray:
    v = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        raise SVToolsError(f"{name} is empty (no selected pairs?)")
    return v


def _need(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    from svtools.sad import _check_columns

    _check_columns(df, cols, what)


def plot_n_recon_distribution(
    data: Any,
    rotated: Any = None,
    *,
    measure: str = "n_recon",
    ax: Optional[plt.Axes] = None,
    title: Optional[str] = None,
    label: str = "singular basis",
) -> Figure:
    """Distribution of N_recon (or another per-pair measure) in the singular vs rotated basis.

    Args:
        data: a :func:`~svtools.sad.head_sparsity` / :func:`~svtools.sad.toy_sparsity` frame
            (columns ``measure`` and ``measure + "_rotated"`` are read), or an array of values
            in the singular basis.
        rotated: with an array ``data``, the rotated-control values (optional).
        measure: ``"n_recon"`` (integer bars, one per value) or ``"rolls_tovee"`` (histogram).
        ax: draw into this axes (else a new figure).
    Each distribution is normalised to a fraction of pairs; medians are marked by dashed lines.
    """
    if isinstance(data, pd.DataFrame):
        _need(data, [measure], "plot_n_recon_distribution")
        real = _values(data[measure], measure)
        rot_col = measure + "_rotated"
        rot = _values(data[rot_col], rot_col) if rot_col in data and data[rot_col].notna().any() else None
    else:
        real = _values(data, "data")
        rot = None if rotated is None else _values(rotated, "rotated")
    fig, ax = (ax.figure, ax) if ax is not None else subplots(figsize=(6, 3.6))
    series = [(real, label, REAL)] + ([(rot, "rotated control", ROT)] if rot is not None else [])
    integer = measure.startswith("n_recon") and all(np.allclose(v, np.round(v)) for v, _, _ in series)
    if integer:
        hi = int(max(v.max() for v, _, _ in series))
        ks = np.arange(0, hi + 1)
        w = 0.8 / len(series)
        for i, (v, lab, c) in enumerate(series):
            frac = np.bincount(v.astype(int), minlength=hi + 1) / len(v)
            ax.bar(ks + (i - (len(series) - 1) / 2) * w, frac, width=w, color=c, label=f"{lab} (median {np.median(v):g})")
        ax.set_xlabel("N_recon (number of terms needed to reconstruct the score)")
    else:
        bins = np.linspace(min(v.min() for v, _, _ in series), max(v.max() for v, _, _ in series), 31)
        for v, lab, c in series:
            ax.hist(v, bins=bins, weights=np.full(len(v), 1 / len(v)), color=c, alpha=0.6,
                    label=f"{lab} (median {np.median(v):.2f})")
        ax.set_xlabel(measure.replace("_", " ") + (" (1 = dense, 1/r = one term)" if "rolls" in measure else ""))
    for v, _, c in series:
        ax.axvline(np.median(v), color=c, ls="--", lw=1)
    ax.set_ylabel("fraction of selected pairs")
    ax.set_title(title or f"{measure.replace('_', ' ')}: singular basis vs rotated control ({len(real)} pairs)")
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def plot_pair_terms(
    terms: Any,
    rotated_terms: Any = None,
    sigma: Any = None,
    *,
    title: Optional[str] = None,
    frac: float = 1.0,
) -> Figure:
    """One pair's score terms over the singular index, next to the same score's rotated terms.

    Args:
        terms: ``(r,)`` terms ``sigma_k (u_k . x)(v_k . y)`` of one pair.
        rotated_terms: ``(r,)`` terms of the same score in the rotated basis (optional panel).
        sigma: ``(r,)`` singular values, drawn as a line on a second axis of the first panel.
        frac: N_recon fraction; the N_recon terms are drawn dark, the rest light.
    The panel titles give the total score, N_recon and the Rolls-Tovee sparseness.
    """
    import torch

    from svtools.sparsity import n_recon, rolls_tovee

    panels = [(_values(terms, "terms"), "singular basis", REAL)]
    if rotated_terms is not None:
        panels.append((_values(rotated_terms, "rotated_terms"), "rotated control", ROT))
    r = len(panels[0][0])
    if any(len(p[0]) != r for p in panels):
        raise SVToolsError("terms and rotated_terms must have the same length r")
    fig, axes = subplots(1, len(panels), figsize=(5.2 * len(panels), 3.4), sharey=True, squeeze=False)
    for ax, (v, lab, c) in zip(axes[0], panels):
        t = torch.as_tensor(v)
        nr, rt = int(n_recon(t, frac)), float(rolls_tovee(t))
        s = 1.0 if v.sum() >= 0 else -1.0
        order = np.argsort(-s * v, kind="stable")
        used = np.zeros(r, bool)
        used[order[:nr]] = True
        ax.bar(np.arange(r)[used], v[used], color=c, label=f"the {nr} terms of N_recon")
        ax.bar(np.arange(r)[~used], v[~used], color=c, alpha=0.3, label="other terms")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("singular index k (sigma descending)" if lab == "singular basis" else "rotated direction k")
        ax.set_title(f"{lab}: score {v.sum():.3g}, N_recon {nr}, RT {rt:.2f}", fontsize=10)
        ax.legend(frameon=False, fontsize=8, loc="upper right")
    axes[0, 0].set_ylabel("term (contribution to the unscaled score)")
    if sigma is not None:
        sg = _values(sigma, "sigma")
        if len(sg) != r:
            raise SVToolsError(f"sigma has length {len(sg)}, terms {r}")
        tw = axes[0, 0].twinx()
        tw.plot(np.arange(r), sg, color="tab:orange", marker=".", lw=1)
        tw.set_ylabel("singular value sigma_k", color="tab:orange")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_n_recon_per_head(df: pd.DataFrame, heads: Optional[Sequence[tuple[int, int]]] = None, *,
                          measure: str = "n_recon", title: Optional[str] = None) -> Figure:
    """Box plots of N_recon per head, singular basis next to the rotated control (paper Fig. 9).

    ``heads``: ``(layer, head)`` pairs to show (default: every head with selected pairs). The
    number of pairs of each head is written under its label.
    """
    _need(df, ["layer", "head", measure], "plot_n_recon_per_head")
    if heads is None:
        heads = sorted({(int(a), int(b)) for a, b in zip(df["layer"], df["head"])})
    heads = [tuple(h) for h in heads]
    rot_col = measure + "_rotated"
    has_rot = rot_col in df and df[rot_col].notna().any()
    fig, ax = subplots(figsize=(max(5, 0.75 * len(heads) + 2), 3.8))
    labels, pos = [], np.arange(len(heads), dtype=float)
    for i, (l, h) in enumerate(heads):
        sub = df[(df["layer"] == l) & (df["head"] == h)]
        labels.append(f"{l}.{h}\n(n={len(sub)})")
        if len(sub) == 0:
            continue
        b = ax.boxplot([sub[measure].to_numpy()], positions=[pos[i] - (0.2 if has_rot else 0)], widths=0.35,
                       patch_artist=True, showfliers=False)
        b["boxes"][0].set_facecolor(REAL)
        if has_rot:
            b = ax.boxplot([sub[rot_col].to_numpy()], positions=[pos[i] + 0.2], widths=0.35, patch_artist=True,
                           showfliers=False)
            b["boxes"][0].set_facecolor(ROT)
    ax.set_xticks(pos)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_xlabel("head (layer.head)")
    ax.set_ylabel(measure.replace("_", " ") + (" (terms)" if measure == "n_recon" else ""))
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color=REAL, label="singular basis")] + ([Patch(color=ROT, label="rotated control")]
                                                                   if has_rot else []), frameon=False)
    ax.set_title(title or f"{measure.replace('_', ' ')} per head (boxes: quartiles, whiskers 1.5 IQR)")
    fig.tight_layout()
    return fig


def plot_sparseness_map(df: pd.DataFrame, *, measure: str = "rolls_tovee", n_layers: Optional[int] = None,
                        n_heads: Optional[int] = None, min_pairs: int = 5, title: Optional[str] = None) -> Figure:
    """Layer x head maps: mean sparseness in the singular basis, in the rotated control, and their
    difference (singular minus rotated; negative = sparser than the control).

    Heads with fewer than ``min_pairs`` selected pairs are left blank.
    """
    _need(df, ["layer", "head", measure, measure + "_rotated"], "plot_sparseness_map")
    n_layers = n_layers or int(df["layer"].max()) + 1
    n_heads = n_heads or int(df["head"].max()) + 1
    g = df.groupby(["layer", "head"])
    mean = g[[measure, measure + "_rotated"]].mean()
    cnt = g.size()
    mats = [np.full((n_layers, n_heads), np.nan) for _ in range(3)]
    for (l, h), row in mean.iterrows():
        if cnt[(l, h)] >= min_pairs:
            mats[0][l, h] = row[measure]
            mats[1][l, h] = row[measure + "_rotated"]
            mats[2][l, h] = row[measure] - row[measure + "_rotated"]
    fig, axes = subplots(1, 3, figsize=(15, 0.45 * n_layers + 2.2))
    finite = np.concatenate([m[np.isfinite(m)] for m in mats[:2]]) if np.isfinite(mats[0]).any() else np.array([0, 1])
    vmin, vmax = float(finite.min()), float(finite.max())
    d = np.nanmax(np.abs(mats[2])) if np.isfinite(mats[2]).any() else 1.0
    names = {"rolls_tovee": "Rolls-Tovee sparseness", "n_recon": "N_recon"}
    nm = names.get(measure, measure)
    for ax, m, t, kw in zip(axes, mats, [f"{nm}: singular basis", f"{nm}: rotated control",
                                         "singular minus rotated"],
                            [dict(cmap="viridis", vmin=vmin, vmax=vmax), dict(cmap="viridis", vmin=vmin, vmax=vmax),
                             dict(cmap="RdBu_r", vmin=-d, vmax=d)]):
        im = ax.imshow(m, aspect="auto", origin="upper", **kw)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(t, fontsize=10)
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        fig.colorbar(im, ax=ax, label=f"mean {nm} per pair")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_dominant_index(df: pd.DataFrame, *, title: Optional[str] = None) -> Figure:
    """Where the largest term sits in the spectrum (paper Fig. 8).

    Left: histogram of the dominant term's singular index ``k`` (0 = largest sigma) over all
    selected pairs, with the uniform level ``1/r`` for reference. Right: histogram of its relative
    singular value ``sigma_k / sigma_0``.
    """
    _need(df, ["dominant_k", "dominant_sigma", "r"], "plot_dominant_index")
    if df.empty:
        raise SVToolsError("plot_dominant_index: the frame has no pairs")
    r = int(df["r"].max())
    k = df["dominant_k"].to_numpy().astype(int)
    fig, axes = subplots(1, 2, figsize=(11, 3.6))
    frac = np.bincount(k, minlength=r) / len(k)
    axes[0].bar(np.arange(r), frac, color=REAL)
    axes[0].axhline(1 / r, color="k", ls=":", lw=1, label=f"uniform (1/{r})")
    axes[0].set_xlabel("singular index k of the largest term (0 = largest sigma)")
    axes[0].set_ylabel("fraction of selected pairs")
    top = np.mean(k < max(1, r // 8))
    axes[0].set_title(f"{100 * (1 - top):.0f}% of pairs: dominant term outside the top {max(1, r // 8)} of {r}",
                      fontsize=10)
    axes[0].legend(frameon=False)
    s = df["dominant_sigma"].to_numpy()
    axes[1].hist(s, bins=np.linspace(0, 1, 26), weights=np.full(len(s), 1 / len(s)), color=REAL)
    axes[1].set_xlabel("sigma_k / sigma_0 of the largest term")
    axes[1].set_ylabel("fraction of selected pairs")
    axes[1].set_title(f"median sigma_k / sigma_0 = {np.median(s):.2f}", fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_usage(df: pd.DataFrame, layer: int, head: int, *, max_prompts: int = 40,
               title: Optional[str] = None) -> Figure:
    """Which singular vectors one head's pairs use, prompt by prompt (reuse across prompts).

    Rows: prompts (up to ``max_prompts``); columns: singular index ``k``; a cell is the fraction of
    the prompt's selected pairs of this head whose N_recon set (column ``used``) contains ``k``.
    Columns that light up in every row are singular vectors the head reuses across prompts.
    """
    _need(df, ["layer", "head", "prompt", "used", "r"], "plot_usage")
    sub = df[(df["layer"] == layer) & (df["head"] == head)]
    if sub.empty:
        raise SVToolsError(f"head {layer}.{head} has no selected pairs in this frame")
    r = int(sub["r"].max())
    prompts = sorted(sub["prompt"].unique())[:max_prompts]
    M = np.zeros((len(prompts), r))
    row = {p: i for i, p in enumerate(prompts)}
    n = np.zeros(len(prompts))
    for p, used in zip(sub["prompt"], sub["used"]):
        if p in row:
            M[row[p], list(used)] += 1
            n[row[p]] += 1
    M /= np.maximum(n, 1)[:, None]
    fig, ax = subplots(figsize=(min(12, 2 + 0.18 * r), 0.12 * len(prompts) + 1.8))
    im = ax.imshow(M, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("singular index k (0 = largest sigma)")
    ax.set_ylabel("prompt")
    ax.set_title(title or f"head {layer}.{head}: singular vectors used per prompt ({len(sub)} pairs)", fontsize=10)
    fig.colorbar(im, ax=ax, label="fraction of the prompt's pairs using k")
    fig.tight_layout()
    return fig


def plot_summary(summary: pd.DataFrame, *, x: str = "layer", measure: str = "rolls_tovee",
                 xlabel: Optional[str] = None, title: Optional[str] = None, ax: Optional[plt.Axes] = None,
                 paper: Optional[tuple[float, float]] = None) -> Figure:
    """A bootstrap summary (:func:`svtools.sad.bootstrap`) against ``x``: singular basis and rotated
    control with their confidence intervals. ``paper``: an optional (lo, hi) band to shade
    (e.g. a reference range quoted in the caption)."""
    _need(summary, [x, "column", "estimate", "lo", "hi"], "plot_summary")
    fig, ax = (ax.figure, ax) if ax is not None else subplots(figsize=(6, 3.6))
    for col, lab, c in ((measure, "singular basis", REAL), (measure + "_rotated", "rotated control", ROT)):
        s = summary[summary["column"] == col].sort_values(x)
        if s.empty:
            continue
        ax.errorbar(s[x], s["estimate"], yerr=[s["estimate"] - s["lo"], s["hi"] - s["estimate"]],
                    marker="o", capsize=3, color=c, label=lab)
    if paper is not None:
        ax.axhspan(*paper, color="tab:orange", alpha=0.15, label="reference range")
    stat = summary["stat"].iloc[0] if "stat" in summary and len(summary) else "mean"
    ax.set_xlabel(xlabel or x)
    unit = " (1 = dense)" if "rolls" in measure else " (terms)" if "n_recon" in measure else ""
    ax.set_ylabel(f"{stat} {measure.replace('_', ' ')}{unit}")
    ax.set_title(title or f"{stat} {measure.replace('_', ' ')} with bootstrap CI over prompts", fontsize=10)
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def plot_emergence(summary: pd.DataFrame, *, x: str = "step", measures: Sequence[str] = ("rolls_tovee", "n_recon"),
                   logx: bool = True, title: Optional[str] = None, extra: Optional[pd.DataFrame] = None,
                   extra_label: str = "") -> Figure:
    """Sparseness over training (paper Fig. 7): one panel per measure, singular basis vs rotated
    control with bootstrap bands, against training ``x`` (step). ``extra``: an optional frame with
    columns ``x`` and ``value`` drawn on a second axis of the first panel (e.g. alignment cosine)."""
    _need(summary, [x, "column", "estimate", "lo", "hi"], "plot_emergence")
    fig, axes = subplots(1, len(measures), figsize=(5.5 * len(measures), 3.6), squeeze=False)
    for ax, m in zip(axes[0], measures):
        for col, lab, c in ((m, "singular basis", REAL), (m + "_rotated", "rotated control", ROT)):
            s = summary[summary["column"] == col].sort_values(x)
            if s.empty:
                continue
            ax.plot(s[x], s["estimate"], marker="o", color=c, label=lab)
            ax.fill_between(s[x], s["lo"], s["hi"], color=c, alpha=0.25)
        if logx:
            ax.set_xscale("symlog", linthresh=max(1.0, float(summary[x][summary[x] > 0].min())
                                                  if (summary[x] > 0).any() else 1.0))
        ax.set_xlabel(f"training {x}")
        unit = " (1 = dense)" if "rolls" in m else " (terms)" if "n_recon" in m else ""
        stat = summary["stat"].iloc[0] if "stat" in summary and len(summary) else "mean"
        ax.set_ylabel(f"{stat} {m.replace('_', ' ')}{unit}")
        ax.legend(frameon=False, loc="best")
    if extra is not None:
        _need(extra, [x, "value"], "plot_emergence(extra)")
        tw = axes[0, 0].twinx()
        e = extra.sort_values(x)
        tw.plot(e[x], e["value"], color="tab:orange", ls="--", marker=".", label=extra_label)
        tw.set_ylabel(extra_label, color="tab:orange")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
