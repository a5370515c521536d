"""Issue 20: the IOI-model run cache keeps data on disk, so it must heal: an entry is written
atomically, verified on read against the request (config, seed, code version, files and their
sizes), rebuilt when damaged, never leaks directories after a failure (an exception, Ctrl-C, a
killed process), and a cache location that cannot be used is named. Two processes training the
same key end with one good entry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from svtools import SVToolsError, ioi_lm

TINY = ioi_lm.IOILMConfig(n_layers=2, n_heads=2, d_model=16, steps=12, n_checkpoints=5, batch=8, warmup=2)
LAST = f"step_{TINY.steps:06d}.safetensors"
ROOT = Path(__file__).resolve().parents[1]


def _train_module():
    """The module whose globals ``train`` reads (``ioi_lm`` itself, or its training submodule)."""
    return sys.modules[ioi_lm.train.__module__]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SVTOOLS_CACHE", str(tmp_path))
    return tmp_path / "ioi_lm"


@pytest.fixture
def count_training(monkeypatch):
    """Counts the training loops run (the real loop still runs)."""
    mod = _train_module()
    real, calls = mod._train_loop, []

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(mod, "_train_loop", counted)
    return calls


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    # copies: safetensors may map the file, and the tests then truncate it (a bus error on read)
    return {k: v.clone() for k, v in load_file(str(path / LAST)).items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _truncate(f: Path, keep: float) -> None:
    data = f.read_bytes()
    f.write_bytes(data[:int(len(data) * keep)])


def _edit_meta(path: Path, **changes) -> None:
    meta = json.loads((path / "meta.json").read_text())
    for k, v in changes.items():
        if k == "lr":
            meta["config"]["lr"] = v
        else:
            meta[k] = v
    (path / "meta.json").write_text(json.dumps(meta))


DAMAGE = {
    "empty checkpoint": lambda p: (p / LAST).write_bytes(b""),
    "truncated checkpoint": lambda p: _truncate(p / LAST, 0.6),
    "checkpoint header cut": lambda p: _truncate(p / LAST, 0.001),
    "deleted checkpoint": lambda p: (p / LAST).unlink(),
    "empty meta.json": lambda p: (p / "meta.json").write_bytes(b""),
    "truncated meta.json": lambda p: _truncate(p / "meta.json", 0.5),
    "deleted meta.json": lambda p: (p / "meta.json").unlink(),
    "meta.json of another config": lambda p: _edit_meta(p, lr=0.5),
    "meta.json of another seed": lambda p: _edit_meta(p, seed=7),
    "meta.json of another code version": lambda p: _edit_meta(p, code_version=-1),
    "meta.json of other checkpoints": lambda p: _edit_meta(p, checkpoints=[0, 12]),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_entry_is_detected_and_rebuilt(cache, count_training, damage):
    """A zero-byte or truncated checkpoint or meta.json counted as a hit and then raised
    SafetensorError / JSONDecodeError on every call, forever; an entry of another config raised a
    state-dict size mismatch; a deleted checkpoint made every later call retrain into a new
    directory that stayed. Now: detected on read, said, removed, retrained into the same place."""
    first = ioi_lm.train(TINY, seed=0, progress=False)
    good = _weights(first.path)
    DAMAGE[damage](first.path)
    with pytest.warns(UserWarning, match="retrain"):
        again = ioi_lm.train(TINY, seed=0, progress=False)
    assert len(count_training) == 2
    assert again.path == first.path and sorted(os.listdir(cache)) == [first.path.name]
    assert _same(_weights(again.path), good)  # training is deterministic: the same run again
    assert again.history.equals(first.history)
    sd = again.hf_model(TINY.steps, "cpu").state_dict()  # and it loads
    assert all(torch.equal(sd[k], v) for k, v in good.items())
    third = ioi_lm.train(TINY, seed=0, progress=False)  # healed: a plain hit now
    assert len(count_training) == 2 and third.path == first.path


def test_checkpoint_of_another_config_is_detected(cache, count_training):
    """A checkpoint file of another model put into an entry (its size differs from the recorded one)."""
    first = ioi_lm.train(TINY, seed=0, progress=False)
    other = ioi_lm.train(TINY.replace(d_model=8), seed=0, progress=False)
    (first.path / LAST).write_bytes((other.path / LAST).read_bytes())
    with pytest.warns(UserWarning, match="retrain"):
        again = ioi_lm.train(TINY, seed=0, progress=False)
    assert len(count_training) == 3 and again.hf_model(TINY.steps, "cpu") is not None


def test_entries_written_before_sizes_were_recorded(cache, count_training):
    """Entries written by the previous code have no recorded sizes: still hits when intact (no
    retraining of everyone's cached runs), still caught when truncated (safetensors header)."""
    first = ioi_lm.train(TINY, seed=0, progress=False)
    meta = json.loads((first.path / "meta.json").read_text())
    meta.pop("files", None)
    (first.path / "meta.json").write_text(json.dumps(meta))
    hit = ioi_lm.train(TINY, seed=0, progress=False)
    assert len(count_training) == 1 and hit.path == first.path
    _truncate(first.path / "step_000002.safetensors", 0.9)
    with pytest.warns(UserWarning, match="retrain"):
        ioi_lm.train(TINY, seed=0, progress=False)
    assert len(count_training) == 2


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failed_run_leaves_nothing_behind(cache, monkeypatch, exc):
    """Interrupted runs (Ctrl-C, an exception) left their partial directory in the cache forever."""
    mod = _train_module()
    real = mod._train_loop

    def fail_midway(model, opt, tok, cfg, seed, ckpts, out, *a, **k):
        real(model, opt, tok, cfg.replace(steps=2, n_checkpoints=2), seed, [0, 1], out, *a, **k)
        assert len(list(Path(out).iterdir())) >= 2  # some checkpoints were written
        raise exc

    monkeypatch.setattr(mod, "_train_loop", fail_midway)
    with pytest.raises(type(exc)):
        ioi_lm.train(TINY, seed=0, progress=False)
    assert not cache.exists() or os.listdir(cache) == []
    # cache=False runs clean up their temporary directory too
    before = set(os.listdir(tempfile.gettempdir()))
    with pytest.raises(type(exc)):
        ioi_lm.train(TINY, seed=0, progress=False, cache=False)
    assert not [d for d in set(os.listdir(tempfile.gettempdir())) - before if d.startswith("ioi_lm_")]


KILLED = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from svtools import ioi_lm
    from test_ioi_lm_cache import TINY, _train_module
    mod = _train_module()
    real = mod._train_loop
    def die(model, opt, tok, cfg, seed, ckpts, out, *a, **k):
        real(model, opt, tok, cfg.replace(steps=1, n_checkpoints=2), seed, [0], out, *a, **k)
        os.kill(os.getpid(), signal.SIGKILL)
    mod._train_loop = die
    ioi_lm.train(TINY, seed=0, progress=False)
""")


def test_killed_run_is_cleaned_up_by_the_next_call(cache, count_training):
    """A run killed outright (SIGKILL: no handler runs) leaves its directory; the next call
    removes it (its process is gone) instead of leaking it."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", KILLED.format(tests=str(ROOT / "tests"))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = os.listdir(cache)
    assert len(left) == 1 and left[0] != _train_module()._key(TINY, 0)  # the killed run's partial directory
    run = ioi_lm.train(TINY, seed=0, progress=False)
    assert os.listdir(cache) == [run.path.name] and len(count_training) == 1


def test_stale_directories_of_live_processes_are_kept(cache):
    """Cleaning must never touch a directory a live run is writing (here: this process's own pid)."""
    cache.mkdir(parents=True)
    mine = ioi_lm.train(TINY, seed=0, progress=False)
    live = cache / "ioi_lm_0123456789abcdef_live"
    live.mkdir()
    (live / "owner.json").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid()}))
    ioi_lm.train(TINY, seed=1, progress=False)
    assert live.is_dir() and mine.path.is_dir()


