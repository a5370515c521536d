"""Check the built book (``_build/html``) for what a reader should never meet.

Run after ``make book`` (``.ci/run`` does), or on its own::

    python scripts/check_html.py [--html _build/html] [--bib book/references.bib]

Standard library only. Checks every page (``*.html`` outside ``_static``/``_sources``):

- **external resources**: no ``<script src>``, stylesheet, image, iframe or font loaded from
  another site (links *to* other sites, ``<a href>``, are fine). The book must read offline.
- **stderr boxes**: no ``stderr`` output of a notebook cell (progress bars, warnings).
- **figure reprs**: no ``<Figure size ...>`` text (a figure printed instead of shown).
- **raw TeX**: no ``\\(`` or ``\\[`` outside the elements MathJax typesets (class ``math``),
  outside code. MathJax is configured to process only those, so anything else stays raw.
- **internal links and images**: every relative ``href``/``src`` resolves to a file of the
  site, and every ``#fragment`` to an ``id`` in the target page.
- **figure widths**: every PNG a page shows is at most ``svtools.plots.MAX_WIDTH_PX`` wide
  (the content column + 10%; read from ``svtools/plots/__init__.py`` without importing it).
- **bibliography**: every key of ``book/references.bib`` is cited (``{cite}``, ``{cite:p}``,
  ``{cite:t}``...) by some page's source, the bibliography page lists every entry, and every
  entry links to where the work can be read (arXiv, DOI or URL field).
- **words for readers**: no page says "unverified" or speaks of our machines or our process
  (``PROCESS_WORDS``: "2-core", "low priority", "since replaced", "no GPU was available", "could
  not read"...): where a claim comes from is said once per chapter, in its Sources note.
- **numbered figures**: on a chapter converted to the book's conventions (not in ``PENDING``),
  every figure is a numbered, captioned figure (``{glue:figure}``), not a bare cell output; and
  the chapter opens with a result box whose Colab link is the one the theme's launch button uses.

Prints one line per problem, then a summary; exits 1 if there is any problem.
"""

from __future__ import annotations

import argparse
import ast
import re
import struct
import sys
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
        "source", "track", "wbr"}
LOADED_RELS = {"stylesheet", "icon", "preload", "modulepreload", "manifest", "prefetch"}
RAW_TEX = re.compile(r"\\\(|\\\[")

#: Pages not yet converted to the conventions (result box, glued numbers, captioned figures,
#: tables that fit): their figure, width and words checks are reported, not failed, here and in
#: ``scripts/screenshots.py``. Remove a page once converted (issue 22, second round).
PENDING: set[str] = set()

#: Words that are about us, not for readers (case-insensitive).
PROCESS_WORDS = re.compile(r"unverified|\b2-core\b|low priority|since replaced|no GPU was available|"
                           r"could not read|we could not check|shared CPU", re.I)
