"""The notebook tests of ``make test``: every notebook under ``book/`` is one test that executes it
through the book's jupyter-cache (``scripts/book_exec.py``), failing on the first error; a notebook
the cache already holds (executed by ``make book`` or an earlier ``make test``, same code cells,
same package and environment) passes without running again, and ``make book`` reuses what these
tests executed. With ``--nbmake`` (``pytest --nbmake book/...``) nbmake runs the notebooks instead,
without the cache.

At collection time the notebooks the cache does not hold start executing in the background, as
many at once as there are cores (``book_exec.NotebookPool``, each in its own process; the chapters
that need the IOI LM once its seeds are trained), and the IOI LM's three seeds start training (in parallel processes)
when a chapter needs them: all of it runs while the unit tests run. Each notebook's test waits
for its execution and fails with its error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "scripts"))
import book_exec  # noqa: E402

_BACKGROUND: list = []
_POOL: list = []  # the book_exec.NotebookPool executing the uncached notebooks


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if (file_path.suffix == ".ipynb" and ROOT / "book" in file_path.parents
            and ".ipynb_checkpoints" not in file_path.parts and not parent.config.getoption("nbmake", False)):
        return NotebookFile.from_parent(parent, path=file_path)
    return None


class NotebookFile(pytest.File):
    def collect(self):
        yield NotebookItem.from_parent(self, name=self.path.name)


class NotebookItem(pytest.Item):
    """Executes one notebook through the book's jupyter-cache (errors raised)."""

    def runtest(self) -> None:
        how, seconds = _POOL[0].result(self.path) if _POOL else book_exec.execute(self.path)
        self.user_properties.append(("notebook", f"{how} ({seconds:.0f} s)"))
        self.add_report_section("call", "notebook", f"{self.path.name}: {how}, execution {seconds:.1f} s")

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, book_exec.NotebookFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, 0, f"notebook {self.path.relative_to(ROOT)}"


def pytest_collection_finish(session: pytest.Session) -> None:
    paths = [item.path for item in session.items if isinstance(item, NotebookItem)]
    if paths and not session.config.option.collectonly:
        proc = book_exec.start_lm_training(paths)
        if proc is not None:
            _BACKGROUND.append(proc)
        pool = book_exec.NotebookPool(paths, training=proc)
        if len(pool):
            _POOL.append(pool)


def pytest_sessionfinish(session: pytest.Session) -> None:
    for pool in _POOL:
        pool.close()
    for proc in _BACKGROUND:
        book_exec.stop(proc)


def pytest_terminal_summary(terminalreporter) -> None:
    lines = [f"  {rep.nodeid}: {dict(rep.user_properties)['notebook']}"
             for rep in terminalreporter.stats.get("passed", []) if dict(rep.user_properties).get("notebook")]
    if lines:
        terminalreporter.write_line(f"notebooks (jupyter-cache {book_exec.cache_path(prune=False)}):")
        for line in lines:
            terminalreporter.write_line(line)