def test_cache_location_that_is_a_file(tmp_path, monkeypatch):
    """SVTOOLS_CACHE pointing to a file: a clear error naming the variable (before any training)."""
    f = tmp_path / "not_a_dir"
    f.write_text("x")
    for value in (f, f / "below"):
        monkeypatch.setenv("SVTOOLS_CACHE", str(value))
        with pytest.raises(SVToolsError, match="SVTOOLS_CACHE"):
            ioi_lm.train(TINY, seed=0, progress=False)


def test_cache_location_that_is_read_only(cache, monkeypatch):
    """SVTOOLS_CACHE in a read-only directory: a clear error naming the variable when a run must
    be written; a read-only cache that holds the run still serves it."""
    first = ioi_lm.train(TINY, seed=0, progress=False)

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied", str(cache))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    assert ioi_lm.train(TINY, seed=0, progress=False).path == first.path  # a hit needs no write
    with pytest.raises(SVToolsError, match="SVTOOLS_CACHE"):
        ioi_lm.train(TINY, seed=1, progress=False)
    # a damaged entry that cannot be removed: the error says the one command that clears it
    (first.path / LAST).write_bytes(b"")
    monkeypatch.setattr(os, "rename", read_only)
    with pytest.raises(SVToolsError, match="rm -rf"):
        ioi_lm.train(TINY, seed=0, progress=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_cache_location_that_is_read_only_for_real(cache):
    first = ioi_lm.train(TINY, seed=0, progress=False)
    os.chmod(cache, 0o555)
    try:
        assert ioi_lm.train(TINY, seed=0, progress=False).path == first.path
        with pytest.raises(SVToolsError, match="SVTOOLS_CACHE"):
            ioi_lm.train(TINY, seed=1, progress=False)
    finally:
        os.chmod(cache, 0o755)


RACE = textwrap.dedent("""
    import hashlib, sys
    from svtools import ioi_lm
    cfg = ioi_lm.IOILMConfig(n_layers=2, n_heads=2, d_model=16, steps=12, n_checkpoints=5, batch=8, warmup=2)
    run = ioi_lm.train(cfg, seed=3, progress=False)
    print(run.path, hashlib.sha256((run.path / "step_000012.safetensors").read_bytes()).hexdigest())
""")


def test_two_processes_training_one_key_end_with_one_good_entry(cache):
    """Two processes training the same key at once: both return the same, complete entry, and
    nothing else is left in the cache."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    procs = [subprocess.Popen([sys.executable, "-c", RACE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    lines = [out.strip().splitlines()[-1] for out, _ in outs]
    assert lines[0] == lines[1]
    key = _train_module()._key(TINY, 3)
    assert lines[0].split()[0] == str(cache / key) and os.listdir(cache) == [key]
    run = ioi_lm.train(TINY, seed=3, progress=False)  # a verified hit
    assert run.path == cache / key
