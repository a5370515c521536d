"""Sphinx extension of the book (loaded by ``_config.yml``: ``sphinx.local_extensions``).

What it does, all in the build only (readers running a chapter themselves are unaffected):

- switches progress bars off in every notebook the build executes. The kernels inherit this
  process's environment; ``TQDM_DISABLE=1`` is tqdm's own switch (every tqdm bar honours it:
  svtools', TransformerLens', the model hub's), and ``HF_HUB_DISABLE_PROGRESS_BARS=1`` covers the
  hub's downloads where the hub is reachable. Each refresh of a bar would otherwise be kept in
  the built page as a stderr output box.
- adds the book's stylesheet (``scripts/book_static/svtools-book.css``): display equations
  scroll instead of being clipped on narrow screens.
- hides the theme's second search bar: pydata-sphinx-theme 0.17 draws its own top navbar (a
  search field spanning the page) that sphinx-book-theme 1.3 no longer suppresses. The book
  theme's article header and sidebar search already do its job on desktop and on phones. (The
  navbar stays in the page, hidden by the stylesheet: the theme's scripts measure it.)
- writes each script of a page once: sphinx-thebe registers its inline configuration twice under
  Jupyter Book, and the second ``const THEBE_JS_URL`` is a JavaScript SyntaxError on every page.
"""

from __future__ import annotations

import os
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.config import Config

HERE = Path(__file__).resolve().parent


def _add_paths(app: Sphinx, config: Config) -> None:
    config.html_static_path = [*config.html_static_path, str(HERE / "book_static")]


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
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    app.connect("config-inited", _add_paths)
    app.connect("html-page-context", _unique_scripts, priority=900)  # after those that add scripts
    app.add_css_file("svtools-book.css")
    return {"parallel_read_safe": True, "parallel_write_safe": True}
