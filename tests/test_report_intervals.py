"""Estimates with intervals as reader tables (svtools.report.interval_cells, format_interval_table,
format_matched): cells read "estimate [lo, hi]" on one scale, one column per kind, rows per group."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from svtools._checks import SVToolsError
from svtools.report import TABLE_CHARS, format_interval_table, format_matched, interval_cells


def _ratios() -> pd.DataFrame:
    rows = []
    for layer in (0, 1):
        for kind, base in (("attended", 0.65), ("random", 0.95)):
            r = base + 0.1 * layer
            rows.append({"layer": layer, "kind": kind, "ratio": r, "lo": r - 0.02, "hi": r + 0.03,
                         "pairs": 100 * (layer + 1)})
    return pd.DataFrame(rows)


def test_interval_cells_use_fixed_decimals_and_no_negative_zero():
    df = pd.DataFrame({"ratio": [0.6512, -0.0001], "lo": [0.002, -0.02], "hi": [0.7, 0.0004]})
    cells = interval_cells(df, digits=2)
    assert cells.tolist() == ["0.65 [0.00, 0.70]", "0.00 [-0.02, 0.00]"]
    assert interval_cells(df, digits=3).iloc[0] == "0.651 [0.002, 0.700]"
    with pytest.raises(SVToolsError):
        interval_cells(df.drop(columns="hi"))


def test_interval_table_has_one_column_per_kind_and_one_row_per_group():
    t = format_interval_table(_ratios(), "layer", "kind", names={"attended": "attended pairs"},
                              extra={"pairs": "pairs"})
    assert list(t.data.columns) == ["attended pairs", "random", "pairs"]
    assert t.data.loc["1", "attended pairs"] == "0.75 [0.73, 0.78]"
    assert t.data.loc["0", "random"] == "0.95 [0.93, 0.98]"
    assert t.show_index and t.width_chars() <= TABLE_CHARS


def test_interval_table_without_columns_and_a_missing_group():
    df = _ratios().query("not (layer == 1 and kind == 'random')")
    wide = format_interval_table(df, "layer", "kind")
    assert wide.data.loc["1", "random"] == "–"          # the missing group reads as missing
    one = format_interval_table(df[df["kind"] == "attended"], ["layer", "kind"])
    assert list(one.data.columns) == ["ratio [95% interval]"] and len(one.data) == 2
    with pytest.raises(SVToolsError):
        format_interval_table(df, "layer", "no such column")


def test_format_matched_reads_raw_and_matched_differences():
    cmp = pd.DataFrame({"layer": [0, 1], "raw_diff": [-0.19, -0.1], "raw_lo": [-0.2, -0.11],
                        "raw_hi": [-0.18, -0.09], "matched_diff": [-0.001, 0.03], "matched_lo": [-0.02, 0.01],
                        "matched_hi": [0.01, 0.05], "coverage": [0.9, np.nan]})
    t = format_matched(cmp, index="layer")
    assert list(t.data.columns) == ["raw difference", "at matched scores", "coverage"]
    assert t.data.loc["0", "raw difference"] == "-0.19 [-0.20, -0.18]"
    assert t.data.loc["0", "at matched scores"] == "0.00 [-0.02, 0.01]"
    assert t.data.loc["1", "coverage"] == "–"
    plain = format_matched(cmp.drop(columns="layer"))
    assert not plain.show_index
    with pytest.raises(SVToolsError):
        format_matched(cmp.drop(columns="coverage"))
