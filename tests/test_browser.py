"""A real browser reads the built book: headless Chromium (Debian's) driven by Selenium.

Every page is opened from a local HTTP server; the test fails on a broken image or an empty
figure, a broken internal link, a Python traceback or papermill error banner, an unrendered glue
role or a raw glue key, math that MathJax did not typeset (MathJax is served from the book
itself, so this also holds offline), or a "download CSV" link that does not give a CSV table.
The landing page's claims table has one row per claim of the discussion.
Screenshots of the landing page and of a chapter are saved for the record.
"""
from __future__ import annotations

import csv
import functools
import http.server
import io
import os
import re
import shutil
import threading
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from impact_core.config import REPO_ROOT
from impact_core.notebook import CLAIM_FIELDS, read_glued
from impact_core.runner import local_mathjax

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOTS = Path(os.environ.get("IMPACT_SCREENSHOTS", REPO_ROOT / "_build" / "screenshots"))
BAD_TEXT = ("Traceback (most recent call last)", "PapermillExecutionError", "An Exception was encountered",
            "{glue:", "{glue}", "glue target not found", "\\(", "\\)", "$$")
RAW_GLUE_KEY = re.compile(r"\bclaim_[a-z0-9_]+_(?:%s)\b" % "|".join(CLAIM_FIELDS))
"""A glue key of a claim field (``claim_circuit_edges_verdict``) shown as text: a paste that failed."""

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (make test installs them as root)")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no line per request in the test output
        pass


def landing_page(html: Path) -> str:
    """The page a reader lands on: ``index.html``, or the page its redirect names (``book/intro.html``)."""
    match = re.search(r'http-equiv="Refresh" content="\d+;\s*url=([^"]+)"', (html / "index.html").read_text(), re.I)
    return match.group(1) if match else "index.html"


@pytest.fixture(scope="module")
def server(smoke_book):
    _, html = smoke_book
    handler = functools.partial(QuietHandler, directory=str(html))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", html
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1280,1600",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


MATHJAX_DONE = """
const done = arguments[arguments.length - 1];
if (!document.querySelector('.math')) { done('no math'); return; }
const start = Date.now();
(function wait() {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    MathJax.startup.promise.then(() => done('typeset'), e => done('error: ' + e));
  } else if (Date.now() - start > 30000) { done('MathJax did not load'); }
  else { setTimeout(wait, 100); }
})();
"""

PAGE_CHECK = """
const broken = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src);
const emptyFigures = [...document.querySelectorAll('figure, .cell_output .output.image, img')].filter(f => {
  const imgs = f.tagName === 'IMG' ? [f] : [...f.querySelectorAll('img, svg')];
  return imgs.length === 0 || imgs.every(i => i.tagName === 'IMG' ? i.naturalWidth === 0 || i.naturalHeight === 0
                                                                   : i.getBBox().width === 0);
}).map(f => f.outerHTML.slice(0, 120));
const links = [...document.querySelectorAll('a[href]')].map(a => a.href);
const csv = [...document.querySelectorAll('a[href$=".csv"]')].map(a => a.href);
const ids = [...document.querySelectorAll('[id]')].map(e => e.id);
const math = document.querySelectorAll('.math').length;
const untypeset = [...document.querySelectorAll('.math')].filter(m => !m.querySelector('mjx-container'))
  .map(m => m.textContent.slice(0, 80));
const mathjax = [...document.scripts].map(s => s.src).filter(s => /mathjax/i.test(s));
const claims = [...document.querySelectorAll('table.claims-table')].map(t => t.querySelectorAll('tbody tr').length);
return {broken: broken, emptyFigures: emptyFigures, links: links, csv: csv, ids: ids, text: document.body.innerText,
        images: document.images.length, math: math, untypeset: untypeset,
        mjx: document.querySelectorAll('mjx-container').length, mathjax: mathjax, claims: claims};
"""


def open_page(browser, url: str) -> dict:
    """Load a page, wait for MathJax to finish typesetting (if the page has math), inspect it."""
    browser.get(url)
    browser.set_script_timeout(40)
    status = browser.execute_async_script(MATHJAX_DONE)
    info = browser.execute_script(PAGE_CHECK)
    if status == "no math" and info["math"]:  # math appeared after the first look (a CI run under load saw
        status = browser.execute_async_script(MATHJAX_DONE)  # this once): wait for MathJax on it, look again
        info = browser.execute_script(PAGE_CHECK)
    info["mathjax_status"] = status
    return info


