"""Property-based tests (Hypothesis) over the argument spaces of the modules issue 20 hardened:
the ``_checks`` helpers, ``sae.train``, ``residual_activations``, ``IOILMConfig``, and the
statistics ``bootstrap``, ``usage_difference``, ``compare_kinds``, ``over_seeds``.

Each draw keeps every argument valid but (mostly) one, drawn from a pool of values of every kind a
careless user might pass (ints, floats with NaN and infinities, bools, None, strings, numpy scalars,
0-d tensors, lists), so that each argument's checks are reached. On every draw either the
documented identity holds, from arguments of the right kinds (a float that "worked" as a seed would
be a silent truncation), or an :class:`SVToolsError` is raised: never another exception, never a
NaN the docstrings do not promise, and inputs are never modified.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from svtools import SVToolsError, sad, sae
from svtools._checks import as_bool, as_float, as_int, as_names, as_seed
from svtools.ioi_lm import IOILMConfig, over_seeds, train

_key = sys.modules[train.__module__]._key  # the cache key (ioi_lm, or its training submodule)
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FEW = settings(SETTINGS, max_examples=40)


def _cast(t, v):
    """``t(v)`` for a numpy scalar type, or ``t(0)`` when ``v`` does not fit (overflow, NaN to int)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if np.issubdtype(t, np.integer) and not (isinstance(v, int) and np.iinfo(t).min <= v <= np.iinfo(t).max):
                return t(0)
            return t(v)
        except (OverflowError, ValueError):
            return t(0)


def _numpy(v):
    return st.sampled_from([np.int8, np.int32, np.int64, np.uint16, np.float16, np.float32, np.float64]).map(
        lambda t: _cast(t, v))


def anything(ints=st.integers(-3, 300), floats=st.floats(-10, 10)):
    """A value of any kind: the right kind often, every wrong kind too."""
    special = st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e300, 2**64, -1, True, False,
                               None, "", "1", "0.5", "no", [], [1], (1, 2), {"a": 1}])
    tensors = st.one_of(ints.map(lambda i: torch.tensor(max(-2**62, min(2**62, i)))),
                        floats.map(lambda f: torch.tensor(f)))
    return st.one_of(ints, floats, special, ints.flatmap(_numpy), floats.flatmap(_numpy), tensors)


# ------------------------------------------------------------------ the helpers themselves

@SETTINGS
@given(anything(ints=st.integers(-2**70, 2**70), floats=st.floats(allow_nan=True, allow_infinity=True)))
def test_helpers_accept_or_name_the_argument(x):
    """Each helper returns its canonical type with the same value, or raises SVToolsError naming
    the argument; bools are never numbers, floats never integers, strings never truth values."""
    for helper, typ in ((as_int, int), (as_float, float), (as_bool, bool), (as_seed, int)):
        try:
            v = helper(x, "arg")
        except SVToolsError as exc:
            assert "arg" in str(exc)
            continue
        assert type(v) is typ
        if typ is int:
            assert not isinstance(x, (bool, np.bool_, float, np.floating, str)) and v == int(x)
            assert helper is not as_seed or v >= 0
        elif typ is float:
            assert math.isfinite(v) and not isinstance(x, (bool, str)) and v == float(x)
        else:
            assert isinstance(x, (bool, np.bool_)) and v == bool(x)
    try:
        names = as_names(x, "by")
    except SVToolsError as exc:
        assert "by" in str(exc)
    else:
        assert isinstance(x, (str, list, tuple)) and all(isinstance(n, str) for n in names)


def _int_like(x) -> bool:
    if isinstance(x, (bool, np.bool_)):
        return False
    return isinstance(x, (int, np.integer)) or (isinstance(x, torch.Tensor) and x.ndim == 0 and not
                                                x.is_floating_point() and x.dtype != torch.bool)


def _real(x) -> bool:
    if isinstance(x, (bool, np.bool_, str)) or x is None:
        return False
    try:
        return math.isfinite(float(x)) and not (isinstance(x, torch.Tensor) and x.dtype == torch.bool)
    except (TypeError, ValueError):
        return False


