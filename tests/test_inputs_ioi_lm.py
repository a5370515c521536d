"""Issue 20: svtools.ioi_lm under careless or unlucky input: config checks, a finite-loss guard
(no NaN run is ever cached), unknown words in IOI prompts, argument errors. The cache's own
faults are in test_ioi_lm_cache.py. Each test names the issue's item it covers."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
import torch

from svtools import SVToolsError, ioi_lm
from svtools.ioi import ioi_tokens
from svtools.data import ioi_prompts
from conftest import svtools_cache_at

#: the module that holds train and the cache key (ioi_lm itself, or its training submodule)
_training = sys.modules[ioi_lm.train.__module__]
TINY = ioi_lm.IOILMConfig(n_layers=2, n_heads=2, d_model=16, steps=12, n_checkpoints=5, batch=8, warmup=2)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SVTOOLS_CACHE", str(tmp_path))
    return tmp_path / "ioi_lm"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    with svtools_cache_at(tmp_path_factory.mktemp("svtools_cache_inputs")):
        yield ioi_lm.train(TINY, seed=0, progress=False)


def _entries(cache_root):
    return sorted(p.name for p in cache_root.iterdir()) if cache_root.exists() else []


# ------------------------------------------------------------------ silent wrong results

@pytest.mark.parametrize("change", [dict(lr=1e6), dict(lr=50.0, warmup=0)])
def test_training_to_nan_raises_and_caches_nothing(cache, change):
    """train trained to NaN without an error and cached the NaN run; every later call returned
    it. Now the finite-loss guard stops it, and nothing stays in the cache."""
    cfg = TINY.replace(**change)
    with pytest.raises(SVToolsError, match="diverged"):
        ioi_lm.train(cfg, seed=0, progress=False)
    assert _entries(cache) == []
    with pytest.raises(SVToolsError, match="diverged"):  # and again: nothing was cached
        ioi_lm.train(cfg, seed=0, progress=False)
    with pytest.raises(SVToolsError, match="diverged"):
        ioi_lm.train(cfg, seed=0, progress=False, cache=False)


@pytest.mark.parametrize("value", [-5.0, float("nan"), float("inf"), "0.1", None])
def test_weight_decay_is_checked(value):
    """weight_decay was never checked (-5 accepted, NaN trained to NaN, '0.1' a TypeError)."""
    with pytest.raises(SVToolsError, match="weight_decay"):
        ioi_lm.IOILMConfig(weight_decay=value)


def test_unknown_words_in_ioi_prompts(tiny_run):
    """IOI prompts with words the IOI model does not know: ioi_tokens accepted <unk> for both
    names (and ioi_accuracy then reported 0.0); with the default ioi_prompts(32), 41% of prompts
    hold <unk> ("returned", ...) and nothing warned."""
    model = tiny_run.load(tiny_run.checkpoints[-1], device="cpu")
    strangers = ioi_prompts(4, seed=0, names=["Zorblax", "Quimbly"], templates=[ioi_lm.TRAIN_TEMPLATES[0]])
    with pytest.raises(SVToolsError, match="vocabulary"):
        ioi_tokens(model, strangers)
    with pytest.raises(SVToolsError, match="vocabulary"):
        tiny_run.logits(tiny_run.checkpoints[-1], strangers)
    default = ioi_prompts(32)
    with pytest.warns(UserWarning, match="of 32 IOI prompts hold words") as caught:
        ioi_tokens(model, default)
    assert any(type(w.message).__name__ == "UnknownWordsWarning" for w in caught)
    # the model's own prompts are all in its vocabulary: no warning
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ioi_tokens(model, tiny_run.prompts(32, seed=1))
    assert not [w for w in caught if "IOI prompts hold words" in str(w.message)]


def test_ioi_accuracy_refuses_indistinguishable_names():
    """With both names one token (e.g. both <unk>), "IO beats S" is never true and top-1 is
    meaningless: ioi_accuracy says so instead of reporting 0.0."""
    from svtools.data import IOIPositions

    t = torch.tensor
    pos = IOIPositions(io=t([1, 1]), s1=t([2, 2]), s2=t([4, 4]), end=t([5, 5]), length=t([6, 6]),
                       io_id=t([7, 9]), s_id=t([7, 8]))
    with pytest.raises(SVToolsError, match="same token"):
        ioi_lm.ioi_accuracy(torch.zeros(2, 20), pos)


# ------------------------------------------------------------------ raw tracebacks and wrong messages

@pytest.mark.parametrize("field, value", [
    ("lr", "1e-3"), ("lr", None), ("lr", 0.0), ("ioi_fraction", None), ("ioi_fraction", 1.5),
    ("answer_weight", "4"), ("attn_dropout", None), ("filler_test_share", "0.7"), ("name_shared", "x"),
    ("steps", 2.0), ("steps", True), ("batch", "64"), ("warmup", -1), ("warmup", 1.5), ("buckets", None),
    ("n_layers", 0), ("n_heads", np.float64(4.0)), ("seed", 1.5), ("freeze_names", "yes")])
def test_config_fields_name_themselves(field, value):
    """IOILMConfig(lr='1e-3'), weight_decay='0.1', ioi_fraction=None: TypeErrors from a
    comparison inside the config; each bad field now raises naming itself."""
    with pytest.raises(SVToolsError, match=field):
        ioi_lm.IOILMConfig(**{field: value})


def test_config_accepts_numpy_scalars_with_the_same_key():
    """numpy integers (and floats) for the config's numbers: accepted, stored as Python numbers,
    the same cache key as the Python values; the default config's key is unchanged."""
    ints = {f: getattr(TINY, f) for f in ("n_layers", "n_heads", "d_model", "steps", "n_checkpoints", "batch",
                                          "warmup", "buckets", "seed")}
    cfg = TINY.replace(**{k: np.int64(v) for k, v in ints.items()}, lr=np.float64(TINY.lr),
                       answer_weight=np.float64(TINY.answer_weight))
    assert cfg == TINY and all(type(getattr(cfg, k)) is int for k in ints)
    assert type(cfg.lr) is float and _training._key(cfg, 0) == _training._key(TINY, 0)
    # integers where a float is meant are the same run as the float
    assert _training._key(TINY.replace(answer_weight=4), 0) == _training._key(TINY.replace(answer_weight=4.0), 0)
    # the default runs every chapter uses keep their cache entries (a changed key would retrain them)
    assert [_training._key(ioi_lm.IOILMConfig(), s) for s in (0, 1, 2)] == \
        ["dc15d1d14085f70f", "92b5ae2d0844d16c", "13b450ba0c58e321"]
    assert dataclasses.asdict(ioi_lm.IOILMConfig(**dataclasses.asdict(cfg))) == dataclasses.asdict(TINY)