def math_problems(page: str, info: dict, base: str) -> list[str]:
    """Math that MathJax did not typeset, or a MathJax not served by the book itself."""
    if not info["math"]:
        return []
    out = []
    if info["mathjax_status"] != "typeset":
        out.append(f"{page}: MathJax: {info['mathjax_status']}")
    if info["untypeset"] or not info["mjx"]:
        out.append(f"{page}: {len(info['untypeset'])} of {info['math']} math elements not typeset "
                   f"(e.g. {info['untypeset'][:2]})")
    if local_mathjax() is not None and not all(src.startswith(base) for src in info["mathjax"]):
        out.append(f"{page}: MathJax is not served by the book itself: {info['mathjax']}")
    return out


LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Fetches from the local server directly, whatever proxy the environment names."""


def csv_problems(page: str, links: list[str], base: str, checked: dict) -> list[str]:
    """Every "download CSV" link gives a non-empty table that parses as CSV (each fetched once)."""
    out = []
    for link in links:
        if link in checked:
            continue
        if not link.startswith(base):
            checked[link] = f"{page}: CSV link outside the book: {link}"
        else:
            try:
                with LOCAL.open(link, timeout=30) as response:
                    body = response.read().decode("utf-8")
                rows = list(csv.reader(io.StringIO(body)))
                width = len(rows[0]) if rows else 0
                if len(rows) < 2 or width == 0 or any(len(r) != width for r in rows):
                    checked[link] = f"{page}: {link} is not a CSV table ({len(rows)} rows)"
                else:
                    checked[link] = None
            except Exception as err:  # noqa: BLE001
                checked[link] = f"{page}: CSV link {link} fails: {err}"
        if checked[link]:
            out.append(checked[link])
    return out


def test_every_page_renders_cleanly(server, browser):
    base, html = server
    pages = sorted(p.relative_to(html).as_posix() for p in html.rglob("*.html") if "_static" not in p.parts)
    assert "index.html" in pages
    problems, ids_by_page, links_by_page, images, csv_checked, math_pages = [], {}, {}, 0, {}, 0
    for page in pages:
        info = open_page(browser, f"{base}/{page}")
        images += info["images"]
        math_pages += bool(info["math"])
        ids_by_page[page] = set(info["ids"])
        links_by_page[page] = info["links"]
        problems += [f"{page}: broken image {src}" for src in info["broken"]]
        problems += [f"{page}: empty figure {html_}" for html_ in info["emptyFigures"]]
        problems += [f"{page}: contains {bad!r}" for bad in BAD_TEXT if bad in info["text"]]
        problems += [f"{page}: raw glue key {key!r}" for key in sorted(set(RAW_GLUE_KEY.findall(info["text"])))]
        problems += math_problems(page, info, base)
        problems += csv_problems(page, info["csv"], base, csv_checked)
    for page, links in links_by_page.items():
        for link in links:
            url = urlparse(link)
            if not link.startswith(base):
                continue
            target = unquote(url.path).lstrip("/") or "index.html"
            if target.endswith("/"):
                target += "index.html"
            if not (html / target).exists():
                problems.append(f"{page}: broken link {link}")
            elif url.fragment and target in ids_by_page and url.fragment not in ids_by_page[target]:
                problems.append(f"{page}: broken anchor {link}")
    assert not problems, "\n".join(problems)
    assert images > 0, "the book shows no figure at all"
    assert math_pages > 0, "no page has math: the MathJax check checked nothing"
    chapters = [p for p in pages if p.startswith("book/chapters/")]
    without_csv = [p for p in chapters if not any(link.endswith(".csv") for link in links_by_page[p])]
    assert not without_csv, f"chapters without a 'download CSV' link: {without_csv}"
    assert csv_checked, "no 'download CSV' link in the book"


def test_landing_claims_table_has_one_row_per_claim(server, browser, smoke_book):
    """The landing page's claims table (class ``claims-table``) lists every claim of the discussion."""
    base, html = server
    out, _ = smoke_book
    n_claims = int(read_glued(out / "_build" / "src" / "book" / "chapters" / "07_discussion.ipynb")["n_claims"])
    info = open_page(browser, f"{base}/{landing_page(html)}")
    assert info["claims"], "the landing page shows no table of class 'claims-table'"
    assert info["claims"] == [n_claims], f"claims-table rows {info['claims']} != {n_claims} claims of the discussion"


