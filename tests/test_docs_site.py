"""The documentation site builds with --strict and works in a real browser.

The site (mkdocs.yml, docs/) is built into a temporary folder, served on localhost by http.server in a thread and
opened in headless Chromium through Selenium and the system's chromedriver (Debian: apt-get install chromium
chromium-driver; a browser that downloads itself cannot be fetched here). Each main page must render its title and
heading with every figure loaded, and the site's search must find "Picard". Without Chromium, chromedriver or
selenium the browser test skips, saying which is missing; the strict build runs regardless.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# page (its folder in the built site) -> (its title in the navigation, the main heading it shows)
PAGES = {
    "": ("difflab", "difflab"),
    "getting-started/": ("Getting started", "Getting started"),
    "training/": ("Training", "Training"),
    "sampling/": ("Sampling and parallel sampling", "Sampling and parallel sampling"),
    "images/": ("Images and FID", "Images and FID"),
    "diffusers/": ("Bring your own model", "Bring your own model (diffusers in and out)"),
    "studies/": ("Studies", "Studies"),
    "safety/": ("Many processes and safety", "Many processes, kills and bad input"),
    "results/": ("Results", "Results"),
    "architecture/": ("How difflab is put together", "How difflab is put together"),
    "layout/": ("Layout", "Layout"),
    "changelog/": ("Changelog", "Changelog"),
    "api/": ("API reference", "API reference"),
    "api/runs/": ("difflab.runs", "difflab.runs"),
    "reference/cli/": ("CLI reference", "CLI reference"),
    "reference/config/": ("Config reference", "Config reference"),
}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built with --strict: a warning (a broken link or anchor, a missing figure, a docstring the API
    reference cannot render) fails the build."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, ("mkdocs build --strict failed (the docs extra: pip install -e '.[docs]'):\n"
                                  + done.stdout[-3000:] + done.stderr[-5000:])
    return out


def test_the_site_builds_strictly_with_every_page_and_figure(site):
    for page in PAGES:
        assert (site / page / "index.html").is_file(), page
    for png in (ROOT / "docs").glob("*.png"):  # the figures the pages show are published beside them
        assert (site / png.name).is_file(), png.name
    assert (site / "search" / "search_index.json").is_file()
    api = (site / "api" / "runs" / "index.html").read_text()
    assert "<code>RunConfig</code>" in api and ":class:" not in api and ":meth:" not in api  # (the roles hook)


@pytest.fixture(scope="module")
def server(site):
    """The built site on http://127.0.0.1:PORT/, served by a thread."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request lines in the test output
        pass


def _missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[docs]')"
    if not CHROMEDRIVER.is_file():
        return f"{CHROMEDRIVER} is missing (apt-get install -y chromium-driver)"
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        return "chromium is missing (apt-get install -y chromium)"
    return None


@pytest.fixture(scope="module")
def browser():
    reason = _missing()
    if reason:
        pytest.skip(f"no headless browser for the docs site: {reason}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    options.binary_location = binary
    # Offline but for the local site: a name to resolve (the theme's web fonts) fails at once instead of stalling a
    # page load for the resolver's timeout (5 s, now and then) on a machine without a network; every figure the test
    # checks is served from 127.0.0.1
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_the_main_pages_render_with_their_figures(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    shown = set()
    for page, (title, heading) in PAGES.items():
        browser.get(server + page)
        WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
        assert browser.title == (title if not page else f"{title} - difflab"), (page, browser.title)
        h1 = browser.find_element(By.CSS_SELECTOR, "article h1")
        assert h1.text.strip().rstrip("¶").strip() == heading, (page, h1.text)
        images = browser.find_elements(By.CSS_SELECTOR, "article img")
        for img in images:  # every figure of the content loaded and decoded
            WebDriverWait(browser, 30).until(lambda d, img=img: d.execute_script("return arguments[0].complete", img))
            width = browser.execute_script("return arguments[0].naturalWidth", img)
            assert width > 0, (page, img.get_attribute("src"))
        shown |= {img.get_attribute("src").rsplit("/", 1)[1] for img in images}
    # every figure of docs/ is shown on a page (the ten the README showed are on Results, the home page has one)
    assert shown == {png.name for png in (ROOT / "docs").glob("*.png")}


def test_the_search_finds_picard(server, browser):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
    # Material's search box sits in the header (at this window width; a narrow one opens it from a button)
    box = WebDriverWait(browser, 30).until(ec.element_to_be_clickable((By.CSS_SELECTOR, "input.md-search__input")))
    box.click()
    box.send_keys("Picard")
    # the list is redrawn as each letter lands (its elements go stale): read the texts in one script, and wait until
    # the list answers the whole word
    read = ("return [document.querySelector('.md-search-result__meta')?.innerText || '', "
            "Array.from(document.querySelectorAll('.md-search-result__item')).map(e => e.innerText)]")

    def answered(d):
        meta, items = d.execute_script(read)
        return (meta, items) if any("picard" in t.lower() for t in items) else False

    try:
        meta, items = WebDriverWait(browser, 60).until(answered)
    except TimeoutException:
        raise AssertionError(f"no search result mentions Picard: {browser.execute_script(read)}") from None
    assert "matching" in meta.lower() and not meta.lower().startswith("no "), meta
