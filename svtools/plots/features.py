"""Figures of the chapter on known features (Part 3): where a head's features and decision live
among its singular directions, what removing them does, and how both develop over training.

Inputs are the frames of :mod:`svtools.ioi_causal` (:func:`~svtools.ioi_causal.known_feature_summary`,
:func:`~svtools.ioi_causal.effect_summary`, :func:`~svtools.ioi_causal.over_training`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from svtools._checks import SVToolsError
from svtools.plots import book_figure, subplots

__all__ = ["plot_direction_profiles", "plot_intervention_effects", "plot_features_over_training",
           "INTERVENTION_STYLE"]

#: colour and label of each intervention of :func:`svtools.ioi_causal.intervention_effects`.
INTERVENTION_STYLE = {
    "none": ("black", "no intervention"),
    "sad": ("tab:blue", "remove SAD's top set"),
    "sad null": ("tab:blue", "remove matched random sets"),
    "decision": ("tab:red", "remove the decision's top set"),
    "decision null": ("tab:red", "remove matched random sets"),
    "zero omega": ("tab:gray", r"zero the head's $\Omega$"),
}


def _need(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise SVToolsError(f"{what}: the frame lacks column(s) {missing}")


@book_figure
def plot_direction_profiles(profiles: pd.DataFrame, *, pair_io: str, pair_s: str, n_show: int = 10,
                            title: Optional[str] = None) -> Figure:
    """One panel per seed: what each singular direction of a head carries.

    ``profiles``: :func:`~svtools.ioi_causal.direction_profile`'s ``profile`` frames with code
    masses, one head per ``seed`` (columns ``seed, k, sigma, sad_mean, decision_mean`` and the
    two mass columns ``pair_io``, ``pair_s``). Bars: the mean relative term of the END -> IO
    pairs (SAD, blue) and the mean decision term ``t(IO) - t(S1)`` (red); diamonds: what the
    known codes predict for the decision (IO-code mass minus S-code mass); line: ``sigma_k``.
    Each series is divided by its largest absolute value (the panel compares shapes, not
    sizes). Only the first ``n_show`` directions are drawn.
    """
    _need(profiles, ["seed", "k", "sigma", "sad_mean", "decision_mean", pair_io, pair_s], "plot_direction_profiles")
    seeds = sorted(profiles["seed"].unique())
    fig, axes = subplots(len(seeds), 1, height=2.0 * len(seeds) + 0.6, sharex=True, squeeze=False)
    for ax, s in zip(axes[:, 0], seeds):
        g = profiles[profiles["seed"] == s].sort_values("k").head(n_show)
        k = g["k"].to_numpy()
        unit = lambda v: v / max(float(np.abs(v).max()), 1e-300)  # noqa: E731
        ax.bar(k - 0.2, unit(g["sad_mean"].to_numpy()), width=0.4, color="tab:blue", label="END → IO term (SAD)")
        ax.bar(k + 0.2, unit(g["decision_mean"].to_numpy()), width=0.4, color="tab:red",
               label=r"decision $t_k(\mathrm{IO}) - t_k(\mathrm{S1})$")
        known = (g[pair_io] - g[pair_s]).to_numpy()
        ax.plot(k + 0.2, unit(known), "D", color="black", ms=4, label="predicted by the name codes")
        ax.plot(k, unit(g["sigma"].to_numpy()), "-", color="tab:gray", lw=1.2, label="singular value")
        ax.axhline(0, color="black", lw=0.6)
        head = g["head_label"].iloc[0] if "head_label" in g else ""
        ax.set_ylabel(f"seed {s}, {head}\n(share of max)")
        ax.set_ylim(-0.45, 1.1)
    axes[-1, 0].set_xlabel(r"singular direction $k$ (largest $\sigma_k$ first)")
    axes[-1, 0].set_xticks(range(n_show))
    axes[-1, 0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=2, frameon=False)
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    return fig


@book_figure
def plot_intervention_effects(summary: pd.DataFrame, *, columns: Sequence[str] = ("end_io", "selectivity", "logit_diff"),
                              labels: Optional[dict] = None, title: Optional[str] = None) -> Figure:
    """Behaviour after each intervention, per seed: points with 95% intervals.

    ``summary``: :func:`~svtools.ioi_causal.effect_summary` frames with a ``seed`` column.
    One panel per measure in ``columns`` (stacked); along x the seeds, and within each seed one
    marker per intervention (:data:`INTERVENTION_STYLE`). Filled markers: the intervention (bar:
    t interval over prompts); open markers: the mean over matched random sets (bar: their 2.5-97.5%
    range over draws).
    """
    _need(summary, ["seed", "intervention", "column", "mean", "lo", "hi"], "plot_intervention_effects")
    labels = labels or {"end_io": "END → IO\nattention", "selectivity": r"$\log(p_\mathrm{IO} / p_\mathrm{S1})$",
                        "logit_diff": r"$\ell_\mathrm{IO} - \ell_\mathrm{S}$ (nats)",
                        "io_over_s": "IO over S\naccuracy"}
    order = [i for i in INTERVENTION_STYLE if i in set(summary["intervention"])]
    seeds = sorted(summary["seed"].unique())
    fig, axes = subplots(len(columns), 1, height=2.1 * len(columns) + 0.5, sharex=True, squeeze=False)
    width = 0.8 / max(len(order), 1)
    for ax, col in zip(axes[:, 0], columns):
        for j, name in enumerate(order):
            color, label = INTERVENTION_STYLE[name]
            g = summary[(summary["intervention"] == name) & (summary["column"] == col)]
            g = g.set_index("seed").reindex(seeds)
            x = np.arange(len(seeds)) - 0.4 + width * (j + 0.5)
            y, lo, hi = g["mean"].to_numpy(), g["lo"].to_numpy(), g["hi"].to_numpy()
            face = "none" if name.endswith("null") else color
            ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="o", color=color, mfc=face, ms=5, capsize=2,
                        label=label if col == columns[0] else None)
        ax.set_ylabel(labels.get(col, col))
        for b in range(1, len(seeds)):
            ax.axvline(b - 0.5, color="0.85", lw=0.8)
    axes[-1, 0].set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
    fig.legend(loc="lower center", ncol=2, frameon=False, bbox_to_anchor=(0.5, 0.0))
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


@book_figure
def plot_features_over_training(frame: pd.DataFrame, *, title: Optional[str] = None) -> Figure:
    """Known features of one head per seed over training: three panels stacked.

    ``frame``: :func:`~svtools.ioi_causal.over_training` rows (one head per seed). Top: held-out
    IO-over-S accuracy and the head's END -> IO attention. Middle: ``max_k |cos|`` between the
    name direction and the head's right singular vectors, raw (solid) and un-whitened (dotted),
    with each reading's null 95th percentile (dashed, grey: raw; light: un-whitened). Bottom:
    how many directions the IO/S decision uses: per prompt (N_recon of the decision terms) and
    over prompts (N_recon of their mean profile).
    """
    _need(frame, ["seed", "step", "io_over_s", "end_io", "name_raw", "name_raw_q95", "name_unwhitened",
                  "name_unwhitened_q95", "decision_nrecon", "profile_nrecon"], "plot_features_over_training")
    fig, axes = subplots(3, 1, height=8.0, sharex=True)
    colors = dict(zip(sorted(frame["seed"].unique()), ("tab:blue", "tab:orange", "tab:green", "tab:purple")))
    for s, g in frame.groupby("seed"):
        g = g.sort_values("step")
        c = colors[s]
        axes[0].plot(g["step"], g["io_over_s"], "-o", color=c, ms=3, label=f"seed {s}")
        axes[0].plot(g["step"], g["end_io"], "--s", color=c, ms=3)
        axes[1].plot(g["step"], g["name_raw"], "-o", color=c, ms=3, label=f"seed {s}")
        axes[1].plot(g["step"], g["name_unwhitened"], ":", color=c, lw=1.5)
        axes[2].plot(g["step"], g["decision_nrecon"], "-o", color=c, ms=3)
        axes[2].plot(g["step"], g["profile_nrecon"], "--s", color=c, ms=3)
    q = frame.groupby("step")[["name_raw_q95", "name_unwhitened_q95"]].mean()
    axes[1].plot(q.index, q["name_raw_q95"], "--", color="0.4", label="null 95%, raw")
    axes[1].plot(q.index, q["name_unwhitened_q95"], "--", color="0.75", label=r"null 95%, $\Sigma v$")
    axes[0].set_ylabel("accuracy,\nattention")
    axes[0].set_ylim(-0.03, 1.05)
    axes[1].set_ylabel(r"$\max_k |\cos(n, v_k)|$")
    axes[1].set_ylim(-0.32, 1.05)  # room below 0 for the legend; |cos| itself is in [0, 1]
    axes[1].set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axes[2].set_ylabel(r"directions ($N_\mathrm{recon}$)")
    axes[2].yaxis.set_major_locator(MaxNLocator(integer=True))
    # colours name the seeds (one legend, below); line styles name the series, in each panel
    def styles(ax, entries, loc, ncol=1):
        handles = [Line2D([], [], color="0.2", ls=ls, marker=m, ms=3) for _, ls, m in entries]
        extra = [h for h in ax.get_legend_handles_labels()[0] if not str(h.get_label()).startswith("seed")]
        return ax.legend(handles + extra, [t for t, _, _ in entries] + [h.get_label() for h in extra], loc=loc,
                         ncol=ncol, frameon=True)

    styles(axes[0], [("IO over S", "-", "o"), ("END → IO", "--", "s")], "upper left")
    styles(axes[1], [("raw $v$", "-", "o"), (r"$\Sigma v$", ":", "")], "lower right", ncol=2)  # below 0
    axes[2].add_artist(styles(axes[2], [("per prompt", "-", "o"), ("mean profile", "--", "s")], "upper left"))
    seeds = [Line2D([], [], color=c, lw=2) for c in colors.values()]
    axes[2].legend(seeds, [f"seed {s}" for s in colors], loc="upper center", bbox_to_anchor=(0.5, -0.34),
                   ncol=len(seeds), frameon=False)
    axes[2].set_xscale("symlog", linthresh=10)
    axes[2].set_xlim(0, frame["step"].max() * 1.1)
    axes[2].set_xlabel("training step (log scale past 10)")
    for ax, letter in zip(axes, "abc"):
        ax.set_title(f"({letter})", loc="left")
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    return fig
