"""Results for readers: small tables, numbers in words, values glued into a chapter's prose.

Functions here turn results into what a reader reads; they compute nothing new. A chapter shows
what it computed in three ways, and this module serves all three:

* **Tables that fit the column.** :func:`format_table` turns a DataFrame into a small table for
  readers: columns chosen and named in words, numbers rounded, empty columns dropped, no
  ``0, 1, 2`` index unless it means something. It returns a :class:`Table`, which a notebook
  shows as HTML (and as aligned text elsewhere). A table estimated wider than the book's column
  warns (the build turns the warning into a failure), so a table is made narrower by choosing
  fewer columns, not by being cut off. :func:`format_mean_sd` shows a spread over seeds,
  :func:`format_settings` a run's settings, :func:`format_summary` a
  :func:`svtools.sad.bootstrap` summary (``"estimate [lo, hi]"`` cells).
* **Numbers in sentences.** :func:`glue` records a value under a name in the notebook's output;
  the chapter's Markdown pastes it with myst-nb's role, ``{glue:text}`name``` (as recorded) or
  ``{glue:text}`name:.3f``` (a number, formatted). From another page:
  ``{glue:text}`part1/02_many_pairs.ipynb::name:s``` (path relative to the pasting page; the
  format spec, here ``s``, ``d`` or ``.3f``, is then required). So "What this chapter showed"
  states the numbers of the run that built the page, never a typed copy. Figures are glued too
  (:func:`glue` with a Figure: SVG, shown where the cell runs, and pasted numbered and captioned by
  ``{glue:figure}``).
* **Run time.** :func:`glue_run_time` (the last cell of a chapter) records how long the chapter
  took since svtools was imported, at which scale and on what hardware; the chapter's
  ``{result-box}`` shows it.

The ``format_*`` functions of single values return strings: :func:`format_number`,
:func:`format_range`, :func:`format_list`, :func:`format_pm`, :func:`format_interval`,
:func:`format_duration`, :func:`format_count`; :func:`wrap` breaks a printed sentence into lines
that fit the column.
"""

from __future__ import annotations

import math
import numbers
import os
import textwrap
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from svtools._checks import as_int, check_columns
from svtools.plots import to_svg
from svtools.runtime import elapsed, scale_name

__all__ = ["COLUMN_CHARS", "TABLE_CHARS", "Table", "format_table", "format_mean_sd", "format_settings",
           "format_summary", "format_number", "format_range",
           "format_list", "format_pm", "format_interval", "format_duration", "format_count", "wrap",
           "glue", "glue_run_time", "GLUED", "interval_cells", "format_interval_table",
           "format_matched"]

#: Characters of printed (monospace) output that fit the book's column at 1400 px without
#: scrolling (measured with ``scripts/screenshots.py``). :func:`wrap` breaks lines here.
COLUMN_CHARS = 80
#: Estimated width budget of a table, in characters of the table font (cells plus padding).
TABLE_CHARS = 84

_PAD = 3          # characters of padding a table cell adds, estimated
_DASH = "–"       # en dash, for ranges
_MISSING = "–"

#: myst-nb's prefix for a glued value that is recorded but not shown (``myst_nb.glue``).
_GLUE_PREFIX = "application/papermill.record/"


# ------------------------------------------------------------------------------- numbers in words

def _scalar(x: Any) -> Any:
    """numpy/torch scalars as Python numbers (their reprs are not plain numbers)."""
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 0) == 0:
        return x.item()
    return x


def _missing(x: Any) -> bool:
    if x is None or x is pd.NA or x is pd.NaT:
        return True
    if isinstance(x, str):
        return x.strip() == ""
    try:
        return isinstance(x, numbers.Real) and math.isnan(x)
    except TypeError:
        return False


