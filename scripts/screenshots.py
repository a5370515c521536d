"""Browser check of the built book: screenshots of every page, MathJax offline, external requests.

Opens every page of ``_build/html`` in headless Chromium (Debian's package:
``apt-get install -y chromium``), at a desktop width (1400 px) and a phone width (400 px), with
every request that leaves the site blocked and recorded. For each page it waits for MathJax to
finish typesetting, then saves a full-page screenshot and checks:

- no request to another site (the book must read offline; MathJax is served from ``_static``);
- MathJax typeset without errors (no ``mjx-merror``, no raw ``\\(`` or ``$$`` left in the text
  outside code, where the page has math);
- no JavaScript exception;
- nothing wider than the page: the document does not scroll sideways (display equations and
  wide tables scroll inside their own box instead);
- nothing wider than its column: no printed output or table of a cell and no display equation
  that the reader has to scroll sideways to read (code cells that do are counted, not failed),
  and on a desktop (1400 px) no code block of the text (an API example) wider than the column;
- no heading that wraps with a single character or only punctuation on its last line (a lone ")");
- figure text legible: every SVG figure's smallest text, at the width the page shows the figure,
  is at least ``MIN_TEXT_PX`` (``svtools/plots/__init__.py``, 8 px) at every width checked, the
  400 px phone width included. The sizes are read from the SVG files (matplotlib writes each text
  as a group scaled by its font size); PNG figures cannot be measured and are counted.

Pages listed in ``PENDING`` (chapters not yet converted to the book's result-box, table and figure
conventions) are checked the same way, but their width and figure-text problems are reported
without failing the run.

Usage (from the repository root, after ``make book``)::

    python scripts/screenshots.py                 # every page, both widths, into _build/screenshots
    python scripts/screenshots.py --pages intro book/part2/01_theorem1 --widths 1400

Exits 1 when a check fails; prints one line per page and width. Needs only the standard library
and tornado (installed with Jupyter). ``.ci/run`` installs Debian's Chromium and runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit
from urllib.request import urlopen

from tornado.websocket import websocket_connect

ROOT = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_html import PENDING  # noqa: E402 - the one list of pages not yet converted


def _plots_module():
    """``svtools/plots/__init__.py`` loaded on its own (matplotlib only: no torch, no svtools)."""
    spec = importlib.util.spec_from_file_location("_svtools_plots", ROOT / "svtools" / "plots" / "__init__.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PLOTS = _plots_module()
MIN_TEXT_PX = PLOTS.MIN_TEXT_PX


def svg_text(path: Path) -> tuple[float, list[tuple[float, str]]]:
    """The SVG's width (in its units: pt for matplotlib) and each text's (font size, text)."""
    try:
        return PLOTS.svg_text(path.read_text(encoding="utf-8", errors="replace"))
    except ValueError as e:
        raise ValueError(f"{path.name}: {e}") from None


def figure_text(page: Path, figures: list[dict]) -> tuple[list[str], int, float | None]:
    """Problems with figure text on ``page`` as shown, the number of PNG figures (unmeasured),
    and the smallest figure text in px (None when no SVG figure)."""
    bad, png, smallest = [], 0, None
    for f in figures:
        path = Path(unquote(urlsplit(f["url"]).path))
        if path.suffix.lower() != ".svg":
            png += path.suffix.lower() == ".png"
            continue
        try:
            width, texts = svg_text(path)
        except (OSError, ValueError) as e:
            bad.append(f"figure {f['src']}: {e}")
            continue
        if not texts:
            continue
        size, text = min(texts)
        px = size * f["shown"] / width
        smallest = px if smallest is None else min(smallest, px)
        if px < MIN_TEXT_PX - 1e-6:
            bad.append(f"figure {Path(f['src']).name}: text {text[:30]!r} is {px:.1f} px as shown "
                       f"(< {MIN_TEXT_PX:g} px; {size:.1f} pt in a {width:.0f} pt wide figure shown at {f['shown']:.0f} px)")
    return bad, png, smallest

# Runs in the page once it has loaded: waits for MathJax, then measures what the checks need.
PROBE = r"""
(async () => {
  const out = {};
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    try { await MathJax.startup.promise; out.mathjax = "ok"; }
    catch (e) { out.mathjax = "error: " + e; }
  } else { out.mathjax = window.MathJax ? "not started" : "absent"; }
  out.mathjax_version = (window.MathJax && MathJax.version) || null;
  out.typeset = document.querySelectorAll("mjx-container").length;
  out.merror = document.querySelectorAll("mjx-merror").length;
  // Raw TeX left in the text (outside code and outside typeset math).
  const walker = document.createTreeWalker(document.querySelector("main") || document.body,
                                           NodeFilter.SHOW_TEXT);
  let raw = 0; const samples = [];
  while (walker.nextNode()) {
    const n = walker.currentNode, p = n.parentElement;
    if (!p || p.closest("pre, code, script, style, mjx-container, .highlight, textarea")) continue;
    if (/\\\(|\\\[|\$\$/.test(n.textContent)) { raw += 1; if (samples.length < 3) samples.push(n.textContent.slice(0, 80)); }
  }
  out.raw_tex = raw; out.raw_samples = samples;
  const de = document.documentElement;
  out.page_width = de.clientWidth; out.scroll_width = de.scrollWidth;
  out.height = Math.max(de.scrollHeight, document.body.scrollHeight);
  const art = document.querySelector("article.bd-article") || document.querySelector("main");
  out.column = art ? Math.round(art.getBoundingClientRect().width
      - parseFloat(getComputedStyle(art).paddingLeft) - parseFloat(getComputedStyle(art).paddingRight)) : null;
  out.images = [...document.querySelectorAll("article img")].filter(i => i.naturalWidth > 0).map(i => ({
    src: i.getAttribute("src"), natural: i.naturalWidth, shown: Math.round(i.getBoundingClientRect().width)}));
  out.broken_images = [...document.querySelectorAll("main img")].filter(i => i.complete && i.naturalWidth === 0)
      .map(i => i.getAttribute("src"));
  out.stderr_boxes = document.querySelectorAll(".output.stderr, div.stderr").length;
  // What runs past its column: a cell's printed output or table (it scrolls inside its box, so
  // the reader must scroll to see the end of a line), a code cell, a display equation.
  const over = (el) => el.scrollWidth - el.clientWidth;
  const sample = (el) => (el.innerText || "").split("\n").reduce((a, b) => b.length > a.length ? b : a, "").slice(0, 90);
  out.wide_outputs = [...document.querySelectorAll(
      "div.cell_output pre, div.cell_output div.output.text_html, div.cell_output table")]
    .filter(el => el.clientWidth > 0 && over(el) > 1)
    .map(el => ({tag: el.tagName.toLowerCase(), over: over(el), width: el.clientWidth, text: sample(el)}));
  out.outputs = document.querySelectorAll("div.cell_output pre, div.cell_output table").length;
  out.wide_code = [...document.querySelectorAll("div.cell_input pre")].filter(el => over(el) > 1).length;
  out.code_cells = document.querySelectorAll("div.cell_input pre").length;
  // Code blocks of the text (not notebook cells): API examples, docstrings' literal blocks.
  out.wide_blocks = [...document.querySelectorAll("article pre")].filter(el => !el.closest("div.cell"))
    .filter(el => over(el) > 1).map(el => ({over: over(el), width: el.clientWidth, text: sample(el)}));
  out.wide_equations = [...document.querySelectorAll("mjx-container[display='true']")]
    .map(el => el.closest("div.math, .math-wrapper") || el)
    .filter(el => over(el) > 1).map(el => ({over: over(el), text: (el.textContent || "").slice(0, 60)}));
  // Headings whose last line holds a single character or only punctuation (a lone ")").
  out.orphans = [];
  for (const h of document.querySelectorAll("article h1, article h2, article h3, article h4")) {
    const tw = document.createTreeWalker(h, NodeFilter.SHOW_TEXT);
    const lines = new Map();
    while (tw.nextNode()) {
      const n = tw.currentNode;
      if (n.parentElement.closest(".headerlink, mjx-container")) continue;
      for (let i = 0; i < n.textContent.length; i++) {
        const r = document.createRange(); r.setStart(n, i); r.setEnd(n, i + 1);
        const b = r.getBoundingClientRect();
        if (b.width === 0 && b.height === 0) continue;
        const top = Math.round(b.top / 4);
        lines.set(top, (lines.get(top) || "") + n.textContent[i]);
      }
    }
    const tops = [...lines.keys()].sort((a, b) => a - b);
    const last = tops.length > 1 ? lines.get(tops[tops.length - 1]).trim() : null;
    if (last !== null && (last.length === 1 || /^[)\]}.,;:!?'"’”]+$/.test(last))) out.orphans.push(h.textContent.replace("#", "").trim().slice(0, 70));
  }
  // Every figure the article shows: its file, natural size and the width it is shown at.
  out.figures = [...document.querySelectorAll("article img")].filter(i => i.naturalWidth > 0)
    .filter(i => !i.closest(".colab-badge"))
    .map(i => ({src: i.getAttribute("src"), url: i.src, natural: i.naturalWidth,
                shown: i.getBoundingClientRect().width}));
  return JSON.stringify(out);
})()
"""


class Browser:
    """A headless Chromium driven over the DevTools protocol (one tab)."""

    def __init__(self, binary: str):
        self.profile = tempfile.mkdtemp(prefix="svtools-chromium-")
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--no-first-run", "--disable-extensions", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and port_file.read_text().strip():
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("Chromium did not start (no DevToolsActivePort)")
        port = port_file.read_text().split()[0]
        with urlopen(f"http://127.0.0.1:{port}/json/list") as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        self.ws_url = pages[0]["webSocketDebuggerUrl"]
        self.ws = None
        self.next_id = 0
        self.events: list[dict] = []

    async def connect(self):
        self.ws = await websocket_connect(self.ws_url, max_message_size=512 * 2**20)

    async def send(self, method: str, **params) -> dict:
        self.next_id += 1
        my_id = self.next_id
        await self.ws.write_message(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads(await self.ws.read_message())
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    async def wait_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for i, ev in enumerate(self.events):
            if ev.get("method") == method:
                return self.events.pop(i)
        while time.monotonic() < deadline:
            msg = json.loads(await asyncio.wait_for(self.ws.read_message(), deadline - time.monotonic()))
            if msg.get("method") == method:
                return msg
            self.events.append(msg)
        raise TimeoutError(method)

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


async def check_page(b: Browser, url: str, width: int, shot: Path) -> dict:
    b.events.clear()
    await b.send("Emulation.setDeviceMetricsOverride", width=width, height=900, deviceScaleFactor=1,
                 mobile=width < 700)
    await b.send("Page.navigate", url=url)
    await b.wait_event("Page.loadEventFired")
    res = await b.send("Runtime.evaluate", expression=PROBE, awaitPromise=True, returnByValue=True,
                       timeout=60000)
    probe = json.loads(res["result"]["value"])
    height = min(int(probe["height"]), 30000)
    await b.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                 mobile=width < 700)
    await asyncio.sleep(0.3)
    # The viewport is now as tall as the page (up to 30,000 px): capture it as it is laid out.
    img = await b.send("Page.captureScreenshot", format="png", captureBeyondViewport=False)
    shot.parent.mkdir(parents=True, exist_ok=True)
    shot.write_bytes(base64.b64decode(img["data"]))
    external, exceptions = [], []
    for ev in b.events:
        m, p = ev.get("method"), ev.get("params", {})
        if m == "Fetch.requestPaused":
            external.append(p["request"]["url"])
            await b.send("Fetch.failRequest", requestId=p["requestId"], errorReason="BlockedByClient")
        elif m == "Runtime.exceptionThrown":
            exceptions.append(p["exceptionDetails"].get("exception", {}).get("description", "")
                              or p["exceptionDetails"].get("text", ""))
    probe.update(external=external, exceptions=exceptions)
    return probe


def problems(p: dict) -> list[str]:
    out = []
    if p["external"]:
        out.append(f"{len(p['external'])} external request(s): {p['external'][:3]}")
    if p["exceptions"]:
        out.append(f"JavaScript exception(s): {[e[:120] for e in p['exceptions'][:2]]}")
    if p["mathjax"] not in ("ok", "absent"):
        out.append(f"MathJax {p['mathjax']}")
    if p["merror"]:
        out.append(f"{p['merror']} MathJax error(s)")
    if p["raw_tex"]:
        out.append(f"{p['raw_tex']} text node(s) with raw TeX, e.g. {p['raw_samples'][:1]}")
    if p["scroll_width"] > p["page_width"] + 1:
        out.append(f"page scrolls sideways ({p['scroll_width']} px > {p['page_width']} px)")
    if p["broken_images"]:
        out.append(f"broken image(s): {p['broken_images'][:3]}")
    if p["stderr_boxes"]:
        out.append(f"{p['stderr_boxes']} stderr box(es)")
    return out


def layout_problems(p: dict, width: int) -> list[str]:
    """Outputs and equations wider than the column, text code blocks wider than a desktop column,
    figure text too small, headings with a lone character (see PENDING)."""
    out = []
    if width >= 1000:
        for b in p["wide_blocks"][:3]:
            out.append(f"code block {b['over']} px wider than its {b['width']} px box: {b['text']!r}")
    for o in p["wide_outputs"][:4]:
        out.append(f"{o['tag']} output {o['over']} px wider than its {o['width']} px box: {o['text']!r}")
    if len(p["wide_outputs"]) > 4:
        out.append(f"... {len(p['wide_outputs']) - 4} more output(s) wider than the column")
    for e in p["wide_equations"][:3]:
        out.append(f"display equation {e['over']} px wider than the column: {e['text']!r}")
    out += p["figure_text"]
    for h in p["orphans"]:
        out.append(f"heading wraps with a lone character or punctuation on its last line: {h!r}")
    return out


async def _check_all(b: Browser, items: list[tuple[Path, int]], html: Path, outdir: Path) -> dict:
    """Check ``(page, width)`` items one after another in browser ``b``; ``{item: (failed, line)}``."""
    out = {}
    await b.connect()
    await b.send("Page.enable")
    await b.send("Runtime.enable")
    # Pause every request that is not a local file or inline data, to record and block it.
    await b.send("Fetch.enable", patterns=[{"urlPattern": "http*"}])
    for page, w in items:
        rel = page.relative_to(html).with_suffix("")
        shot = outdir / f"{str(rel).replace(os.sep, '__')}@{w}.png"
        try:
            p = await asyncio.wait_for(check_page(b, page.as_uri(), w, shot), 120)
        except Exception as e:  # noqa: BLE001 - report and go on to the next page
            out[page, w] = (True, f"FAIL {rel} @{w}px: {type(e).__name__}: {e}")
            continue
        p["figure_text"], png, smallest = figure_text(page, p["figures"])
        bad = problems(p)
        layout = layout_problems(p, w)
        pending = rel.as_posix() in PENDING
        if not pending:
            bad += layout
        fig = (f", {len(p['figures'])} figure(s)" + (f", smallest figure text {smallest:.1f} px"
                                                    if smallest is not None else "")
               + (f", {png} PNG (text not measured)" if png else ""))
        code = f", code cells wider than the column {p['wide_code']}/{p['code_cells']}" if p["code_cells"] else ""
        out[page, w] = (bool(bad), f"{'FAIL' if bad else 'ok  '} {rel} @{w}px: column {p['column']} px, "
                        f"{p['typeset']} math typeset, height {p['height']} px{fig}, "
                        f"outputs wider than the column {len(p['wide_outputs'])}/{p['outputs']}{code}"
                        + ("".join(f"\n       - {x}" for x in bad))
                        + ("".join(f"\n       - (pending, not failed) {x}" for x in layout) if pending else ""))
    return out


def _browsers() -> int:
    """Browsers checking pages at once: one per core this process may use (at most 2; each page's
    check is independent), or ``$SCREENSHOT_BROWSERS``."""
    env = os.environ.get("SCREENSHOT_BROWSERS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise SystemExit(f"SCREENSHOT_BROWSERS must be a positive integer, got {env!r}")
        return int(env)
    try:
        return max(1, min(2, len(os.sched_getaffinity(0))))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return 1


async def run(pages: list[Path], html: Path, widths: list[int], outdir: Path, binary: str) -> int:
    items = [(page, w) for page in pages for w in widths]
    n = min(_browsers(), len(items)) or 1
    browsers = [Browser(binary) for _ in range(n)]
    try:
        parts = await asyncio.gather(*(_check_all(b, items[i::n], html, outdir) for i, b in enumerate(browsers)))
    finally:
        for b in browsers:
            b.close()
    results = {k: v for part in parts for k, v in part.items()}
    failed = 0
    for item in items:  # in page order, whichever browser checked it
        bad, line = results[item]
        print(line)
        failed += bad
    print(f"{failed} failure(s); screenshots in {outdir}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--html", type=Path, default=ROOT / "_build" / "html")
    ap.add_argument("--out", type=Path, default=ROOT / "_build" / "screenshots")
    ap.add_argument("--widths", type=int, nargs="+", default=[1400, 400])
    ap.add_argument("--pages", nargs="*", help="page paths without .html (default: every page)")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    a = ap.parse_args(argv)
    if not a.chromium:
        print("Chromium not found: apt-get update && apt-get install -y chromium", file=sys.stderr)
        return 2
    html = a.html.resolve()
    if a.pages:
        pages = [html / f"{p}.html" for p in a.pages]
    else:
        pages = sorted(p for p in html.rglob("*.html")
                       if not p.relative_to(html).parts[0].startswith("_") and p.name != "search.html"
                       and 'http-equiv="Refresh"' not in p.read_text(encoding="utf-8")[:300])  # redirects
    return asyncio.run(run(pages, html, a.widths, a.out.resolve(), a.chromium))


if __name__ == "__main__":
    sys.exit(main())
