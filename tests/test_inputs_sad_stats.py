"""Issue 20: the statistics of svtools.sad (bootstrap, compare_kinds, usage_difference,
singular_vector_usage), ioi_lm.over_seeds and the argument checks of head_sparsity and
baseline_pairs, under careless or unlucky input. Each test names the issue's item it covers."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch

from svtools import SVToolsError, sad
from svtools.ioi_lm import over_seeds


@pytest.fixture(scope="module")
def pairs(random_models):
    """A head_sparsity frame of a random GPT-2 with non-attended baseline rows."""
    ids = torch.randint(1, 128, (6, 12), generator=torch.Generator().manual_seed(0))
    df = sad.head_sparsity(random_models["gpt2"], ids, threshold=0.3, baseline="non-attended",
                           baseline_fraction=0.3, progress=False)
    assert set(df["kind"]) == {"attended", "non-attended"}
    return df


def _csv(df: pd.DataFrame) -> pd.DataFrame:
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    buf.seek(0)
    return pd.read_csv(buf)


# ------------------------------------------------------------------ silent wrong results

def test_compare_kinds_pairs_like_statistics(pairs):
    """A summary holding mean and median rows paired one kind's mean with the other's median
    (8 rows instead of 2 per layer... one reading "lower"). Each statistic is compared with itself."""
    by = ["layer", "kind"]
    mean = sad.bootstrap(pairs, ["rolls_tovee"], by=by, n_boot=50, stat="mean")
    median = sad.bootstrap(pairs, ["rolls_tovee"], by=by, n_boot=50, stat="median")
    both = sad.compare_kinds(pd.concat([mean, median], ignore_index=True))
    n_layers = pairs["layer"].nunique()
    assert len(both) == 2 * n_layers
    for stat, summary in (("mean", mean), ("median", median)):
        alone = sad.compare_kinds(summary)
        got = both[both["stat"] == stat].drop(columns="stat").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, alone.drop(columns="stat", errors="ignore").reset_index(drop=True))


@pytest.mark.parametrize("kw, match", [
    (dict(b="non-atended"), "non-atended"), (dict(a="Attended"), "Attended"),
    (dict(column="rollstovee"), "rollstovee"), (dict(column_b="n_recon"), "n_recon")])
def test_compare_kinds_unknown_kind_or_column(pairs, kw, match):
    """A misspelt kind or column returned an empty frame."""
    summary = sad.bootstrap(pairs, ["rolls_tovee", "rolls_tovee_rotated"], by=["layer", "kind"], n_boot=20)
    with pytest.raises(SVToolsError, match=match):
        sad.compare_kinds(summary, **kw)


def test_over_seeds_checks_ci_and_one_row_per_seed():
    """ci=95 gave NaN bounds, ci=-1 inf; two rows per seed narrowed the interval while `seeds`
    still said 3."""
    frame = pd.DataFrame({"seed": [0, 1, 2, 0, 1, 2], "step": [1, 1, 1, 2, 2, 2],
                          "v": [0.1, 0.3, 0.2, 0.5, 0.6, 0.4]})
    out = over_seeds(frame, "v", by=["step"])
    assert out["seeds"].tolist() == [3, 3] and np.isfinite(out[["lo", "hi"]].to_numpy()).all()
    for ci in (95, -1, 0.0, 1.0, float("nan"), "0.95"):
        with pytest.raises(SVToolsError, match="ci"):
            over_seeds(frame, "v", by=["step"], ci=ci)
    doubled = pd.concat([frame, frame.assign(v=frame["v"] + 0.01)], ignore_index=True)
    with pytest.raises(SVToolsError, match="one row per"):
        over_seeds(doubled, "v", by=["step"])
    # by as one column name, and numpy ci
    pd.testing.assert_frame_equal(over_seeds(frame, "v", by="step", ci=np.float64(0.95)), out)


def test_head_sparsity_silent_coercions(random_models):
    """seed=1.7 truncated (baseline_seed), exclude_first="no" behaved as True."""
    model = random_models["gpt2"]
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    with pytest.raises(SVToolsError, match="baseline_seed"):
        sad.head_sparsity(model, ids, baseline="random", baseline_seed=1.7, progress=False)
    with pytest.raises(SVToolsError, match="exclude_first"):
        sad.head_sparsity(model, ids, exclude_first="no", progress=False)
    with pytest.raises(SVToolsError, match="exclude_first"):
        sad.select_pairs(torch.full((1, 4, 4), 0.25), torch.ones(4, 4, dtype=torch.bool), exclude_first="no")


def test_baseline_pairs_checks_its_arguments():
    """baseline_pairs(fraction=5.0) kept every pair."""
    pattern = torch.full((1, 1, 4, 4), 0.25)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    sel = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    qm = torch.ones(1, 1, 4, dtype=torch.bool)
    kw = dict(query_mask=qm, layer=0, heads=[0])
    for bad in (5.0, 0.0, -0.1, float("nan"), "0.1", None):
        with pytest.raises(SVToolsError, match="fraction"):
            sad.baseline_pairs("random", pattern, mask, sel, fraction=bad, **kw)
    with pytest.raises(SVToolsError, match="bound"):
        sad.baseline_pairs("non-attended", pattern, mask, sel, bound=2.0, **kw)
    with pytest.raises(SVToolsError, match="seed"):
        sad.baseline_pairs("random", pattern, mask, sel, seed=0.5, **kw)
    with pytest.raises(SVToolsError, match="exclude_first"):
        sad.baseline_pairs("random", pattern, mask, sel, exclude_first="no", **kw)
    with pytest.raises(SVToolsError, match="kind"):
        sad.baseline_pairs("attended", pattern, mask, sel, **kw)
    a = sad.baseline_pairs("random", pattern, mask, sel, fraction=0.5, **kw)
    b = sad.baseline_pairs("random", pattern, mask, sel, fraction=np.float32(0.5), layer=np.int64(0), heads=[0],
                           query_mask=qm, seed=np.int64(0))
    assert torch.equal(a, b) and 0 < int(a.sum()) < 12


# ------------------------------------------------------------------ raw tracebacks and wrong messages

def test_head_sparsity_argument_errors(random_models):
    """baseline_seed='a' (ValueError from int()), tokens=[] ("got dtype torch.float32")."""
    model = random_models["gpt2"]
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    with pytest.raises(SVToolsError, match="baseline_seed"):
        sad.head_sparsity(model, ids, baseline="random", baseline_seed="a", progress=False)
    with pytest.raises(SVToolsError, match="empty"):
        sad.head_sparsity(model, [], progress=False)
    # numpy scalars where the API takes numbers
    a = sad.head_sparsity(model, ids, baseline="random", baseline_fraction=0.5, baseline_seed=3, progress=False)
    b = sad.head_sparsity(model, ids, baseline="random", baseline_fraction=np.float32(0.5),
                          baseline_seed=np.int64(3), progress=False)
    pd.testing.assert_frame_equal(a, b)


def test_bootstrap_argument_errors(pairs):
    """bootstrap: zero rows with by=() (ZeroDivisionError) or by=layer; by='layer' (read as
    columns 'l','a','y','e'); columns='used' (ValueError from numpy); seed=-1 (numpy)."""
    with pytest.raises(SVToolsError, match="no rows"):
        sad.bootstrap(pairs.iloc[:0], by=())
    with pytest.raises(SVToolsError, match="no rows"):
        sad.bootstrap(pairs.iloc[:0])
    pd.testing.assert_frame_equal(sad.bootstrap(pairs, by="layer", n_boot=30),
                                  sad.bootstrap(pairs, by=["layer"], n_boot=30))
    with pytest.raises(SVToolsError, match="used"):
        sad.bootstrap(pairs, columns="used")
    with pytest.raises(SVToolsError, match="kind"):
        sad.bootstrap(pairs, columns=["kind"])
    for bad in (-1, 1.5, "a"):
        with pytest.raises(SVToolsError, match="seed"):
            sad.bootstrap(pairs, seed=bad)
    for bad in (0, 2.0, True):
        with pytest.raises(SVToolsError, match="n_boot"):
            sad.bootstrap(pairs, n_boot=bad)
    for bad in (95, 0.0, "0.9"):
        with pytest.raises(SVToolsError, match="ci"):
            sad.bootstrap(pairs, ci=bad)
    with pytest.raises(SVToolsError, match="stat"):
        sad.bootstrap(pairs, stat="max")
    # numpy scalars
    pd.testing.assert_frame_equal(sad.bootstrap(pairs, n_boot=np.int64(40), seed=np.int64(2), ci=np.float32(0.9)),
                                  sad.bootstrap(pairs, n_boot=40, seed=2, ci=float(np.float32(0.9))))


def test_usage_difference_argument_errors(pairs):
    """usage_difference: seed=-1 (ValueError from numpy), n_perm as a numpy integer rejected."""
    with pytest.raises(SVToolsError, match="seed"):
        sad.usage_difference(pairs, n_perm=10, seed=-1)
    with pytest.raises(SVToolsError, match="n_perm"):
        sad.usage_difference(pairs, n_perm=0)
    pd.testing.assert_frame_equal(sad.usage_difference(pairs, n_perm=np.int64(20), seed=np.int64(1)),
                                  sad.usage_difference(pairs, n_perm=20, seed=1))
    pd.testing.assert_frame_equal(sad.usage_difference(pairs, by="layer", n_perm=20),
                                  sad.usage_difference(pairs, by=["layer"], n_perm=20))


def test_frames_read_back_from_csv(pairs):
    """A head_sparsity frame written to CSV and read back (the `used` tuples come back as
    strings) gave ValueErrors; it gives the same statistics as the frame itself."""
    back = _csv(pairs)
    assert isinstance(back["used"].iloc[0], str)
    pd.testing.assert_frame_equal(sad.usage_difference(back, n_perm=20), sad.usage_difference(pairs, n_perm=20))
    pd.testing.assert_frame_equal(sad.singular_vector_usage(back), sad.singular_vector_usage(pairs))
    pd.testing.assert_frame_equal(sad.bootstrap(back, n_boot=20), sad.bootstrap(pairs, n_boot=20))
    garbled = back.assign(used="not a tuple")
    with pytest.raises(SVToolsError, match="used"):
        sad.singular_vector_usage(garbled)