def format_number(x: Any, digits: int = 3) -> str:
    """One value as a reader reads it.

    Integers get thousands separators from 10,000 (``29804`` → ``"29,804"``); floats get
    ``digits`` decimals, or two significant digits in scientific form when smaller than the
    last decimal shown (``1.2e-05``, so a small number never reads as ``0.000``); whole-number
    floats stay floats (``2.000``). Booleans read ``"yes"``/``"no"``, missing values ``"–"``,
    strings pass unchanged.
    """
    x = _scalar(x)
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if _missing(x):
        return _MISSING
    if isinstance(x, numbers.Integral):
        return f"{x:,}" if abs(x) >= 10_000 else str(x)
    if isinstance(x, numbers.Real):
        x = float(x)
        if math.isinf(x):
            return "∞" if x > 0 else "−∞"
        if x != 0 and abs(x) < 0.5 * 10.0 ** -digits:
            return f"{x:.1e}"
        return f"{x:,.{digits}f}" if abs(x) >= 10_000 else f"{x:.{digits}f}"
    return str(x)


def format_range(values: Iterable[Any], digits: int = 3) -> str:
    """``"lo–hi"`` of ``values`` (one number when they are all equal); missing values ignored."""
    vals = [float(_scalar(v)) if not isinstance(_scalar(v), numbers.Integral) else _scalar(v)
            for v in values if not _missing(_scalar(v))]
    if not vals:
        return _MISSING
    lo, hi = min(vals), max(vals)
    a, b = format_number(lo, digits), format_number(hi, digits)
    return a if a == b else f"{a}{_DASH}{b}"


def format_list(values: Iterable[Any], digits: int = 3, *, last: str = "and") -> str:
    """``"18, 18, 17 and 16"``: values in their order, the last two joined by ``last``."""
    items = [format_number(v, digits) for v in values]
    if len(items) <= 1:
        return items[0] if items else ""
    return f"{', '.join(items[:-1])} {last} {items[-1]}"


def format_pm(mean: Any, spread: Any, digits: int = 3) -> str:
    """``"0.993 ± 0.004"`` (a mean and its spread, e.g. the standard deviation over seeds)."""
    if _missing(_scalar(spread)):
        return format_number(mean, digits)
    return f"{format_number(mean, digits)} ± {format_number(spread, digits)}"


def format_interval(estimate: Any, lo: Any, hi: Any, digits: int = 2) -> str:
    """``"0.21 [0.19, 0.23]"``: an estimate and its interval."""
    return f"{format_number(estimate, digits)} [{format_number(lo, digits)}, {format_number(hi, digits)}]"


