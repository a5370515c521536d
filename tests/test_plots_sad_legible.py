"""The figures of Part 3's first chapters (svtools.plots.sad, svtools.plots.null) are legible on a phone, fit the column
and label their axes in math, not ASCII (as tests/test_plots_legible.py requires of Parts 1-2).

The frames are synthetic, with the columns the plot functions read: what is measured is layout,
text sizes and labels, which do not depend on the values."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
from conftest import figure_problems

from svtools._checks import SVToolsError
from svtools.plots import null as nu, sad as sp



def _pairs(seed: int = 0, n: int = 400, r: int = 16) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    kind = rng.choice(["attended", "non-attended", "random"], n)
    nr = rng.integers(1, r, n)
    return pd.DataFrame({
        "layer": rng.integers(0, 3, n), "head": rng.integers(0, 4, n), "prompt": rng.integers(0, 20, n),
        "kind": kind, "n_recon": nr, "n_recon_null": nr + rng.random(n), "rolls_tovee": rng.random(n),
        "rolls_tovee_null": rng.random(n), "r": r, "dominant_k": rng.integers(0, r, n),
        "dominant_sigma": rng.random(n), "used": [tuple(range(k)) for k in nr]})


def _ratio(x: str = "layer") -> pd.DataFrame:
    rows = [{x: i, "kind": k, "ratio": v, "lo": v - 0.02, "hi": v + 0.02}
            for i in range(6) for k, v in (("attended", 0.7 + 0.05 * i), ("random", 0.95))]
    return pd.DataFrame(rows)


def _figures():
    df = _pairs()
    att = df[df["kind"] == "attended"]
    rng = np.random.default_rng(1)
    yield "n_recon_distribution", sp.plot_n_recon_distribution(att, measure="rolls_tovee")
    yield "n_recon_distribution (n_recon)", sp.plot_n_recon_distribution(att)
    yield "pair_terms", sp.plot_pair_terms(rng.normal(size=16), rng.normal(size=16), np.sort(rng.random(16))[::-1],
                                           compare_label="one null head")
    yield "n_recon_per_head", sp.plot_n_recon_per_head(df, [(0, 1), (1, 2), (2, 3)])
    yield "sparseness_map", sp.plot_sparseness_map(att, n_layers=3, n_heads=4)
    yield "dominant_index", sp.plot_dominant_index(att)
    yield "usage", sp.plot_usage(att, 0, 1)
    per_pair = pd.DataFrame({"cos": rng.random(30), "n_recon": rng.integers(1, 9, 30), "rolls_tovee": rng.random(30),
                             "n_features": np.repeat([16, 32, 64], 10)})
    yield "sad_vs_alignment", sp.plot_sad_vs_alignment(per_pair)
    cal = pd.DataFrame({"spectrum": np.repeat(["flat", "random init", "rank one"], 2),
                        "kind": ["attended", "random"] * 3, "ratio_rotated": [1.0, 0.99, 0.91, 0.93, 0.13, 0.13],
                        "ratio_null": [0.99, 1.0, 0.98, 0.99, 1.0, 1.0]})
    yield "null_calibration", nu.plot_null_calibration(cal)
    yield "null_ratio", nu.plot_null_ratio(_ratio())
    yield "null_ratios", nu.plot_null_ratios({"IOI prompts": _ratio(), "plain sentences": _ratio()})


def test_part3_figures_are_legible_on_a_phone_and_fit_the_column():
    bad = figure_problems(_figures())
    assert not bad, "\n".join(bad)


def test_stacked_ratio_panels_share_axes_and_keep_one_legend():
    fig = nu.plot_null_ratios({"a": _ratio(), "b": _ratio()})
    axes = fig.axes
    assert len(axes) == 2 and [ax.get_title() for ax in axes] == ["a", "b"]
    assert axes[0].get_legend() is not None and axes[1].get_legend() is None
    assert axes[0].get_xlabel() == "" and axes[1].get_xlabel() == "layer"
    with pytest.raises(SVToolsError):
        nu.plot_null_ratios({})