@st.composite
def one_bad(draw, valid: dict, wild: dict):
    """Valid values for every argument, then (mostly) one of them replaced by a value of any kind:
    each argument's checks are reached, whatever the order the function checks them in."""
    args = {k: draw(v) for k, v in valid.items()}
    name = draw(st.sampled_from([None, *wild]))
    if name is not None:
        args[name] = draw(wild[name])
    return args


# ------------------------------------------------------------------ sae.train

_X = torch.randn(60, 5, generator=torch.Generator().manual_seed(0))
_SAE_KINDS = {"n_features": _int_like, "steps": _int_like, "batch": _int_like, "seed": _int_like, "l1": _real,
              "lr": _real, "held_out": _real}


@FEW
@given(one_bad(valid=dict(n_features=st.integers(1, 12), l1=st.floats(0, 1), steps=st.integers(1, 3),
                          batch=st.integers(1, 40), lr=st.floats(1e-4, 0.1), held_out=st.floats(0, 0.3),
                          seed=st.integers(0, 2**40)),
               wild=dict(n_features=anything(ints=st.integers(-2, 12)), l1=anything(floats=st.floats(-1, 2)),
                         steps=anything(ints=st.integers(-1, 4)), batch=anything(ints=st.integers(-1, 40)),
                         lr=anything(floats=st.floats(-1, 0.1)), held_out=anything(floats=st.floats(-0.5, 1.5)),
                         seed=anything(ints=st.integers(-2, 2**70)))))
def test_sae_train_argument_space(args):
    """Either a dictionary with its identities, from arguments of the right kinds (a float seed or
    step count that "worked" would be a silent truncation), or an SVToolsError; the data untouched."""
    x = _X.clone()
    try:
        model = sae.train(x, progress=False, **args)
    except SVToolsError:
        assert torch.equal(x, _X)
        return
    assert torch.equal(x, _X)
    for k, ok in _SAE_KINDS.items():
        assert ok(args[k]), f"{k}={args[k]!r} was accepted"
    n = int(args["n_features"])
    assert model.W_dec.shape == (5, n) and model.W_enc.shape == (n, 5)
    torch.testing.assert_close(model.W_dec.norm(dim=0), torch.ones(n), rtol=0, atol=1e-5)
    assert math.isfinite(model.scale) and model.scale > 0
    for k, v in model.held_out.items():
        assert math.isfinite(v), k
    torch.testing.assert_close(model.reconstruct(x[:3]), model.decode(model.encode(x[:3])))


# ------------------------------------------------------------------ residual_activations

@FEW
@given(one_bad(valid=dict(layer=st.integers(0, 1), batch_size=st.integers(1, 5), skip_first=st.booleans()),
               wild=dict(layer=anything(ints=st.integers(-2, 3)), batch_size=anything(ints=st.integers(-1, 5)),
                         skip_first=anything())))
def test_residual_activations_argument_space(random_models, batch_tokens, args):
    from svtools.activations import residual_activations

    model = random_models["gpt2"]
    ids, am = batch_tokens
    ids0, am0 = ids.clone(), am.clone()
    try:
        acts = residual_activations(model, ids, args["layer"], attention_mask=am, batch_size=args["batch_size"],
                                    skip_first=args["skip_first"], progress=False)
    except SVToolsError:
        assert torch.equal(ids, ids0) and torch.equal(am, am0)
        return
    assert torch.equal(ids, ids0) and torch.equal(am, am0)
    assert _int_like(args["layer"]) and _int_like(args["batch_size"])
    assert isinstance(args["skip_first"], (bool, np.bool_))
    ref = residual_activations(model, ids, int(args["layer"]), attention_mask=am, batch_size=len(ids),
                               skip_first=bool(args["skip_first"]), progress=False)
    # float32 forward passes in batches of another size block their matmuls differently: a few ulps of
    # the largest activation (seen: 1.14e-5 on a fresh machine), not a fixed 1e-5
    torch.testing.assert_close(acts, ref, rtol=1e-5, atol=1e-5 * max(1.0, float(ref.abs().max())))
    assert acts.shape == (int(am.sum()) - (len(ids) if args["skip_first"] else 0), model.cfg.d_model)


