"""Figures of the book, one module per part (``toy``, ``theory``, ``sad``).

Every function returns a matplotlib Figure with labelled axes and units; the notebooks add the
captions. The functions follow one convention, so that every figure is readable where the book
shows it:

**The column.** On a desktop screen (1400 px window) the book's content column is
``COLUMN_PX = 784`` px wide (sphinx-book-theme 1.3; measured with ``scripts/screenshots.py``).
A notebook shows a Figure as a PNG of ``DPI = 100`` pixels per inch (matplotlib's default
``figure.dpi``; IPython saves with ``bbox_inches="tight"``). So the column is
``COLUMN_IN = 7.84`` inches of figure, and a figure wider than that is shrunk by the browser,
text included. Wider than the column by more than 10% (``MAX_WIDTH_PX = 862`` px) is an error:
``scripts/check_html.py`` fails the build on such a PNG.

**Fonts.** Text must be at least 10 px as displayed: at 100 dpi one point is 1.39 px, so 8 pt is
the smallest size allowed (``MIN_FONT_PT``; 11 px at 100%, still 10 px in a figure 10% too
wide). ``STYLE`` sets 10 pt labels and titles, 9 pt ticks and legends. Do not pass smaller
``fontsize=`` values; leave sizes to the style unless making text larger.

**How a plot function follows it.**

1. Decorate it with ``@book_figure``: the body runs under ``STYLE`` (fonts, dpi), and the
   finished figure's drawn width (tight bounding box, the PNG the reader gets) is checked; a
   figure wider than ``MAX_WIDTH_PX`` raises a ``UserWarning`` naming the function, which the
   build shows and ``check_html.py`` rejects.
2. Make the figure with ``subplots(nrows, ncols, width=..., height=...)``: ``width`` is a
   fraction of the column (default 1.0, the full column), ``height`` is in inches (default: a
   panel aspect of 0.7, capped at 3.2 in per row). A ``figsize=`` wider than the column is
   narrowed to the column. Three panels side by side leave each ~2.4 in: if a panel needs more,
   stack rows instead.
3. Keep what is drawn outside the axes small: a legend placed outside (``bbox_to_anchor``) or a
   long suptitle widens the PNG beyond ``figsize``. Prefer legends inside the axes in an empty
   corner (``loc="best"`` is slow and can cover data: name the corner), or below the axes.

A Figure made here is detached from pyplot (see ``subplots``): make it a cell's last expression
to display it, once.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, TypeVar

import matplotlib as mpl
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

__all__ = ["COLUMN_PX", "DPI", "COLUMN_IN", "MAX_WIDTH_PX", "MIN_FONT_PT", "STYLE", "book_figure",
           "figure_width_px", "subplots"]

#: Width of the book's content column on a desktop screen, in CSS pixels.
COLUMN_PX = 784
#: Pixels per inch of the PNG a notebook shows (matplotlib's default ``figure.dpi``).
DPI = 100
#: The column in figure inches.
COLUMN_IN = COLUMN_PX / DPI
#: The widest PNG allowed: the column plus 10%.
MAX_WIDTH_PX = round(1.1 * COLUMN_PX)
#: The smallest font size allowed, in points (8 pt = 11.1 px at ``DPI``).
MIN_FONT_PT = 8
#: The smallest figure text allowed on screen, in CSS px, at every width the browser check tries
#: (``scripts/screenshots.py``, 1400 and 400 px).
MIN_TEXT_PX = 8

#: rcParams every figure of the book is drawn with (``@book_figure`` applies them).
STYLE: dict[str, Any] = {
    "figure.dpi": DPI,
    "savefig.dpi": "figure",
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.title_fontsize": 9,
    "figure.titlesize": 11,
    "legend.framealpha": 0.85,
}

_PANEL_ASPECT = 0.7  # default panel height / width
_MAX_ROW_IN = 3.2    # default cap on a row's height, inches

F = TypeVar("F", bound=Callable[..., Figure])


def subplots(nrows: int = 1, ncols: int = 1, *, width: float = 1.0, height: float | None = None,
             **kwargs: Any) -> tuple[Figure, Any]:
    """``plt.subplots`` sized to the book's column, detached from pyplot's list of open figures.

    Args:
        nrows, ncols: the grid of axes.
        width: figure width as a fraction of the column (``0 < width <= 1``).
        height: figure height in inches; default ``nrows`` rows of panels of aspect 0.7, each row
            at most 3.2 in high.
        **kwargs: passed to ``plt.subplots`` (``sharex``, ``squeeze``, ``gridspec_kw``...). A
            ``figsize`` is accepted for old callers; its width is narrowed to the column.

    Returns:
        ``(fig, axes)`` as ``plt.subplots`` returns them, with ``fig.dpi == DPI``.

    A function that returns its Figure should not also leave it open in pyplot: a notebook would
    show it twice (once as the cell's value, once when pyplot flushes), and loops would pile up
    open figures. Display the returned Figure (make it a cell's last expression).
    """
    if not 0 < width <= 1:
        raise ValueError(f"width is a fraction of the column, in (0, 1]; got {width}")
    if "figsize" in kwargs:
        w, h = kwargs.pop("figsize")
        w = min(float(w), COLUMN_IN)
    else:
        w = width * COLUMN_IN
        h = height if height is not None else nrows * min(_MAX_ROW_IN, _PANEL_ASPECT * w / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(w, h), dpi=DPI, **kwargs)
    plt.close(fig)
    return fig, axes


def figure_width_px(fig: Figure) -> int:
    """Width in pixels of the PNG a notebook shows for ``fig`` (tight bounding box, ``fig.dpi``)."""
    bbox = fig.get_tightbbox()  # inches; draws with a renderer of its own if needed
    return round(bbox.width * fig.dpi + 2 * mpl.rcParams["savefig.pad_inches"] * fig.dpi)


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
