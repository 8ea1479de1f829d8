"""The site's own Sphinx extension: what makes the documentation follow the code.

- ``<!-- public-api -->`` in a page is replaced, as the page is read, by one
  section per name of ``mploader.__all__`` with its autodoc entry, so a name
  added to the package appears in the reference without an edit here.
- Checks, reported as warnings (``-W``: the build fails): every public name,
  and every public method and property of a public class, has a docstring;
  every public name is mentioned outside the generated reference; every
  public error has an entry in troubleshooting.md; every parameter of
  ``MPLoader`` has an entry in its docstring's ``Args:`` section (and no
  entry names a parameter it does not have), and a row in the reference
  page's table whose default is the signature's; no page quotes a decimal
  figure that ``make bench`` did not write (benchmarks/results/results.md).
- Google-style sections of docstrings (``Args:``, ``Raises:``,
  ``Example:``) are read by napoleon, as ``help()`` shows them: see
  :func:`on_process_docstring`.
- Lines ``# docs-test: ...`` in code blocks (the markers of
  ``docs_tests/run_blocks.py``: skip a block, or run it only where a module
  is installed) are left out of the pages: they are for the runner, not for
  the reader.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.ext.napoleon import Config as NapoleonConfig
from sphinx.ext.napoleon.docstring import GoogleDocstring
from sphinx.util import logging

log = logging.getLogger(__name__)

PUBLIC_API_MARK = "<!-- public-api -->"
CODE_WIDTH = 84
# Decimal numbers of the pages' prose that are not measurements, each with what
# it is; a constant of the package is compared with the package's own value.
NOT_FIGURES = {
    "0.57": "MiB of the 224x224x3 float32 image of the benchmark's (h)",
    "0.25": ("seconds between the pool's samples of each worker's memory",
             "mploader.memory_deaths", "SAMPLE_EVERY_S"),
}
# Python's versions, named in prose ("Python 3.10 and 3.13", "OTHER_PYTHONS=...").
PYTHON_VERSION = re.compile(r"3\.1\d")
FIGURE = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.]*\d)")
# napoleon, for the Google-style sections of functions', classes' and methods'
# docstrings; the numpy style is not used here.
NAPOLEON = NapoleonConfig(napoleon_google_docstring=True, napoleon_numpy_docstring=False,
                          napoleon_use_param=True, napoleon_use_rtype=False)
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


def on_process_docstring(app: Sphinx, what: str, name: str, obj: object, options: object,
                         lines: list[str]) -> None:
    """Google-style sections (``Args:``, ``Raises:``, ``Example:``) as napoleon
    reads them, for every docstring but a property's or an attribute's: napoleon
    reads the first line of those as ``type: description``, and "The loader's
    pool and passes: ..." is no type.  (Why not ``sphinx.ext.napoleon`` in
    conf.py: it has no setting to leave properties alone.)"""
    if what in ("attribute", "property", "data"):
        return
    lines[:] = GoogleDocstring(lines, NAPOLEON, app, what, name, obj, options).lines()


def args_documented(doc: str) -> list[str]:
    """The names the ``Args:`` section of a Google-style docstring (as
    ``inspect.getdoc`` gives it) has an entry for: ``name:`` or
    ``name (type):`` at the section's indentation."""
    section = re.search(r"^Args:[ \t]*\n((?:[ \t]+\S.*\n|[ \t]*\n)+)", doc + "\n",
                        re.MULTILINE)
    if section is None:
        return []
    body = section.group(1)
    indent = min(len(line) - len(line.lstrip()) for line in body.split("\n") if line.strip())
    return re.findall(rf"^[ \t]{{{indent}}}(\w+)[ \t]*(?:\([^)\n]*\))?:", body, re.MULTILINE)