LANDING_ORDER = """
const top = e => e ? e.getBoundingClientRect().top + window.scrollY : null;
const answers = document.querySelector('ul.impact-answers');
const forest = document.querySelector('a[href$="forest.csv"]');
const table = document.querySelector(arguments[0]);
return {answers: answers ? answers.querySelectorAll('li').length : 0, answersTop: top(answers),
        forestTop: top(forest), tableTop: top(table), screen: window.innerHeight,
        images: [...document.images].filter(i => top(i) < top(table) && i.naturalWidth > 0).length};
"""


@pytest.mark.parametrize("page, table", [(None, "table.claims-table"),
                                         ("book/chapters/07_discussion.html", "table.claims-compact")])
def test_the_landing_page_and_discussion_open_with_the_answer_then_every_claim_in_one_picture(server, browser,
                                                                                             smoke_book, page, table):
    """A reader's first screen holds the answer per question; the forest plot (with its data as CSV) comes
    before the long claims table; on the landing page and in the discussion."""
    base, html = server
    browser.get(f"{base}/{page or landing_page(html)}")
    order = browser.execute_script(LANDING_ORDER, table)
    assert order["answers"] >= 5, order  # pruning, neuron, layer, circuit, model (and chapter 6's)
    assert order["answersTop"] < order["screen"], order  # on the first screen
    assert order["forestTop"] is not None and order["answersTop"] < order["forestTop"] < order["tableTop"], order
    assert order["images"] >= 1, order  # the forest plot itself, above the table


def test_screenshots_for_the_record(server, browser):
    base, html = server
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    chapter = sorted((html / "book" / "chapters").glob("*.html"))[0]
    for name, page in (("landing", "index.html"), (chapter.stem, chapter.relative_to(html).as_posix())):
        browser.get(f"{base}/{page}")
        path = SCREENSHOTS / f"{name}.png"
        assert browser.save_screenshot(str(path)) and path.stat().st_size > 10_000


TABLE_FIT = """
const t = document.querySelector(arguments[0]);
if (!t) { return null; }
const verdicts = [...t.querySelectorAll('tbody tr')].map(r => r.lastElementChild.getBoundingClientRect().right);
return {rows: t.querySelectorAll('tbody tr').length, table: t.scrollWidth, container: t.parentElement.clientWidth,
        viewport: document.documentElement.clientWidth, page: document.documentElement.scrollWidth,
        rightmost: Math.max(...verdicts)};
"""


@pytest.mark.parametrize("page, table", [("book/chapters/07_discussion.html", "table.claims-compact"),
                                         ("book/intro.html", "table.claims-table")])
@pytest.mark.parametrize("width", [1280, 400])
def test_the_claims_tables_fit_the_page(server, browser, smoke_book, width, page, table):
    """At a laptop's and a phone's width the discussion's and the landing page's claims tables do not
    overflow their container, every verdict cell lies inside the viewport and the page itself does not
    scroll sideways (no horizontal scrolling to read a verdict). Last in this file: it resizes the shared
    browser window."""
    base, html = server
    out, _ = smoke_book
    n_claims = int(read_glued(out / "_build" / "src" / "book" / "chapters" / "07_discussion.ipynb")["n_claims"])
    try:
        browser.set_window_size(width, 1600)
        browser.get(f"{base}/{page}")
        fit = browser.execute_script(TABLE_FIT, table)
    finally:
        browser.set_window_size(1280, 1600)
    assert fit is not None, f"{page} shows no {table}"
    assert fit["rows"] == n_claims
    assert fit["table"] <= fit["container"] + 1, fit
    assert fit["rightmost"] <= fit["viewport"] + 1, fit
    assert fit["page"] <= fit["viewport"] + 1, fit
