"""Running a scenario script under a hard bound, so that a hang fails its test.

The hang tests (test_deadlocks.py, test_restarts.py, test_resources.py,
test_items.py) pin down defects whose symptom is a program that never ends.
Each runs its scenario as a real user script (the ``script`` fixture of
conftest.py) through ``run_bounded``, which makes a hang fail the test with
the script's stacks instead of wedging the suite:

1. a watchdog inside the script (``faulthandler.dump_traceback_later``) dumps
   every thread's stack to its stderr and exits it with status 1 after
   ``within`` seconds; its workers then die with it (PR_SET_PDEATHSIG);
2. should even that fail, the test stops waiting ``_GRACE_S`` later and kills
   the script and every process started under it (found by the script's
   unique $PID_FILE in their environment, so workers already orphaned and a
   worker's own children are found too).

Either way the test fails with a message that says it hung, where, and the
script's output.  Scripts print one JSON report as their last line of stdout.
The watchdog is prepended to the script's text (two lines: tracebacks of the
script are off by two, and a script cannot begin with ``from __future__``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from .procs import wait_gone

_GRACE_S = 15.0  # after the watchdog: room for the dump and the workers' exit
_WATCHDOG = (
    "import faulthandler as _faulthandler\n"
    "_faulthandler.dump_traceback_later({within!r}, exit=True)  # a hang: stacks, then exit 1\n"
)
_WATCHDOG_FIRED = "Timeout ("  # how faulthandler's dump begins: "Timeout (0:00:30)!"


# Snippets for scripts (insert with ``joined``): counting by /proc, as a test would.
NFDS = """
def nfds():
    return len(os.listdir("/proc/self/fd"))
"""

LIVE_WORKERS = """
def live_workers():
    '''The mploader workers among this process's children, zombies excluded.'''
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            if int(ppid) != os.getpid() or state == "Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"mploader.worker" in f.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            pass
    return found
"""


def last_json(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    assert lines, "the script printed no report"
    return json.loads(lines[-1])


def strays(s) -> list[psutil.Process]:
    """Every live process started under the script ``s`` (its workers, their
    children), found by the script's unique $PID_FILE in their environment."""
    mine = str(s.pid_file)
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get("PID_FILE") == mine and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            pass  # gone, or not ours
    return found


def kill_all(s) -> None:
    """SIGKILL the script ``s`` and everything started under it."""
    procs = strays(s)
    if s.proc is not None and s.proc.poll() is None:
        try:
            procs.append(psutil.Process(s.proc.pid))
        except psutil.Error:
            pass
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)


def _tail(text: str | None, chars: int = 6000) -> str:
    text = text or ""
    return text if len(text) <= chars else "...\n" + text[-chars:]


def joined(*parts: str) -> str:
    """Script text from pieces indented differently (``script()`` dedents the whole only)."""
    return "\n".join(textwrap.dedent(part) for part in parts)


def _arm(s, within: float) -> None:
    s.path.write_text(_WATCHDOG.format(within=float(within)) + s.path.read_text())


def start_bounded(s, within: float) -> subprocess.Popen:
    """Start the script ``s`` (Script.start) with its watchdog armed: it dumps its
    stacks and exits after ``within`` seconds.  For tests that end it themselves."""
    _arm(s, within)
    return s.start()


def run_bounded(s, within: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the script ``s`` (made by the ``script`` fixture); fail the test if it
    has not ended ``within`` seconds after it started.  ``cwd``: the directory
    to start it in (default: the script's own, as Script.run does)."""
    _arm(s, within)
    if cwd is None:
        runner = lambda: s.run(timeout=within + _GRACE_S)  # noqa: E731
    else:
        runner = lambda: _run_in(s, cwd, within + _GRACE_S)  # noqa: E731
    try:
        result = runner()
    except subprocess.TimeoutExpired:
        status = s.proc.poll()
        kill_all(s)
        try:
            out, err = s.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            out, err = "", "(its output pipes stayed open: something it started survived SIGKILL)"
        what = ("the script was still running (even its own watchdog did not end it)"
                if status is None else
                f"the script had ended (status {status}), but processes it started (workers, "
                f"or their children) still held its stdout and stderr open")
        pytest.fail(f"HANG: {within + _GRACE_S:g} s after the start, {what}; killed them all.\n"
                    f"--- stdout\n{_tail(out)}\n--- stderr\n{_tail(err)}", pytrace=False)
    if result.returncode == 1 and _WATCHDOG_FIRED in result.stderr:
        kill_all(s)  # whatever outlived it (an orphaned worker, a worker's child)
        pytest.fail(f"HANG: the script had not ended after {within:g} s; its watchdog "
                    f"dumped every thread's stack and ended it.\n--- stdout\n{_tail(result.stdout)}"
                    f"\n--- stderr (stacks at the hang)\n{_tail(result.stderr)}", pytrace=False)
    return result


def _run_in(s, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Script.run, started in ``cwd`` rather than in the script's directory."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2",
               PID_FILE=str(s.pid_file))
    s.proc = subprocess.Popen([sys.executable, str(s.path)], cwd=cwd, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = s.proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(s.proc.args, s.proc.returncode, out, err)


def report(result: subprocess.CompletedProcess) -> dict:
    """The script's JSON report; fails with its output when it has none."""
    try:
        return last_json(result.stdout)
    except (AssertionError, ValueError):
        pytest.fail(f"the script ended (status {result.returncode}) without its report\n"
                    f"--- stdout\n{_tail(result.stdout)}\n--- stderr\n{_tail(result.stderr)}",
                    pytrace=False)


def assert_no_worker_left(pids, within: float = 2.0) -> None:
    left = wait_gone(pids, within)
    assert not left, f"workers {left} were still alive {within:g} s after the scenario ended"


def assert_quiet(result: subprocess.CompletedProcess) -> None:
    """The script exited 0 and printed no traceback nor warning of a leak."""
    assert result.returncode == 0, f"status {result.returncode}\n{_tail(result.stderr)}"
    for marker in ("Traceback", "leaked", "Exception ignored"):
        assert marker not in result.stderr, _tail(result.stderr)


def kill_pid_if_alive(pid: int, cmdline_part: str) -> bool:
    """SIGKILL ``pid`` if it is alive and its command line contains ``cmdline_part``."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or cmdline_part not in " ".join(proc.cmdline()):
            return False
        os.kill(pid, signal.SIGKILL)
        return True
    except (psutil.Error, ProcessLookupError):
        return False

