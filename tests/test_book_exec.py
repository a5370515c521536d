"""Issue 21: the book executes once. `make test` and `make book` share one jupyter-cache
(scripts/book_exec.py): a notebook is executed when its code or what its outputs depend on
changed, its errors fail the test and are never cached, and the cache is keyed on the package."""

from __future__ import annotations

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
