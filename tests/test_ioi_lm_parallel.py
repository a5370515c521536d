"""Issue 21: the IOI LM's seeds train in parallel processes with the numbers of a serial run; a
run is never trained twice into the cache (a lock); the training step's speed-ups (data prepared
ahead in a thread, ``foreach`` AdamW) keep the weights bit for bit; unit tests never train the
book's runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from svtools import SVToolsError, ioi_lm
from svtools.ioi_lm import batches, training
from svtools.runtime import Prefetch

TINY = ioi_lm.IOILMConfig(n_layers=2, n_heads=2, d_model=16, steps=12, n_checkpoints=5, batch=8, warmup=2)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SVTOOLS_CACHE", str(tmp_path))
    return tmp_path


def _weights(run) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(run.path / f"step_{s:06d}.safetensors")) for s in run.checkpoints]


def _same(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return a.checkpoints == b.checkpoints and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(wa, wb))


def test_parallel_seeds_are_bit_identical_to_serial_runs(cache):
    """Two seeds trained by two worker processes give the weights (every checkpoint, every
    tensor: torch.equal) and losses of the same seeds trained here one after another."""
    par = ioi_lm.train_seeds(TINY, seeds=(0, 1), processes=2)
    assert [r.seed for r in par] == [0, 1]
    assert all(r.path.parent == ioi_lm.cache_dir() for r in par)  # trained by the workers into the cache
    for r in par:
        ser = ioi_lm.train(TINY, seed=r.seed, progress=False, cache=False)
        assert _same(r, ser)
        assert r.history["loss"].tolist() == ser.history["loss"].tolist()
    assert not _same(par[0], par[1])  # the comparison can fail: two seeds differ


def test_train_seeds_loads_what_is_cached_and_checks_its_arguments(cache, monkeypatch):
    first = ioi_lm.train(TINY, seed=3, progress=False)
    trained = []
    monkeypatch.setattr(training, "_train_worker", lambda cfg, s: trained.append(s))  # no worker may run
    again = ioi_lm.train_seeds(TINY, seeds=[3], processes=2)
    assert again[0].path == first.path and trained == []
    with pytest.raises(SVToolsError, match="seeds"):
        ioi_lm.train_seeds(TINY, seeds=3)
    with pytest.raises(SVToolsError, match="processes"):
        ioi_lm.train_seeds(TINY, seeds=[3], processes=0)
    with pytest.raises(SVToolsError, match="cfg"):
        ioi_lm.train_seeds({"steps": 3})


RACER = textwrap.dedent("""
    import sys, time
    from svtools import ioi_lm
    from svtools.ioi_lm import training
    real = training._about_to_train
    def mark(cfg, seeds):
        with open({log!r}, "a") as f:
            f.write("trained\\n")
        time.sleep(2)  # hold the lock long enough for the other process to ask
    training._about_to_train = mark
    cfg = ioi_lm.IOILMConfig(n_layers=2, n_heads=2, d_model=16, steps=12, n_checkpoints=5, batch=8, warmup=2)
    print(ioi_lm.train(cfg, seed=0, progress=False).path)
""")


def test_two_processes_never_train_the_same_run_twice(cache, tmp_path):
    """Two processes asking for one run at the same time: one trains, the other waits for the
    lock and loads the entry (the same directory)."""
    log = tmp_path / "log.txt"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    procs = [subprocess.Popen([sys.executable, "-c", RACER.format(log=str(log))], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert log.read_text().count("trained") == 1
    paths = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(paths) == 1 and Path(paths.pop()).parent == ioi_lm.cache_dir()


def test_prefetched_data_is_the_inline_data():
    """The training loop's data, prepared ahead in a thread, equals each step's data computed
    inline (and errors in the thread reach the loop)."""
    tok = ioi_lm.build_tokenizer()
    steps = range(7)
    got = list(Prefetch(lambda s: batches.step_data(TINY, 5, tok, s), steps, depth=3))
    assert len(got) == len(steps)
    for step, item in zip(steps, got):
        want = batches.step_data(TINY, 5, tok, step)
        assert all(torch.equal(a, b) for a, b in zip(item, want))
    assert not torch.equal(got[0][1][:, :4], got[1][1][:, :4])  # steps differ

    class Boom(Exception):
        pass

    def bad_tok(*a, **k):
        raise Boom("tokenizer failed")

    with pytest.raises(Boom):
        list(Prefetch(lambda s: batches.step_data(TINY, 5, bad_tok, s), steps))
    early = Prefetch(lambda s: s * s, range(10**6), depth=2)  # left early: close() stops the thread
    assert [next(early) for _ in range(3)] == [0, 1, 4]
    early.close()
    assert not early._thread.is_alive()


def test_foreach_adamw_is_bit_identical_to_the_loop(cache, monkeypatch):
    """AdamW's foreach implementation (the default here) gives the weights of torch's
    per-parameter loop bit for bit."""
    fe = ioi_lm.train(TINY, seed=4, progress=False, cache=False)
    monkeypatch.setattr(training, "_ADAMW_KW", {"foreach": False})
    loop = ioi_lm.train(TINY, seed=4, progress=False, cache=False)
    assert _same(fe, loop)


def test_unit_tests_may_not_train_the_books_runs(cache):
    """The autouse guard of tests/conftest.py: training the default config fails the test (here:
    caught), before any step runs and before anything is written."""
    with pytest.raises(pytest.fail.Exception, match="would train the book's IOI LM"):
        ioi_lm.train(progress=False, seed=7)
    with pytest.raises(pytest.fail.Exception, match="would train the book's IOI LM"):
        ioi_lm.train_seeds(seeds=(0, 1), processes=2)
    assert not (cache / "ioi_lm").exists() or not any((cache / "ioi_lm").iterdir())
