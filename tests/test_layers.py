"""The package's layering, read from the source: imports run down the layers, never in a cycle.

Every module of ``svtools`` belongs to a *room*: a top-level module (``svtools.qk``) or a
subpackage with all its modules (``svtools.sad``, ``svtools.sad.engine``, ...). Rooms sit in
layers (README, "Map of the package"):

    0  checks and run-time      _checks, runtime
    1  linear algebra and data  qk, rotary, factor_cache, terms, sparsity, alignment, geometry, data
    2  models                   bridge, models, decomposition
    3  studies                  sad, toy, theory, ioi, ioi_lm, sae, activations
    4  presentation             plots, report

A module may import a room of a lower layer, its own room (the modules of one package), or a room
of its own layer only where :data:`SAME_LAYER` lists the pair (with the reason). Every import is
counted wherever it sits (module top or function body), except under ``if TYPE_CHECKING:``.
Besides the order, the test checks that there is no import cycle between modules, that no private
name (``_x``) is imported from another module, that svtools modules are imported at the top of
modules (not inside functions), and that no module is longer than :data:`MAX_LINES`.

The package facade ``svtools/__init__.py`` is outside the layers: it imports a few light
modules eagerly and the rest lazily by name; modules never import names from it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "svtools"

LAYERS: dict[str, int] = {
    "svtools._checks": 0, "svtools._cache": 0, "svtools.runtime": 0,
    "svtools.qk": 1, "svtools.rotary": 1, "svtools.factor_cache": 1, "svtools.terms": 1, "svtools.sparsity": 1,
    "svtools.alignment": 1, "svtools.geometry": 1,
    "svtools.data": 1,
    "svtools.bridge": 2, "svtools.models": 2, "svtools.decomposition": 2,
    "svtools.sad": 3, "svtools.toy": 3, "svtools.theory": 3, "svtools.ioi": 3, "svtools.ioi_lm": 3,
    "svtools.sae": 3, "svtools.activations": 3, "svtools.intervene": 3, "svtools.features": 3, "svtools.ov": 3,
    "svtools.ioi_causal": 3, "svtools.emergence": 3,
    "svtools.plots": 4, "svtools.report": 4,
}

#: Imports between two rooms of the same layer that are allowed: (importer, imported) -> why.
SAME_LAYER: dict[tuple[str, str], str] = {
    ("svtools._cache", "svtools._checks"): "a cache location that cannot be used is an SVToolsError",
    ("svtools.terms", "svtools.qk"): "terms are formed from a head's QKSVD",
    ("svtools.alignment", "svtools.qk"): "alignment compares a QKSVD's singular vectors with features",
    ("svtools.rotary", "svtools.qk"): "per-offset decompositions of rotary heads: RotarySpec, homogeneous weights, qk_svd",
    ("svtools.factor_cache", "svtools.rotary"): "the cache keeps what svtools.rotary computes, keyed by its digests",
    ("svtools.models", "svtools.bridge"): "the loader checks models and reads their patterns through the bridge",
    ("svtools.decomposition", "svtools.bridge"): "the decomposition's inputs and model facts",
    ("svtools.decomposition", "svtools.models"): "the exactness tolerance of a loaded model",
    ("svtools.toy", "svtools.sad"): "SAD on the toy selects and measures pairs as svtools.sad does",
    ("svtools.theory", "svtools.toy"): "toy_optimal_omega checks the theory on a trained toy",
    ("svtools.ioi", "svtools.sad"): "IOI pair frames are svtools.sad frames",
    ("svtools.ioi_lm", "svtools.ioi"): "the IOI LM's measurements tokenise IOI prompts with name positions",
    ("svtools.ioi_lm", "svtools.sad"): "the IOI LM's checkpoints are measured with head_sparsity",
    ("svtools.report", "svtools.plots"): "glue records a figure as the SVG the figure convention defines",
    ("svtools.features", "svtools.ioi"): "known features are read at the IOI name positions",
    ("svtools.features", "svtools.theory"): "the un-whitened reading is Part 2's theory.unwhiten",
    ("svtools.ov", "svtools.features"): "the OV copying mass is the bilinear mass of the OV matrix",
    ("svtools.ioi_causal", "svtools.intervene"): "causal IOI tests run interventions and their null",
    ("svtools.ioi_causal", "svtools.features"): "the causal tests' sets and summaries use the known features",
    ("svtools.ioi_causal", "svtools.ov"): "the summaries report what the heads write",
}

#: svtools imports allowed inside a function body (module -> why); none today.
LAZY: dict[str, str] = {}

#: Longest module allowed, in lines.
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _room(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of each svtools module an import statement loads (``names``: what it
    takes from that module; empty for a plain ``import``)."""
    out = []
    if isinstance(node, ast.Import):
        for a in node.names:
            if a.name == "svtools" or a.name.startswith("svtools."):
                out.append((a.name, []))
        return out
    if node.level:  # relative import: resolve against the importer's package
        base = importer.split(".")
        if not _is_package(importer):
            base = base[:-1]
        base = base[:len(base) - node.level + 1]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    if not (mod == "svtools" or mod.startswith("svtools.")):
        return out
    names = []
    for a in node.names:
        sub = f"{mod}.{a.name}"
        if sub in MODULES:  # "from svtools import sad": the submodule itself
            out.append((sub, []))
        else:
            names.append(a.name)
    if names:
        out.append((mod, names))
    return out