def undocumented_members(cls: type) -> list[str]:
    """The public methods and properties ``cls`` defines (and the special
    methods the reference shows) that have no docstring of their own."""
    shown = ("__iter__", "__len__", "__enter__", "__exit__", "__call__")
    missing = []
    for member, value in vars(cls).items():
        if member.startswith("_") and member not in shown:
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if not (isinstance(value, property) or inspect.isfunction(value)):
            continue  # a field, a constant: documented with its class
        if not (value.__doc__ or "").strip():
            missing.append(member)
    return missing


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
        if inspect.isclass(obj):
            for member in undocumented_members(obj):
                log.warning("mploader.%s.%s has no docstring: every public method and "
                            "property needs one (the reference shows them)", name, member)
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
    # about 86 characters of code.
    for page, text in texts.items():
        inside = False
        for number, line in enumerate(text.split("\n"), 1):
            if line.startswith("```"):
                inside = line.startswith("```python")
            elif inside and len(line) > CODE_WIDTH:
                log.warning("%s:%d: a code line of %d characters (at most %d show without "
                            "scrolling)", page, number, len(line), CODE_WIDTH)

    # No figure that `make bench` did not write: every decimal number of every
    # page's prose and of README.md is one of benchmarks/results/results.md.
    # Not checked: code (blocks and `inline`: values of the API, not
    # measurements), Python's versions, and NOT_FIGURES, each with what it is.
    # Whole numbers ("20 ms", "64 MiB") are too often sizes and settings to check.
    results_md = os.path.join(repo, "benchmarks", "results", "results.md")
    with open(results_md, encoding="utf-8") as f:
        measured = f.read()
    with open(os.path.join(repo, "README.md"), encoding="utf-8") as f:
        pages = {"README.md": f.read(), **texts}
    for name, (what, *constant) in ((n, v if isinstance(v, tuple) else (v,))
                                    for n, v in NOT_FIGURES.items()):
        if constant:
            value = getattr(importlib.import_module(constant[0]), constant[1])
            if f"{value:g}" != name:
                log.warning("the pages give %s for %s, and %s.%s is now %r: change the "
                            "pages and NOT_FIGURES", name, what, *constant, value)
    for page, text in pages.items():
        for number, line, before in figures_in(text):
            if number in measured or number in NOT_FIGURES:
                continue
            if PYTHON_VERSION.fullmatch(number) and re.search(r"Python|PYTHONS", before):
                continue
            log.warning("%s:%d gives the figure %s, which benchmarks/results/results.md "
                        "does not hold: figures come from `make bench` (a number that is "
                        "no measurement: NOT_FIGURES in docs/_ext/mploader_docs.py)",
                        page, line, number)

    # MPLoader's parameters: each has an entry in the docstring's Args (what
    # help(MPLoader) and the reference show), and a row in the reference page's
    # table whose default is the signature's.
    signature = inspect.signature(mploader.MPLoader.__init__)
    params = [p for p in signature.parameters if p != "self"]
    documented = args_documented(inspect.getdoc(mploader.MPLoader) or "")
    for param in params:
        if param not in documented:
            log.warning("MPLoader's docstring has no entry for its parameter %r in its "
                        "Args section (loader.py)", param)
    for name in documented:
        if name not in params:
            log.warning("MPLoader's docstring's Args section names %r, which is no "
                        "parameter of MPLoader", name)
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]*?) \|", texts.get("reference.md", ""),
                           re.MULTILINE))
    for param in params:
        default = signature.parameters[param].default
        expected = ("(required)" if default is inspect.Parameter.empty
                    else f"`{default!r}`".replace("'", '"'))
        if param not in rows:
            log.warning("reference.md's table of MPLoader's parameters has no row for %r",
                        param)
        elif rows[param].strip() != expected:
            log.warning("reference.md gives %s as the default of %r; the signature's is %s",
                        rows[param].strip(), param, expected)


def figures_in(text: str) -> list[tuple[str, int, str]]:
    """(number, line, the 80 characters before it) of each decimal number of a
    Markdown page's prose: code blocks and inline code are left out."""
    def blank(m: re.Match) -> str:
        return re.sub(r"[^\n]", " ", m.group())
    prose = re.sub(r"^[ \t]*(`{3,}|~{3,}).*?^[ \t]*\1[ \t]*$", blank, text,
                   flags=re.MULTILINE | re.DOTALL)
    prose = re.sub(r"(?<!`)(`+)(?!`)(?:(?!\n[ \t]*\n).)+?(?<!`)\1(?!`)", blank, prose,
                   flags=re.DOTALL)
    return [(m.group(), prose.count("\n", 0, m.start()) + 1,
             text[max(0, m.start() - 80):m.start()]) for m in FIGURE.finditer(prose)]


def setup(app: Sphinx) -> dict:
    app.connect("autodoc-process-docstring", on_process_docstring)
    app.connect("source-read", on_source_read)
    app.connect("doctree-read", on_doctree_read)
    app.connect("builder-inited", on_builder_inited)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
