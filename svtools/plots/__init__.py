r"""Figures of the book, one module per part (``toy``, ``theory``, ``sad``).

Every function returns a matplotlib Figure with labelled axes and units (axis labels and titles
in mathtext, ``r"$\sigma_k$"``, not ``sigma_k``); the notebooks add the numbered captions. The
functions follow one convention, so that every figure is readable on a desktop screen and on a
phone:

**Two screens.** The book's content column is ``COLUMN_PX = 784`` CSS px wide in a 1400 px
window; in a 400 px window a figure gets ``PHONE_FIGURE_PX = 352`` px (sphinx-book-theme 1.3;
measured with ``scripts/screenshots.py``). A figure is shown at its own width, or shrunk to that
width when wider, text included. A figure saved ``w`` inches wide (its tight bounding box plus
``PAD_IN`` on each side) with ``s``-point text therefore shows that text at ``s * 4/3`` px on a
desktop and at ``s * PHONE_FIGURE_PX / (72 w)`` px on a phone (the same for SVG at 96 px/in and
PNG at ``DPI``). The rule: every text at least ``MIN_TEXT_PX = 8`` px on both screens. Hence
the widest figure, ``FIGURE_IN = 5.8`` in (about 570 px as SVG), and the smallest font,
``MIN_FONT_PT = 10`` pt: 10 pt in a 5.8 in figure shows at about 8.3 px on a phone.
:func:`legibility` computes a figure's smallest text on a phone; the tests of the plot functions
require it to be at least ``MIN_TEXT_PX``, and the browser check measures it again on the built
pages (from the SVG files).

**Format.** The book shows figures as SVG (``svtools.report.glue`` writes them so; they stay
sharp on any screen). A PNG shown directly by a cell is ``DPI = 100`` px per inch; wider than
the desktop column by more than 10% (``MAX_WIDTH_PX = 862`` px) fails ``scripts/check_html.py``.

**Fonts.** ``STYLE`` sets 11 pt labels and titles, 10 pt ticks and legends. Do not pass smaller
``fontsize=`` values; leave sizes to the style.

**How a plot function follows it.**

1. Decorate it with ``@book_figure``: the body runs under ``STYLE``, and a finished figure whose
   drawn width (tight bounding box) exceeds the desktop column by more than 10% warns (the build
   fails on the warning).
2. Make the figure with ``subplots(nrows, ncols, width=..., height=...)``: ``width`` is a fraction
   of ``FIGURE_IN`` (default 1.0), ``height`` is in inches (default: a panel aspect of 0.7, capped
   at 3.2 in per row). A ``figsize=`` wider than ``FIGURE_IN`` is narrowed to it. Two panels side
   by side leave each ~3 in; more panels are stacked in rows, which also reads better on phones.
3. Keep what is drawn outside the axes small: a legend placed outside (``bbox_to_anchor``) or a
   long suptitle widens the figure. Prefer legends inside the axes in an empty corner (name the
   corner: ``loc="best"`` is slow and can cover data), or below the axes. No titles that repeat
   the caption: the caption says what to see.

A Figure made here is detached from pyplot (see ``subplots``): make it a cell's last expression
to display it, once, or glue it (``svtools.report.glue``) to show it with a caption.
"""

from __future__ import annotations

import functools
import io
import re
import warnings
from typing import Any, Callable, TypeVar

import matplotlib as mpl
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

__all__ = ["COLUMN_PX", "PHONE_COLUMN_PX", "PHONE_FIGURE_PX", "PAD_IN", "DPI", "COLUMN_IN", "FIGURE_IN", "MAX_WIDTH_PX", "MIN_FONT_PT",
           "MIN_TEXT_PX", "STYLE", "book_figure", "figure_width_px", "legibility", "subplots", "svg_text", "to_svg"]

#: Width of the book's content column in a 1400 px window, in CSS pixels.
COLUMN_PX = 784
#: Width of the content column in a 400 px (phone) window, in CSS pixels.
PHONE_COLUMN_PX = 368
#: Width a figure is shown at in a 400 px window (the column less the figure's margins), CSS px.
PHONE_FIGURE_PX = 352
#: Pixels per inch of a PNG a notebook shows (matplotlib's default ``figure.dpi``).
DPI = 100
#: The desktop column in figure inches at ``DPI``.
COLUMN_IN = COLUMN_PX / DPI
#: The widest figure, in inches: ``MIN_FONT_PT`` text in it stays >= ``MIN_TEXT_PX`` on a phone.
FIGURE_IN = 5.8
#: White margin around a saved figure, in inches (``savefig(pad_inches=...)``).
PAD_IN = 0.05
#: The widest PNG allowed: the desktop column plus 10%.
MAX_WIDTH_PX = round(1.1 * COLUMN_PX)
#: The smallest font size allowed, in points.
MIN_FONT_PT = 10
#: The smallest figure text allowed on screen, in CSS px, on a desktop and on a phone (checked by
#: the plot functions' tests through :func:`legibility` and by ``scripts/screenshots.py``).
MIN_TEXT_PX = 8

#: rcParams every figure of the book is drawn with (``@book_figure`` applies them).
STYLE: dict[str, Any] = {
    "figure.dpi": DPI,
    "savefig.dpi": "figure",
    "savefig.pad_inches": PAD_IN,
    "svg.fonttype": "path",          # text as outlines: the same glyphs on every screen
    "font.size": 11,
    "axes.titlesize": 11,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "legend.title_fontsize": 10,
    "figure.titlesize": 11,
    "legend.framealpha": 0.85,
    "mathtext.fontset": "dejavusans",
}