def _imports(module: str):
    """Every svtools import of ``module``: ``(imported module, names, line, inside a function)``."""
    tree = ast.parse(MODULES[module].read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # imports for annotations only: never run
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for mod, names in _resolve(module, child):
                    found.append((mod, names, child.lineno, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the modules its imports run: the imported module and, from outside its package,
    the package ``__init__`` that Python runs first."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for mod, _, _, _ in _imports(m):
            if mod == "svtools":
                continue
            graph[m].add(mod)
            parent = mod.rsplit(".", 1)[0]
            while parent != "svtools" and parent != m and not m.startswith(parent + "."):
                if parent in MODULES:
                    graph[m].add(parent)
                parent = parent.rsplit(".", 1)[0]
    return graph


def test_every_module_has_a_layer():
    unknown = sorted({_room(m) for m in MODULES if m != "svtools" and _room(m) not in LAYERS})
    assert not unknown, f"modules without a layer (add them to LAYERS and to the README's map): {unknown}"
    stale = sorted(r for r in LAYERS if not any(_room(m) == r for m in MODULES))
    assert not stale, f"LAYERS names rooms that do not exist: {stale}"


def test_imports_run_down_the_layers():
    bad = []
    for m in MODULES:
        if m == "svtools":
            continue
        for mod, names, line, _ in _imports(m):
            if mod == "svtools":
                bad.append(f"{m}:{line} imports {names} from the svtools facade; import from the defining module")
                continue
            a, b = _room(m), _room(mod)
            if a == b:
                continue
            if LAYERS[b] > LAYERS[a] or (LAYERS[b] == LAYERS[a] and (a, b) not in SAME_LAYER):
                bad.append(f"{m}:{line} (layer {LAYERS[a]}) imports {mod} (layer {LAYERS[b]})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_same_layer_exceptions_are_used():
    used = {(_room(m), _room(mod)) for m in MODULES if m != "svtools" for mod, *_ in _imports(m)}
    unused = sorted(set(SAME_LAYER) - used)
    assert not unused, f"SAME_LAYER allows imports that no module makes (remove them): {unused}"


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def dfs(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                dfs(v)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_name_crosses_modules():
    bad = []
    for m in MODULES:
        tree = ast.parse(MODULES[m].read_text())
        aliases = {}  # local name -> svtools module it is bound to
        for mod, names, line, _ in _imports(m):
            bad += [f"{m}:{line} imports {n} from {mod}" for n in names if n.startswith("_") and not n.startswith("__")]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("svtools"):
                        aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "svtools"
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("svtools"):
                for a in node.names:
                    if f"{node.module}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                bad.append(f"{m}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "private names used across modules (make them public or move them):\n" + "\n".join(bad)


def test_svtools_imports_sit_at_module_top():
    bad = [f"{m}:{line} imports {mod} inside a function"
           for m in MODULES for mod, _, line, inside in _imports(m) if inside and m not in LAZY]
    assert not bad, ("svtools imports inside functions (import at the top, or list the module in LAZY "
                     "with the reason):\n" + "\n".join(bad))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_length(module):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{module} has {n} lines (> {MAX_LINES}): split it by concept"


def test_the_checks_see_violations(tmp_path, monkeypatch):
    """The checks above can fail: a fake package with an upward import, a cycle and a private import."""
    pkg = tmp_path / "svtools"
    (pkg / "sad").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "qk.py").write_text("from svtools.sad import head_sparsity\n")
    (pkg / "sad" / "__init__.py").write_text("from svtools.sad.engine import head_sparsity\n")
    (pkg / "sad" / "engine.py").write_text("from svtools.qk import _homogeneous\n\ndef head_sparsity():\n"
                                           "    import svtools.qk\n")
    me = sys.modules[__name__]  # the checks read this module's globals
    monkeypatch.setattr(me, "ROOT", pkg)
    monkeypatch.setattr(me, "MODULES", {me._module_name(p): p for p in sorted(pkg.rglob("*.py"))})
    for check, message in ((me.test_imports_run_down_the_layers, r"layer 1\) imports svtools.sad"),
                           (me.test_no_import_cycle, "svtools.qk -> svtools.sad"),
                           (me.test_no_private_name_crosses_modules, "imports _homogeneous"),
                           (me.test_svtools_imports_sit_at_module_top, "inside a function")):
        with pytest.raises(AssertionError, match=message):
            check()
