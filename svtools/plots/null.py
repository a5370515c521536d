"""Figures of the calibrated spectrum null (:mod:`svtools.sad.null`): its calibration against the
rotated control on inputs without features, and ratios real / null with their intervals.

Every function returns a matplotlib Figure. Inputs are the frames of
:func:`svtools.sad.null.featureless_calibration` and :func:`svtools.sad.null_ratio`.
"""

from __future__ import annotations

from typing import Optional

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from svtools._checks import SVToolsError, check_columns
from svtools.plots import book_figure, subplots
from svtools.plots.sad import KIND_COLORS, NULL, ROT, RT_NAME

__all__ = ["plot_null_calibration", "plot_null_ratio", "plot_null_ratios"]


def _need(df: pd.DataFrame, cols: list, what: str) -> None:
    check_columns(df, cols, what)


@book_figure
def plot_null_calibration(cal: pd.DataFrame, *, title: Optional[str] = None) -> Figure:
    """The two controls on featureless inputs (:func:`svtools.sad.null.featureless_calibration`).

    For each spectrum, bars of the ratio of mean Rolls-Tovee sparseness real / control for the
    attended pairs, with the rotated control (grey) and the spectrum null (orange), and the same
    ratios for random pairs as dots. Nothing aligns with anything here: a calibrated control
    reads 1 (dotted line); a ratio below 1 is a false "sparser".
    """
    _need(cal, ["spectrum", "kind", "ratio_rotated", "ratio_null"], "plot_null_calibration")
    spectra = list(dict.fromkeys(cal["spectrum"]))
    fig, ax = subplots(width=0.85, height=3.4)
    x = np.arange(len(spectra), dtype=float)
    for j, (col, lab, c) in enumerate((("ratio_rotated", "rotated control", ROT),
                                       ("ratio_null", "spectrum null", NULL))):
        att = cal[cal["kind"] == "attended"].set_index("spectrum").reindex(spectra)[col].to_numpy(float)
        rnd = cal[cal["kind"] == "random"].set_index("spectrum").reindex(spectra)[col].to_numpy(float)
        xs = x + (j - 0.5) * 0.36
        ax.bar(xs, att, width=0.34, color=c, label=f"{lab}: attended pairs")
        ax.plot(xs, rnd, "o", color="k", ms=4, label="random pairs" if j == 0 else None)
        for xi, v in zip(xs, att):
            ax.text(xi, v + 0.05, f"{v:.2f}", ha="center", va="bottom")
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xticks(x)
    ax.set_xticklabels(spectra)
    ax.set_xlabel("spectrum of the head (inputs without features)")
    ax.set_ylabel(RT_NAME + ", real / control")
    ax.set_ylim(0, 1.75)
    ax.legend(loc="upper left", ncol=1, frameon=True)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


@book_figure
def plot_null_ratio(ratio: pd.DataFrame, *, x: str = "layer", hue: str = "kind", xlabel: Optional[str] = None,
                    ylabel: str = RT_NAME + ", real / null", title: Optional[str] = None,
                    ax: Optional[plt.Axes] = None, legend: Optional[str] = "lower right") -> Figure:
    """A :func:`svtools.sad.null_ratio` frame against ``x``, one line per ``hue`` (kinds of pairs), with
    the intervals over prompts as error bars and the line at 1 (no sparser than the null).
    Groups are offset slightly along ``x``; ``x`` may be numbers or labels. ``legend``: its corner
    inside the axes (a matplotlib ``loc``), or ``None`` for no legend."""
    _need(ratio, [x, hue, "ratio", "lo", "hi"], "plot_null_ratio")
    fig, ax = (ax.figure, ax) if ax is not None else subplots(width=0.8, height=3.2)
    levels = list(dict.fromkeys(ratio[hue]))
    xv = list(dict.fromkeys(ratio[x]))
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) for v in xv)
    pos = {v: (float(v) if numeric else float(i)) for i, v in enumerate(xv)}
    for i, lv in enumerate(levels):
        s = ratio[ratio[hue] == lv]
        xs = np.array([pos[v] for v in s[x]]) + 0.08 * (i - (len(levels) - 1) / 2)
        c = KIND_COLORS.get(lv, None) if isinstance(lv, str) else None
        ax.errorbar(xs, s["ratio"], yerr=[s["ratio"] - s["lo"], s["hi"] - s["ratio"]], marker="o", ms=4,
                    capsize=2, color=c, ls="-" if numeric else "none",
                    label=str(lv) + (" pairs" if hue == "kind" else ""))
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    if not numeric:
        ax.set_xticks(range(len(xv)))
        ax.set_xticklabels([str(v) for v in xv])
    ax.set_xlabel(x if xlabel is None else xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if legend:
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo - 0.45 * (hi - lo), hi)  # room for the legend below the data
        ax.legend(loc=legend, frameon=True)
    fig.tight_layout()
    return fig


@book_figure
def plot_null_ratios(ratios: "dict[str, pd.DataFrame]", *, x: str = "layer", hue: str = "kind",
                     xlabel: Optional[str] = None, legend: str = "lower right") -> Figure:
    """Several :func:`svtools.sad.null_ratio` frames (e.g. one per prompt set), one panel each,
    stacked top to bottom with a shared ``x`` and a shared ratio axis; each panel is titled by its
    key, and only the first has the legend (see :func:`plot_null_ratio`).

    Raises:
        SVToolsError: ``ratios`` is empty.
    """
    if not ratios:
        raise SVToolsError("plot_null_ratios: no frames to plot")
    fig, axes = subplots(len(ratios), 1, width=0.8, height=2.6 * len(ratios) + 0.4, sharex=True, sharey=True,
                         squeeze=False)
    for i, (ax, (name, r)) in enumerate(zip(axes[:, 0], ratios.items())):
        plot_null_ratio(r, x=x, hue=hue, ax=ax, title=name, legend=legend if i == 0 else None,
                        xlabel=(xlabel or x) if i == len(ratios) - 1 else "")
    fig.tight_layout()
    return fig
