"""``RayBackend(address=None)`` with no cluster anywhere: the loader starts a
local Ray instance and shuts it down when it closes; a Ray the user started
(``ray.init()``) it leaves running.

Each runs in a child interpreter: no ``RAY_ADDRESS``, no ``ray.init`` before
the loader, and a Ray temp dir of its own, so that Ray does not find the
session's cluster (``address=None`` connects to a cluster started on this
machine, found through ``<temp dir>/ray/ray_current_cluster``).
"""
from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from conftest import pids_gone

pytest.importorskip("ray")

_CHILD = """
    import os, sys
    import ray
    from mploader import MPLoader

    def triple(i):
        return 3 * i

    def step(*said):
        print(*said, flush=True)
        sys.stdin.readline()  # the parent looks at the processes meanwhile

    # 1. Nothing connected, nothing running: the loader starts a local instance.
    assert not ray.is_initialized()
    loader = MPLoader(triple, 10, num_workers=2, backend="ray")
    values = list(loader)
    step("started", ray.is_initialized(), *loader.worker_pids())
    loader.close()
    step("closed", ray.is_initialized(), values == [3 * i for i in range(10)])

    # 2. The user's own ray.init(): close() leaves it running, and usable.
    ray.init(logging_level="WARNING")
    with MPLoader(triple, 10, num_workers=2, backend="ray") as loader:
        values = list(loader)
    print("user's", ray.is_initialized() and ray.get(ray.put(7)) == 7,
          values == [3 * i for i in range(10)], flush=True)
    with MPLoader(triple, 4, num_workers=1, backend="ray") as loader:  # and again
        print("again", list(loader) == [0, 3, 6, 9], ray.is_initialized(), flush=True)
    ray.shutdown()
"""


class Child:
    """The child interpreter, its stdout read line by line on a thread."""

    def __init__(self, code: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True)
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def expect(self, word: str, within: float = 90) -> list[str]:
        """The words of the next line that starts with ``word``."""
        while True:
            try:
                line = self._lines.get(timeout=within)
            except queue.Empty:
                pytest.fail(f"no {word!r} line within {within} s:\n{''.join(self.output)}")
            if line is None:
                pytest.fail(f"the child ended before {word!r}:\n{''.join(self.output)}")
            if line.startswith(word):
                return line[len(word):].split()

    def go_on(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()


@pytest.fixture
def ray_tmpdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="mpl-ray-", dir="/tmp")  # short: Ray's socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _instance(pid: int) -> dict[int, str]:
    """The processes below ``pid`` (the Ray instance it started), by pid."""
    found = {}
    for proc in psutil.Process(pid).children(recursive=True):
        try:
            found[proc.pid] = " ".join(proc.cmdline())
        except psutil.Error:
            pass
    return found


def _alive(pid: int, cmd: str) -> bool:
    """``pid`` still runs ``cmd`` (not a zombie, not a new process of that pid)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and " ".join(proc.cmdline()) == cmd
    except psutil.Error:
        return False


def test_no_cluster_starts_a_local_instance_that_close_shuts_down_but_not_the_users(
        ray_tmpdir: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_TMPDIR"] = ray_tmpdir
    child = Child(_CHILD, env)
    instance: dict[int, str] = {}
    try:
        initialized, *actors = child.expect("started")
        assert initialized == "True"
        instance = _instance(child.proc.pid)
        commands = list(instance.values())
        # the instance this test must see go: its GCS, its raylet, the actors
        # (those that started; 10 items may all run before the second does)
        assert any("gcs_server" in c for c in commands), commands
        assert any("raylet" in c for c in commands), commands
        assert actors and {int(a) for a in actors} <= set(instance), (actors, instance)
        child.go_on()

        assert child.expect("closed") == ["False", "True"]  # shut down; the values right
        if not pids_gone(list(instance), within=30):
            left = {pid: cmd[:120] for pid, cmd in instance.items() if _alive(pid, cmd)}
            pytest.fail(f"processes of the instance the loader started outlive its close(): "
                        f"{left}")
        child.go_on()

        assert child.expect("user's") == ["True", "True"]  # running, usable, values right
        assert child.expect("again") == ["True", "True"]
        assert child.proc.wait(60) == 0, "".join(child.output)
    finally:
        if child.proc.poll() is None:
            os.killpg(child.proc.pid, signal.SIGKILL)
            child.proc.wait(10)
        for pid, cmd in instance.items():  # whatever a failure left
            if _alive(pid, cmd):
                os.kill(pid, signal.SIGKILL)
    assert pids_gone(list(instance), within=5)
