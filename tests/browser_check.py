"""Open every page of the built book in headless Chromium, as a reader would.

Run ``make book`` first, then ``make browser-check`` (which runs this file with pytest).
It serves ``_build/html`` from a thread on 127.0.0.1 (a free port), drives Debian's
``/usr/bin/chromium`` through Playwright (Playwright's own browser download is not
used) and checks, for every page listed in ``_toc.yml``:

* the page's ``<h1>`` is the title of its source;
* every image has loaded (``naturalWidth > 0``);
* MathJax, served from the book itself, has typeset every math element, with no TeX
  errors;
* a notebook page's Colab launch link opens that notebook from the repository and
  branch named in ``_config.yml``;
* no uncaught JavaScript error (``pageerror``), no error on the console (a missing
  favicon, a theme complaint), no request for a file of the book that fails, and no
  request at all to any host other than 127.0.0.1 (the book works offline);
* at 1280 px and at 400 px wide, no code block or cell output is wider than its box
  (nothing scrolls sideways or is cut off);
* at 1280 px, every figure is shown at no less than :data:`MIN_FIGURE_SCALE` of its
  natural size, so that the figures' 10-point text (``roilib.plot``'s style, at 100 dpi)
  is at least 10 pixels tall on the page.

A full-page screenshot of every page at both widths lands in ``_build/browser-check/``
for a look.

Without ``_build/html`` or Chromium or Playwright the tests are skipped, unless
``ROILIB_REQUIRE_BROWSER=1`` (``make browser-check`` and CI set it), in which case they
fail.
"""
from __future__ import annotations

import functools
import http.server
import os
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import book_layout  # noqa: E402

HTML = book_layout.ROOT / "_build" / "html"
SHOTS = book_layout.ROOT / "_build" / "browser-check"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
REQUIRED = os.environ.get("ROILIB_REQUIRE_BROWSER") == "1"
#: the two page widths checked: a desktop window and a phone
WIDTHS = (1280, 400)
#: smallest displayed/natural width of a figure at 1280 px: 10 pt at 100 dpi is 13.9 px,
#: so at 0.72 of its natural size a figure's smallest text is still 10 px tall
MIN_FIGURE_SCALE = 0.72
PAGES = book_layout.toc_docnames()


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"browser check cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@pytest.fixture(scope="module")
def base_url():
    if not (HTML / "index.html").is_file():
        _unavailable(f"{HTML} has no index.html; run `make book` first")
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"{CHROMIUM} not found (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install '.[bookcheck]')")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


class PageVisit:
    """One page load with everything the checks need recorded."""

    def __init__(self, browser, base_url: str, path: str, width: int = 1280):
        self.base = base_url
        self.errors: list = []  # uncaught exceptions in the page
        self.console: list = []  # console.error messages (a 404, a theme complaint)
        self.outside: list = []  # requests to any host but ours (all blocked)
        self.failed: list = []  # requests for our files that failed
        self.context = browser.new_context(viewport={"width": width, "height": 900})
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", self._console)
        self.page.on("requestfailed", self._request_failed)
        self.page.on("response", self._response)
        self.page.route("**/*", self._route)
        self.page.goto(f"{base_url}/{path}", wait_until="load")

    def _ours(self, url: str) -> bool:
        return url.startswith(self.base + "/")

    def _route(self, route):
        url = route.request.url
        if self._ours(url) or urlsplit(url).scheme in ("data", "blob", "about"):
            route.continue_()
        else:
            self.outside.append(url)
            route.abort()

    def _console(self, message):
        if message.type == "error":
            self.console.append(f"{message.text} ({message.location.get('url', '')})")

    def _request_failed(self, request):
        if self._ours(request.url):
            self.failed.append(f"{request.url}: {request.failure}")

    def _response(self, response):
        if self._ours(response.url) and response.status >= 400:
            self.failed.append(f"{response.url}: HTTP {response.status}")

    def close(self):
        self.context.close()


def _visit(browser, base_url, docname, width=1280):
    return PageVisit(browser, base_url, f"{docname}.html", width)


# Code blocks and cell outputs whose content is wider than their box (it would scroll
# sideways or be cut off). Returns a short description of each.
_OVERFLOWING = """
() => Array.from(document.querySelectorAll(
    'div.highlight pre, div.cell_output pre, div.cell_output, div.cell_input'))
  .filter(el => el.offsetParent !== null && el.scrollWidth > el.clientWidth + 1)
  .map(el => `${el.tagName.toLowerCase()}.${el.className || ''}: ${el.scrollWidth} > `
             + `${el.clientWidth} px: ${(el.innerText || '').split('\\n')[0].slice(0, 60)}`)
"""

