"""Run the Python code blocks of README.md and of the documentation's pages.

Every fenced block whose language is ``python`` runs; the blocks of one page
run in order, in one namespace (as a reader pasting the page top to bottom
would), in a fresh interpreter whose working directory is an empty temporary
directory, with this checkout's ``mploader`` first on ``sys.path``.  A page
whose block raises fails the run, naming the page, the block's first line and
the traceback.

A block is left out only by an explicit marker, a comment line in the block
(the site does not show these lines):

    # docs-test: skip <why>           never run (a multi-host recipe, your own data)
    # docs-test: needs tensorflow     run where the module is installed, else skipped

``needs`` names one or more modules (``needs monai, torchio``).  A page
listed in ``UNMARKED`` (below) has its unmarked blocks skipped, each counted
and printed with the reason, and a NOTICE: for a page written elsewhere whose
author has not marked its blocks yet.  A page with a block that needs a
module of ``LOOPBACK_ONLY`` (Ray: a local Ray instance binds the machine's
network address) runs in a private network namespace with only loopback up
(``unshare -n``, as ``make test-ray`` runs; it needs root, as CI has), or, where
none can be made, has those blocks skipped and counted.  Every page runs with
its own Ray temporary directory and without ``RAY_ADDRESS``, so that a block
starts its own local Ray instance rather than join a cluster that happens to
run on the machine.  The page runs
on the first interpreter that can run the most of its blocks: this one, then
each of ``--python`` (``make docs`` passes ``.venv/bin/python``, which holds
TensorFlow after ``make demo`` or ``make test``, ``.venv-ecosystem``'s,
which holds MONAI and TorchIO, and ``.venv-ray``'s, which holds Ray, when they
exist).  A block needing what no
interpreter has is skipped and counted.  The run prints how many blocks ran
and how many were skipped, and why.

A page may have a setup file, ``docs_tests/setup/<page path with / as __>.py``
(``README.md.py``, ``guides__tensorflow.md.py``), run before its blocks: the
stand-ins for what a snippet leaves to the reader (``paths``, ``model``).

    python docs_tests/run_blocks.py [--python PY]... [PAGE.md ...]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP_DIR = os.path.join(ROOT, "docs_tests", "setup")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")
MARKER = re.compile(r"^[ \t]*#[ \t]*docs-test:[ \t]*(?P<what>skip|needs)\b[ \t]*(?P<rest>.*)$")
PAGE_TIMEOUT_S = 420
# Pages whose author has not marked their blocks yet, and why their unmarked
# blocks cannot run here: those are skipped, counted and printed with a
# NOTICE (a marked block follows its marker).  Remove an entry once its page
# marks its blocks.
UNMARKED: dict[str, str] = {}
# Modules whose blocks run only in a network namespace of their own, and why.
LOOPBACK_ONLY = {
    "ray": "a local Ray instance binds the machine's network address, so its blocks "
           "run only with loopback alone (unshare -n, which needs root)",
}
ISOLATE = ["unshare", "-n", "bash", "-c", 'ip link set lo up && exec "$@"', "isolated"]


@dataclass
class Block:
    page: str
    line: int                      # of the block's first code line, 1-based
    code: str
    skip: str | None = None        # why, when marked skip
    needs: tuple[str, ...] = ()


@dataclass
class PageResult:
    page: str
    ran: int = 0
    skipped: list[tuple[Block, str]] = field(default_factory=list)
    python: str = ""
    seconds: float = 0.0
    error: str | None = None


def blocks_of(page: str) -> list[Block]:
    """The ``python`` blocks of a Markdown page, with their markers."""
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        lines = f.read().split("\n")
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group("fence"), m.group("info").strip()
        lang = info[len("{code-block}"):].strip() if info.startswith("{code-block}") else info
        lang = lang.split()[0] if lang else ""
        start, j = i + 1, i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence[0] * len(fence))
                                      and lines[j].strip().strip(fence[0]) == ""):
            j += 1
        body = lines[start:j]
        if lang in ("python", "py", "python3"):
            block = Block(page, start + 1, "\n".join(body))
            for text in body:
                mark = MARKER.match(text)
                if mark and mark.group("what") == "skip":
                    block.skip = "marked skip: " + (mark.group("rest").strip() or "no reason given")
                elif mark:
                    block.needs += tuple(n.strip() for n in mark.group("rest").split(",")
                                         if n.strip())
            if page in UNMARKED and not block.skip and not block.needs:
                block.skip = "unmarked, on a page listed in UNMARKED (see the NOTICE)"
            found.append(block)
        i = j + 1
    return found


@functools.lru_cache(maxsize=None)
def can_isolate() -> bool:
    """Whether this process can run a command in a network namespace of its
    own with loopback up (``ISOLATE``)."""
    try:
        return subprocess.run(ISOLATE + ["true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.lru_cache(maxsize=None)
def has_module(python: str, module: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


DRIVER = r"""
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
ns = {"__name__": "__main__"}
for block in blocks:
    print(f"-- {block['where']}", flush=True)
    try:
        exec(compile(block["code"], block["file"], "exec"), ns)
    except BaseException:
        traceback.print_exc()
        print(f"FAILED: the block at {block['where']}", flush=True)
        sys.exit(1)
