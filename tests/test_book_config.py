"""The book's configuration agrees with itself: one repository URL, Colab cells that install with
visible errors, no torch cap that would make Colab reinstall torch, MathJax served locally."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


colab = _script("colab_cells")
URL = colab.repository_url()
NOTEBOOKS = colab.notebooks()


def _first_code_cell(path: Path) -> str:
    return "".join(colab.first_code_cell(json.loads(path.read_text(encoding="utf-8")))["source"])


def test_repository_url_is_a_github_repository():
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", URL), URL


def test_every_chapter_is_found():
    assert len(NOTEBOOKS) >= 10
    assert ROOT / "book" / "quickstart.ipynb" in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_first_cell_is_the_generated_colab_cell(path: Path):
    """Rewrite with ``python scripts/colab_cells.py`` after changing ``_config.yml``."""
    src = _first_code_cell(path)
    assert src == colab.cell_source(path.relative_to(ROOT).as_posix(), URL)
    cell = colab.first_code_cell(json.loads(path.read_text(encoding="utf-8")))
    assert cell["metadata"].get("tags") == colab.TAGS
    assert all(len(line) <= 88 for line in src.splitlines()), "keep lines short: the column shows ~88"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_first_cell_installs_from_the_configured_repository_with_visible_errors(path: Path):
    src = _first_code_cell(path)
    installs = [line for line in src.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    assert installs, "the first cell must install svtools"
    for line in installs:
        assert not re.search(r"(^|\s)(-q|--quiet)\b", line), f"pip's errors must stay visible: {line!r}"
    assert f'REPO = "{URL}"' in src
    assert "import svtools" in src and "except ImportError" in src, "the cell must check the import"
    assert "Model:" in src, "the cell must say which model the chapter uses"
    # Every URL in the cell points at the configured repository.
    for url in re.findall(r"https://github\.com/[\w./-]+", src):
        assert url.startswith(URL), url


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if colab.MODELS.get(p.relative_to(ROOT).as_posix()) == colab.REAL_MODEL],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_real_model_chapters_say_how_to_switch_model(path: Path):
    src = _first_code_cell(path)
    assert 'os.environ["SVTOOLS_MODEL"] = "gpt2"' in src
    assert 'os.environ["SVTOOLS_MODEL"] = "EleutherAI/pythia-160m"' in src


def test_readme_points_at_the_configured_repository():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    owner_repo = URL.removeprefix("https://github.com/")
    found = re.findall(r"github(?:\.com)?/([\w.-]+/[\w.-]+)", readme)
    assert found, "README should say where the repository is"
    for f in found:
        if f.startswith("svtools") or owner_repo.split("/")[0] in f:
            assert f == owner_repo, f"README names {f}, _config.yml says {owner_repo}"


def test_no_other_file_hard_codes_another_repository_url():
    pattern = re.compile(r"github\.com/([\w.-]+/svtools)\b")
    owner_repo = URL.removeprefix("https://github.com/")
    for path in [ROOT / "_config.yml", ROOT / "README.md", *NOTEBOOKS, *(ROOT / "book").glob("**/*.md")]:
        for f in pattern.findall(path.read_text(encoding="utf-8")):
            assert f == owner_repo, f"{path.relative_to(ROOT)} names {f}"


def test_torch_has_no_upper_cap():
    deps = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    torch_req = re.findall(r'"torch\s*([^"]*)"', deps)
    assert torch_req == [">=2.4"], torch_req


def test_cpu_torch_2_13_is_installed_before_the_project():
    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^TORCH\s*\?=\s*torch==2\.13\.0$", make, re.M)
    assert make.index("--quiet $(TORCH)") < make.index('-e ".[book,test]"')
    assert "torch==2.13.0" in (ROOT / "README.md").read_text(encoding="utf-8")
    for name in [".ci/run", ".github/workflows/book.yml"]:  # both install through the Makefile
        assert re.search(r"^\s*(run:\s*|step\s+)?make \w", (ROOT / name).read_text(encoding="utf-8"), re.M), name


def test_mathjax_is_served_by_the_site():
    config = (ROOT / "_config.yml").read_text(encoding="utf-8")
    assert "sphinx-mathjax-offline" in config
    assert not re.search(r"mathjax_path:\s*['\"]?(https?:)?//", config)


# --- The API pages render the docstrings: each must be valid reStructuredText after napoleon. ----

def _api_modules() -> list[str]:
    pages = [ROOT / "book" / "api.md", *sorted((ROOT / "book" / "api").glob("*.md"))]
    return [m for p in pages for m in re.findall(r"^\.\. automodule:: (\S+)", p.read_text(encoding="utf-8"), re.M)]


def _documented(module) -> list[tuple[str, object]]:
    """What ``automodule :members:`` shows: the module, its public members, their methods."""
    import inspect

    names = getattr(module, "__all__", None) or [
        n for n, v in vars(module).items()
        if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__]
    out = [(module.__name__, module)]
    for n in names:
        obj = getattr(module, n)
        if getattr(obj, "__module__", module.__name__).split(".")[0] != "svtools":
            continue  # a third-party object re-exported (runtime.tqdm): the page describes it itself
        out.append((f"{module.__name__}.{n}", obj))
        if inspect.isclass(obj) and obj.__module__ == module.__name__:
            out += [(f"{module.__name__}.{n}.{m}", v) for m, v in vars(obj).items()
                    if not m.startswith("_") and (inspect.isfunction(v) or isinstance(v, (property, classmethod, staticmethod)))]
    return out


def test_api_pages_document_every_module():
    """A new module of svtools needs its section on one of the pages book/api/*.md."""
    mods = _api_modules()
    assert len(mods) == len(set(mods)), "a module is documented twice"
    package = ROOT / "svtools"
    public = sorted(
        ".".join(("svtools", *p.relative_to(package).with_suffix("").parts)).removesuffix(".__init__")
        for p in package.rglob("*.py") if not any(part.startswith("_") for part in p.relative_to(package).parts[:-1])
        and (not p.name.startswith("_") or p.name == "__init__.py"))
    public = [m for m in public if m not in {"svtools", "svtools.data"}]  # re-exports only
    missing = [m for m in public if m not in mods]
    assert not missing, f"modules without an API section: {missing}"


@pytest.mark.parametrize("modname", _api_modules())
def test_docstrings_are_valid_restructuredtext(modname: str):
    """A docstring that docutils warns about fails the book's build (warnings are errors)."""
    import importlib
    import inspect
    import io

    docutils_core = pytest.importorskip("docutils.core")
    napoleon = pytest.importorskip("sphinx.ext.napoleon")
    from docutils import nodes
    from docutils.parsers.rst import roles

    def literal_role(name, rawtext, text, lineno, inliner, options=None, content=None):
        return [nodes.literal(rawtext, text)], []

    for role in ["func", "class", "mod", "meth", "attr", "data", "exc", "obj", "math", "ref", "doc", "cite"]:
        roles.register_local_role(role, literal_role)
        roles.register_local_role(f"py:{role}", literal_role)
    config = napoleon.Config(napoleon_use_ivar=True, napoleon_use_rtype=False)
    bad = []
    for name, obj in _documented(importlib.import_module(modname)):
        doc = inspect.getdoc(obj.fget if isinstance(obj, property) else obj)
        if not doc or (not inspect.ismodule(obj) and not inspect.isclass(obj) and not callable(obj)
                       and not isinstance(obj, property)):
            continue  # constants: autodoc shows their value, not their type's docstring
        rst = str(napoleon.GoogleDocstring(doc, config))
        stream = io.StringIO()
        docutils_core.publish_doctree(rst, settings_overrides={"warning_stream": stream, "report_level": 2,
                                                               "halt_level": 5})
        if stream.getvalue():
            bad.append(f"{name}: {stream.getvalue().strip().splitlines()[0]}")
    assert not bad, "docstrings that the API pages cannot render:\n" + "\n".join(bad)


# --- Chapters: a result box, and every number pasted into the prose glued by a cell. -------------

#: Chapters converted to the result box and glue: all but the pages ``scripts/check_html.py`` lists
#: as pending (one list for the tests, check_html and the browser check).
PENDING = _script("check_html").PENDING
CHAPTERS = [p for p in NOTEBOOKS if p.relative_to(ROOT).with_suffix("").as_posix() not in PENDING]
GLUE_ROLE = re.compile(r"\{glue(?::\w+)?\}`([^`]+)`")
GLUE_DIRECTIVE = re.compile(r"```\{glue(?::\w+)?\}\s+(\S+)")
GLUED_KEY = re.compile(r"""\bglue\(\s*(f?)["']([^"']+)["']""")


class _Keys(set):
    """Glued keys: literals, plus f-string keys as patterns (``f"{name}_med"`` matches ``align_med``)."""

    def __init__(self, literal, patterns):
        super().__init__(literal)
        self.patterns = [re.compile(re.sub(r"\\\{[^}]*\\\}", ".+", re.escape(p)) + "$") for p in patterns]

    def __contains__(self, key):
        return set.__contains__(self, key) or any(p.match(key) for p in self.patterns)


def _loop_glued_keys(src: str) -> tuple[set[str], list[str]]:
    """Keys glued in a loop over literal keys, read with ``ast``: ``for name, value in {"a": ...}.items():
    glue(name, value)`` and ``for name in ("a", "b"): glue(name, ...)`` give ``a`` and ``b``; an f-string
    key (``glue(f"one_{what}_{s}", ...)``) gives a pattern. Cells that do not parse (IPython magics)
    give nothing here."""
    import ast

    try:
        tree = ast.parse(src)
    except SyntaxError:
        return set(), []
    literal, patterns = set(), []
    dicts = {t.id: n.value for n in ast.walk(tree) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict)
             for t in n.targets if isinstance(t, ast.Name)}  # found = {"a": ...}; for k, v in found.items()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "glue" and node.args \
                and isinstance(node.args[0], ast.JoinedStr):
            patterns.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.args[0].values))
        if not isinstance(node, ast.For):
            continue
        target = node.target.elts[0] if isinstance(node.target, ast.Tuple) else node.target
        glued = any(isinstance(c, ast.Call) and getattr(c.func, "id", None) == "glue" and c.args
                    and isinstance(c.args[0], ast.Name) and c.args[0].id == getattr(target, "id", None)
                    for c in ast.walk(node))
        it = node.iter
        if isinstance(it, ast.Call) and isinstance(it.func, ast.Attribute) and it.func.attr == "items":
            it = it.func.value
        it = dicts.get(it.id, it) if isinstance(it, ast.Name) else it
        keys = it.keys if isinstance(it, ast.Dict) else it.elts if isinstance(it, (ast.Tuple, ast.List)) else []
        if glued:
            literal |= {k.value for k in keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    return literal, patterns


def _glued_keys(path: Path) -> _Keys:
    """Keys a notebook's code cells glue (``glue("key", ...)``; ``glue_run_time`` glues three)."""
    literal, patterns = set(), []
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] == "code":
            src = "".join(cell["source"])
            for f, k in GLUED_KEY.findall(src):
                (patterns.append(k) if f else literal.add(k))
            loop_literal, loop_patterns = _loop_glued_keys(src)
            literal |= loop_literal
            patterns += loop_patterns
            if "glue_run_time(" in src:
                literal |= {"run_time", "run_scale", "run_hardware"}
    return _Keys(literal, patterns)


def _pasted(text: str) -> list[str]:
    """Keys pasted by glue roles (without a format spec) and glue directives, ``doc::key`` kept."""
    out = []
    for ref in GLUE_ROLE.findall(text):
        doc, sep, rest = ref.partition("::")
        key = (rest if sep else doc).rsplit(":", 1)[0] if ":" in (rest if sep else doc) else (rest if sep else doc)
        out.append(f"{doc}::{key}" if sep else key)
    return out + GLUE_DIRECTIVE.findall(text)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_chapter_opens_with_a_result_box_and_glues_its_run_time(path: Path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    first = "".join(nb["cells"][0]["source"])
    assert first.lstrip().startswith("# "), "the first cell is the chapter's title"
    assert "```{result-box}" in first, "the result box follows the title (scripts/svtools_book.py: ResultBox)"
    assert all(k in _glued_keys(path) for k in ("run_time", "run_scale", "run_hardware")), \
        "call svtools.report.glue_run_time() in the last cell: the result box shows the run time"


@pytest.mark.parametrize("path", [*CHAPTERS, *sorted((ROOT / "book").rglob("*.md"))],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_pasted_number_is_glued(path: Path):
    """A ``{glue:text}`key``` whose key no cell glues fails the build; this names it sooner."""
    if path.suffix == ".ipynb":
        text = "\n".join("".join(c["source"]) for c in json.loads(path.read_text(encoding="utf-8"))["cells"]
                         if c["cell_type"] == "markdown")
    else:
        text = path.read_text(encoding="utf-8")
    missing = []
    for ref in _pasted(text):
        doc, sep, key = ref.partition("::")
        if sep:
            target = (path.parent / doc).resolve()
            if not target.exists() or key not in _glued_keys(target):
                missing.append(ref)
        elif path.suffix != ".ipynb" or ref not in _glued_keys(path):
            missing.append(ref)
    assert not missing, f"pasted but never glued: {missing}"


def test_loop_glued_keys_reads_literal_loops_only():
    src = ('found = {"a": 1, "b": 2}\nfor name, value in found.items():\n    glue(name, value)\n'
           'for k in ("c", "d"):\n    glue(k, 0)\nfor k, v in {"e": 1}.items():\n    print(k)\n'
           'for s in range(3):\n    glue(f"one_{s}_x", s)\nfor k in make_keys():\n    glue(k, 1)\n')
    literal, patterns = _loop_glued_keys(src)
    assert literal == {"a", "b", "c", "d"}  # "e" is never glued; make_keys() cannot be read
    keys = _Keys(literal, patterns)
    assert "one_2_x" in keys and "one_2_y" not in keys
    assert _loop_glued_keys("%pip install x\n") == (set(), [])