# Figures (cell outputs' images): displayed width over natural width.
_FIGURE_SCALES = """
() => Array.from(document.querySelectorAll('div.cell_output img'))
  .filter(img => img.naturalWidth > 0)
  .map(img => ({src: img.currentSrc || img.src, scale: img.clientWidth / img.naturalWidth,
                natural: img.naturalWidth, shown: img.clientWidth}))
"""


def _wait_for_images(page):
    page.evaluate("document.querySelectorAll('img[loading=lazy]').forEach(i => { i.loading = 'eager'; })")
    page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=30_000)
    return page.evaluate(
        "Array.from(document.images).map(i => ({src: i.currentSrc || i.src, width: i.naturalWidth}))"
    )


def _wait_for_mathjax(page):
    """Number of math elements Sphinx emitted, MathJax containers, and TeX errors."""
    n_math = page.evaluate("document.querySelectorAll('.math').length")
    if n_math == 0:
        return 0, 0, 0
    try:
        page.wait_for_function("window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=30_000)
    except Exception as exc:  # playwright's TimeoutError
        pytest.fail(f"{n_math} math elements but MathJax never started (is _static/mathjax there?): {exc}")
    page.evaluate("MathJax.startup.promise.then(() => true)")
    return (
        n_math,
        page.evaluate("document.querySelectorAll('.math mjx-container').length"),
        page.evaluate("document.querySelectorAll('mjx-merror').length"),
    )


@pytest.mark.parametrize("docname", PAGES)
def test_page_renders(browser, base_url, docname):
    visit = _visit(browser, base_url, docname)
    page = visit.page
    try:
        title = page.locator("main h1, article h1").first.inner_text(timeout=10_000)
        assert title.rstrip("#¶ \n").strip() == book_layout.page_title(docname)

        for image in _wait_for_images(page):
            assert image["width"] > 0, f"image did not load: {image['src']}"

        n_math, n_typeset, n_errors = _wait_for_mathjax(page)
        assert n_typeset == n_math, f"MathJax typeset {n_typeset} of {n_math} math elements"
        assert n_errors == 0, f"{n_errors} TeX errors on the page"

        if docname in book_layout.notebook_docnames():
            links = page.eval_on_selector_all(
                "a[href*='colab.research.google.com']", "els => els.map(e => e.href)"
            )
            assert links == [book_layout.colab_url(docname)], links

        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"{docname.replace('/', '__')}.png"), full_page=True)

        small = [f for f in page.evaluate(_FIGURE_SCALES) if f["scale"] < MIN_FIGURE_SCALE]
        assert not small, f"figures shrunk below {MIN_FIGURE_SCALE:.0%} (text under 10 px): {small}"
        overflowing = page.evaluate(_OVERFLOWING)
        assert not overflowing, f"wider than their box at 1280 px: {overflowing}"

        assert not visit.errors, f"JavaScript errors: {visit.errors}"
        assert not visit.console, f"console errors: {visit.console}"
        assert not visit.failed, f"failed requests: {visit.failed}"
        assert not visit.outside, f"requests leaving 127.0.0.1 (the book must work offline): {visit.outside}"
    finally:
        visit.close()


@pytest.mark.parametrize("docname", PAGES)
def test_narrow_page_has_nothing_wider_than_its_box(browser, base_url, docname):
    """At 400 px (a phone), code and outputs wrap or fit; nothing scrolls sideways."""
    visit = _visit(browser, base_url, docname, width=WIDTHS[1])
    page = visit.page
    try:
        _wait_for_images(page)
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"{docname.replace('/', '__')}-{WIDTHS[1]}.png"), full_page=True)
        overflowing = page.evaluate(_OVERFLOWING)
        assert not overflowing, f"wider than their box at {WIDTHS[1]} px: {overflowing}"
        assert not visit.errors, f"JavaScript errors: {visit.errors}"
        assert not visit.console, f"console errors: {visit.console}"
    finally:
        visit.close()


def test_mathjax_is_served_by_the_book(browser, base_url):
    """The root page has math, typeset by the MathJax copy under _static/."""
    root = PAGES[0]
    visit = _visit(browser, base_url, root)
    try:
        n_math, n_typeset, _ = _wait_for_mathjax(visit.page)
        assert n_math > 0, f"{root} was expected to contain math"
        assert n_typeset == n_math
        src = visit.page.evaluate("document.querySelector('script[src*=\"mathjax\"]').src")
        assert src.startswith(base_url + "/_static/mathjax/"), src
        assert visit.page.evaluate("MathJax.version").startswith("3."), "expected MathJax 3"
    finally:
        visit.close()


def test_site_root_leads_to_the_introduction(browser, base_url):
    visit = PageVisit(browser, base_url, "")
    try:
        visit.page.wait_for_url(f"{base_url}/{PAGES[0]}.html", timeout=10_000)
        assert not visit.errors and not visit.failed and not visit.outside
    finally:
        visit.close()
