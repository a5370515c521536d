"""svtools.report: numbers as readers read them, tables that fit, values glued in myst-nb's format."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from svtools import report as T


@pytest.mark.parametrize("value, digits, text", [
    (29804, 3, "29,804"), (1338, 3, "1338"), (np.int64(7), 3, "7"), (0.98765, 3, "0.988"),
    (2.0, 3, "2.000"), (1.2e-5, 3, "1.2e-05"), (0.0004, 3, "4.0e-04"), (0.0006, 3, "0.001"), (0.0, 3, "0.000"),
    (True, 3, "yes"), (np.bool_(False), 3, "no"), (float("nan"), 3, "–"), (None, 3, "–"),
    ("seed 0", 3, "seed 0"), (torch.tensor(0.5), 2, "0.50"), (12345.678, 1, "12,345.7"), (-0.25, 2, "-0.25"),
    (float("inf"), 3, "∞"),
])
def test_format_number(value, digits, text):
    assert T.format_number(value, digits) == text


def test_small_numbers_never_read_as_zero():
    for x in [1e-9, 3e-7, 4.9e-4]:
        assert float(T.format_number(x, 3)) == pytest.approx(x, rel=0.05)


def test_ranges_lists_and_intervals():
    assert T.format_range([0.996, 0.987, float("nan"), 0.99]) == "0.987–0.996"
    assert T.format_range([18, 18]) == "18"
    assert T.format_range([]) == "–"
    assert T.format_list([18, 18, 17]) == "18, 18 and 17"
    assert T.format_list([0.5], 2) == "0.50"
    assert T.format_list([1, 2], last="or") == "1 or 2"
    assert T.format_pm(0.99281, 0.00412) == "0.993 ± 0.004"
    assert T.format_pm(0.5, float("nan")) == "0.500"
    assert T.format_interval(0.211, 0.19, 0.234) == "0.21 [0.19, 0.23]"
    assert T.format_count(4, 5) == "4 of 5"


@pytest.mark.parametrize("seconds, text", [(44.6, "45 s"), (192, "3 min 12 s"), (3900, "1 h 05 min"), (60, "1 min 00 s")])
def test_format_duration(seconds, text):
    assert T.format_duration(seconds) == text


def test_wrap_keeps_lines_within_the_column():
    text = "pairs aligned per seed: " + ", ".join(str(i) for i in range(60)) + "\nshort line"
    out = T.wrap(text, 40)
    assert all(len(line) <= 40 for line in out.splitlines())
    assert out.splitlines()[-1] == "short line"
    assert out.replace("\n  ", " ").replace("\n", " ").split() == text.split()


def test_format_table_names_rounds_and_drops_empty_columns():
    df = pd.DataFrame({"seed": [0, 1], "cos_min": [0.99991, 0.98], "empty": [np.nan, None],
                       "loss": [1.23e-6, 0.5], "note": ["", ""]})
    t = T.format_table(df, {"seed": "seed", "cos_min": "worst |cos|", "empty": "nothing", "loss": "loss",
                            "note": "note"}, digits={"cos_min": 4}, index="seed")
    assert list(t.data.columns) == ["worst |cos|", "loss"]          # empty and blank columns dropped
    assert t.data.index.name == "seed" and list(t.data.index) == ["0", "1"]
    assert t.data.loc["0", "worst |cos|"] == "0.9999" and t.data.loc["1", "loss"] == "0.500"
    assert t.data.loc["0", "loss"] == "1.2e-06"
    html = t._repr_html_()
    assert "<table" in html and "nothing" not in html and "NaN" not in html and "seed" in html
    assert "worst |cos|" in repr(t)


def test_format_table_hides_a_plain_index_and_keeps_a_meaningful_one():
    df = pd.DataFrame({"a": [1.0, 2.0]})
    assert not T.format_table(df).show_index
    assert T.format_table(df.set_index(pd.Index(["x", "y"], name="k"))).show_index
    assert not T.format_table(df.set_index(pd.Index(["x", "y"], name="k")), index=False).show_index
    multi = pd.DataFrame({"p": ["lam", "lam"], "v": [0.1, 1.0], "m": [0.5, 0.6]}).set_index(["p", "v"])
    t = T.format_table(multi, {"m": "mean"})
    assert t.show_index and list(t.data.columns) == ["mean"]


def test_format_table_rejects_unknown_columns_and_warns_when_too_wide():
    df = pd.DataFrame({"a": [1.0]})
    with pytest.raises(KeyError, match="not in the frame"):
        T.format_table(df, ["b"])
    wide = pd.DataFrame({f"column number {i}": [123456.789] for i in range(12)})
    with pytest.warns(UserWarning, match="characters wide"):
        T.format_table(wide)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T.format_table(df)


def test_width_estimate_counts_the_longest_word_of_a_name():
    t = T.format_table(pd.DataFrame({"worst seed anywhere": [0.5]}))
    assert t.width_chars() == len("anywhere") + T._PAD


class _Shell:
    """Stands in for IPython: collects what glue displays."""


def test_glue_writes_myst_nb_format(monkeypatch):
    shown = []
    monkeypatch.setattr(T, "_ipython", lambda: _Shell())
    import IPython.display
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw, metadata: shown.append((obj, metadata)))
    assert T.glue("n", np.int64(18)) is None
    T.glue("cos", torch.tensor(0.25))
    T.glue("who", "seed 0")
    (b1, m1), (b2, _), (b3, _) = shown
    assert b1 == {T._GLUE_PREFIX + "text/plain": "18"}
    assert m1 == {"scrapbook": {"name": "n", "mime_prefix": T._GLUE_PREFIX}}
    assert b2 == {T._GLUE_PREFIX + "text/plain": "0.25"} and b3 == {T._GLUE_PREFIX + "text/plain": "'seed 0'"}
    # myst-nb reads these back with literal_eval and formats them
    import ast
    assert f"{ast.literal_eval(b2[T._GLUE_PREFIX + 'text/plain']):.3f}" == "0.250"


def test_glue_shows_figures_as_svg(monkeypatch):
    from svtools.plots import subplots

    shown = []
    monkeypatch.setattr(T, "_ipython", lambda: _Shell())
    import IPython.display
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw, metadata: shown.append((obj, metadata)))
    fig, ax = subplots()
    ax.plot([0, 1], [0, 1])
    T.glue("fig-x", fig)
    bundle, meta = shown[0]
    assert meta["scrapbook"] == {"name": "fig-x", "mime_prefix": ""}          # displayed where the cell runs
    assert bundle["image/svg+xml"].lstrip().startswith("<?xml") and "<svg" in bundle["image/svg+xml"]


def test_glue_outside_ipython_only_records():
    T.glue("outside", 3.5)
    assert T.GLUED["outside"] == 3.5


def test_run_time_is_measured_from_the_import_of_svtools():
    from svtools import runtime

    assert runtime.elapsed() > 0 and math.isfinite(runtime.STARTED)
    sentence = T.glue_run_time()
    assert "ran in" in sentence and T.GLUED["run_time"].endswith("s") and "scale" in T.GLUED["run_scale"]


def test_format_settings_reads_attributes_in_order():
    from svtools.toy import ToyConfig

    t = T.format_settings(ToyConfig.single_pair(), {"n_features": "features N", "lr": "learning rate",
                                                    "lam": "loss weight", "head": "head"})
    assert list(t.data["setting"]) == ["features N", "learning rate", "loss weight", "head"]
    assert list(t.data["value"]) == ["20", "0.003", "1", "yes"]
    assert not t.show_index and "<table" in t._repr_html_()
    assert list(T.format_settings({"a": 0.25}, {"a": "a"}).data["value"]) == ["0.25"]


def test_format_mean_sd_groups_in_order_of_appearance():
    df = pd.DataFrame({"param": ["lam"] * 4 + ["N"] * 2, "value": [0.1, 0.1, 1.0, 1.0, 10, 10],
                       "cos": [0.9, 1.0, 0.5, 0.5, 0.2, 0.4]})
    t = T.format_mean_sd(df, ["param", "value"], {"cos": "min |cos|"}, digits=2, names={"param": "setting"})
    assert list(t.data["min |cos|"]) == ["0.95 ± 0.07", "0.50 ± 0.00", "0.30 ± 0.14"]
    assert list(t.data.index) == [("lam", "0.1"), ("lam", "1"), ("N", "10")]
    assert t.data.index.names == ["setting", "value"]


def test_whole_number_columns_read_as_integers_even_with_missing_values():
    df = pd.DataFrame({"owner": [14.0, float("nan"), 15.0], "x": [1.0, 2.0, 2.5]})
    t = T.format_table(df)
    assert list(t.data["owner"]) == ["14", "–", "15"]
    assert list(t.data["x"]) == ["1.000", "2.000", "2.500"]
