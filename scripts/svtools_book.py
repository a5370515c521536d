"""Sphinx extension of the book (loaded by ``_config.yml``: ``sphinx.local_extensions``).

What it does, all in the build only (readers running a chapter themselves are unaffected):

- switches progress bars off in every notebook the build executes. The kernels inherit this
  process's environment; ``TQDM_DISABLE=1`` is tqdm's own switch: it is the default of every
  tqdm bar (TransformerLens', the model hub's downloads), and svtools' bars obey it even when
  called with ``progress=True``. Each refresh of a bar would otherwise be kept in the built page
  as a stderr output box. (Not ``HF_HUB_DISABLE_PROGRESS_BARS``: with it set, loading a model
  warns that bars cannot be enabled.)
- adds the book's stylesheet (``scripts/book_static/svtools-book.css``): display equations
  scroll instead of being clipped on narrow screens.
- hides the theme's second search bar: pydata-sphinx-theme 0.17 draws its own top navbar (a
  search field spanning the page) that sphinx-book-theme 1.3 no longer suppresses. The book
  theme's article header and sidebar search already do its job on desktop and on phones. (The
  navbar stays in the page, hidden by the stylesheet: the theme's scripts measure it.)
- registers the bibliography style ``authoryear`` (``_config.yml``: ``bibtex_default_style``):
  pybtex's ``plain`` entries, sorted by author and year, labelled like the in-text citations
  ("Franco et al., 2026"), instead of ``alpha``'s "[FLC26]".
- writes each script of a page once: sphinx-thebe registers its inline configuration twice under
  Jupyter Book, and the second ``const THEBE_JS_URL`` is a JavaScript SyntaxError on every page.
"""

from __future__ import annotations

import os
from pathlib import Path

import pybtex.plugin
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle
from sphinx.application import Sphinx
from sphinx.config import Config

HERE = Path(__file__).resolve().parent


def _add_paths(app: Sphinx, config: Config) -> None:
    config.html_static_path = [*config.html_static_path, str(HERE / "book_static")]


class AuthorYearLabels(BaseLabelStyle):
    """Labels "Rolls and Tovee, 1995", "Franco et al., 2026"; "2024a"/"2024b" when they collide."""

    def format_labels(self, sorted_entries):
        labels = [self._label(e) for e in sorted_entries]
        counts = {lab: labels.count(lab) for lab in labels}
        seen: dict[str, int] = {}
        for lab in labels:
            if counts[lab] > 1:
                seen[lab] = seen.get(lab, 0) + 1
                lab = f"{lab}{chr(ord('a') + seen[lab] - 1)}"
            yield lab

    @staticmethod
    def _label(entry) -> str:
        people = entry.persons.get("author") or entry.persons.get("editor") or []
        last = [" ".join(p.prelast_names + p.last_names).replace("{", "").replace("}", "") for p in people]
        who = (last[0] if len(last) == 1 else f"{last[0]} and {last[1]}" if len(last) == 2
               else f"{last[0]} et al." if last else entry.key)
        return f"{who}, {entry.fields.get('year', 'n.d.')}"


class AuthorYearStyle(UnsrtStyle):
    """pybtex's entries, sorted by author, year and title, labelled by :class:`AuthorYearLabels`."""

    default_label_style = AuthorYearLabels
    default_sorting_style = "author_year_title"


def _unique_scripts(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    seen, unique = set(), []
    for js in context.get("script_files", []):
        # The same script registered twice differs by priority, or by a filename of None or "": compare the rest.
        key = (str(getattr(js, "filename", js) or ""),
               tuple(sorted((k, str(v)) for k, v in getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    context["script_files"] = unique


def setup(app: Sphinx) -> dict:
    pybtex.plugin.register_plugin("pybtex.style.formatting", "authoryear", AuthorYearStyle, force=True)
    os.environ["TQDM_DISABLE"] = "1"
    app.connect("config-inited", _add_paths)
    app.connect("html-page-context", _unique_scripts, priority=900)  # after those that add scripts
    app.add_css_file("svtools-book.css")
    return {"parallel_read_safe": True, "parallel_write_safe": True}
