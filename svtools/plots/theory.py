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


def _style_legend(fig: Figure, color_labels: Sequence[tuple[str, str]], style_labels: Sequence[tuple[str, dict]],
                  ncol: int = 2) -> None:
    """One legend below the panels: a colour per entry of ``color_labels`` ``(color, label)``, then
    a grey line per entry of ``style_labels`` ``(label, line properties)``."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, lw=2, label=lab) for c, lab in color_labels]
    handles += [Line2D([], [], color="0.35", label=lab, **kw) for lab, kw in style_labels]
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, frameon=False)


def _split_label(label: str) -> tuple[str, str]:
    """``"method, frame"`` -> ``("method", "frame")`` (the frame empty when there is no comma)."""
    head, _, tail = label.partition(", ")
    return head, tail


@book_figure
def plot_theorem1(spectra: Mapping[str, torch.Tensor], table) -> Figure:
    """Panel (a): normalised singular values ``sigma_k / sigma_1`` of each head (log scale);
    panel (b): ``|cos|`` of each head's top singular vectors with Theorem 1's whitened prediction
    (bars) and with the raw features (crosses). One colour per method, shared by both panels.

    Args:
        spectra: ``"method, frame"`` -> ``(r,)`` singular values (one line each; colour by method,
            line style by frame).
        table: DataFrame with columns ``frame``, ``method``, ``cos_whitened``, ``cos_raw``
            (query and key sides given as the worse of the two).
    """
    if not spectra:
        raise SVToolsError("spectra is empty")
    for c in ("frame", "method", "cos_whitened", "cos_raw"):
        if c not in table.columns:
            raise SVToolsError(f"table needs a column {c!r}")
    methods = list(dict.fromkeys(list(table["method"]) + [_split_label(k)[0] for k in spectra]))
    color = {m: f"C{i}" for i, m in enumerate(methods)}
    spectrum_frames = list(dict.fromkeys(_split_label(k)[1] for k in spectra))
    styles = ["-", "--", ":", "-."]
    style = {f: styles[i % len(styles)] for i, f in enumerate(spectrum_frames)}
    fig, (a, b) = subplots(2, 1, height=6.4, layout="constrained")
    for label, sv in spectra.items():
        m, f = _split_label(label)
        sv = _np(sv)
        a.semilogy(np.arange(1, len(sv) + 1), np.maximum(sv / sv[0], 1e-17), marker="o", ms=3, ls=style[f],
                   color=color[m])
    a.set_xlabel(r"singular index $k$")
    a.set_ylabel(r"$\sigma_k / \sigma_1$")
    a.set_title("(a) singular values of each head")
    a.xaxis.set_major_locator(MaxNLocator(integer=True))
    frames = list(dict.fromkeys(table["frame"]))
    width = 0.8 / len(methods)
    for m_i, m in enumerate(methods):
        sub = table[table["method"] == m].set_index("frame").reindex(frames)
        xs = np.arange(len(frames)) + (m_i - (len(methods) - 1) / 2) * width
        b.bar(xs, sub["cos_whitened"], width * 0.9, color=color[m])
        b.plot(xs, sub["cos_raw"], "kx", ms=8, mew=1.5)
    b.set_xticks(np.arange(len(frames)), frames)
    b.set_ylim(0, 1.05)
    b.set_ylabel(r"$|\cos|$, top singular vector")
    b.set_xlabel(r"feature frame (its interference $\|E_X\|_2$)")
    b.set_title(r"(b) $|\cos|$ with whitened (bars) and raw ($\times$)")
    _style_legend(fig, [(color[m], m) for m in methods],
                  [(f"frame {f}", {"ls": style[f]}) for f in spectrum_frames if f], ncol=2)
    return fig


@book_figure
def plot_mean_effect(ratio: Sequence[float], cos: Mapping[str, Sequence[float]]) -> Figure:
    """``|cos|`` between the whitened prediction and the exact singular vector for non-zero-mean
    activations, against ``N / D`` (one line per label, e.g. per activation probability)."""
    fig, ax = subplots(height=3.0, layout="constrained")
    for label, c in cos.items():
        ax.plot(ratio, c, "o-", label=label)
    ax.axvline(1.0, color="grey", ls=":", lw=1)
    ax.text(1.04, 0.04, r"$N = D$", color="0.35", transform=ax.get_xaxis_transform())
    ax.set_xlabel(r"features per dimension $N / D$")
    ax.set_ylabel(r"mean $|\cos(\Sigma_X^{-1}x_i,\ u_i)|$")
    ax.legend(loc="lower left")
    return fig


@book_figure
def plot_alignment_vs_interference(df, *, measured: Optional[Mapping[str, Mapping[str, float]]] = None,
                                   paper_floor: Optional[float] = 0.75) -> Figure:
    """Paper Fig. 4 counterpart, in both normalisations of ``||E_X||_2``.

    Top: against the trace-normalised interference; bottom: against the unnormalised one (the
    same frames). One colour per (spectrum, D): the mean over frames (line), the spread over
    frames at each level (shaded min-max), the spectral bound (dashed); the worst-case floor
    ``sqrt(1 - e^2)`` (grey). Measured frames (e.g. sparse-autoencoder dictionaries of real
    models) are drawn as stars. The band 10-55 is the "GPT-2-like" range reported for the paper,
    whose normalisation is not known: it is shaded in both.

    Args:
        df: output of :func:`svtools.theory.alignment_sweep` (several concatenated; seeds are
            pooled per level).
        measured: label -> dict with ``interference``, ``interference_abs`` and ``cos_raw``
            (:func:`svtools.theory.measure_frame`).
        paper_floor: the reported "stays above" level (drawn dotted), or None.
    """
    from matplotlib.lines import Line2D

    for c in ("D", "spectrum", "interference", "interference_abs", "cos_raw", "bound_mean"):
        if c not in df.columns:
            raise SVToolsError(f"df needs a column {c!r} (from svtools.theory.alignment_sweep)")
    fig, axes = subplots(2, 1, height=7.4, layout="constrained")
    groups = list(df.groupby(["spectrum", "D"], sort=True))
    for ax, xcol, xlabel, letter in (
            (axes[0], "interference", r"interference $\|E_X\|_2$, trace-normalised", "a"),
            (axes[1], "interference_abs", r"interference $\|E_X\|_2$, absolute", "b")):
        ax.axvspan(*_GPT2_BAND, color="0.9", zorder=0)
        ax.text(np.sqrt(_GPT2_BAND[0] * _GPT2_BAND[1]), 0.04, "reported\nGPT-2 range", ha="center", color="0.3")
        for n, ((spec, D), g) in enumerate(groups):
            agg = g.groupby("level").agg(x=(xcol, "mean"), m=("cos_raw", "mean"), lo=("cos_raw", "min"),
                                         hi=("cos_raw", "max"), b=("bound_mean", "mean"))
            agg = agg.sort_values("x")
            col = f"C{n}"
            ax.plot(agg["x"], agg["m"], "o-", color=col, ms=3)
            ax.fill_between(agg["x"], agg["lo"], agg["hi"], color=col, alpha=0.25, lw=0)
            ax.plot(agg["x"], agg["b"], "--", color=col, lw=1)
        if xcol == "interference":
            e = np.linspace(0, 1, 200)
            ax.plot(e, np.sqrt(1 - e ** 2), color="0.3", lw=1.5)
        if paper_floor is not None:
            ax.axhline(paper_floor, color="k", ls=":", lw=1)
        for m_i, (label, mf) in enumerate((measured or {}).items()):
            ax.plot([mf[xcol]], [mf["cos_raw"]], marker="*", ms=14, color=f"C{len(groups) + m_i}", mec="k",
                    ls="none")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(0, max(70.0, float(df[xcol].max()) * 1.1,
                           *[float(mf[xcol]) * 1.3 for mf in (measured or {}).values()]))
        ax.set_ylim(0, 1.0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(r"mean $|\cos(x_i, u_i)|$")
        ax.set_title(f"({letter}) " + ("trace-normalised interference" if letter == "a"
                                        else "the same frames, absolute interference"))
    handles = [Line2D([], [], color=f"C{n}", marker="o", ms=3, label=f"{spec}, $D$ = {D}: mean, range")
               for n, ((spec, D), _) in enumerate(groups)]
    handles += [Line2D([], [], color=f"C{len(groups) + m_i}", marker="*", ms=12, mec="k", ls="none", label=label)
                for m_i, label in enumerate(measured or {})]
    handles += [Line2D([], [], color="0.35", ls="--", lw=1, label="bound (b), per colour"),
                Line2D([], [], color="0.3", lw=1.5, label=r"worst case $\sqrt{1-\epsilon^2}$")]
    if paper_floor is not None:
        handles.append(Line2D([], [], color="k", ls=":", lw=1, label=f"reported floor {paper_floor:g}"))
    fig.legend(handles=handles, loc="outside lower center", ncol=2, frameon=False)
    return fig


@book_figure
def plot_frame_training(runs: Mapping[str, object], *, predicted_cos: Optional[float] = None,
                        predicted_interference: Optional[float] = None) -> Figure:
    """Theorem 3's experiment: (a) largest overlap of non-target features with the fixed head's
    ``u`` and ``v`` against step; (b) the target feature's ``|cos|`` with ``u`` and its largest
    overlap with any other feature, with the theory's predicted end points. One colour per run.

    Args:
        runs: label -> :class:`svtools.theory.FrameRun`.
    """
    if not runs:
        raise SVToolsError("runs is empty")
    fig, (a, b) = subplots(2, 1, height=6.4, layout="constrained")
    for n, (label, r) in enumerate(runs.items()):
        col = f"C{n}"
        st = _np(r.step)
        a.semilogy(st, np.maximum(_np(r.overlap_u), 1e-6), "-", color=col)
        a.semilogy(st, np.maximum(_np(r.overlap_v), 1e-6), "--", color=col)
        b.plot(st, _np(r.cos_target)[:, 0], "-", color=col)
        b.plot(st, _np(r.interference_target)[:, 0], ":", color=col)
    if predicted_cos is not None:
        b.axhline(predicted_cos, color="k", lw=0.9, ls="-.")
    if predicted_interference is not None:
        b.axhline(predicted_interference, color="0.5", lw=0.9, ls="-.")
    a.set_ylabel(r"non-target $|\cos|$")
    a.set_title("(a) non-target features leave the head's directions")
    a.set_xlabel("training step")
    b.set_xlabel("training step")
    b.set_ylabel(r"$|\cos|$")
    b.set_ylim(0, 1.02)
    b.set_title(r"(b) the target feature lines up with $u$")
    styles = [(r"(a) $\mathrm{max}_k\,|\cos(w_k, u)|$", {"ls": "-"}), (r"(a) $\mathrm{max}_k\,|\cos(w_k, v)|$", {"ls": "--"}),
              (r"(b) $|\cos(w_0, u)|$", {"ls": "-"}), (r"(b) $\mathrm{max}_k\,|\cos(w_0, w_k)|$", {"ls": ":"})]
    if predicted_cos is not None or predicted_interference is not None:
        styles.append(("(b) predicted end points", {"ls": "-.", "lw": 0.9}))
    _style_legend(fig, [(f"C{n}", label) for n, label in enumerate(runs)], styles, ncol=2)
    return fig


@book_figure
def plot_unwhitening(df) -> Figure:
    """Corollary: mean ``|cos|`` with the true features of raw singular vectors (circles, solid)
    and of un-whitened ones (squares, dashed; second moment estimated from samples), against
    ``||E_X||_2``; one colour per (spectrum, D)."""
    from matplotlib.lines import Line2D

    for c in ("D", "spectrum", "interference", "cos_raw_checked", "cos_unwhitened_est"):
        if c not in df.columns:
            raise SVToolsError(f"df needs a column {c!r} (from svtools.theory.alignment_sweep)")
    fig, ax = subplots(height=4.0, layout="constrained")
    ax.axvspan(*_GPT2_BAND, color="0.92", zorder=0)
    groups = list(df.groupby(["spectrum", "D"], sort=True))
    for n, ((spec, D), g) in enumerate(groups):
        g = g.groupby("level").mean(numeric_only=True).sort_values("interference")
        ax.plot(g["interference"], g["cos_raw_checked"], "o-", color=f"C{n}", ms=4)
        ax.plot(g["interference"], g["cos_unwhitened_est"], "s--", color=f"C{n}", ms=4)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(r"interference $\|E_X\|_2$ (trace-normalised)")
    ax.set_ylabel(r"mean $|\cos|$ with the feature")
    handles = [Line2D([], [], color=f"C{n}", lw=2, label=f"{spec}, $D$ = {D}") for n, ((spec, D), _) in enumerate(groups)]
    handles += [Line2D([], [], color="0.35", marker="o", ms=4, label=r"raw singular vector $u$"),
                Line2D([], [], color="0.35", marker="s", ms=4, ls="--", label=r"un-whitened $\hat\Sigma_x u$")]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, frameon=False)
    return fig
