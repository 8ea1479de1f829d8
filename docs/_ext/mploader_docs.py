"""The site's own Sphinx extension: what makes the documentation follow the code.

- ``<!-- public-api -->`` in a page is replaced, as the page is read, by one
  section per name of ``mploader.__all__`` with its autodoc entry, so a name
  added to the package appears in the reference without an edit here.
- Checks, reported as warnings (``-W``: the build fails): every public name
  has a docstring and is mentioned outside the generated reference; every
  public error has an entry in troubleshooting.md; every parameter of
  ``MPLoader`` is named on the reference page.
- Lines ``# docs-test: ...`` in code blocks (the markers of
  ``docs_tests/run_blocks.py``: skip a block, or run it only where a module
  is installed) are left out of the pages: they are for the runner, not for
  the reader.
"""
from __future__ import annotations

import inspect
import os
import re

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util import logging

log = logging.getLogger(__name__)

PUBLIC_API_MARK = "<!-- public-api -->"
CODE_WIDTH = 84
INPUT_SIZES = {"0.57"}   # MiB of the 224x224x3 float32 image of the benchmark's (h)
MARKER = re.compile(r"^[ \t]*# docs-test:.*(\n|$)", re.MULTILINE)


def public_names() -> list[str]:
    import mploader
    return list(mploader.__all__)


def api_section(name: str) -> str:
    """The MyST text of one public name's reference section (autodoc writes
    reStructuredText, so its directive goes through ``eval-rst``)."""
    import mploader
    obj = getattr(mploader, name)
    if inspect.isclass(obj):
        directive = "autoclass"
        options = "   :members:\n   :show-inheritance:\n"
        if name == "MPLoader":
            options += "   :special-members: __iter__, __len__, __enter__, __exit__\n"
    else:
        directive, options = "autofunction", ""
    return (f"## `{name}`\n\n```{{eval-rst}}\n.. {directive}:: mploader.{name}\n{options}```\n\n")


def on_source_read(app: Sphinx, docname: str, source: list[str]) -> None:
    if PUBLIC_API_MARK in source[0]:
        text = "".join(api_section(name) for name in public_names())
        source[0] = source[0].replace(PUBLIC_API_MARK, text)


def on_doctree_read(app: Sphinx, doctree: nodes.document) -> None:
    """Leave the runner's markers out of the rendered code blocks."""
    for block in list(doctree.findall(nodes.literal_block)):
        text = block.astext()
        if "# docs-test:" not in text:
            continue
        kept = MARKER.sub("", text)
        new = nodes.literal_block(kept, kept, **block.attributes)
        block.replace_self(new)


def _page_texts(srcdir: str) -> dict[str, str]:
    texts = {}
    for root, dirs, files in os.walk(srcdir):
        dirs[:] = [d for d in dirs if not d.startswith(("_", "."))]
        for name in files:
            if name.endswith(".md"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as f:
                    texts[os.path.relpath(path, srcdir)] = f.read()
    return texts


def on_builder_inited(app: Sphinx) -> None:
    """The checks that tie the site to the package."""
    import mploader
    from mploader import errors

    texts = _page_texts(app.srcdir)
    written = "\n".join(text for page, text in texts.items())
    for name in public_names():
        obj = getattr(mploader, name)
        if not (inspect.getdoc(obj) or "").strip():
            log.warning("mploader.%s has no docstring: every public name needs one "
                        "(the reference is made from them)", name)
        if not re.search(rf"\b{re.escape(name)}\b", written):
            log.warning("mploader.%s is mentioned on no page of the site: say in a guide "
                        "what it is for (the reference lists it, but nobody finds it there)",
                        name)

    trouble = texts.get("troubleshooting.md", "")
    headings = set(re.findall(r"^#{2,3} `?([A-Za-z_]+)`?", trouble, re.MULTILINE))
    for name in public_names():
        obj = getattr(mploader, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException) \
                and obj.__module__ == errors.__name__ and name not in headings:
            log.warning("troubleshooting.md has no section for the public error %s", name)

    # The tests the guarantees page names exist (a renamed test must not leave a
    # promise pointing at nothing).
    repo = os.path.dirname(app.srcdir)
    defined = set()
    for folder in ("tests", "ecosystem_tests"):
        for root, _, files in os.walk(os.path.join(repo, folder)):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(root, name), encoding="utf-8") as f:
                        defined |= set(re.findall(r"^\s*def (test_\w+)", f.read(), re.MULTILINE))
    for test in sorted(set(re.findall(r"`(test_\w+)`", texts.get("guarantees.md", "")))):
        if test not in defined:
            log.warning("guarantees.md names %s, which no test in tests/ defines", test)

    # Code a reader can read without scrolling sideways: furo's column shows
    # about 86 characters of code.  (guides/ray.md is left to its own author.)
    for page, text in texts.items():
        if page == os.path.join("guides", "ray.md"):
            continue
        inside = False
        for number, line in enumerate(text.split("\n"), 1):
            if line.startswith("```"):
                inside = line.startswith("```python")
            elif inside and len(line) > CODE_WIDTH:
                log.warning("%s:%d: a code line of %d characters (at most %d show without "
                            "scrolling)", page, number, len(line), CODE_WIDTH)

    # No figure that `make bench` did not write: every decimal number of the
    # performance and guarantees pages, and of README's table of figures, is
    # one of benchmarks/results/results.md (sizes of inputs excepted).
    results_md = os.path.join(repo, "benchmarks", "results", "results.md")
    with open(results_md, encoding="utf-8") as f:
        measured = f.read()
    with open(os.path.join(repo, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    figures = {"performance.md": texts.get("performance.md", ""),
               "guarantees.md": texts.get("guarantees.md", ""),
               "README.md (its table of figures)":
                   readme[readme.find("## What it promises"):]}
    for page, text in figures.items():
        for number in sorted(set(re.findall(r"(?<![\w.])\d+\.\d+(?![\w.]*\d)", text))):
            if number not in measured and number not in INPUT_SIZES:
                log.warning("%s gives the figure %s, which benchmarks/results/results.md "
                            "does not hold: figures come from `make bench`", page, number)

    reference = texts.get("reference.md", "")
    params = [p for p in inspect.signature(mploader.MPLoader.__init__).parameters
              if p != "self"]
    for param in params:
        if f"`{param}`" not in reference and f"{param}=" not in reference:
            log.warning("reference.md does not name MPLoader's parameter %r", param)
    doc = inspect.getdoc(mploader.MPLoader) or ""
    undocumented = [p for p in params if not re.search(rf"\b{p}\b", doc)]
    if undocumented:
        # loader.py's docstring is the package's to complete; the reference page
        # documents every parameter meanwhile (checked above).
        log.info("note: MPLoader's docstring does not name %d of its %d parameters: %s",
                 len(undocumented), len(params), ", ".join(undocumented))


def setup(app: Sphinx) -> dict:
    app.connect("source-read", on_source_read)
    app.connect("doctree-read", on_doctree_read)
    app.connect("builder-inited", on_builder_inited)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
