"""Sphinx extension of the book (loaded by ``_config.yml``: ``sphinx.local_extensions``).

What it does, all in the build only (readers running a chapter themselves are unaffected):

- switches progress bars off in every notebook the build executes. The kernels inherit this
  process's environment; ``TQDM_DISABLE=1`` is tqdm's own switch: it is the default of every
  tqdm bar (TransformerLens', the model hub's downloads), and svtools' bars obey it even when
  called with ``progress=True``. Each refresh of a bar would otherwise be kept in the built page
  as a stderr output box. (Not ``HF_HUB_DISABLE_PROGRESS_BARS``: with it set, loading a model
  warns that bars cannot be enabled.)
- executes the notebooks through the jupyter-cache that ``make test`` fills too
  (``scripts/book_exec.py``; ``_config.yml``: ``execute_notebooks: cache``): a notebook executed by
  one of the two commands is not executed again by the other. When a chapter that needs the IOI
  LM's seeds will execute, they start training in the background, in parallel processes.
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
- adds the ``{result-box}`` directive, the box at the top of every chapter (see
  :class:`ResultBox`): the chapter's question and headline numbers (its content, with myst-nb
  ``{glue:text}`` roles), then a footer the directive writes itself: the run time the chapter
  glued (``svtools.report.glue_run_time``) and an "Open in Colab" badge linking to the same
  notebook as the theme's launch button (``repository.url`` and ``branch`` of ``_config.yml``).
- adds the ``{chapter-figure}`` directive: a figure that a chapter glued (``svtools.report.glue``,
  SVG), shown on another page (the landing page) with its own number and caption, without
  computing it twice (see :class:`ChapterFigure`).
"""

from __future__ import annotations

import os
from pathlib import Path

import book_exec  # scripts/: the execution cache shared with `make test`
import pybtex.plugin
from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle
from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.transforms.post_transforms import SphinxPostTransform
from sphinx.util import logging as sphinx_logging
from sphinx.util.docutils import SphinxDirective

LOGGER = sphinx_logging.getLogger(__name__)

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


def colab_url(repository_url: str, branch: str, path: str,
              colab: str = "https://colab.research.google.com") -> str:
    """The Colab link of a notebook of the repository, as sphinx-book-theme's launch button builds it:
    ``{colab}/github/{owner}/{repo}/blob/{branch}/{path}`` (``path`` relative to the repository)."""
    owner_repo = repository_url.strip().rstrip("/").removeprefix("https://github.com/")
    if owner_repo.count("/") != 1:
        raise ValueError(f"repository url {repository_url!r} is not https://github.com/<owner>/<repo>")
    return f"{colab.rstrip('/')}/github/{owner_repo}/blob/{branch}/{path.lstrip('/')}"


#: The footer of a result box: the run time a chapter glued with ``svtools.report.glue_run_time``.
RUN_TIME_LINE = ("**Run time** {glue:text}`run_time` at the {glue:text}`run_scale`, on "
                 "{glue:text}`run_hardware`, when this page was built.")


