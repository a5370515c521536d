"""Issue 21: the book executes once. `make test` and `make book` share one jupyter-cache
(scripts/book_exec.py): a notebook is executed when its code or what its outputs depend on
changed, its errors fail the test and are never cached, and the cache is keyed on the package."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import book_exec  # noqa: E402


def _notebook(path: Path, code: str, prose: str = "text") -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(prose), nbformat.v4.new_code_cell(code)]
    nbformat.write(nb, str(path))
    return path


def test_a_notebook_executes_once_per_code_and_errors_are_never_cached(tmp_path):
    cache = tmp_path / "jc"
    nb = _notebook(tmp_path / "nb.ipynb", "print(6 * 7)")
    assert book_exec.execute(nb, cache)[0] == "executed"
    assert book_exec.execute(nb, cache)[0] == "cached" and book_exec.is_cached(nb, cache)
    _notebook(nb, "print(6 * 7)", prose="new prose")  # prose only: the outputs still hold
    assert book_exec.execute(nb, cache)[0] == "cached"
    _notebook(nb, "print(6 * 8)")  # a code cell changed: executed again
    assert not book_exec.is_cached(nb, cache)
    assert book_exec.execute(nb, cache)[0] == "executed"
    _notebook(nb, "raise ValueError('boom 42')")
    for _ in range(2):  # fails every time: a failed execution is not cached
        with pytest.raises(book_exec.NotebookFailed, match="boom 42"):
            book_exec.execute(nb, cache)
    assert not book_exec.is_cached(nb, cache)


def test_the_cache_is_keyed_on_the_package_and_the_chapters_environment(tmp_path, monkeypatch):
    (tmp_path / "svtools").mkdir()
    (tmp_path / "svtools" / "a.py").write_text("X = 1\n")
    key = book_exec.cache_key(tmp_path)
    assert book_exec.cache_key(tmp_path) == key
    monkeypatch.setenv("SVTOOLS_CACHE", str(tmp_path / "elsewhere"))  # where runs are stored: not a result
    assert book_exec.cache_key(tmp_path) == key
    monkeypatch.setenv("SVTOOLS_FULL", "1")
    assert book_exec.cache_key(tmp_path) != key
    monkeypatch.delenv("SVTOOLS_FULL")
    (tmp_path / "svtools" / "a.py").write_text("X = 2\n")
    assert book_exec.cache_key(tmp_path) != key


def test_the_book_executes_through_the_shared_cache():
    """_config.yml caches executions with errors not allowed; every chapter of the table of
    contents is a notebook the tests collect."""
    opts = book_exec.settings()
    assert opts["mode"] == "cache" and opts["allow_errors"] is False
    nbs = book_exec.notebooks()
    assert len(nbs) >= 10 and all(p.suffix == ".ipynb" and (ROOT / "book") in p.parents for p in nbs)
    assert any(book_exec.needs_lm(p) for p in nbs)  # the seeds train in the background for them


def test_the_pool_executes_notebooks_in_parallel_processes_into_the_cache(tmp_path):
    """Two notebooks that each wait for the other's file: they finish only if they run at the
    same time. A failing one raises its own error and is not cached; the pool's results are the
    cache's (a second pool has nothing to do)."""
    cache = tmp_path / "jc"
    cache.mkdir()
    a, b = tmp_path / "a", tmp_path / "b"
    wait = ("import pathlib, time\n"
            "pathlib.Path({mine!r}).touch()\n"
            "t = time.time()\n"
            "while not pathlib.Path({other!r}).exists():\n"
            "    assert time.time() - t < 60, 'the other notebook never started'\n"
            "    time.sleep(0.05)\n"
            "print('both ran')")
    nb_a = _notebook(tmp_path / "a.ipynb", wait.format(mine=str(a), other=str(b)))
    nb_b = _notebook(tmp_path / "b.ipynb", wait.format(mine=str(b), other=str(a)))
    bad = _notebook(tmp_path / "bad.ipynb", "raise RuntimeError('pool boom 7')")
    pool = book_exec.NotebookPool([nb_a, nb_b, bad], cache, n_workers=2)
    try:
        assert len(pool) == 3
        assert pool.result(nb_a)[0] == "executed" and pool.result(nb_b)[0] == "executed"
        with pytest.raises(book_exec.NotebookFailed, match="pool boom 7"):
            pool.result(bad)
    finally:
        pool.close()
    assert book_exec.is_cached(nb_a, cache) and book_exec.is_cached(nb_b, cache)
    assert not book_exec.is_cached(bad, cache)
    again = book_exec.NotebookPool([nb_a, nb_b], cache, n_workers=2)
    try:
        assert len(again) == 0 and again.result(nb_a)[0] == "cached"
    finally:
        again.close()


def test_closing_the_pool_stops_its_executions(tmp_path):
    cache = tmp_path / "jc"
    cache.mkdir()
    slow = [_notebook(tmp_path / f"slow{i}.ipynb", f"import time\ntime.sleep(300)\nprint({i})") for i in range(3)]
    pool = book_exec.NotebookPool(slow, cache, n_workers=1)
    import time

    time.sleep(3)
    t = time.time()
    pool.close()
    assert time.time() - t < 30
    assert not any(book_exec.is_cached(p, cache) for p in slow)