CITE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]+)`")


def max_width_px() -> int:
    """``MAX_WIDTH_PX`` from ``svtools/plots/__init__.py`` (parsed, not imported)."""
    src = (ROOT / "svtools" / "plots" / "__init__.py").read_text()
    consts: dict[str, float] = {}
    for node in ast.parse(src).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            if isinstance(target, ast.Name) and target.id in {"COLUMN_PX", "MAX_WIDTH_PX"}:
                consts[target.id] = eval(compile(ast.Expression(node.value), "<const>", "eval"),  # noqa: S307
                                         {"round": round, **consts})
    return int(consts["MAX_WIDTH_PX"])


def png_width(path: Path) -> int | None:
    with path.open("rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return struct.unpack(">I", head[16:20])[0]


class Page(HTMLParser):
    """Collects what the checks need from one page."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, set[str]]] = []
        self.ids: set[str] = set()
        self.refs: list[tuple[str, str, str, str]] = []  # (tag, rel, attribute, url)
        self.stderr = 0
        self.figure_reprs: list[str] = []
        self.raw_tex: list[str] = []
        self.bib_entries = 0
        self.bib_unlinked: list[str] = []
        self._bib_links = None             # external links in the entry being read
        self._bib_text = ""
        self.process_words: list[str] = []
        self.bare_output_images = 0
        self.result_box_colab: list[str] = []
        self.theme_colab: list[str] = []

    def _inside(self, classes: set[str] = frozenset(), tags: set[str] = frozenset()) -> bool:
        return any(t in tags or (c & classes) for t, c in self.stack)

    def handle_starttag(self, tag, attrs):
        a = {k: (v or "") for k, v in attrs}
        classes = set(a.get("class", "").split())
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and "name" in a:
            self.ids.add(a["name"])
        if "stderr" in classes and ("output" in classes or tag == "div"):
            self.stderr += 1
        if a.get("role") == "doc-biblioentry" or ("citation" in classes and tag == "div"):
            self.bib_entries += 1
            self._bib_links, self._bib_text = 0, ""
            self._bib_depth = len(self.stack)
        if tag == "a" and self._bib_links is not None and external(a.get("href", "")):
            self._bib_links += 1
        if tag == "img" and self._inside(classes={"cell_output"}):
            self.bare_output_images += 1
        if tag == "a" and "colab-link" in classes:
            self.result_box_colab.append(a.get("href", ""))
        elif tag == "a" and "colab.research.google.com" in a.get("href", ""):
            self.theme_colab.append(a.get("href", ""))
        for attr in ("href", "src"):
            if attr in a:
                self.refs.append((tag, a.get("rel", ""), attr, a[attr]))
        if tag not in VOID:
            self.stack.append((tag, classes))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID and self.stack and self.stack[-1][0] == tag:
            self.stack.pop()

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                if self._bib_links is not None and len(self.stack) <= self._bib_depth:
                    if not self._bib_links:
                        self.bib_unlinked.append(self._bib_text.strip()[:70])
                    self._bib_links = None
                return

    def handle_data(self, data):
        if self._inside(tags={"script", "style"}):
            return
        if self._bib_links is not None:
            self._bib_text += data
        if self._inside(classes={"bd-article"}, tags={"article"}) and not self._inside(classes={"highlight"}):
            for m in PROCESS_WORDS.finditer(data):
                self.process_words.append(data[max(0, m.start() - 40):m.end() + 40].replace("\n", " ").strip())
        if "<Figure size" in data:
            self.figure_reprs.append(data.strip()[:60])
        if RAW_TEX.search(data) and not self._inside(classes={"math", "highlight"},
                                                       tags={"pre", "code", "mjx-container", "textarea"}):
            self.raw_tex.append(data.strip()[:70])


def external(url: str) -> bool:
    s = urlsplit(url)
    return bool(s.scheme in {"http", "https"} or url.startswith("//"))


def check(html: Path, bib: Path) -> list[str]:
    problems: list[str] = []
    pages = sorted(p for p in html.rglob("*.html") if p.relative_to(html).parts[0] not in {"_static", "_sources"})
    parsed: dict[Path, Page] = {}
    for p in pages:
        pg = Page()
        pg.feed(p.read_text(encoding="utf-8"))
        parsed[p.resolve()] = pg
    limit = max_width_px()
    counts = defaultdict(int)
    for p, pg in parsed.items():
        name = p.relative_to(html.resolve())
        if pg.stderr:
            problems.append(f"{name}: {pg.stderr} stderr output box(es)")
            counts["stderr"] += pg.stderr
        for f in pg.figure_reprs:
            problems.append(f"{name}: figure repr instead of a figure: {f!r}")
            counts["figure repr"] += 1
        for t in pg.raw_tex[:5]:
            problems.append(f"{name}: raw TeX outside math: {t!r}")
        counts["raw TeX"] += len(pg.raw_tex)
        for tag, rel, attr, url in pg.refs:
            loaded = tag != "a" and (tag != "link" or bool(LOADED_RELS & set(rel.split())))
            if external(url):
                if loaded:
                    problems.append(f"{name}: external resource <{tag} {attr}={url!r}>")
                    counts["external"] += 1
                continue
            s = urlsplit(url)
            if s.scheme or url.startswith(("mailto:", "javascript:", "data:")):
                continue
            target = (p.parent / unquote(s.path)).resolve() if s.path else p
            if s.path.endswith("/"):
                target = target / "index.html"
            if not target.exists():
                problems.append(f"{name}: broken {tag} {attr}={url!r}")
                counts["broken"] += 1
                continue
            if s.fragment and target.suffix == ".html" and target in parsed:
                if unquote(s.fragment) not in parsed[target].ids:
                    problems.append(f"{name}: broken anchor {url!r}")
                    counts["broken"] += 1
            if tag == "img" and target.suffix.lower() == ".png":
                w = png_width(target)
                if w and w > limit:
                    problems.append(f"{name}: figure {target.name} is {w} px wide (> {limit} px: column + 10%)")
                    counts["too wide"] += 1

    for p, pg in parsed.items():
        name = p.relative_to(html.resolve())
        page = name.with_suffix("").as_posix()
        pending = page in PENDING
        tag = " (pending, not failed)" if pending else ""
        for w in pg.process_words[:3]:
            (print if pending else problems.append)(f"{name}: words about us, not for readers{tag}: {w!r}")
        counts["process words"] += 0 if pending else len(pg.process_words)
        if pg.bare_output_images and not pending:
            problems.append(f"{name}: {pg.bare_output_images} figure(s) shown as a bare cell output: glue them "
                            "(svtools.report.glue) and paste them with {glue:figure}, numbered and captioned")
            counts["uncaptioned figure"] += pg.bare_output_images
        for href in pg.result_box_colab:
            if pg.theme_colab and href not in pg.theme_colab:
                problems.append(f"{name}: the result box's Colab link {href} is not the launch button's {pg.theme_colab[0]}")
                counts["colab link"] += 1
        for entry in pg.bib_unlinked:
            problems.append(f"{name}: bibliography entry without a link (add eprint, doi or url): {entry!r}")
            counts["unlinked reference"] += 1

    # Bibliography: every key cited in some page's source, every entry listed.
    keys = re.findall(r"@\w+\s*\{\s*([^,\s]+)\s*,", bib.read_text(encoding="utf-8"))
    cited: set[str] = set()
    for src in (html / "_sources").rglob("*"):
        if src.is_file():
            for group in CITE.findall(src.read_text(encoding="utf-8", errors="replace")):
                cited.update(k.strip() for k in group.split(","))
    for k in keys:
        if k not in cited:
            problems.append(f"bibliography: {k} is never cited")
            counts["uncited"] += 1
    for k in sorted(cited - set(keys)):
        problems.append(f"bibliography: cited key {k} is not in {bib.name}")
        counts["unknown cite"] += 1
    listed = max((pg.bib_entries for p, pg in parsed.items() if p.stem == "bibliography"), default=0)
    if listed != len(keys):
        problems.append(f"bibliography page lists {listed} entries, {bib.name} has {len(keys)}")
        counts["bib listing"] += 1

    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()) if v) or "no problem"
    problems.append(f"SUMMARY {len(pages)} pages: {summary}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--html", type=Path, default=ROOT / "_build" / "html")
    ap.add_argument("--bib", type=Path, default=ROOT / "book" / "references.bib")
    a = ap.parse_args(argv)
    if not (a.html / "index.html").exists():
        print(f"{a.html} has no index.html: build the book first (make book)", file=sys.stderr)
        return 2
    out = check(a.html, a.bib)
    print("\n".join(out))
    return 1 if len(out) > 1 else 0


if __name__ == "__main__":
    sys.exit(main())
