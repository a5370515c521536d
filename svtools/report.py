"""Formatting results for readers: the small tables the chapters print.

Functions here turn result frames into readable tables (no dict dumps, no reprs, nothing that
runs past the column); they compute nothing new. :func:`format_summary` shows a
:func:`svtools.sad.bootstrap` summary as one row per group, one ``"estimate [lo, hi]"`` cell per
measure.
"""

from __future__ import annotations

import pandas as pd

from svtools._checks import as_int, check_columns

__all__ = ["format_summary"]


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
