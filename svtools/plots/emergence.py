r"""Figures of the emergence chapter (Part 3): the IOI language model over training.

Inputs are the per-seed frames of the chapter summarised over seeds by
:func:`svtools.ioi_lm.over_seeds` (columns ``step``, ``mean``, ``lo``, ``hi``; the band is the
interval over seeds). Labels are written in mathtext and the figure follows the book's
convention for two screens (:mod:`svtools.plots`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import pandas as pd
from matplotlib.figure import Figure

from svtools._checks import SVToolsError
from svtools.plots import book_figure, subplots

__all__ = ["plot_lm_emergence", "KIND_STYLE", "ACCURACY_LABELS"]

#: Colour and legend label of each kind of pair (:func:`svtools.sad.head_sparsity`'s ``kind``).
KIND_STYLE: dict[str, tuple[str, str]] = {
    "attended": ("tab:red", "attended pairs"),
    "non-attended": ("tab:blue", "non-attended pairs"),
    "random": ("tab:gray", "random pairs"),
}

#: Legend label of each accuracy metric of :meth:`svtools.ioi_lm.IOILMRun.accuracy`.
ACCURACY_LABELS: dict[str, str] = {
    "top1": "IO is the top token",
    "io_vs_s": r"$\ell_\mathrm{IO} > \ell_\mathrm{S}$",
}


def _need(df: pd.DataFrame, cols: list[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise SVToolsError(f"plot_lm_emergence({what}): the frame lacks column(s) {missing} "
                           f"(it has {list(df.columns)}); pass svtools.ioi_lm.over_seeds(...) of it")


@book_figure
def plot_lm_emergence(accuracy: pd.DataFrame, attention: pd.DataFrame, sparseness: pd.DataFrame,
                      ratio: pd.DataFrame, *, marks: Optional[Mapping[str, float]] = None) -> Figure:
    r"""The IOI language model over training: four panels stacked, one column wide.

    Args:
        accuracy: held-out accuracy per ``metric`` (``top1``, ``io_vs_s``) and ``step``;
            columns ``metric, step, mean, lo, hi``.
        attention: the IO heads' mean END → IO attention per ``step``; ``step, mean, lo, hi``.
        sparseness: mean Rolls–Tovée sparseness of each ``kind`` of pair (attended,
            non-attended, random) per ``step``; ``kind, step, mean, lo, hi``.
        ratio: the calibrated ratio real / spectrum null of each ``kind`` per ``step``
            (:func:`svtools.sad.null_ratio`); ``kind, step, mean, lo, hi``.
        marks: optional vertical dotted lines, ``{label: step}`` (e.g. the sparsest checkpoint
            and the step where accuracy reaches one half), drawn in every panel and labelled at
            the foot of the last one.

    Returns:
        the Figure: (a) accuracy, (b) attention, (c) Rolls–Tovée (1 = dense, lower = sparser),
        (d) ratio to the null with the line at 1 (no sparser than the spectrum alone). The x-axis
        is the training step, linear up to 10 and logarithmic past it (step 0 is shown).

    Raises:
        SVToolsError: a frame lacks a column, or has no rows.
    """
    frames = {"accuracy": (accuracy, ["metric"]), "attention": (attention, []),
              "sparseness": (sparseness, ["kind"]), "ratio": (ratio, ["kind"])}
    for what, (f, extra) in frames.items():
        _need(f, ["step", "mean", "lo", "hi", *extra], what)
        if f.empty:
            raise SVToolsError(f"plot_lm_emergence({what}): the frame has no rows")
    fig, axes = subplots(4, 1, height=9.6, sharex=True)

    def band(ax, s: pd.DataFrame, color: str, label: str) -> None:
        s = s.sort_values("step")
        ax.plot(s["step"], s["mean"], color=color, marker="o", ms=3, label=label)
        ax.fill_between(s["step"], s["lo"], s["hi"], color=color, alpha=0.2, lw=0)

    for (metric, g), c in zip(accuracy.groupby("metric", sort=False), ("tab:purple", "tab:olive")):
        band(axes[0], g, c, ACCURACY_LABELS.get(metric, str(metric)))
    axes[0].set_ylabel("accuracy")
    axes[0].set_ylim(-0.03, 1.05)
    axes[0].legend(loc="center left", frameon=True)
    band(axes[1], attention, "tab:brown", "END → IO")
    axes[1].set_ylabel("attention")
    axes[1].set_ylim(-0.03, 1.05)
    for ax, frame in ((axes[2], sparseness), (axes[3], ratio)):
        for kind, (color, label) in KIND_STYLE.items():
            g = frame[frame["kind"] == kind]
            if not g.empty:
                band(ax, g, color, label)
    axes[2].set_ylabel(r"Rolls–Tovée $S$")
    axes[3].axhline(1.0, color="k", lw=0.8, ls=":")
    axes[3].set_ylabel(r"$S_\mathrm{real} / S_\mathrm{null}$")
    for ax, letter in zip(axes, "abcd"):
        ax.set_title(f"({letter})", loc="left")
    top = max(float(f["step"].max()) for f, _ in frames.values())
    for i, (label, step) in enumerate((marks or {}).items()):
        for ax in axes:
            ax.axvline(float(step), color="0.45", lw=0.9, ls=(0, (2, 2)))
        axes[-1].annotate(label, (float(step), 0.0), xycoords=axes[-1].get_xaxis_transform(),
                          xytext=(-3, 4 + 14 * i), textcoords="offset points", va="bottom", ha="right", color="0.3")
    axes[-1].set_xscale("symlog", linthresh=10)
    axes[-1].set_xlim(0, top * 1.15)
    axes[-1].set_xlabel("training step (log scale past 10)")
    axes[-1].legend(loc="upper center", bbox_to_anchor=(0.5, -0.34), frameon=False, ncol=3)
    fig.tight_layout()
    return fig