# ------------------------------------------------------------------ IOILMConfig

_INT_FIELDS = ("n_layers", "n_heads", "d_model", "steps", "n_checkpoints", "batch", "warmup", "buckets", "seed")
_FLOAT_FIELDS = ("lr", "weight_decay", "ioi_fraction", "answer_weight", "attn_dropout", "filler_test_share",
                 "name_shared")


@SETTINGS
@given(st.sampled_from(_INT_FIELDS + _FLOAT_FIELDS + ("freeze_names", "resample_names")),
       anything(ints=st.integers(-2, 70), floats=st.floats(-2, 2)))
def test_ioilm_config_field_space(field, value):
    """Every field accepts exactly its kind (numpy scalars included) and is stored as the plain
    Python type, so the cache key is computable and equal for equal values; else SVToolsError
    naming the field."""
    try:
        cfg = IOILMConfig(**{field: value})
    except SVToolsError as exc:
        assert field in str(exc) or "divisible" in str(exc) or "needs freeze_names" in str(exc)
        return
    got = getattr(cfg, field)
    if field in _INT_FIELDS:
        assert type(got) is int and got == value
    elif field in _FLOAT_FIELDS:
        assert (got is None and value is None) or (type(got) is float and math.isfinite(got) and got == float(value))
    else:
        assert type(got) is bool
    assert len(_key(cfg, 0)) == 16
    assert _key(IOILMConfig(**dataclasses.asdict(cfg)), 0) == _key(cfg, 0)


# ------------------------------------------------------------------ statistics

def _frame(seed=0, n_prompts=6, pairs_per=4, r=5):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_prompts):
        for i in range(pairs_per):
            for kind in ("attended", "non-attended"):
                k = int(rng.integers(1, 3))
                used = tuple(int(v) for v in rng.choice(r, k, replace=False))
                rows.append({"layer": int(rng.integers(0, 2)), "head": 0, "prompt": p, "kind": kind, "r": r,
                             "rolls_tovee": float(rng.random()), "rolls_tovee_rotated": float(rng.random()),
                             "n_recon": k, "used": used, "dominant_k": used[0]})
    return pd.DataFrame(rows)


FRAME = _frame()


@FEW
@given(one_bad(valid=dict(columns=st.sampled_from(["rolls_tovee", ["rolls_tovee", "n_recon"]]),
                          by=st.sampled_from(["layer", ["layer", "kind"], []]), stat=st.sampled_from(["mean", "median"]),
                          n_boot=st.integers(1, 60), ci=st.floats(0.5, 0.99), seed=st.integers(0, 2**40)),
               wild=dict(columns=st.one_of(st.sampled_from(["used", "kind", "nope", "", []]),
                                           st.lists(st.sampled_from(["rolls_tovee", "n_recon", "kind"]), max_size=3)),
                         by=st.one_of(st.sampled_from(["", "lyer", ("layer",)]),
                                      st.lists(st.sampled_from(["layer", "kind"]), max_size=2)),
                         stat=st.sampled_from(["max", None, "MEAN"]), n_boot=anything(ints=st.integers(-1, 60)),
                         ci=anything(floats=st.floats(-0.5, 1.5)), seed=anything(ints=st.integers(-2, 2**40)))))
def test_bootstrap_argument_space(args):
    df = FRAME.copy()
    try:
        out = sad.bootstrap(df, args["columns"], by=args["by"], stat=args["stat"], n_boot=args["n_boot"],
                            ci=args["ci"], seed=args["seed"])
    except SVToolsError:
        pd.testing.assert_frame_equal(df, FRAME)
        return
    pd.testing.assert_frame_equal(df, FRAME)
    assert _int_like(args["n_boot"]) and _int_like(args["seed"]) and _real(args["ci"])
    assert len(out) and (out["lo"] <= out["hi"]).all()
    assert np.isfinite(out[["estimate", "lo", "hi"]].to_numpy()).all()
    by_cols = [args["by"]] if isinstance(args["by"], str) else list(args["by"])
    assert list(out.columns[:len(by_cols)]) == by_cols
    cols = [args["columns"]] if isinstance(args["columns"], str) else list(args["columns"])
    assert list(dict.fromkeys(out["column"])) == cols


