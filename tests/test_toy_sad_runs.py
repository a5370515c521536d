"""svtools.toy.toy_sad_across_runs: one row per run and per template pair, a given run reused."""

from __future__ import annotations

import pytest
import torch

from svtools._checks import SVToolsError
from svtools.toy import ToyConfig, linear_template, toy_pair_sad, toy_sad_across_runs, train


def test_rows_per_run_and_pair_and_a_given_run_is_used():
    torch.set_num_threads(1)
    base = ToyConfig.many_pairs(d_model=8, d_head=8, template=linear_template(3, 3), steps=15, batch=64, seed=0,
                                n_keys=4, p_plant=0.5, target_scale=10.0)
    given = train(base.replace(n_features=8, p_active=2.0 / 8), progress=False)
    per_run, per_pair = toy_sad_across_runs(base, (8, 12), (0,), 300, runs={(8, 0): given}, n_boot=20)
    assert list(per_run["n_features"]) == [8, 12] and list(per_run["seed"]) == [0, 0]
    assert {"cos_min", "RT", "RT null", "ratio", "lo", "hi", "pairs"} <= set(per_run.columns)
    assert len(per_pair) == 2 * len(base.template)
    ok = per_run.dropna(subset=["ratio"])
    assert (ok["lo"] <= ok["ratio"]).all() and (ok["ratio"] <= ok["hi"]).all()
    assert (ok["ratio"] - ok["RT"] / ok["RT null"]).abs().max() < 1e-9
    # the given run is the one measured: its pair SAD matches toy_pair_sad of that run
    mine = per_pair[per_pair["n_features"] == 8].drop(columns=["n_features", "seed"]).reset_index(drop=True)
    assert mine.equals(toy_pair_sad(given).reset_index(drop=True))


def test_empty_grids_are_refused():
    base = ToyConfig.many_pairs(steps=1)
    with pytest.raises(SVToolsError):
        toy_sad_across_runs(base, (), (0,))
    with pytest.raises(SVToolsError):
        toy_sad_across_runs(base, (16,), ())
