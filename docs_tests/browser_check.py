"""Look at the built site as a reader would: headless Chromium over HTTP.

Serves the built HTML (``docs/_build/html``) on 127.0.0.1, then:

- checks every internal link of every page: the target file exists and, for a
  link with a ``#fragment``, the target page has an element with that id;
- opens the main pages in Debian's Chromium (``/usr/bin/chromium``, driven by
  Playwright from PyPI; Playwright's own browsers are never downloaded), fails
  a page that logs a JavaScript error, has an image that did not load, or
  renders a main text narrower than a reader needs, and saves a full-page
  screenshot of each under ``docs/_build/screenshots/``.

    python docs_tests/browser_check.py [BUILD_DIR]
"""
from __future__ import annotations

import functools
import http.server
import os
import sys
import threading
import time
from html.parser import HTMLParser
from urllib.parse import unquote, urldefrag, urljoin, urlparse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
MAIN_PAGES = ["index.html", "getting-started.html", "guides/tensorflow.html",
              "guides/medical.html", "guides/shapes.html", "guides/cache.html",
              "guides/epochs.html", "guides/threads.html", "guides/ray.html",
              "reference.html", "guarantees.html", "performance.html",
              "how-it-works.html", "troubleshooting.html", "changes.html"]


class Links(HTMLParser):
    """The ids of a page and the links (href, src) it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for key in ("id", "name"):
            if values.get(key):
                self.ids.add(values[key])  # type: ignore[arg-type]
        if tag == "a" and values.get("href"):
            self.links.append(values["href"])  # type: ignore[arg-type]
        if tag in ("img", "script") and values.get("src"):
            self.links.append(values["src"])  # type: ignore[arg-type]
        if tag == "link" and values.get("href") and values.get("rel") in ("stylesheet",):
            self.links.append(values["href"])  # type: ignore[arg-type]


@functools.lru_cache(maxsize=None)
def parse(path: str) -> Links:
    parser = Links()
    with open(path, encoding="utf-8") as f:
        parser.feed(f.read())
    return parser


def check_links(build: str) -> tuple[int, list[str]]:
    """Every internal link of every built page resolves: (links checked, problems)."""
    problems, checked = [], 0
    for root, dirs, files in os.walk(build):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "_sources"]
        for name in files:
            if not name.endswith(".html"):
                continue
            page = os.path.join(root, name)
            rel = os.path.relpath(page, build)
            for link in parse(page).links:
                url = urlparse(link)
                if url.scheme or link.startswith("//") or link.startswith("mailto:"):
                    continue                         # external: not this check's business
                target, fragment = urldefrag(urljoin("/" + rel.replace(os.sep, "/"), link))
                target = urlparse(target).path                 # without ?v=... (cache busting)
                path = os.path.join(build, unquote(target).lstrip("/"))
                if target.endswith("/") or os.path.isdir(path):
                    path = os.path.join(path, "index.html")
                checked += 1
                if not os.path.isfile(path):
                    problems.append(f"{rel}: the link {link!r} points to a missing file")
                elif fragment and path.endswith(".html") and unquote(fragment) not in parse(path).ids:
                    problems.append(f"{rel}: the link {link!r} names #{fragment}, which "
                                    f"{os.path.relpath(path, build)} does not have")
    return checked, problems


def serve(build: str) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass
    handler = functools.partial(Quiet, directory=build)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def look(build: str, shots: str) -> list[str]:
    """Open the main pages in Chromium; screenshots; what looks wrong."""
    from playwright.sync_api import sync_playwright

    problems = []
    server, base = serve(build)
    os.makedirs(shots, exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox", "--disable-gpu",
                                              "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            # A browser asks for /favicon.ico by itself: no page links it, so its 404 is no error.
            page.on("console", lambda m: errors.append(m.text)
                    if m.type == "error" and "Failed to load resource" not in m.text else None)
            page.on("response", lambda r: errors.append(f"HTTP {r.status} for {r.url}")
                    if r.status >= 400 and not r.url.endswith("/favicon.ico") else None)
            for rel in MAIN_PAGES:
                if not os.path.exists(os.path.join(build, rel)):
                    problems.append(f"{rel}: a main page was not built")
                    continue
                errors.clear()
                response = page.goto(base + rel, wait_until="load")
                if response is None or response.status != 200:
                    problems.append(f"{rel}: HTTP {response.status if response else 'no response'}")
                    continue
                title = page.title()
                broken = page.evaluate(
                    "() => Array.from(document.images).filter(i => !i.complete || "
                    "i.naturalWidth === 0).map(i => i.getAttribute('src'))")
                width = page.evaluate(
                    "() => { const a = document.querySelector('article') || document.body;"
                    " return a.getBoundingClientRect().width; }")
                heading = page.evaluate(
                    "() => (document.querySelector('article h1') || {}).textContent || ''")
                text = page.inner_text("article") if page.query_selector("article") else ""
                for raw in (".. py:", ".. auto", "```{", "{eval-rst}", ":members:"):
                    if raw in text:
                        problems.append(f"{rel}: markup shows as text: {raw!r}")
                shot = os.path.join(shots, rel.replace("/", "__").replace(".html", ".png"))
                page.screenshot(path=shot, full_page=True)
                for text in errors:
                    problems.append(f"{rel}: the browser logged an error: {text}")
                for src in broken:
                    problems.append(f"{rel}: the image {src} did not load")
                if width < 400:
                    problems.append(f"{rel}: the main text is {width:.0f} px wide")
                if not heading.strip():
                    problems.append(f"{rel}: no heading shows")
                print(f"  {rel}: {title!r}, screenshot {os.path.relpath(shot, ROOT)}")
            # The narrow screen a phone has: the navigation folds away, text stays readable.
            page.set_viewport_size({"width": 420, "height": 860})
            page.goto(base + "index.html", wait_until="load")
            page.screenshot(path=os.path.join(shots, "index-narrow.png"), full_page=False)
            browser.close()
    finally:
        server.shutdown()
    return problems


def main() -> int:
    build = os.path.abspath(sys.argv[1] if len(sys.argv) > 1
                            else os.path.join(ROOT, "docs", "_build", "html"))
    shots = os.path.join(os.path.dirname(build), "screenshots")
    start = time.monotonic()
    checked, problems = check_links(build)
    print(f"browser check: {checked} internal links checked")
    if not os.path.exists(CHROMIUM):
        problems.append(f"{CHROMIUM} is missing (Debian's chromium package: "
                        "apt-get install chromium)")
    else:
        problems += look(build, shots)
    for problem in problems:
        print(f"  PROBLEM {problem}")
    print(f"browser check: {len(MAIN_PAGES)} main pages, {len(problems)} problem(s) "
          f"({time.monotonic() - start:.0f} s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
