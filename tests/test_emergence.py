"""svtools.emergence reads the emergence chapter's frames the same way every time (synthetic
frames whose answers are known by construction)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from svtools import SVToolsError
from svtools.emergence import emergence_readings, zero_summary

STEPS = [0, 10, 100, 1000]
LAST = 1000


def _frames(dip_step: int = 100):
    ratio_of = {0: 1.0, 10: 0.9, 100: 0.6, 1000: 0.8}
    ratio_of[dip_step], ratio_of[100] = 0.4, ratio_of[dip_step] if dip_step != 100 else 0.4
    rows, rt_rows, acc_rows = [], [], []
    for seed in (0, 1, 2):
        for step in STEPS:
            for kind, shift in (("attended", 0.0), ("random", 0.05)):
                r = ratio_of[step] + shift + 0.01 * seed
                rows.append({"seed": seed, "step": step, "kind": kind, "ratio": r, "lo": r - 0.02, "hi": r + 0.02})
                rt_rows.append({"seed": seed, "step": step, "kind": kind, "value": 0.4 * ratio_of[step] + shift / 10})
            acc_rows.append({"seed": seed, "step": step, "metric": "top1", "value": {0: 0, 10: 0, 100: 0.2, 1000: 1}[step]})
            acc_rows.append({"seed": seed, "step": step, "metric": "io_vs_s", "value": 0.5})
    return pd.DataFrame(rows), pd.DataFrame(rt_rows), pd.DataFrame(acc_rows)


def test_readings_find_the_dip_the_band_and_the_tracking():
    ratio, rt, acc = _frames()
    out = emergence_readings(ratio, rt, acc, last=LAST)
    assert out["step0_ratios"] == "1.00 / 1.01 / 1.02" and out["step0_in_band"] == 3
    assert out["min_step"] == 100 and out["min_ratio"] == pytest.approx(0.41)
    assert out["min_ratio_random"] == pytest.approx(0.46) and out["acc_at_min"] == pytest.approx(0.2)
    assert out["rt_at_min"] == pytest.approx(0.16) and out["rt_last"] == pytest.approx(0.32)
    assert out["acc_half_step"] == 1000 and out["last_below"] == 3
    assert out["r_att_rnd"] == pytest.approx(1.0) and out["n_points"] == 12
    assert emergence_readings(ratio, rt, acc, last=LAST, band=(0.95, 1.005))["step0_in_band"] == 1
    assert emergence_readings(ratio, rt, acc, last=LAST, half=2.0)["acc_half_step"] == "never"


def test_readings_follow_the_data():
    ratio, rt, acc = _frames(dip_step=10)  # the dip moved: the reading moves with it
    assert emergence_readings(ratio, rt, acc, last=LAST)["min_step"] == 10


def test_readings_refuse_frames_without_what_they_read():
    ratio, rt, acc = _frames()
    with pytest.raises(SVToolsError, match="steps 0"):
        emergence_readings(ratio[ratio.step > 0], rt, acc, last=LAST)
    with pytest.raises(SVToolsError, match="kinds"):
        emergence_readings(ratio[ratio.kind == "attended"], rt, acc, last=LAST)
    with pytest.raises(SVToolsError, match="lacks"):
        emergence_readings(ratio.drop(columns="lo"), rt, acc, last=LAST)
    with pytest.raises(SVToolsError, match="top1"):
        emergence_readings(ratio, rt, acc[acc.metric != "top1"], last=LAST)


def test_zero_summary_counts_and_orders_groups():
    zero = pd.DataFrame({"seed": [0, 0, 0, 0, 1], "group": ["reference", "chosen", "chosen", "all chosen", "chosen"],
                         "rel_change": [-0.5, -0.08, 0.01, -0.39, -0.1], "io_over_s": [0.5, 0.97, 1.0, 0.98, 1.0]})
    out = zero_summary(zero)
    assert list(out.loc[0].index) == ["each IO head", "all IO heads at once", "each other head"]
    row = out.loc[(0, "each IO head")]
    assert row["heads"] == 2 and row["lowest"] == "-8%" and row["highest"] == "+1%" and row["after"] == 0.97
    assert np.isclose(out.loc[(1, "each IO head"), "after"], 1.0)
    with pytest.raises(SVToolsError):
        zero_summary(zero.drop(columns="io_over_s"))
