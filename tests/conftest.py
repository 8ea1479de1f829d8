"""Shared test helpers, and the leak check that every test runs under.

The autouse fixture ``no_leaks`` fails any test that leaves a child process of
the test runner alive, or a new entry in /dev/shm, a few seconds after it ends.
Lifecycle tests run a real user script in a child interpreter (``run_script``)
and check by pid and /proc that none of its workers remains.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from .procs import LEAK_GRACE_S, shm_entries


@pytest.fixture(autouse=True)
def no_leaks():
    me = psutil.Process()
    before_children = {c.pid for c in me.children(recursive=True)}
    before_shm = shm_entries()
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        extra = [c for c in me.children(recursive=True)
                 if c.pid not in before_children and c.status() != psutil.STATUS_ZOMBIE]
        new_shm = shm_entries() - before_shm
        if (not extra and not new_shm) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for c in extra:
        c.kill()
    assert not extra, f"test left child processes: {[(c.pid, c.cmdline()) for c in extra]}"
    assert not new_shm, f"test left entries in /dev/shm: {sorted(new_shm)}"


class Script:
    """A user program run in a child interpreter, as a user would run it."""

    def __init__(self, tmp_path: Path, code: str, name: str = "user_script.py") -> None:
        self.path = tmp_path / name
        self.path.write_text(textwrap.dedent(code))
        self.proc: subprocess.Popen | None = None
        self.pid_file = tmp_path / "worker_pids.json"

    def start(self, *args: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2",
                   PID_FILE=str(self.pid_file))
        self.proc = subprocess.Popen([sys.executable, str(self.path), *args],
                                     cwd=self.path.parent, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return self.proc

    def run(self, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = self.start()
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def wait_for_pids(self, within: float = 60) -> list[int]:
        """The worker pids the script wrote to $PID_FILE (see report_pids)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.pid_file.exists():
                text = self.pid_file.read_text()
                if text.endswith("\n"):
                    return json.loads(text)
            assert self.proc is None or self.proc.poll() is None, self.proc.communicate()
            time.sleep(0.02)
        raise AssertionError("the script never reported its worker pids")


# Scripts call this to tell the test which workers to watch.
REPORT_PIDS = """
import json as _json, os as _os
def report_pids(loader):
    with open(_os.environ["PID_FILE"] + ".tmp", "w") as _f:
        _f.write(_json.dumps(loader.worker_pids()) + "\\n")
    _os.replace(_os.environ["PID_FILE"] + ".tmp", _os.environ["PID_FILE"])
"""


@pytest.fixture
def script(tmp_path):
    def make(code: str, name: str = "user_script.py") -> Script:
        return Script(tmp_path, REPORT_PIDS + textwrap.dedent(code), name)
    return make
