"""The figures of the emergence and known-features chapters (Part 3) are legible on a phone, fit
the column and label their axes in math, not ASCII.

The frames are synthetic (the figures' layout does not depend on the numbers); the functions'
argument checks are tested too.
"""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
from conftest import figure_problems

from svtools import SVToolsError
from svtools.plots import emergence as eplots
from svtools.plots import features as fplots

STEPS = [0, 3, 6, 14, 32, 72, 159, 355, 790, 1759, 3000]


def _band(rows: list[dict]) -> pd.DataFrame:
    f = pd.DataFrame(rows)
    return f.assign(lo=f["mean"] - 0.05, hi=f["mean"] + 0.05)


def _emergence_frames():
    rng = np.random.default_rng(0)
    acc = _band([{"metric": m, "step": s, "mean": min(1.0, s / 2000)} for m in ("top1", "io_vs_s") for s in STEPS])
    att = _band([{"step": s, "mean": min(0.9, s / 3000)} for s in STEPS])
    rt = _band([{"kind": k, "step": s, "mean": 0.4 - 0.2 * rng.random()}
                for k in ("attended", "non-attended", "random") for s in STEPS])
    ratio = _band([{"kind": k, "step": s, "mean": 1 - 0.5 * rng.random()}
                   for k in ("attended", "non-attended", "random") for s in STEPS])
    return acc, att, rt, ratio


def _over_training():
    rows = []
    for seed in (0, 1, 2):
        for s in STEPS:
            rows.append({"seed": seed, "step": s, "io_over_s": min(1, s / 2000), "end_io": min(0.9, s / 3000),
                         "name_raw": 0.3 + s / 10000, "name_raw_q95": 0.36, "name_unwhitened": 0.9,
                         "name_unwhitened_q95": 0.93, "decision_nrecon": 2.5, "profile_nrecon": 2 + s / 300})
    return pd.DataFrame(rows)


def _effects():
    rows = []
    for seed in (0, 1):
        for i, what in enumerate(("none", "sad", "sad null", "decision", "decision null", "zero omega")):
            for col in ("end_io", "selectivity", "logit_diff"):
                rows.append({"seed": seed, "intervention": what, "column": col, "mean": 1.0 - 0.1 * i,
                             "lo": 0.9 - 0.1 * i, "hi": 1.1 - 0.1 * i})
    return pd.DataFrame(rows)


def _profiles():
    rows = [{"seed": seed, "k": k, "sigma": 1 / (k + 1), "sad_mean": float(k < 2), "decision_mean": 0.3,
             "a": 0.2, "b": -0.1, "head_label": "head 2.0"} for seed in (0, 1, 2) for k in range(16)]
    return pd.DataFrame(rows)


def _figures():
    acc, att, rt, ratio = _emergence_frames()
    yield "plot_lm_emergence", eplots.plot_lm_emergence(acc, att, rt, ratio,
                                                        marks={"sparsest": 72, "accuracy 0.5": 1759})
    yield "plot_features_over_training", fplots.plot_features_over_training(_over_training())
    yield "plot_intervention_effects", fplots.plot_intervention_effects(_effects())
    yield "plot_direction_profiles", fplots.plot_direction_profiles(_profiles(), pair_io="a", pair_s="b")


def test_part3_lm_figures_are_legible_on_a_phone_and_fit_the_column():
    bad = figure_problems(_figures())
    assert not bad, "\n".join(bad)


def test_plot_lm_emergence_draws_each_kind_and_checks_its_frames():
    acc, att, rt, ratio = _emergence_frames()
    fig = eplots.plot_lm_emergence(acc, att, rt[rt["kind"] != "random"], ratio)
    assert len(fig.axes) == 4
    labels = fig.axes[2].get_legend_handles_labels()[1]
    assert labels == ["attended pairs", "non-attended pairs"]  # a kind without rows is not drawn
    assert any(abs(line.get_ydata()[0] - 1.0) < 1e-12 for line in fig.axes[3].get_lines())  # the line at 1
    with pytest.raises(SVToolsError, match="ratio"):
        eplots.plot_lm_emergence(acc, att, rt, ratio.drop(columns="kind"))
    with pytest.raises(SVToolsError, match="no rows"):
        eplots.plot_lm_emergence(acc, att.iloc[:0], rt, ratio)