class ResultBox(SphinxDirective):
    """``{result-box}``: the box at the top of a chapter.

    Content (MyST): the question and the answer with the run's numbers (``{glue:text}`` roles).
    The directive adds a footer: :data:`RUN_TIME_LINE` (the chapter must call
    ``svtools.report.glue_run_time()``; a missing key fails the build) and, on a notebook page,
    an "Open in Colab" badge. Option ``:title:`` (default "In brief").
    """

    has_content = True
    option_spec = {"title": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        box = nodes.admonition(classes=["result-box"])
        box += nodes.title("", self.options.get("title", "In brief"))
        self.state.nested_parse(self.content, self.content_offset, box)
        footer = nodes.container(classes=["result-box-footer"])
        self.state.nested_parse(StringList([RUN_TIME_LINE], source=self.get_source_info()[0]),
                                self.content_offset, footer)
        path = self.env.doc2path(self.env.docname, False)
        if str(path).endswith(".ipynb"):
            opts = self.config.html_theme_options
            url = colab_url(opts.get("repository_url", ""), opts.get("repository_branch", "main"),
                            f"{opts.get('path_to_docs', '').strip('/')}/{path}".lstrip("/"),
                            opts.get("launch_buttons", {}).get("colab_url", "https://colab.research.google.com"))
            up = "../" * self.env.docname.count("/")
            footer += nodes.raw("", f'<p class="colab-badge"><a href="{url}" class="colab-link">'
                                    f'<img src="{up}_static/colab-badge.svg" alt="Open in Colab" '
                                    'width="117" height="20"></a></p>', format="html")
        box += footer
        return [box]


class pending_chapter_figure(nodes.General, nodes.Element):
    """Where a :class:`ChapterFigure`'s image goes once the chapter's glued data can be read."""


class ChapterFigure(SphinxDirective):
    """``{chapter-figure} part1/02_many_pairs.ipynb::fig-pairs``: a chapter's glued figure on this page.

    The argument is the notebook (relative to this page) and the key the notebook glued its figure
    under (SVG, :func:`svtools.report.glue`); the content is the caption; ``:name:`` labels the
    figure for ``{numref}``. The image is read from the glue cache myst-nb writes when it reads the
    notebook, after every page is read (a missing key fails the build).
    """

    required_arguments = 1
    final_argument_whitespace = False
    has_content = True
    option_spec = {"name": directives.unchanged, "alt": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        doc, sep, key = self.arguments[0].partition("::")
        if not sep:
            raise self.error("chapter-figure: the argument is <notebook>::<key>")
        _, filepath = self.env.relfn2path(doc, self.env.docname)
        refdoc = self.env.path2doc(filepath)
        if refdoc is None:
            raise self.error(f"chapter-figure: no document {doc!r}")
        self.env.note_dependency(filepath)
        figure = nodes.figure(classes=["chapter-figure"])
        figure += pending_chapter_figure(refdoc=refdoc, key=key, alt=self.options.get("alt", key))
        if self.content:
            body = nodes.Element()
            self.state.nested_parse(self.content, self.content_offset, body)
            first = body.children[0] if body.children else None
            if isinstance(first, nodes.paragraph):
                caption = nodes.caption(first.rawsource, "", *first.children)
                caption.source, caption.line = first.source, first.line
                figure += caption
                rest = body.children[1:]
            else:
                rest = body.children
            if rest:
                figure += nodes.legend("", *rest)
        self.add_name(figure)
        return [figure]


class ResolveChapterFigures(SphinxPostTransform):
    """Writes each pending chapter figure's SVG into ``_images`` and points an image at it."""

    default_priority = 5

    def run(self, **kwargs) -> None:
        import hashlib
        import os

        from myst_nb.ext.glue.crossref import read_glue_cache

        for node in list(self.document.findall(pending_chapter_figure)):
            data = read_glue_cache(self.env.mystnb_config.output_folder, node["refdoc"]).get(node["key"])
            svg = (data or {}).get("data", {}).get("image/svg+xml")
            if svg is None:
                LOGGER.warning(f"chapter-figure: {node['refdoc']} glued no SVG figure {node['key']!r}",
                               location=node)
                node.parent.remove(node)
                continue
            raw = svg.encode("utf-8")
            out = os.path.join(self.app.builder.outdir, self.app.builder.imagedir)
            os.makedirs(out, exist_ok=True)
            path = os.path.join(out, hashlib.sha256(raw).hexdigest() + ".svg")
            with open(path, "wb") as f:
                f.write(raw)
            uri = os.path.relpath(path, os.path.dirname(os.path.join(self.app.builder.outdir, self.env.docname)))
            image = nodes.image(uri=uri, alt=node["alt"])
            image["candidates"] = {"*": uri}
            node.replace_self(image)


_TRAINING: list = []


def _execution_cache(app: Sphinx, config: Config) -> None:
    """``execute_notebooks: cache``: the jupyter-cache shared with ``make test`` (scripts/book_exec.py)."""
    if config.nb_execution_mode == "cache":
        config.nb_execution_cache_path = str(book_exec.cache_path())


def _execute_in_parallel(app: Sphinx) -> None:
    """Before Sphinx reads the chapters: seeds 0-2 of the IOI LM train in the background (in
    parallel) when a chapter that needs them is not cached, and the chapters the cache does not
    hold execute as many at once as there are cores (scripts/book_exec.py), so myst-nb finds every
    chapter in the cache. A chapter that fails there is not cached: myst-nb executes it again
    itself and reports its error as usual."""
    if app.config.nb_execution_mode != "cache":
        return
    cache = Path(app.config.nb_execution_cache_path)
    proc = book_exec.start_lm_training(book_exec.notebooks(), cache)
    if proc is not None:
        _TRAINING.append(proc)
    pool = book_exec.NotebookPool(book_exec.notebooks(), cache, training=proc)
    if not len(pool):
        return
    LOGGER.info(f"executing {len(pool)} notebook(s), {book_exec.workers()} at a time (log: {cache / 'notebooks.log'})")
    try:
        for path, error in pool.wait().items():
            LOGGER.info(f"  {path.relative_to(book_exec.ROOT)}: {'failed (myst-nb runs it again)' if error else 'executed'}")
    finally:
        pool.close()


def _stop_lm_training(app: Sphinx, exc) -> None:
    for proc in _TRAINING:
        book_exec.stop(proc)


def _outdated_on_new_key(app: Sphinx, env, added, changed, removed) -> list[str]:
    """Re-read every notebook when the execution cache changed (the package, the libraries or the
    environment: :func:`book_exec.cache_key`), though its text did not: otherwise Sphinx would keep
    the pages of an earlier build with outputs of the earlier package."""
    key = Path(app.config.nb_execution_cache_path or "").name
    if getattr(env, "svtools_execution_key", None) == key:
        return []
    env.svtools_execution_key = key
    return [d for d in env.found_docs if str(env.doc2path(d)).endswith(".ipynb") and d not in added | changed]


def setup(app: Sphinx) -> dict:
    pybtex.plugin.register_plugin("pybtex.style.formatting", "authoryear", AuthorYearStyle, force=True)
    os.environ.update(book_exec.KERNEL_ENV)
    app.connect("config-inited", _add_paths)
    app.connect("config-inited", _execution_cache)
    app.connect("builder-inited", _execute_in_parallel)
    app.connect("env-get-outdated", _outdated_on_new_key)
    app.connect("build-finished", _stop_lm_training)
    app.connect("html-page-context", _unique_scripts, priority=900)  # after those that add scripts
    app.add_css_file("svtools-book.css")
    app.add_directive("result-box", ResultBox)
    app.add_directive("chapter-figure", ChapterFigure)
    app.add_node(pending_chapter_figure)
    app.add_post_transform(ResolveChapterFigures)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
