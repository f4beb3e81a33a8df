"""A real browser reads the built book: headless Chromium (Debian's) driven by Selenium.

Every page is opened from a local HTTP server; the test fails on a broken image, a broken
internal link, a Python traceback or papermill error banner, or an unrendered glue role.
Screenshots of the landing page and of a chapter are saved for the record.
"""
from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from impact_core.config import REPO_ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOTS = Path(os.environ.get("IMPACT_SCREENSHOTS", REPO_ROOT / "_build" / "screenshots"))
BAD_TEXT = ("Traceback (most recent call last)", "PapermillExecutionError", "An Exception was encountered",
            "{glue:", "glue target not found")

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (make test installs them as root)")


@pytest.fixture(scope="module")
def server(smoke_book):
    _, html = smoke_book
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(html))
    handler.log_message = lambda *a, **k: None
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


PAGE_CHECK = """
const broken = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src);
const links = [...document.querySelectorAll('a[href]')].map(a => a.href);
const ids = [...document.querySelectorAll('[id]')].map(e => e.id);
return {broken: broken, links: links, ids: ids, text: document.body.innerText,
        images: document.images.length};
"""


def test_every_page_renders_cleanly(server, browser):
    base, html = server
    pages = sorted(p.relative_to(html).as_posix() for p in html.rglob("*.html") if "_static" not in p.parts)
    assert "index.html" in pages
    problems, ids_by_page, links_by_page, images = [], {}, {}, 0
    for page in pages:
        browser.get(f"{base}/{page}")
        info = browser.execute_script(PAGE_CHECK)
        images += info["images"]
        ids_by_page[page] = set(info["ids"])
        links_by_page[page] = info["links"]
        problems += [f"{page}: broken image {src}" for src in info["broken"]]
        problems += [f"{page}: contains {bad!r}" for bad in BAD_TEXT if bad in info["text"]]
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


def test_screenshots_for_the_record(server, browser):
    base, html = server
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    chapter = sorted((html / "book" / "chapters").glob("*.html"))[0]
    for name, page in (("landing", "index.html"), (chapter.stem, chapter.relative_to(html).as_posix())):
        browser.get(f"{base}/{page}")
        path = SCREENSHOTS / f"{name}.png"
        assert browser.save_screenshot(str(path)) and path.stat().st_size > 10_000