_PANEL_ASPECT = 0.7  # default panel height / width
_MAX_ROW_IN = 3.2    # default cap on a row's height, inches

F = TypeVar("F", bound=Callable[..., Figure])


def subplots(nrows: int = 1, ncols: int = 1, *, width: float = 1.0, height: float | None = None,
             **kwargs: Any) -> tuple[Figure, Any]:
    """``plt.subplots`` sized to the book's column, detached from pyplot's list of open figures.

    Args:
        nrows, ncols: the grid of axes.
        width: figure width as a fraction of ``FIGURE_IN`` (``0 < width <= 1``).
        height: figure height in inches; default ``nrows`` rows of panels of aspect 0.7, each row
            at most 3.2 in high.
        **kwargs: passed to ``plt.subplots`` (``sharex``, ``squeeze``, ``gridspec_kw``...). A
            ``figsize`` is accepted too; its width is narrowed to ``FIGURE_IN``.

    Returns:
        ``(fig, axes)`` as ``plt.subplots`` returns them, with ``fig.dpi == DPI``.

    A function that returns its Figure should not also leave it open in pyplot: a notebook would
    show it twice (once as the cell's value, once when pyplot flushes), and loops would pile up
    open figures. Display the returned Figure (make it a cell's last expression).
    """
    if not 0 < width <= 1:
        raise ValueError(f"width is a fraction of FIGURE_IN, in (0, 1]; got {width}")
    if "figsize" in kwargs:
        w, h = kwargs.pop("figsize")
        w = min(float(w), FIGURE_IN)
    else:
        w = width * FIGURE_IN
        h = height if height is not None else nrows * min(_MAX_ROW_IN, _PANEL_ASPECT * w / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(w, h), dpi=DPI, **kwargs)
    plt.close(fig)
    return fig, axes


def figure_width_px(fig: Figure) -> int:
    """Width in pixels of the PNG a notebook shows for ``fig`` (tight bounding box, ``fig.dpi``)."""
    bbox = fig.get_tightbbox()  # inches; draws with a renderer of its own if needed
    return round(bbox.width * fig.dpi + 2 * mpl.rcParams["savefig.pad_inches"] * fig.dpi)


# matplotlib (``svg.fonttype = "path"``) writes each text as ``<g id="text_N"><!-- the text --><g
# transform="translate(..) [rotate(..)] scale(s -s)">``: its font size is ``100 s`` in the SVG's units.
_SVG_WIDTH = re.compile(r'<svg\b[^>]*?\bwidth="([\d.]+)(pt|px)?"')
_SVG_TEXT = re.compile(r'<g id="text_\d+">\s*(?:<!--((?:(?!-->).)*)-->)?\s*<g\b[^>]*?\stransform="[^"]*?'
                       r'scale\(([\d.e-]+) -[\d.e-]+\)"', re.S)


def to_svg(fig: Figure) -> str:
    """``fig`` as the SVG the book shows (tight bounding box, ``PAD_IN`` margin, text as paths)."""
    buf = io.StringIO()
    with mpl.rc_context({"svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", pad_inches=PAD_IN)
    return buf.getvalue()


def svg_text(svg: str) -> tuple[float, list[tuple[float, str]]]:
    """The width of a matplotlib SVG (in its units, points) and each text's ``(font size, text)``.

    Raises:
        ValueError: not an SVG with a width.
    """
    w = _SVG_WIDTH.search(svg)
    if not w:
        raise ValueError("no width on <svg>")
    return float(w.group(1)), [(100 * float(sc), (t or "").strip()) for t, sc in _SVG_TEXT.findall(svg)]


def legibility(fig: Figure) -> tuple[float, str]:
    """The smallest text of ``fig`` on a phone, in CSS px, and that text.

    Measured on the SVG the book shows (:func:`to_svg`), as ``scripts/screenshots.py`` measures
    it on the built pages: a figure ``W`` points wide is shown at ``min(W * 4/3, PHONE_FIGURE_PX)``
    px in a 400 px window, so a text of ``s`` points measures ``s * shown / W`` px. Returns
    ``(inf, "")`` for a figure without text.
    """
    width, texts = svg_text(to_svg(fig))
    shown = min(width * 4 / 3, PHONE_FIGURE_PX)
    return min(((size * shown / width, text) for size, text in texts), default=(float("inf"), ""))


def book_figure(fn: F) -> F:
    """Decorator of the plot functions: draw under ``STYLE``, warn when wider than the column.

    The warning (``UserWarning``) names the function and both widths; the build shows it, and
    ``scripts/check_html.py`` rejects the page for the warning and for the PNG's width.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with mpl.rc_context(STYLE):
            fig = fn(*args, **kwargs)
            if isinstance(fig, Figure):
                px = figure_width_px(fig)
                if px > MAX_WIDTH_PX:
                    warnings.warn(f"{fn.__module__}.{fn.__qualname__}: figure is {px} px wide, more than "
                                  f"the book's column ({COLUMN_PX} px) + 10%; use svtools.plots.subplots "
                                  "and keep legends inside the axes", UserWarning, stacklevel=2)
        return fig

    return wrapper  # type: ignore[return-value]