def test_worker_count_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("BOOK_EXEC_WORKERS", "3")
    assert book_exec.workers() == 3
    monkeypatch.setenv("BOOK_EXEC_WORKERS", "zero")
    with pytest.raises(ValueError, match="BOOK_EXEC_WORKERS"):
        book_exec.workers()
    monkeypatch.delenv("BOOK_EXEC_WORKERS")
    assert book_exec.workers() >= 1


def test_kernels_keep_freed_memory_unless_the_caller_says_otherwise(tmp_path, monkeypatch):
    """The kernel's environment carries MEMORY_ENV (glibc keeps freed blocks for reuse) where the
    caller does not set those variables, and a caller's own value wins; neither is in the cache key."""
    cache = tmp_path / "jc"
    cache.mkdir()
    (tmp_path / "svtools").mkdir()
    key = book_exec.cache_key(tmp_path)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    assert book_exec.cache_key(tmp_path) == key
    out = tmp_path / "env.txt"
    nb = _notebook(tmp_path / "env.ipynb", "import os, pathlib\n"
                   f"pathlib.Path({str(out)!r}).write_text(os.environ.get('MALLOC_MMAP_THRESHOLD_', '-') + ' ' + "
                   "os.environ.get('MALLOC_TRIM_THRESHOLD_', '-') + ' ' + os.environ.get('TQDM_DISABLE', '-'))")
    assert book_exec.execute(nb, cache)[0] == "executed"
    assert out.read_text().split() == [book_exec.MEMORY_ENV["MALLOC_MMAP_THRESHOLD_"], "12345", "1"]
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ  # restored after the execution


class _Training:
    """A stand-in for start_lm_training's process: running until ``done`` is set."""

    def __init__(self, done: bool):
        self.done = done

    def poll(self):
        return 0 if self.done else None


@pytest.mark.parametrize("trained", [False, True])
def test_lm_chapters_run_when_the_seeds_are_ready_and_the_others_fill_in(tmp_path, trained):
    """One worker, chapters [lm, plain1, plain2]: while the seeds train, the plain chapters go first
    and the LM chapter when none is left; once they are trained, the LM chapter goes first."""
    cache = tmp_path / "jc"
    cache.mkdir()
    log = tmp_path / "order.txt"
    code = "import pathlib\nwith open({log!r}, 'a') as f:\n    f.write({name!r} + ' ')\n"
    lm = _notebook(tmp_path / "lm.ipynb", "# uses svtools.ioi_lm\n" + code.format(log=str(log), name="lm"))
    plain = [_notebook(tmp_path / f"p{i}.ipynb", code.format(log=str(log), name=f"p{i}")) for i in (1, 2)]
    assert book_exec.needs_lm(lm) and not book_exec.needs_lm(plain[0])
    pool = book_exec.NotebookPool([lm, *plain], cache, n_workers=1, training=_Training(trained))
    try:
        assert set(pool.wait().values()) == {None}
    finally:
        pool.close()
    assert log.read_text().split() == (["lm", "p1", "p2"] if trained else ["p1", "p2", "lm"])


@pytest.mark.skipif(not Path("/proc/self/autogroup").exists(), reason="no sched_autogroup on this system")
def test_a_lowered_kernel_runs_in_a_lowered_scheduling_group(tmp_path):
    """jupyter_client starts each kernel in a session (a scheduling group) of its own: niceness alone
    would not lower its share of the CPU; execute(nice=...) lowers the group too."""
    cache = tmp_path / "jc"
    cache.mkdir()
    out = tmp_path / "group.txt"
    nb = _notebook(tmp_path / "g.ipynb", "import pathlib\n"
                   f"pathlib.Path({str(out)!r}).write_text(open('/proc/self/autogroup').read())")
    assert book_exec.execute(nb, cache, nice=7)[0] == "executed"
    assert out.read_text().split()[-2:] == ["nice", "7"]


def test_a_lowered_kernel_gets_time_to_start(tmp_path, monkeypatch):
    """A kernel in a lowered scheduling group waits for the CPU while the seeds train: its start may take
    longer than nbclient's 60 s without anything being wrong, so lowered executions allow much longer;
    executions at normal priority keep nbclient's default."""
    import jupyter_cache.executors.utils as utils

    class Stop(Exception):
        pass

    seen: dict = {}

    def fake(nb, **kw):
        seen.clear()
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(utils, "single_nb_execution", fake)
    nb = _notebook(tmp_path / "x.ipynb", "1 + 1")
    with pytest.raises(Stop):
        book_exec.execute(nb, tmp_path / "jc", nice=15)
    assert seen["startup_timeout"] == book_exec.LOWERED_STARTUP_TIMEOUT >= 300
    assert "kernel_manager_class" in seen
    with pytest.raises(Stop):
        book_exec.execute(nb, tmp_path / "jc", nice=0)
    assert "startup_timeout" not in seen and "kernel_manager_class" not in seen
