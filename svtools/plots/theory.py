"""Figures of Part 2 (the theory). Each function returns a matplotlib Figure; captions live in
the notebooks."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from svtools.plots import book_figure, subplots
from svtools._checks import SVToolsError

__all__ = ["plot_theorem1", "plot_mean_effect", "plot_alignment_vs_interference", "plot_frame_training",
           "plot_unwhitening"]

_GPT2_BAND = (10.0, 55.0)


def _np(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=float)


@book_figure
def plot_theorem1(spectra: Mapping[str, torch.Tensor], table) -> Figure:
    """Panel (a): normalised singular values ``sigma_k / sigma_1`` of each head (log scale);
    panel (b): ``|cos|`` of each head's top singular vectors with Theorem 1's whitened prediction and with
    the raw features.

    Args:
        spectra: label -> ``(r,)`` singular values (one line each).
        table: DataFrame with columns ``frame``, ``method``, ``cos_whitened``, ``cos_raw``
            (query and key sides averaged by the caller or given as the worse of the two).
    """
    if not spectra:
        raise SVToolsError("spectra is empty")
    for c in ("frame", "method", "cos_whitened", "cos_raw"):
        if c not in table.columns:
            raise SVToolsError(f"table needs a column {c!r}")
    fig, (a, b) = subplots(2, 1, figsize=(7.0, 9.5))
    for label, s in spectra.items():
        s = _np(s)
        a.semilogy(np.arange(1, len(s) + 1), np.maximum(s / s[0], 1e-17), "o-", ms=3, label=label)
    a.set_xlabel("singular index k")
    a.set_ylabel(r"$\sigma_k / \sigma_1$ (dimensionless)")
    a.set_title("(a) one significant singular value", fontsize=10)
    a.xaxis.set_major_locator(MaxNLocator(integer=True))
    a.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    frames = list(dict.fromkeys(table["frame"]))
    methods = list(dict.fromkeys(table["method"]))
    width = 0.8 / len(methods)
    for m_i, m in enumerate(methods):
        sub = table[table["method"] == m].set_index("frame").reindex(frames)
        xs = np.arange(len(frames)) + (m_i - (len(methods) - 1) / 2) * width
        b.bar(xs, sub["cos_whitened"], width * 0.9, label=f"{m}: vs whitened", color=f"C{m_i}")
        b.plot(xs, sub["cos_raw"], "kx", ms=7, label="vs raw feature" if m_i == 0 else None)
    b.set_xticks(np.arange(len(frames)))
    b.set_xticklabels(frames, fontsize=9)
    b.set_ylim(0, 1.0)
    b.set_ylabel(r"$|\cos|$ with top singular vector")
    b.set_xlabel(r"feature frame (interference $\|E_X\|_2$)")
    b.set_title("(b) the whitened direction is the singular vector", fontsize=10)
    b.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


@book_figure
def plot_mean_effect(ratio: Sequence[float], cos: Mapping[str, Sequence[float]]) -> Figure:
    """``|cos|`` between the whitened prediction and the exact singular vector for non-zero-mean
    activations, against ``N / D`` (one line per label, e.g. per activation law)."""
    fig, ax = subplots(figsize=(6.5, 3.8))
    for label, c in cos.items():
        ax.plot(ratio, c, "o-", label=label)
    ax.axvline(1.0, color="grey", ls=":", lw=1)
    ax.text(1.02, ax.get_ylim()[0], " N = D", color="grey", va="bottom", fontsize=8)
    ax.set_xlabel("features per dimension N / D")
    ax.set_ylabel(r"mean $|\cos(\Sigma_X^{-1}x_i,\ u_i)|$")
    ax.set_title("non-zero-mean activations: the whitened prediction drifts in superposition", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


@book_figure
def plot_alignment_vs_interference(df, *, measured: Optional[Mapping[str, Mapping[str, float]]] = None,
                                   paper_floor: Optional[float] = 0.75) -> Figure:
    """Paper Fig. 4 counterpart, in both normalisations of ``||E_X||_2``.

    Top: against the trace-normalised interference; bottom: against the unnormalised one (the
    same frames). One colour per (spectrum, D): the mean over frames (line), the spread over
    frames at each level (shaded min-max), the spectral bound (dashed); the worst-case floor
    ``sqrt(1 - e^2)`` (grey). Measured frames (e.g. sparse-autoencoder dictionaries of real
    models) are drawn as labelled stars. The band 10-55 is the "GPT-2-like" range reported in a
    summary of the paper (unverified), whose normalisation we do not know: it is shaded in both.

    Args:
        df: output of :func:`svtools.theory.alignment_sweep` (several concatenated; seeds are
            pooled per level).
        measured: label -> dict with ``interference``, ``interference_abs`` and ``cos_raw``
            (:func:`svtools.theory.measure_frame`).
        paper_floor: the reported "stays above" level (drawn dotted), or None.
    """
    for c in ("D", "spectrum", "interference", "interference_abs", "cos_raw", "bound_mean"):
        if c not in df.columns:
            raise SVToolsError(f"df needs a column {c!r} (from svtools.theory.alignment_sweep)")
    fig, axes = subplots(2, 1, figsize=(7.0, 8.0))
    groups = list(df.groupby(["spectrum", "D"], sort=True))
    for ax, xcol, xlabel in ((axes[0], "interference", r"$\|E_X\|_2$, trace-normalised $\Sigma_X/(\mathrm{tr}\,\Sigma_X/D) - I$"),
                             (axes[1], "interference_abs", r"$\|E_X\|_2$, absolute $\Sigma_X - (\mathrm{tr}\,\Sigma_X/D)\,I$")):
        ax.axvspan(*_GPT2_BAND, color="0.9", zorder=0)
        ax.text(np.sqrt(_GPT2_BAND[0] * _GPT2_BAND[1]), 0.03, "10-55: 'GPT-2-like'\n(reported, unverified)",
                ha="center", fontsize=8, color="0.35")
        for n, ((spec, D), g) in enumerate(groups):
            agg = g.groupby("level").agg(x=(xcol, "mean"), m=("cos_raw", "mean"), lo=("cos_raw", "min"),
                                         hi=("cos_raw", "max"), b=("bound_mean", "mean"), k=("cos_raw", "size"))
            agg = agg.sort_values("x")
            col = f"C{n}"
            ax.plot(agg["x"], agg["m"], "o-", color=col, ms=3, label=f"{spec}, D={D} (mean of {int(agg['k'].min())}+ frames)")
            ax.fill_between(agg["x"], agg["lo"], agg["hi"], color=col, alpha=0.25, lw=0)
            ax.plot(agg["x"], agg["b"], "--", color=col, lw=1)
        if xcol == "interference":
            e = np.linspace(0, 1, 200)
            ax.plot(e, np.sqrt(1 - e ** 2), color="0.3", lw=1.5, label=r"worst case $\sqrt{1-\epsilon^2}$")
        if paper_floor is not None:
            ax.axhline(paper_floor, color="k", ls=":", lw=1, label=f"'stays above {paper_floor}' (reported, unverified)")
        for m_i, (label, mf) in enumerate((measured or {}).items()):
            ax.plot([mf[xcol]], [mf["cos_raw"]], marker="*", ms=14, color=f"C{len(groups) + m_i}", mec="k",
                    ls="none", label=f"measured: {label}")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(0, max(70.0, float(df[xcol].max()) * 1.1,
                           *[float(mf[xcol]) * 1.3 for mf in (measured or {}).values()]))
        ax.set_ylim(0, 1.0)
        ax.set_xlabel(xlabel + " (symlog)")
        ax.set_ylabel(r"mean $|\cos(x_i, u_i)|$")
    axes[0].set_title("(a) trace-normalised interference", fontsize=10)
    axes[1].set_title("(b) the same frames, absolute interference", fontsize=10)
    h, lab = axes[0].get_legend_handles_labels()
    h.append(plt_line("--"))
    lab.append("bound (b), dashed, per colour")
    fig.legend(h, lab, fontsize=8, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    return fig


def plt_line(ls: str):
    """A grey legend handle with line style ``ls``."""
    from matplotlib.lines import Line2D
    return Line2D([], [], color="0.4", ls=ls)


@book_figure
def plot_frame_training(runs: Mapping[str, object], *, predicted_cos: Optional[float] = None,
                        predicted_interference: Optional[float] = None) -> Figure:
    """Theorem 3's experiment: (a) largest overlap of non-target features with the fixed head's
    ``u`` and ``v`` against step; (b) the target features' ``|cos|`` with ``u`` / ``v`` and their
    largest overlap with any other feature, with the theory's predicted end points.

    Args:
        runs: label -> :class:`svtools.theory.FrameRun`.
    """
    if not runs:
        raise SVToolsError("runs is empty")
    fig, (a, b) = subplots(2, 1, figsize=(7.0, 9.0))
    for n, (label, r) in enumerate(runs.items()):
        col = f"C{n}"
        st = _np(r.step)
        a.semilogy(st, np.maximum(_np(r.overlap_u), 1e-6), "-", color=col, label=f"{label}: max |cos(w_k, u)|")
        a.semilogy(st, np.maximum(_np(r.overlap_v), 1e-6), "--", color=col, label=f"{label}: max |cos(w_k, v)|")
        b.plot(st, _np(r.cos_target)[:, 0], "-", color=col, label=f"{label}: |cos(w_i, u)|")
        b.plot(st, _np(r.interference_target)[:, 0], ":", color=col, label=f"{label}: max |cos(w_i, w_k)|")
    if predicted_cos is not None:
        b.axhline(predicted_cos, color="k", lw=0.8, ls="-.", label="predicted |cos(w_i, u)|")
    if predicted_interference is not None:
        b.axhline(predicted_interference, color="0.5", lw=0.8, ls="-.", label="predicted interference")
    a.set_ylabel("overlap of non-target\n" r"features, $|\cos|$")
    a.set_title("(a) non-target features leave the head's directions", fontsize=10)
    a.set_xlabel("training step")
    a.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    b.set_xlabel("training step")
    b.set_ylabel(r"$|\cos|$")
    b.set_ylim(0, 1.0)
    b.set_title("(b) the target feature lines up with u", fontsize=10)
    b.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


@book_figure
def plot_unwhitening(df) -> Figure:
    """Corollary: mean ``|cos|`` with the true features of raw singular vectors and of
    un-whitened ones (second moment estimated from samples), against ``||E_X||_2``."""
    for c in ("D", "spectrum", "interference", "cos_raw_checked", "cos_unwhitened_est"):
        if c not in df.columns:
            raise SVToolsError(f"df needs a column {c!r} (from svtools.theory.alignment_sweep)")
    fig, ax = subplots(figsize=(7.0, 5.4))
    ax.axvspan(*_GPT2_BAND, color="0.92", zorder=0)
    for n, ((spec, D), g) in enumerate(df.groupby(["spectrum", "D"], sort=True)):
        g = g.groupby("level").mean(numeric_only=True).sort_values("interference")
        ax.plot(g["interference"], g["cos_raw_checked"], "o-", color=f"C{n}", ms=4, label=f"{spec}, D={D}: raw u")
        ax.plot(g["interference"], g["cos_unwhitened_est"], "s--", color=f"C{n}", ms=4,
                label=rf"{spec}, D={D}: $\hat\Sigma_x u$ (un-whitened)")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_ylim(0, 1.0)
    ax.set_xlabel(r"interference $\|E_X\|_2$ (trace-normalised; symlog axis)")
    ax.set_ylabel(r"mean $|\cos|$ with the true feature")
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    return fig