@FEW
@given(one_bad(valid=dict(by=st.sampled_from(["layer", ["layer", "head"], []]), kinds=st.sampled_from(
                   [("attended", "non-attended"), ("non-attended", "attended")]), on=st.sampled_from(["used", "dominant"]),
                   measure=st.sampled_from(["js", "tv"]), n_perm=st.integers(1, 40), seed=st.integers(0, 2**40)),
               wild=dict(by=st.sampled_from(["lyer", ("layer", "layer"), 3]),
                         kinds=st.sampled_from([("attended", "attended"), ("attended", "random"), ("attended",), "attended"]),
                         on=st.sampled_from(["other", None]), measure=st.sampled_from(["kl", None]),
                         n_perm=anything(ints=st.integers(-1, 40)), seed=anything(ints=st.integers(-2, 2**40)))))
def test_usage_difference_argument_space(args):
    df = FRAME.copy()
    try:
        out = sad.usage_difference(df, **args)
    except SVToolsError:
        pd.testing.assert_frame_equal(df, FRAME)
        return
    pd.testing.assert_frame_equal(df, FRAME)
    assert _int_like(args["n_perm"]) and _int_like(args["seed"])
    assert len(out)
    assert out["distance"].between(0, 1).all() and out["p_value"].between(0, 1, inclusive="right").all()
    assert (out["p_value"] >= 1 / (1 + int(args["n_perm"])) - 1e-12).all()


@FEW
@given(a=st.sampled_from(["attended", "non-attended", "random", "atended"]),
       b=st.sampled_from(["attended", "non-attended", "random"]),
       column=st.sampled_from(["rolls_tovee", "rolls_tovee_rotated", "n_recon", "x"]),
       column_b=st.sampled_from([None, "rolls_tovee_rotated", "n_recon"]),
       stats=st.sampled_from([("mean",), ("median",), ("mean", "median")]))
def test_compare_kinds_argument_space(a, b, column, column_b, stats):
    """Whatever the summary holds, each output row compares one statistic of one group with the
    same statistic of the same group; unknown names are errors, never an empty frame."""
    summary = pd.concat([sad.bootstrap(FRAME, ["rolls_tovee", "rolls_tovee_rotated"], by=["layer", "kind"],
                                       stat=s, n_boot=30) for s in stats], ignore_index=True)
    try:
        out = sad.compare_kinds(summary, a, b, column=column, column_b=column_b)
    except SVToolsError:
        return
    assert len(out) == FRAME["layer"].nunique() * len(stats)
    assert set(out["verdict"]) <= {"lower", "higher", "overlap"}
    for d in out.to_dict("records"):  # the estimate of kind a is its own statistic of its own group
        want = summary[(summary["kind"] == a) & (summary["column"] == column) & (summary["layer"] == d["layer"])
                       & (summary["stat"] == d["stat"])]["estimate"]
        assert len(want) == 1 and want.iloc[0] == d[a]


@FEW
@given(ci=anything(floats=st.floats(-0.5, 1.5)), by=st.sampled_from(["step", ["step"], [], "nope", ["step", "step"]]),
       dup=st.booleans())
def test_over_seeds_argument_space(ci, by, dup):
    frame = pd.DataFrame({"seed": [0, 1, 2, 0, 1, 2], "step": [1, 1, 1, 2, 2, 2], "v": [.1, .3, .2, .5, .6, .4]})
    if dup:
        frame = pd.concat([frame, frame], ignore_index=True)
    before = frame.copy()
    try:
        out = over_seeds(frame, "v", by=by, ci=ci)
    except SVToolsError:
        pd.testing.assert_frame_equal(frame, before)
        return
    assert not dup
    pd.testing.assert_frame_equal(frame, before)
    assert (out["lo"] <= out["mean"]).all() and (out["mean"] <= out["hi"]).all()
    assert np.isfinite(out[["mean", "lo", "hi"]].to_numpy()).all() and (out["seeds"] == 3).all()
