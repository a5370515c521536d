"""Figures of Part 3: sparse attention decomposition (SAD), its calibrated spectrum null and the rotated control.

Every function returns a matplotlib Figure. The null's own figures (its calibration on inputs
without features, ratios real / null) are in :mod:`svtools.plots.null`. Inputs are the frames of :mod:`svtools.sad`
(:func:`~svtools.sad.head_sparsity`, :func:`~svtools.toy.toy_sparsity`,
:func:`~svtools.sad.bootstrap`, :func:`~svtools.sad.singular_vector_usage`) or plain arrays.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from svtools._checks import SVToolsError, check_columns
from svtools.plots import book_figure, subplots
from svtools.sparsity import n_recon, rolls_tovee

__all__ = ["plot_n_recon_distribution", "plot_pair_terms", "plot_n_recon_per_head", "plot_sparseness_map",
           "plot_dominant_index", "plot_usage", "plot_summary", "plot_emergence", "plot_lm_emergence",
           "plot_sad_vs_alignment", "plot_kind_summary", "KIND_COLORS"]

REAL, ROT, NULL = "tab:blue", "tab:gray", "tab:orange"
# Axis names of the measures, in mathtext.
NRECON = r"$N_\mathrm{recon}$"
RT_NAME = r"Rolls–Tovée $S$"
MEASURE_NAMES = {"n_recon": NRECON, "rolls_tovee": RT_NAME}
#: Colours of the pair kinds of :func:`svtools.sad.head_sparsity`, of the rotated control and of the null.
KIND_COLORS = {"attended": REAL, "non-attended": "tab:red", "random": "tab:green", "rotated": ROT, "null": NULL}


def _values(x: Any, name: str) -> np.ndarray:
    v = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        raise SVToolsError(f"{name} is empty (no selected pairs?)")
    return v


def _need(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    check_columns(df, cols, what)


@book_figure
def plot_n_recon_distribution(
    data: Any,
    rotated: Any = None,
    *,
    measure: str = "n_recon",
    ax: Optional[plt.Axes] = None,
    title: Optional[str] = None,
    label: str = "singular basis",
    compare_label: Optional[str] = None,
) -> Figure:
    """Distribution of N_recon (or another per-pair measure) in the singular basis and a control.

    Args:
        data: a :func:`~svtools.sad.head_sparsity` / :func:`~svtools.toy.toy_sparsity` frame
            (columns ``measure`` and, as the control, ``measure + "_null"`` (each pair's mean over
            the null heads) when present, else ``measure + "_rotated"``), or an array of values
            in the singular basis.
        rotated: with an array ``data``, the control's values (optional).
        measure: ``"n_recon"`` (integer bars, one per value) or ``"rolls_tovee"`` (histogram).
        compare_label: the control's name (default: "null heads" or "rotated control").
        ax: draw into this axes (else a new figure).
    Each distribution is normalised to a fraction of pairs; medians are marked by dashed lines.
    """
    if isinstance(data, pd.DataFrame):
        _need(data, [measure], "plot_n_recon_distribution")
        real = _values(data[measure], measure)
        rot = None
        for suffix, name in (("_null", "null heads"), ("_rotated", "rotated control")):
            col = measure + suffix
            if col in data and data[col].notna().any():
                rot, compare_label = _values(data[col], col), compare_label or name
                break
    else:
        real = _values(data, "data")
        rot = None if rotated is None else _values(rotated, "rotated")
    compare_label = compare_label or "rotated control"
    fig, ax = (ax.figure, ax) if ax is not None else subplots(height=3.4)
    series = [(real, label, REAL)] + ([(rot, compare_label, NULL if "null" in compare_label else ROT)]
                                      if rot is not None else [])
    integer = measure.startswith("n_recon") and all(np.allclose(v, np.round(v)) for v, _, _ in series)
    if measure.startswith("n_recon") and not integer:  # null means are not integers: one bar per unit bin
        series = [(np.round(v), lab, c) for v, lab, c in series]
        integer = True
    if integer:
        hi = int(max(v.max() for v, _, _ in series))
        ks = np.arange(0, hi + 1)
        w = 0.8 / len(series)
        for i, (v, lab, c) in enumerate(series):
            frac = np.bincount(v.astype(int), minlength=hi + 1) / len(v)
            ax.bar(ks + (i - (len(series) - 1) / 2) * w, frac, width=w, color=c, label=f"{lab} (median {np.median(v):g})")
        ax.set_xlabel(NRECON + " (terms needed to reach the score)")
    else:
        bins = np.linspace(min(v.min() for v, _, _ in series), max(v.max() for v, _, _ in series), 31)
        for v, lab, c in series:
            ax.hist(v, bins=bins, weights=np.full(len(v), 1 / len(v)), color=c, alpha=0.6,
                    label=f"{lab} (median {np.median(v):.2f})")
        ax.set_xlabel(MEASURE_NAMES.get(measure, measure.replace("_", " "))
                      + (r" (1 = dense, $1/r$ = one term)" if "rolls" in measure else ""))
    for v, _, c in series:
        ax.axvline(np.median(v), color=c, ls="--", lw=1)
    ax.set_ylabel("fraction of selected pairs")
    if title:
        ax.set_title(title)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 1.3)  # room for the legend above the bars
    ax.legend(frameon=True, loc="upper right")
    fig.tight_layout()
    return fig


@book_figure
def plot_pair_terms(
    terms: Any,
    rotated_terms: Any = None,
    sigma: Any = None,
    *,
    title: Optional[str] = None,
    frac: float = 1.0,
    compare_label: str = "rotated control",
) -> Figure:
    """One pair's score terms over the singular index, next to another set of terms for comparison.

    Args:
        terms: ``(r,)`` terms ``sigma_k (u_k . x)(v_k . y)`` of one pair.
        rotated_terms: ``(r,)`` terms to compare with (optional lower panel): the same score in
            the rotated basis, or the pair's terms under one null head
            (:mod:`svtools.sad.null`); ``compare_label`` names them.
        sigma: ``(r,)`` singular values, drawn as a line on a second axis of the first panel.
        frac: N_recon fraction; the N_recon terms are drawn dark, the rest light.
    The panel titles give the total score, N_recon and the Rolls-Tovee sparseness.
    """
    import torch

    panels = [(_values(terms, "terms"), "singular basis", REAL)]
    if rotated_terms is not None:
        panels.append((_values(rotated_terms, "rotated_terms"), compare_label,
                       ROT if "rotat" in compare_label else NULL))
    r = len(panels[0][0])
    if any(len(p[0]) != r for p in panels):
        raise SVToolsError("terms and rotated_terms must have the same length r")
    fig, axes = subplots(len(panels), 1, height=2.7 * len(panels), sharey=True, squeeze=False)
    axes = axes.T  # one row of panels, stacked top to bottom
    for ax, (v, lab, c) in zip(axes[0], panels):
        t = torch.as_tensor(v)
        nr, rt = int(n_recon(t, frac)), float(rolls_tovee(t))
        s = 1.0 if v.sum() >= 0 else -1.0
        order = np.argsort(-s * v, kind="stable")
        used = np.zeros(r, bool)
        used[order[:nr]] = True
        ax.bar(np.arange(r)[used], v[used], color=c, label=f"the {nr} terms of " + NRECON)
        ax.bar(np.arange(r)[~used], v[~used], color=c, alpha=0.3, label="other terms")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel(r"singular index $k$ ($\sigma_k$ descending)" if "rotat" not in lab
                      else r"rotated direction $k$")
        ax.set_title(f"{lab}: score {v.sum():.3g}, " + NRECON + f" = {nr}, $S$ = {rt:.2f}")
        ax.legend(frameon=True, loc="upper right")
    for ax in axes[0]:
        ax.set_ylabel(r"term $t_k$")
    lo, hi = axes[0, 0].get_ylim()
    axes[0, 0].set_ylim(lo, hi + 0.4 * (hi - lo))  # room for the legends above the bars (the panels share y)
    if sigma is not None:
        sg = _values(sigma, "sigma")
        if len(sg) != r:
            raise SVToolsError(f"sigma has length {len(sg)}, terms {r}")
        tw = axes[0, 0].twinx()
        tw.plot(np.arange(r), sg, color="tab:orange", marker=".", lw=1)
        tw.set_ylabel(r"$\sigma_k$", color="tab:orange")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


@book_figure
def plot_n_recon_per_head(df: pd.DataFrame, heads: Optional[Sequence[tuple[int, int]]] = None, *,
                          measure: str = "n_recon", title: Optional[str] = None) -> Figure:
    """Box plots of a measure per head (paper Fig. 9): attended pairs in the singular basis, next to
    the baselines that keep the spectrum (non-attended, random pairs; when the frame has a ``kind``
    column with them), the spectrum null of the attended pairs (each pair's mean over the null
    heads, column ``measure + "_null"``) and the rotated control, where the frame has them.

    ``heads``: ``(layer, head)`` pairs to show (default: every head with attended pairs). The
    number of attended pairs of each head is written under its label.
    """
    from matplotlib.patches import Patch

    _need(df, ["layer", "head", measure], "plot_n_recon_per_head")
    kind = df["kind"] if "kind" in df else pd.Series("attended", index=df.index)
    att = df[kind == "attended"]
    if heads is None:
        heads = sorted({(int(a), int(b)) for a, b in zip(att["layer"], att["head"])})
    heads = [tuple(h) for h in heads]
    rot_col = measure + "_rotated"
    groups = [("attended", measure, "attended pairs", KIND_COLORS["attended"])]
    for k, lab in (("non-attended", "non-attended pairs"), ("random", "random pairs")):
        if (kind == k).any():
            groups.append((k, measure, lab, KIND_COLORS[k]))
    null_col = measure + "_null"
    if null_col in df and att[null_col].notna().any():
        groups.append(("attended", null_col, "attended, null heads (mean)", KIND_COLORS["null"]))
    if rot_col in df and att[rot_col].notna().any():
        groups.append(("attended", rot_col, "attended, rotated basis", KIND_COLORS["rotated"]))
    w = 0.8 / len(groups)
    fig, ax = subplots(height=3.6)
    labels, pos = [], np.arange(len(heads), dtype=float)
    for i, (l, h) in enumerate(heads):
        here = (df["layer"] == l) & (df["head"] == h)
        labels.append(f"{l}.{h}\n(n={int((here & (kind == 'attended')).sum())})")
        for j, (k, col, _, c) in enumerate(groups):
            v = df.loc[here & (kind == k), col].dropna().to_numpy()
            if len(v) == 0:
                continue
            b = ax.boxplot([v], positions=[pos[i] - 0.4 + w * (j + 0.5)], widths=0.9 * w, patch_artist=True,
                           showfliers=False)
            b["boxes"][0].set_facecolor(c)
            b["medians"][0].set_color("k")
    ax.set_xticks(pos)
    ax.set_xticklabels(labels)
    ax.set_xlabel("head (layer.head)")
    ax.set_ylabel(MEASURE_NAMES.get(measure, measure.replace("_", " ")) + (" (terms)" if measure == "n_recon" else ""))
    ax.legend(handles=[Patch(color=c, label=lab) for _, _, lab, c in groups], loc="upper left",
              ncol=2, frameon=True)
    ymax = ax.get_ylim()[1]
    ax.set_ylim(top=ymax * 1.3)  # room for the legend above the boxes
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


@book_figure
def plot_sparseness_map(df: pd.DataFrame, *, measure: str = "rolls_tovee", control: str = "null",
                        n_layers: Optional[int] = None, n_heads: Optional[int] = None, min_pairs: int = 5,
                        title: Optional[str] = None) -> Figure:
    """Layer x head maps: mean sparseness in the singular basis, in the control, and their ratio.

    ``control="null"`` (column ``measure + "_null"``, :mod:`svtools.sad.null`) or ``"rotated"``
    (``measure + "_rotated"``, not evidence of alignment on its own). The third map is the ratio
    of the means, real / control, on a log scale centred on 1 (blue = sparser than the control).
    Heads with fewer than ``min_pairs`` selected pairs are left blank.
    """
    if control not in ("null", "rotated"):
        raise SVToolsError(f"control must be 'null' or 'rotated', got {control!r}")
    col = f"{measure}_{control}"
    _need(df, ["layer", "head", measure, col], "plot_sparseness_map")
    n_layers = n_layers or int(df["layer"].max()) + 1
    n_heads = n_heads or int(df["head"].max()) + 1
    g = df.groupby(["layer", "head"])
    mean = g[[measure, col]].mean()
    cnt = g.size()
    mats = [np.full((n_layers, n_heads), np.nan) for _ in range(3)]
    for (l, h), row in mean.iterrows():
        if cnt[(l, h)] >= min_pairs:
            mats[0][l, h] = row[measure]
            mats[1][l, h] = row[col]
            mats[2][l, h] = row[measure] / row[col]
    fig, axes = subplots(3, 1, height=3 * (0.3 * n_layers + 1.1))
    finite = np.concatenate([m[np.isfinite(m)] for m in mats[:2]]) if np.isfinite(mats[0]).any() else np.array([0, 1])
    vmin, vmax = float(finite.min()), float(finite.max())
    lr = np.log2(mats[2])
    d = float(np.nanmax(np.abs(lr))) if np.isfinite(lr).any() else 1.0
    nm = MEASURE_NAMES.get(measure, measure)
    short = {"rolls_tovee": "$S$", "n_recon": NRECON}.get(measure, measure)
    cname = "null heads" if control == "null" else "rotated control"
    for ax, m, t, kw, lab in zip(axes, [mats[0], mats[1], lr], [f"{nm}: singular basis", f"{nm}: {cname}",
                                                                 f"real / {cname}, " + r"$\log_2$"],
                                 [dict(cmap="viridis", vmin=vmin, vmax=vmax),
                                  dict(cmap="viridis", vmin=vmin, vmax=vmax), dict(cmap="RdBu_r", vmin=-d, vmax=d)],
                                 [f"mean {short}", f"mean {short}", r"$\log_2$ ratio"]):
        im = ax.imshow(m, aspect="auto", origin="upper", **kw)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(t)
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        fig.colorbar(im, ax=ax, label=lab)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


@book_figure
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
    fig, axes = subplots(1, 2, height=3.3)
    frac = np.bincount(k, minlength=r) / len(k)
    axes[0].bar(np.arange(r), frac, color=REAL)
    axes[0].axhline(1 / r, color="k", ls=":", lw=1, label=f"uniform (1/{r})")
    axes[0].set_xlabel("singular index $k$ of the\nlargest term ($0$: largest $\\sigma$)")
    axes[0].set_ylabel("fraction of selected pairs")
    top = np.mean(k < max(1, r // 8))
    axes[0].set_title(f"{100 * (1 - top):.0f}% outside\nthe top {max(1, r // 8)} of {r}")
    axes[0].legend(frameon=False)
    s = df["dominant_sigma"].to_numpy()
    axes[1].hist(s, bins=np.linspace(0, 1, 26), weights=np.full(len(s), 1 / len(s)), color=REAL)
    axes[1].set_xlabel("$\\sigma_k/\\sigma_0$ of the\nlargest term")
    axes[1].set_ylabel("fraction of selected pairs")
    axes[1].set_title(f"median {np.median(s):.2f}")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


@book_figure
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
    ax.set_xlabel(r"singular index $k$ ($0$: largest $\sigma$)")
    ax.set_ylabel("prompt")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, label=r"share of the prompt's pairs using $k$")
    fig.tight_layout()
    return fig


@book_figure
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


@book_figure
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



@book_figure
def plot_lm_emergence(accuracy: pd.DataFrame, attention: pd.DataFrame, sparseness: pd.DataFrame, *,
                      ratio: Optional[pd.DataFrame] = None,
                      measure_label: str = "mean Rolls-Tovee sparseness (1 = dense)",
                      ratio_label: str = "Rolls-Tovee, real / null",
                      attention_label: str = "END -> IO, IO heads",
                      title: Optional[str] = None) -> Figure:
    """The IOI language model over training, three panels stacked (one column wide).

    Each frame comes from :func:`svtools.ioi_lm.over_seeds` (columns ``step``, ``mean``, ``lo``,
    ``hi``, ``seed_min``, ``seed_max``; the band is the interval over seeds, the thin lines the
    seed range):
    ``accuracy`` (plus ``metric``): held-out accuracy; ``attention``: the END -> IO attention of
    the heads measured; ``sparseness`` (plus ``kind``: attended / non-attended / random /
    rotated): the sparseness measure of the heads' pairs of each kind; ``ratio`` (optional fourth
    panel, plus ``kind``): the calibrated ratio real / null of each kind, with the line at 1 (no
    alignment beyond the spectrum).
    """
    for f, what in ((accuracy, "accuracy"), (attention, "attention"), (sparseness, "sparseness")):
        _need(f, ["step", "mean", "lo", "hi"], f"plot_lm_emergence({what})")
    _need(accuracy, ["metric"], "plot_lm_emergence(accuracy)")
    _need(sparseness, ["kind"], "plot_lm_emergence(sparseness)")
    if ratio is not None:
        _need(ratio, ["step", "mean", "lo", "hi", "kind"], "plot_lm_emergence(ratio)")
    n = 3 if ratio is None else 4
    fig, axes = subplots(n, 1, height=2.7 * n + 0.1, sharex=True)

    def band(ax, s, color, label, ls="-"):
        s = s.sort_values("step")
        ax.plot(s["step"], s["mean"], color=color, ls=ls, marker="o", ms=3, label=label)
        ax.fill_between(s["step"], s["lo"], s["hi"], color=color, alpha=0.2, lw=0)

    for (metric, g), c in zip(accuracy.groupby("metric", sort=False), ("tab:purple", "tab:olive")):
        band(axes[0], g, c, {"top1": "IO is the top token", "io_vs_s": "logit IO > logit S"}.get(metric, metric))
    axes[0].set_ylabel("held-out accuracy")
    axes[0].set_ylim(-0.03, 1.03)
    axes[0].legend(loc="upper left", frameon=True)
    band(axes[1], attention, "tab:brown", attention_label)
    axes[1].set_ylabel("attention weight")
    axes[1].set_ylim(-0.03, 1.03)
    axes[1].legend(loc="upper left", frameon=True)
    names = {"attended": "attended pairs", "non-attended": "non-attended pairs (same heads)",
             "random": "random pairs (same heads)", "rotated": "attended pairs, rotated basis"}
    for kind in ("attended", "non-attended", "random", "rotated"):
        g = sparseness[sparseness["kind"] == kind]
        if not g.empty:
            band(axes[2], g, KIND_COLORS[kind], names[kind], ls="--" if kind == "rotated" else "-")
    axes[2].set_ylabel(measure_label)
    if ratio is not None:
        for kind in ("attended", "non-attended", "random"):
            g = ratio[ratio["kind"] == kind]
            if not g.empty:
                band(axes[3], g, KIND_COLORS[kind], names[kind])
        axes[3].axhline(1.0, color="k", lw=0.8, ls=":")
        axes[3].set_ylabel(ratio_label)
    axes[-1].set_xscale("symlog", linthresh=10)
    axes[-1].set_xlim(0, float(max(f["step"].max() for f in (accuracy, attention, sparseness))) * 1.15)
    axes[-1].set_xlabel("training step (log scale past 10)")
    # below the axes: the curves can sit anywhere in the panel
    axes[-1].legend(loc="upper center", bbox_to_anchor=(0.5, -0.32), frameon=False, ncol=2)
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    return fig


@book_figure
def plot_sad_vs_alignment(pairs: pd.DataFrame, *, x: str = "cos", measures: Sequence[str] = ("n_recon", "rolls_tovee"),
                          hue: str = "n_features", title: Optional[str] = None) -> Figure:
    """Per template pair of toy runs: alignment (``x``, e.g. the pair's worst ``|cos|``) against the
    SAD of the pair's own features (one panel per measure, stacked), coloured by ``hue``.

    ``pairs``: one row per (run, template pair) with columns ``x``, ``hue`` and the measures.
    """
    _need(pairs, [x, hue, *measures], "plot_sad_vs_alignment")
    fig, axes = subplots(len(measures), 1, height=2.9 * len(measures), sharex=True, squeeze=False)
    levels = sorted(pairs[hue].unique())
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]  # no yellow on white
    hue_name = {"n_features": "$N$", "seed": "seed"}.get(hue, hue.replace("_", " "))
    for ax, m in zip(axes[:, 0], measures):
        for i, lv in enumerate(levels):
            g = pairs[pairs[hue] == lv]
            ax.scatter(g[x], g[m], s=22, color=colors[i % len(colors)], label=f"{hue_name} = {lv}",
                       alpha=0.85, edgecolor="none")
        unit = " (terms)" if m.startswith("n_recon") else " (1 = dense)" if "rolls" in m else ""
        ax.set_ylabel(MEASURE_NAMES.get(m, m.replace("_", " ")) + unit)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="best" if len(pairs) < 500 else "upper left", frameon=True)
    axes[-1, 0].set_xlabel(r"alignment of the pair, $\min(|\cos_q|, |\cos_k|)$" if x == "cos" else x)
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    return fig


@book_figure
def plot_kind_summary(summary: pd.DataFrame, *, x: str = "layer", measure: str = "rolls_tovee",
                      xlabel: Optional[str] = None, title: Optional[str] = None,
                      ax: Optional[plt.Axes] = None) -> Figure:
    """A :func:`svtools.sad.bootstrap` summary grouped by ``(x, "kind")``: each kind of pair
    (attended, non-attended, random) in the singular basis with its interval over prompts, and the
    attended pairs in the rotated control (dashed). Kinds are offset slightly along ``x``."""
    _need(summary, [x, "kind", "column", "estimate", "lo", "hi"], "plot_kind_summary")
    fig, ax = (ax.figure, ax) if ax is not None else subplots(width=0.72, height=3.2)
    lines = [(k, measure, k.replace("-", " ") + " pairs", "-") for k in ("attended", "non-attended", "random")]
    lines.append(("attended", measure + "_rotated", "attended, rotated basis", "--"))
    lines = [ln for ln in lines if ((summary["kind"] == ln[0]) & (summary["column"] == ln[1])).any()]
    for i, (k, col, lab, ls) in enumerate(lines):
        s = summary[(summary["kind"] == k) & (summary["column"] == col)].sort_values(x)
        c = KIND_COLORS["rotated" if col.endswith("_rotated") else k]
        xs = s[x].to_numpy(dtype=float) + 0.08 * (i - (len(lines) - 1) / 2)
        ax.errorbar(xs, s["estimate"], yerr=[s["estimate"] - s["lo"], s["hi"] - s["estimate"]], marker="o", ms=4,
                    capsize=2, color=c, ls=ls, label=lab)
    stat = summary["stat"].iloc[0] if "stat" in summary and len(summary) else "mean"
    unit = " (1 = dense)" if "rolls" in measure else " (terms)" if "n_recon" in measure else ""
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(f"{stat} {measure.replace('_', ' ')}{unit}")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    fig.tight_layout()
    return fig
