"""Every svtools name the book and the README use exists: the public API cannot break silently.

Read from the sources, without running them: the code cells of every notebook under ``book/``
and the ``python`` blocks of the README and of ``book/*.md`` (their ``import`` statements and
every attribute chain on a name they import from svtools, e.g. ``svtools.sad.head_sparsity``,
``th.frame``, ``ToyConfig.single_pair``), the ``automodule``/``autofunction``/... directives and
``{py:...}`` roles of the book's pages and notebooks, and the ``svtools.x.y`` names the README
quotes. Each is resolved by importing the longest module prefix and reading the attributes.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
README = ROOT / "README.md"


def _resolve(dotted: str):
    """The object ``dotted`` names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as exc:
            if exc.name and not ".".join(parts[:cut]).startswith(exc.name):
                raise  # a dependency is missing, not the svtools module
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def _code_names(src: str) -> set[str]:
    """Dotted svtools names a piece of Python code uses (imports and attribute chains on them)."""
    src = "\n".join(line[:len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("!", "%")) else line
                    for line in src.splitlines())  # shell and magic lines: keep the block structure
    tree = ast.parse(src)
    bound: dict[str, str] = {}  # local name -> dotted svtools path it was imported as
    assigned: set[str] = set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "svtools":
                    names.add(a.name)
                    if a.asname:
                        bound[a.asname] = a.name
                    else:
                        bound["svtools"] = "svtools"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "svtools" and not node.level:
            for a in node.names:
                names.add(f"{node.module}.{a.name}")
                bound[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            assigned.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.Lambda)):
            assigned.update(a.arg for a in node.args.args + node.args.kwonlyargs)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain, cur = [], node
        while isinstance(cur, ast.Attribute):
            chain.append(cur.attr)
            cur = cur.value
        if isinstance(cur, ast.Name) and cur.id in bound and cur.id not in assigned:
            names.add(".".join([bound[cur.id], *reversed(chain)]))
    return names


def _notebook_sources() -> list[tuple[str, str, str]]:
    """``(file, cell kind, source)`` of every cell of every notebook under book/."""
    out = []
    for nb in sorted(BOOK.rglob("*.ipynb")):
        if ".ipynb_checkpoints" in nb.parts or "_build" in nb.parts:
            continue
        for cell in json.loads(nb.read_text(encoding="utf-8"))["cells"]:
            out.append((str(nb.relative_to(ROOT)), cell["cell_type"], "".join(cell["source"])))
    return out


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)


DIRECTIVE = re.compile(r"^\s*\.\. auto(?:module|function|class|exception|data|attribute|method)::\s*(svtools[\w.]*)", re.M)
ROLE = re.compile(r"\{py:(?:mod|func|class|data|meth|attr|exc|obj)\}`~?(svtools[\w.]*)`")
RST_ROLE = re.compile(r":(?:mod|func|class|data|meth|attr|exc|obj):`~?(svtools[\w.]*)`")
QUOTED = re.compile(r"`(svtools(?:\.\w+)+)`")


def _used_names() -> dict[str, set[str]]:
    """Every svtools name the book and the README use -> where."""
    used: dict[str, set[str]] = {}

    def add(names, where):
        for n in names:
            used.setdefault(n.rstrip("."), set()).add(where)

    code: dict[str, list[str]] = {}
    for where, kind, src in _notebook_sources():
        if kind == "code":
            code.setdefault(where, []).append(src)
        else:
            add(ROLE.findall(src) + RST_ROLE.findall(src), where)
    for where, cells in code.items():  # one notebook's cells together: a name imported in one is used in others
        add(_code_names("\n".join(cells)), where)
    for page in sorted(BOOK.rglob("*.md")):
        if "_build" in page.parts:
            continue
        text = page.read_text(encoding="utf-8")
        where = str(page.relative_to(ROOT))
        add(DIRECTIVE.findall(text) + ROLE.findall(text) + RST_ROLE.findall(text), where)
        for block in _python_blocks(text):
            add(_code_names(block), where)
    text = README.read_text(encoding="utf-8")
    add(QUOTED.findall(text), "README.md")
    for block in _python_blocks(text):
        add(_code_names(block), "README.md")
    return used


USED = _used_names()


def test_the_book_uses_the_package():
    """The collection above finds the names (a parser that sees nothing would pass everything)."""
    for name in ("svtools.sad.head_sparsity", "svtools.toy.ToyConfig", "svtools.theory", "svtools.load_model",
                 "svtools.plots.sad", "svtools.qk"):
        assert any(u == name or u.startswith(name + ".") for u in USED), name
    assert len(USED) > 100, len(USED)


@pytest.mark.parametrize("name", sorted(USED))
def test_name_exists(name):
    try:
        _resolve(name)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"{name} (used in {sorted(USED[name])}) does not resolve: {exc!r}")


def test_a_missing_name_fails():
    with pytest.raises(AttributeError):
        _resolve("svtools.sad.no_such_function")
    with pytest.raises(ModuleNotFoundError):
        _resolve("svtools_no_such_package.x")
    assert _code_names("from svtools import sad as s\nx = s.head_sparsity\n") >= {"svtools.sad", "svtools.sad.head_sparsity"}