"""


def run_page(page: str, pythons: list[str]) -> PageResult:
    result = PageResult(page)
    blocks = blocks_of(page)
    if not blocks:
        return result
    best, best_count = pythons[0], -1
    for python in pythons:
        count = sum(1 for b in blocks
                    if not b.skip and all(has_module(python, m) for m in b.needs))
        if count > best_count:
            best, best_count = python, count
    result.python = best
    runnable = []
    for b in blocks:
        isolated = [m for m in b.needs if m in LOOPBACK_ONLY]
        if b.skip:
            result.skipped.append((b, b.skip))
        elif not all(has_module(best, m) for m in b.needs):
            missing = [m for m in b.needs if not has_module(best, m)]
            result.skipped.append((b, f"needs {', '.join(missing)}: not installed"))
        elif isolated and not can_isolate():
            result.skipped.append((b, f"needs {isolated[0]}: "
                                      f"{LOOPBACK_ONLY[isolated[0]]}, and unshare -n failed"))
        else:
            runnable.append(b)
    isolate = any(m in LOOPBACK_ONLY for b in runnable for m in b.needs)
    payload = []
    setup = os.path.join(SETUP_DIR, page.replace("/", "__") + ".py")
    if os.path.exists(setup):
        with open(setup, encoding="utf-8") as f:
            payload.append({"where": os.path.relpath(setup, ROOT), "file": setup,
                            "code": f.read()})
    for b in runnable:
        # Padded so that a traceback's line numbers are the page's own.
        payload.append({"where": f"{page}:{b.line}", "file": os.path.join(ROOT, page),
                        "code": "\n" * (b.line - 1) + b.code})
    if not runnable:
        return result
    with tempfile.TemporaryDirectory(prefix="docs-blocks-") as tmp:
        blocks_json = os.path.join(tmp, "blocks.json")
        with open(blocks_json, "w") as f:
            json.dump(payload, f)
        work = os.path.join(tmp, "work")
        os.mkdir(work)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
            TF_CPP_MIN_LOG_LEVEL="2", MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1",
            RAY_TMPDIR=tmp)
        env.pop("RAY_ADDRESS", None)
        command = [best, "-c", DRIVER, blocks_json]
        start = time.monotonic()
        try:
            proc = subprocess.run(ISOLATE + command if isolate else command, cwd=work,
                                  env=env, capture_output=True, text=True,
                                  timeout=PAGE_TIMEOUT_S)
            failed = proc.returncode != 0
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            failed = True
            output = f"{e.stdout or ''}{e.stderr or ''}\nTIMEOUT after {PAGE_TIMEOUT_S} s"
        result.seconds = time.monotonic() - start
    result.ran = len(runnable)
    if failed:
        result.error = output[-6000:]
    return result


def default_pages() -> list[str]:
    pages = ["README.md"]
    for root, dirs, files in os.walk(os.path.join(ROOT, "docs")):
        dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
        pages += sorted(os.path.relpath(os.path.join(root, f), ROOT)
                        for f in files if f.endswith(".md"))
    return pages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pages", nargs="*", help="pages relative to the repository root")
    parser.add_argument("--python", action="append", default=[],
                        help="another interpreter to run pages on (if it exists)")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    pythons = [sys.executable] + [os.path.abspath(p) for p in args.python if os.path.exists(p)]
    pages = args.pages or default_pages()
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda p: run_page(p, pythons), pages))
    ran = sum(r.ran for r in results)
    skipped = sum(len(r.skipped) for r in results)
    failed = [r for r in results if r.error]
    for r in results:
        if not r.ran and not r.skipped:
            continue
        where = os.path.relpath(r.python, ROOT) if r.python.startswith(ROOT) else r.python
        state = "FAILED" if r.error else "ok"
        print(f"  {r.page}: {r.ran} ran, {len(r.skipped)} skipped "
              f"({state}, {r.seconds:.1f} s on {where})")
        for block, why in r.skipped:
            print(f"      skipped {block.page}:{block.line}: {why}")
    for page in UNMARKED:
        if any("in UNMARKED" in why for r in results if r.page == page
               for _, why in r.skipped):
            print(f"NOTICE: {page} has unmarked blocks, not run: {UNMARKED[page]}")
    for r in failed:
        print(f"\n== {r.page} failed:\n{r.error}")
    print(f"docs code blocks: {ran} ran, {skipped} skipped, {len(failed)} page(s) failed "
          f"({time.monotonic() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