def format_count(k: Any, n: Any) -> str:
    """``"4 of 5"``."""
    return f"{format_number(k)} of {format_number(n)}"


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"3 min 12 s"``, ``"1 h 05 min"``."""
    s = int(round(float(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def wrap(text: str, width: int = COLUMN_CHARS) -> str:
    """``text`` broken into lines of at most ``width`` characters (for ``print``); existing line
    breaks are kept, continuation lines are indented by two spaces."""
    return "\n".join(textwrap.fill(line, width, subsequent_indent="  ", break_on_hyphens=False)
                     if len(line) > width else line for line in text.split("\n"))


# --------------------------------------------------------------------------------------- tables

class Table:
    """A formatted table: strings only, shown as HTML in a notebook and as aligned text elsewhere.

    Attributes:
        data: the table as a DataFrame of strings (columns in words).
        show_index: whether the index is part of the table (False for a plain ``0, 1, 2`` index).
    """

    def __init__(self, data: pd.DataFrame, show_index: bool):
        self.data = data
        self.show_index = show_index

    def _flat(self) -> pd.DataFrame:
        """The table with its index as leading columns, a value repeated from the row above blanked
        in all but the last index column (groups read as groups)."""
        if not self.show_index:
            return self.data
        names = [n if n is not None else "" for n in self.data.index.names]
        flat = self.data.copy()
        flat.index = flat.index.set_names([f"\x00{i}" for i in range(len(names))])
        flat = flat.reset_index()
        for i in range(len(names) - 1):
            col = flat.columns[i]
            flat[col] = flat[col].where(flat[col].ne(flat[col].shift()) |
                                        flat.iloc[:, :i].ne(flat.iloc[:, :i].shift()).any(axis=1), "")
        return flat.rename(columns={f"\x00{i}": n for i, n in enumerate(names)})

    def _repr_html_(self) -> str:
        return self._flat().to_html(index=False, classes="svtools-table", border=0, escape=True,
                                    na_rep=_MISSING)

    def __repr__(self) -> str:
        return self._flat().to_string(index=False, na_rep=_MISSING)

    def width_chars(self) -> int:
        """Estimated width in characters: per column the longer of its longest cell and the
        longest word of its name (names wrap between words), plus padding."""
        frame = self._flat()
        total = 0
        for name in frame.columns:
            words = " ".join(map(str, name if isinstance(name, tuple) else (name,))).split() or [""]
            cells = frame[name].astype(str)
            total += max(max(map(len, words)), cells.str.len().max() if len(cells) else 0) + _PAD
        return total


def _whole_floats(col: pd.Series) -> bool:
    """True for a float column whose values (missing ones aside) are all whole numbers."""
    vals = [_scalar(v) for v in col if not _missing(_scalar(v))]
    return bool(vals) and all(isinstance(v, float) and v.is_integer() and abs(v) < 1e15 for v in vals)


def _label(v: Any) -> str:
    v = _scalar(v)
    if isinstance(v, numbers.Real) and not isinstance(v, (bool, numbers.Integral)) and not _missing(v):
        return f"{float(v):g}"
    return format_number(v)


def _digits_for(column: Any, digits: Union[int, Mapping[Any, int]], default: int = 3) -> int:
    if isinstance(digits, Mapping):
        return int(digits.get(column, default))
    return int(digits)


def format_table(
    df: pd.DataFrame,
    columns: Optional[Union[Mapping[Any, str], Sequence[Any]]] = None,
    *,
    digits: Union[int, Mapping[Any, int]] = 3,
    index: Optional[Union[str, Sequence[str], bool]] = None,
    drop_empty: bool = True,
    max_chars: int = TABLE_CHARS,
) -> Table:
    """A DataFrame as a small table for readers.

    Args:
        df: the results.
        columns: which columns to show, in order: a mapping ``{name in df: name in words}``, or a
            list of names kept as they are; ``None`` keeps every column. Index levels can be
            renamed through the same mapping.
        digits: decimals of floats, one for all columns or ``{name in df: digits}`` (default 3
            for columns not named).
        index: ``None`` keeps ``df``'s index when it means something (named, or not
            ``0, 1, 2, ...``) and hides a plain one; a column name (or list) makes those columns
            the index; ``False`` hides the index.
        drop_empty: drop columns with no value at all (all missing or empty).
        max_chars: warn when the estimated width (:meth:`Table.width_chars`) exceeds it.

    Returns:
        a :class:`Table` of strings (``.data``), numbers written by :func:`format_number`; a float
        column whose values are all whole numbers (counts or indices that a missing value turned
        into floats) is written as integers.

    Raises:
        KeyError: a named column is not in ``df``.

    A ``UserWarning`` says when the table is estimated wider than the column: choose fewer
    columns or shorter names (the book's build fails on the warning).
    """
    frame = df.copy()
    if isinstance(index, str) or (isinstance(index, Sequence) and not isinstance(index, str)
                                  and index is not None and not isinstance(index, bool)):
        frame = frame.set_index(index if isinstance(index, str) else list(index))
    if columns is not None:
        levels = [n for n in frame.index.names if n is not None]
        names = [c for c in (columns.keys() if isinstance(columns, Mapping) else columns) if c not in levels]
        missing = [c for c in names if c not in frame.columns]
        if missing:
            raise KeyError(f"format_table: columns {missing} are not in the frame "
                           f"(it has {list(frame.columns)})")
        frame = frame[names]
    if drop_empty:
        frame = frame[[c for c in frame.columns if not frame[c].map(lambda v: _missing(_scalar(v))).all()]]
    out = pd.DataFrame(index=frame.index)
    for c in frame.columns:
        whole = _whole_floats(frame[c])  # counts or indices stored as floats (a NaN made them float)
        out[c] = frame[c].map(lambda v, c=c, whole=whole: format_number(
            int(_scalar(v)) if whole and not _missing(_scalar(v)) else v, _digits_for(c, digits)))
    if isinstance(columns, Mapping):
        out = out.rename(columns=dict(columns))
        out.index = out.index.rename([columns.get(n, n) for n in out.index.names]
                                     if isinstance(out.index, pd.MultiIndex) else columns.get(out.index.name,
                                                                                               out.index.name))
    if index is False:
        show = False
    elif index is None:
        plain = isinstance(frame.index, pd.RangeIndex) and frame.index.name is None
        show = not plain
    else:
        show = True
    if show:  # index values are labels (a seed, a setting): numbers as short as they are exact
        out.index = out.index.map(lambda v: tuple(_label(x) for x in v) if isinstance(v, tuple) else _label(v))
    table = Table(out, show_index=show)
    width = table.width_chars()
    if width > max_chars:
        warnings.warn(f"format_table: the table is about {width} characters wide, more than the column "
                      f"({max_chars}); show fewer columns or shorter names", UserWarning, stacklevel=2)
    return table


def format_mean_sd(df: pd.DataFrame, by: Union[str, Sequence[str]], columns: Mapping[Any, str], *,
                   digits: Union[int, Mapping[Any, int]] = 3, names: Optional[Mapping[Any, str]] = None,
                   max_chars: int = TABLE_CHARS) -> Table:
    """Mean ± standard deviation of ``columns`` within each group of ``by`` (e.g. over seeds), as
    a table with one row per group and cells ``"0.993 ± 0.004"``.

    Args:
        df: one row per run (e.g. per seed).
        by: the grouping column(s), in their order of appearance.
        columns: ``{column: name in words}``.
        digits: decimals, for all columns or per column.
        names: optional names in words for the ``by`` columns (and their values stay as labels).
    """
    by = [by] if isinstance(by, str) else list(by)
    g = df.groupby(by, sort=False)
    out = pd.DataFrame({words: g[c].agg(lambda v, c=c: format_pm(v.mean(), v.std(), _digits_for(c, digits)))
                        for c, words in columns.items()})
    out.index = out.index.set_names([(names or {}).get(n, n) for n in out.index.names])
    return format_table(out, max_chars=max_chars)


def format_summary(summary: pd.DataFrame, *, digits: int = 2) -> pd.DataFrame:
    """A :func:`svtools.sad.bootstrap` result as a readable wide table: one row per group, one column per
    measure, cells ``"estimate [lo, hi]"``, plus the number of pairs and prompts."""
    check_columns(summary, ["column", "estimate", "lo", "hi", "pairs", "prompts"], "format_summary")
    digits = as_int(digits, "digits", min_value=0, max_value=15)
    by = [c for c in summary.columns if c not in ("column", "stat", "estimate", "lo", "hi", "pairs", "prompts")]
    cell = summary.apply(lambda r: f"{r.estimate:.{digits}f} [{r.lo:.{digits}f}, {r.hi:.{digits}f}]", axis=1)
    wide = summary.assign(cell=cell).pivot_table(index=by or None, columns="column", values="cell",
                                                 aggfunc="first", sort=False) if by else \
        pd.DataFrame([dict(zip(summary["column"], cell))])
    counts = summary.groupby(by, sort=False)[["pairs", "prompts"]].max() if by else \
        summary[["pairs", "prompts"]].max().to_frame().T
    order = list(dict.fromkeys(summary["column"]))
    return wide[order].join(counts) if by else pd.concat([wide[order], counts], axis=1)


def format_settings(obj: Any, names: Mapping[str, str], *, digits: int = 3) -> Table:
    """The settings of a run as a two-column table (``setting``, ``value``), instead of a
    one-line repr.

    Args:
        obj: a dataclass or any object with the attributes, or a mapping.
        names: ``{attribute: name in words}``, in the order to show.
        digits: decimals of floats that are not whole numbers (``0.1``, ``1e-2``, ``10.0`` read as
            written: ``0.1``, ``0.01``, ``10``).
    """
    rows = []
    for attr, words in names.items():
        value = obj[attr] if isinstance(obj, Mapping) else getattr(obj, attr)
        value = _scalar(value)
        if isinstance(value, float) and not isinstance(value, bool) and math.isfinite(value):
            text = f"{value:.{digits}g}" if value != round(value) or abs(value) >= 1e6 else f"{value:g}"
        else:
            text = format_number(value, digits)
        rows.append({"setting": words, "value": text})
    return Table(pd.DataFrame(rows), show_index=False)


# ------------------------------------------------------------------------------------------ glue

def _ipython():
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with matplotlib's notebook support
        return None
    return get_ipython()


#: Every value glued in this process, by name (what :func:`glue` recorded; handy in tests).
GLUED: dict[str, Any] = {}


def _figure_bundle(fig) -> dict[str, str]:
    return {"image/svg+xml": to_svg(fig), "text/plain": f"[figure, {len(fig.axes)} axes]"}


def glue(name: str, value: Any, *, display: Optional[bool] = None) -> None:
    """Record ``value`` under ``name`` for the chapter's prose (myst-nb's glue format).

    Numbers and strings are recorded as their ``repr`` (numpy and torch scalars as Python
    numbers), so ``{glue:text}`name:.3f``` formats a float and ``{glue:text}`name``` pastes a
    string as it is; they are not shown in the notebook (``display=False``). A matplotlib Figure
    is recorded as SVG and shown where the cell runs (``display=True``), so Jupyter and Colab show
    it; the book shows it where ``{glue:figure}`name``` pastes it, with a number and a caption
    (give the cell the tag ``remove-output`` so that the book does not show it twice).

    Outside IPython the value is only kept in :data:`GLUED`. Returns nothing, so that a cell
    ending with ``glue(...)`` shows nothing more.
    """
    GLUED[name] = value
    is_figure = isinstance(value, Figure)
    if display is None:
        display = is_figure
    shell = _ipython()
    if shell is None:
        return
    from IPython.display import display as ipy_display

    if is_figure:
        bundle = _figure_bundle(value)
    else:
        v = _scalar(value)
        bundle = {"text/plain": repr(v if isinstance(v, (numbers.Number, str)) else str(v))}
    prefix = "" if display else _GLUE_PREFIX
    ipy_display({prefix + k: v for k, v in bundle.items()}, raw=True,
                metadata={"scrapbook": {"name": name, "mime_prefix": prefix}})


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"a GPU ({torch.cuda.get_device_name(0)})"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"a CPU with {cores} core{'s' if cores != 1 else ''}"


def glue_run_time() -> str:
    """Glue ``run_time`` (time since svtools was imported, e.g. ``"3 min 12 s"``), ``run_scale``
    (:func:`svtools.runtime.scale_name`) and ``run_hardware`` (``"a CPU with 2 cores"``), which a
    chapter's ``{result-box}`` shows. Call it in the chapter's last cell; returns the sentence
    it stands for (also printed)."""
    t, scale, hw = format_duration(elapsed()), scale_name(), _hardware()
    glue("run_time", t)
    glue("run_scale", scale)
    glue("run_hardware", hw)
    sentence = f"This chapter ran in {t} at the {scale}, on {hw}."
    print(wrap(sentence))
    return sentence


# ------------------------------------------------------------------------ estimates with intervals

def interval_cells(df: pd.DataFrame, estimate: str = "ratio", lo: str = "lo", hi: str = "hi", *,
                   digits: int = 2) -> pd.Series:
    """One ``"0.65 [0.63, 0.67]"`` string per row of ``df``: the columns ``estimate``, ``lo``, ``hi``
    with ``digits`` fixed decimals (``"0.00"``, never ``"-0.00"`` or ``"2.0e-03"``: the three numbers read
    on one scale).

    Raises:
        SVToolsError: a column is missing (the message names the columns ``df`` has).
    """
    check_columns(df, [estimate, lo, hi], "interval_cells")
    digits = as_int(digits, "digits", min_value=0, max_value=15)
    def fixed(x: Any) -> str:  # fixed decimals (an interval reads as one scale), no "-0.00"
        x = _scalar(x)
        if _missing(x):
            return _MISSING
        text = f"{float(x):.{digits}f}"
        return text[1:] if text.startswith("-") and float(text) == 0 else text

    return pd.Series([f"{fixed(e)} [{fixed(a)}, {fixed(b)}]" for e, a, b in zip(df[estimate], df[lo], df[hi])],
                     index=df.index, dtype=object)


def format_interval_table(
    df: pd.DataFrame,
    index: Union[str, Sequence[str]],
    columns: Optional[str] = None,
    *,
    estimate: str = "ratio",
    lo: str = "lo",
    hi: str = "hi",
    digits: int = 2,
    names: Optional[Mapping[Any, str]] = None,
    extra: Optional[Mapping[str, str]] = None,
    max_chars: int = TABLE_CHARS,
) -> Table:
    """Estimates with their intervals as a small table: one row per value of ``index``, cells
    ``"estimate [lo, hi]"`` (e.g. a :func:`svtools.sad.null_ratio` frame, one row per layer).

    Args:
        df: one row per group, with the columns ``index``, ``estimate``, ``lo``, ``hi`` (and
            ``columns``).
        index: the column(s) that make the rows (e.g. ``"layer"`` or ``["layer", "head"]``).
        columns: a column whose values become the table's columns (e.g. ``"kind"``: one column of
            intervals per kind of pair); ``None``: one column, named ``names[estimate]`` or
            ``"<estimate> [95% interval]"``.
        estimate, lo, hi: the columns of the estimate and its interval.
        digits: decimals.
        names: words for index levels, for values of ``columns`` and for ``estimate``.
        extra: ``{column of df: name in words}``, plain columns shown after the intervals (taken
            from the first row of each index group, e.g. a count of pairs).
        max_chars: see :func:`format_table`.

    Returns:
        a :class:`Table`; groups with no row are shown as missing ("–").

    Raises:
        SVToolsError: a named column is not in ``df``.
    """
    index = [index] if isinstance(index, str) else list(index)
    names = dict(names or {})
    check_columns(df, index + [estimate, lo, hi] + ([columns] if columns else []) + list(extra or {}),
                  "format_interval_table")
    cells = df.assign(_cell=interval_cells(df, estimate, lo, hi, digits=digits))
    if columns:
        wide = cells.pivot_table(index=index, columns=columns, values="_cell", aggfunc="first", sort=False)
        order = list(dict.fromkeys(df[columns]))
        wide = wide[[c for c in order if c in wide.columns]]
        wide.columns = [names.get(c, str(c)) for c in wide.columns]
    else:
        wide = cells.set_index(index)[["_cell"]]
        wide.columns = [names.get(estimate, f"{estimate} [95% interval]")]
    wide.columns.name = None
    if extra:
        first = df.groupby(index, sort=False)[list(extra)].first()
        wide = wide.join(first.rename(columns=dict(extra)))
    wide.index = wide.index.set_names([names.get(n, n) for n in wide.index.names])
    return format_table(wide, digits=digits, max_chars=max_chars)


def format_matched(cmp: pd.DataFrame, *, index: Union[str, Sequence[str], None] = None, digits: int = 2,
                   names: Optional[Mapping[Any, str]] = None, max_chars: int = TABLE_CHARS) -> Table:
    """A :func:`svtools.sad.compare_matched` frame as a small table: the raw and the score-matched
    difference of the two kinds, each with its 95% interval, and the coverage (share of the first
    kind's pairs in score bins the second kind reaches).

    Args:
        cmp: the frame (columns ``raw_diff, raw_lo, raw_hi, matched_diff, matched_lo, matched_hi,
            coverage``, and the ``index`` columns).
        index: the column(s) that make the rows (e.g. ``"layer"``); ``None``: rows as they are,
            without an index.
        names: words for the ``index`` columns.

    Raises:
        SVToolsError: a column is missing.
    """
    idx = [] if index is None else [index] if isinstance(index, str) else list(index)
    check_columns(cmp, idx + ["raw_diff", "raw_lo", "raw_hi", "matched_diff", "matched_lo", "matched_hi",
                              "coverage"], "format_matched")
    out = pd.DataFrame({"raw difference": interval_cells(cmp, "raw_diff", "raw_lo", "raw_hi", digits=digits),
                        "at matched scores": interval_cells(cmp, "matched_diff", "matched_lo", "matched_hi",
                                                            digits=digits),
                        "coverage": cmp["coverage"].to_numpy(dtype=float)}, index=cmp.index)
    for c in idx:
        out[c] = cmp[c].to_numpy()
    out = out.set_index(idx) if idx else out
    if idx:
        out.index = out.index.set_names([(names or {}).get(n, n) for n in out.index.names])
    return format_table(out, digits=digits, index=None if idx else False, max_chars=max_chars)