@pytest.mark.parametrize("seed", [2**64, -1, 1.5, "0", True])
def test_train_seed_is_checked(cache, seed):
    """train(seed=2**64) failed inside torch."""
    with pytest.raises(SVToolsError, match="seed"):
        ioi_lm.train(TINY, seed=seed, progress=False)
    assert _entries(cache) == []


def test_numpy_seed_is_the_python_seed(tiny_run):
    again = ioi_lm.train(TINY, seed=np.int64(0), progress=False)
    assert again.path == tiny_run.path and again.seed == 0 and type(again.seed) is int


def test_filler_sentences_arguments():
    """filler_sentences(names=['Mary']) raised ValueError from random.sample."""
    with pytest.raises(SVToolsError, match="names"):
        ioi_lm.filler_sentences(3, names=["Mary"])
    with pytest.raises(SVToolsError, match="names"):
        ioi_lm.filler_sentences(3, names="Mary")
    with pytest.raises(SVToolsError, match="n"):
        ioi_lm.filler_sentences(2.5)
    with pytest.raises(SVToolsError, match="test_share"):
        ioi_lm.filler_sentences(3, test_share="0.5")
    assert ioi_lm.filler_sentences(np.int64(4), seed=np.int64(2)) == ioi_lm.filler_sentences(4, seed=2)
    with pytest.raises(SVToolsError, match="ioi_fraction"):
        ioi_lm.training_texts(4, ioi_fraction=None)


def test_role_attention_and_over_checkpoints_arguments(tiny_run):
    """role_attention(batch_size=0) (ValueError from range), over_checkpoints(run, [])
    (ValueError from pandas.concat)."""
    model = tiny_run.load(tiny_run.checkpoints[-1], device="cpu")
    ds = tiny_run.prompts(4, seed=0)
    with pytest.raises(SVToolsError, match="batch_size"):
        ioi_lm.role_attention(model, ds, batch_size=0)
    with pytest.raises(SVToolsError, match="TransformerBridge|load_model"):
        ioi_lm.role_attention(tiny_run.hf_model(tiny_run.checkpoints[-1], "cpu"), ds)
    a = ioi_lm.role_attention(model, ds, batch_size=2)
    b = ioi_lm.role_attention(model, ds, batch_size=np.int64(2))
    assert a.equals(b)
    with pytest.raises(SVToolsError, match="steps"):
        ioi_lm.over_checkpoints(tiny_run, [], ds, progress=False)
    with pytest.raises(SVToolsError, match="not a checkpoint"):
        ioi_lm.over_checkpoints(tiny_run, [3.0], ds, progress=False)
    roles, pairs = ioi_lm.over_checkpoints(tiny_run, [np.int64(tiny_run.checkpoints[-1])], ds, progress=False)
    assert set(roles["step"]) == {tiny_run.checkpoints[-1]} and pairs.empty


def test_training_runs_on_the_cpu_unless_asked_even_with_a_gpu(monkeypatch):
    """The book's seeds were validated on the CPU: a present GPU must not change which run is trained
    (or loaded). A run asked for on another device is another cache entry."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _training._train_device(None) == torch.device("cpu")
    assert _training._train_device("cuda") == torch.device("cuda")
    cpu_key = _training._key(TINY, 0)
    assert _training._key(TINY, 0, torch.device("cpu")) == cpu_key
    assert _training._key(TINY, 0, torch.device("cuda")) == f"{cpu_key}-cuda"
