"""Figures of Part 2 (the theory). Each function returns a matplotlib Figure; captions live in
the notebooks."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from svtools.plots import subplots
from svtools._checks import SVToolsError

__all__ = ["plot_theorem1", "plot_mean_effect", "plot_alignment_vs_interference", "plot_frame_training",
           "plot_unwhitening"]

_GPT2_BAND = (10.0, 55.0)


def _np(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=float)


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
    fig, (a, b) = subplots(1, 2, figsize=(11, 4))
    for label, s in spectra.items():
        s = _np(s)
        a.semilogy(np.arange(1, len(s) + 1), np.maximum(s / s[0], 1e-17), "o-", ms=3, label=label)
    a.set_xlabel("singular index k")
    a.set_ylabel(r"$\sigma_k / \sigma_1$ (dimensionless)")
    a.set_title("(a) one significant singular value")
    a.legend(fontsize=7)
    frames = list(dict.fromkeys(table["frame"]))
    methods = list(dict.fromkeys(table["method"]))
    width = 0.8 / len(methods)
    for m_i, m in enumerate(methods):
        sub = table[table["method"] == m].set_index("frame").reindex(frames)
        xs = np.arange(len(frames)) + (m_i - (len(methods) - 1) / 2) * width
        b.bar(xs, sub["cos_whitened"], width * 0.9, label=f"{m}: vs whitened", color=f"C{m_i}")
        b.plot(xs, sub["cos_raw"], "kx", ms=7, label="vs raw feature" if m_i == 0 else None)
    b.set_xticks(np.arange(len(frames)))
    b.set_xticklabels(frames, fontsize=8)
    b.set_ylim(0, 1.05)
    b.set_ylabel(r"$|\cos|$ with top singular vector")
    b.set_xlabel(r"feature frame (interference $\|E_X\|_2$)")
    b.set_title("(b) the whitened direction is the singular vector")
    b.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def plot_mean_effect(ratio: Sequence[float], cos: Mapping[str, Sequence[float]]) -> Figure:
    """``|cos|`` between the whitened prediction and the exact singular vector for non-zero-mean
    activations, against ``N / D`` (one line per label, e.g. per activation law)."""
    fig, ax = subplots(figsize=(6, 3.8))
    for label, c in cos.items():
        ax.plot(ratio, c, "o-", label=label)
    ax.axvline(1.0, color="grey", ls=":", lw=1)
    ax.text(1.02, ax.get_ylim()[0], " N = D", color="grey", va="bottom", fontsize=8)
    ax.set_xlabel("features per dimension N / D")
    ax.set_ylabel(r"mean $|\cos(\Sigma_X^{-1}x_i,\ u_i)|$")
    ax.set_title("non-zero-mean activations: the whitened prediction drifts in superposition")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_alignment_vs_interference(df, *, paper_floor: Optional[float] = 0.75) -> Figure:
    """Paper Fig. 4 counterpart: mean ``|cos|`` of raw features with the head's singular vectors
    against ``||E_X||_2``, one colour per (D, spectrum), with the spectral bound (dashed) and the
    worst-case floor ``sqrt(1 - e^2)`` (grey). The GPT-2-like band 10-55 is shaded.

    Args:
        df: output of :func:`svtools.theory.alignment_sweep` (several concatenated).
    """
    for c in ("D", "spectrum", "interference", "cos_raw", "bound_mean"):
        if c not in df.columns:
            raise SVToolsError(f"df needs a column {c!r} (from svtools.theory.alignment_sweep)")
    fig, ax = subplots(figsize=(10, 4.5))
    ax.axvspan(*_GPT2_BAND, color="0.92", zorder=0)
    ax.text(np.sqrt(_GPT2_BAND[0] * _GPT2_BAND[1]), 0.02, "GPT-2-like\nlevels", ha="center", fontsize=8,
            color="0.4")
    groups = df.groupby(["spectrum", "D"], sort=True)
    for n, ((spec, D), g) in enumerate(groups):
        g = g.groupby("level").mean(numeric_only=True).sort_values("interference")
        col = f"C{n}"
        ax.plot(g["interference"], g["cos_raw"], "o-", color=col, ms=4, label=f"{spec}, D={D}: measured")
        ax.plot(g["interference"], g["bound_mean"], "--", color=col, lw=1, label=f"{spec}, D={D}: bound")
    e = np.linspace(0, 1, 200)
    ax.plot(e, np.sqrt(1 - e ** 2), color="0.3", lw=1.5, label=r"worst case $\sqrt{1-\epsilon^2}$")
    if paper_floor is not None:
        ax.axhline(paper_floor, color="k", ls=":", lw=1, label=f"paper: stays above {paper_floor}")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(0, max(60.0, float(df["interference"].max()) * 1.1))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(r"interference $\|E_X\|_2$ (trace-normalised, dimensionless; symlog axis)")
    ax.set_ylabel(r"mean $|\cos(x_i, u_i)|$ over features")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


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
    fig, (a, b) = subplots(1, 2, figsize=(11, 4))
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
    a.set_xlabel("training step")
    a.set_ylabel(r"overlap of non-target features, $|\cos|$")
    a.set_title("(a) non-target features leave the head's directions")
    a.legend(fontsize=7)
    b.set_xlabel("training step")
    b.set_ylabel(r"$|\cos|$")
    b.set_ylim(0, 1.05)
    b.set_title("(b) the target feature lines up with u")
    b.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_unwhitening(df) -> Figure:
    """Corollary: mean ``|cos|`` with the true features of raw singular vectors and of
    un-whitened ones (second moment estimated from samples), against ``||E_X||_2``."""
    for c in ("D", "spectrum", "interference", "cos_raw_checked", "cos_unwhitened_est"):
        if c not in df.columns:
            raise SVToolsError(f"df needs a column {c!r} (from svtools.theory.alignment_sweep)")
    fig, ax = subplots(figsize=(10, 4.3))
    ax.axvspan(*_GPT2_BAND, color="0.92", zorder=0)
    for n, ((spec, D), g) in enumerate(df.groupby(["spectrum", "D"], sort=True)):
        g = g.groupby("level").mean(numeric_only=True).sort_values("interference")
        ax.plot(g["interference"], g["cos_raw_checked"], "o-", color=f"C{n}", ms=4, label=f"{spec}, D={D}: raw u")
        ax.plot(g["interference"], g["cos_unwhitened_est"], "s--", color=f"C{n}", ms=4,
                label=rf"{spec}, D={D}: $\hat\Sigma_x u$ (un-whitened)")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(r"interference $\|E_X\|_2$ (dimensionless; symlog axis)")
    ax.set_ylabel(r"mean $|\cos|$ with the true feature")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig
