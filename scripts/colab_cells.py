"""Write (or check) the first code cell of every notebook of the book: the Colab set-up cell.

The repository URL lives in one place, ``repository.url`` in ``_config.yml``. A notebook opened
in Colab cannot read that file before svtools is installed, so each notebook carries the URL in
its first code cell; this script writes that cell from ``_config.yml`` and a per-chapter line
saying which model the chapter uses. ``tests/test_book_config.py`` fails when a cell differs
from what this script would write.

    python scripts/colab_cells.py           # rewrite the cells that differ
    python scripts/colab_cells.py --check   # exit 1 and name the notebooks that differ

Only the first code cell changes, and the notebook is written back in nbformat's own layout
(one-space indent, sorted keys), so the diff is that cell alone. The cell:

- installs svtools from the repository when it is not importable (Colab, a fresh environment)
  with pip's output visible (no ``-q``: errors must show), and does nothing else elsewhere
  (the book's build and the tests import the working tree);
- checks the import, and if it fails says where to look and what to do;
- says which model the chapter uses and how to switch to GPT-2 or Pythia (``SVTOOLS_MODEL``).

In the built book the cell's code is folded (tag ``hide-input``); its output shows.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What each chapter loads (chapter owners: keep in step with the chapter). Chapters not listed
# train their own small models.
REAL_MODEL = "real"        # reads SVTOOLS_MODEL (default: the embedded MiniLM)
IOI_LM = "ioi_lm"          # the IOI language model trained here; Pythia-160M on request
IOI_LM_ONLY = "ioi_lm_only"  # the IOI language model trained here, nothing else (its features are known)
MODELS = {
    "book/quickstart.ipynb": REAL_MODEL,
    "book/part3/02_sad_real_models.ipynb": REAL_MODEL,
    "book/part3/03_emergence.ipynb": IOI_LM,
    "book/part3/04_known_features.ipynb": IOI_LM_ONLY,
}

HEAD = '''\
# Set-up: where svtools is not installed (Colab, a fresh environment), this installs
# it from the book's repository, showing pip's messages (errors in red).
import importlib.util
import os

REPO = "{url}"
'''

SWITCH = '''\
# The model: SVTOOLS_MODEL, by default the embedded all-MiniLM-L6-v2 (works offline).
# For the paper's models (downloaded from the model hub), uncomment one line:
# os.environ["SVTOOLS_MODEL"] = "gpt2"
# os.environ["SVTOOLS_MODEL"] = "EleutherAI/pythia-160m"
'''

SWITCH_PYTHIA = '''\
# The model: an IOI language model trained here. For the paper's Pythia-160M checkpoints
# as well (downloaded from the model hub), uncomment:
# os.environ["SVTOOLS_MODEL"] = "EleutherAI/pythia-160m"
'''

INSTALL = '''\
if importlib.util.find_spec("svtools") is None:
    %pip install "git+{REPO}"
try:
    import svtools
except ImportError as err:
    raise ImportError(
        f"svtools is not importable after the install above ({err}). Scroll up to "
        "pip's first ERROR line: it names the cause. Restart the runtime (Colab: "
        "Runtime > Restart session) and run this cell again; if it still fails, "
        f"report pip's error at {REPO}/issues."
    ) from err
print(f"svtools {svtools.__version__} is ready.")
'''

MESSAGE = {
    REAL_MODEL: '''\
print("Model:", os.environ.get("SVTOOLS_MODEL", "minilm"), "(from SVTOOLS_MODEL;")
print("the paper's: 'gpt2', 'EleutherAI/pythia-160m', which need the model hub).")
print("Scale:", svtools.runtime.scale_name(), "- SVTOOLS_FULL=1: the paper's.")
''',
    IOI_LM: '''\
print("Model: a small IOI language model trained here, over its checkpoints; with")
print("SVTOOLS_MODEL='EleutherAI/pythia-160m' and the model hub (as in Colab), also")
print("Pythia-160M's checkpoints.")
print("Scale:", svtools.runtime.scale_name(), "- SVTOOLS_FULL=1: the paper's.")
''',
    IOI_LM_ONLY: '''\
print("Model: the small IOI language model trained here (cached after the first run),")
print("whose name codes are known by construction; nothing to download.")
print("Scale:", svtools.runtime.scale_name(), "- SVTOOLS_FULL=1: more prompts.")
''',
    None: '''\
print("Model: none to download; this chapter trains its own small models")
print("(GPT-2 and Pythia appear in Part 3, via SVTOOLS_MODEL).")
print("Scale:", svtools.runtime.scale_name(), "- SVTOOLS_FULL=1: the paper's.")
''',
}

#: Cell tags: the book shows the cell's output and folds its code (Colab shows both).
TAGS = ["hide-input"]


def repository_url(config: Path = ROOT / "_config.yml") -> str:
    """``repository.url`` of ``_config.yml`` (read without a YAML library)."""
    text = config.read_text(encoding="utf-8")
    block = re.search(r"^repository:\s*\n((?:[ \t]+.*\n?)+)", text, flags=re.M)
    if not block:
        raise SystemExit(f"{config}: no repository: section")
    url = re.search(r"^\s+url:\s*['\"]?([^'\"\s#]+)", block.group(1), flags=re.M)
    if not url:
        raise SystemExit(f"{config}: repository: has no url")
    return url.group(1).rstrip("/")


def cell_source(notebook: str, url: str) -> str:
    kind = MODELS.get(notebook)
    switch = {REAL_MODEL: SWITCH, IOI_LM: SWITCH_PYTHIA}.get(kind, "")
    src = HEAD.format(url=url) + switch + INSTALL + MESSAGE[kind]
    return src.rstrip("\n")


def notebooks() -> list[Path]:
    return sorted(p for p in (ROOT / "book").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def first_code_cell(nb: dict) -> dict:
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            return cell
    raise SystemExit("a notebook without a code cell")


def to_lines(src: str) -> list[str]:
    lines = src.split("\n")
    return [line + "\n" for line in lines[:-1]] + [lines[-1]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report notebooks that differ")
    a = ap.parse_args(argv)
    url = repository_url()
    differ = []
    for path in notebooks():
        rel = path.relative_to(ROOT).as_posix()
        nb = json.loads(path.read_text(encoding="utf-8"))
        cell = first_code_cell(nb)
        want = cell_source(rel, url)
        if "".join(cell["source"]) == want and cell["metadata"].get("tags") == TAGS:
            continue
        differ.append(rel)
        if not a.check:
            cell["source"] = to_lines(want)
            cell["metadata"]["tags"] = TAGS
            cell["outputs"] = []
            cell["execution_count"] = None
            path.write_text(json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n",
                            encoding="utf-8")
    verb = "differ" if a.check else "rewritten"
    print(f"{len(differ)} notebook(s) {verb}" + "".join(f"\n  {d}" for d in differ))
    return 1 if (a.check and differ) else 0


if __name__ == "__main__":
    sys.exit(main())
