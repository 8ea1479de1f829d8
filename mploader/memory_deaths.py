"""Was a worker killed for memory?  What the kernel and the cgroup recorded.

A worker that the kernel's out-of-memory killer ends dies by SIGKILL, which
looks like any other kill ("One or more background workers are no longer
alive" is the most common complaint in nnU-Net's tracker).  So the pool keeps,
per worker, its last known resident memory and the ``oom_kill`` counter of its
memory cgroup (sampled every ``SAMPLE_EVERY_S`` while it runs, and when it
dies), and on a SIGKILL death reads the kernel's log for "Killed process
<pid>".  Either record names the cause; neither readable, the message says
that it cannot tell.
"""
from __future__ import annotations

import os
import signal
import time

SAMPLE_EVERY_S = 0.25
_PAGE = os.sysconf("SC_PAGE_SIZE")
_CGROUP_ROOT = "/sys/fs/cgroup"


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


def _oom_counter_file(pid: int) -> str | None:
    """The file that counts OOM kills in the memory cgroup of ``pid`` (v2 or v1)."""
    text = _read(f"/proc/{pid}/cgroup")
    if not text:
        return None
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            candidate = f"{_CGROUP_ROOT}{path.rstrip('/')}/memory.events"
        elif "memory" in controllers.split(","):  # cgroup v1
            candidate = f"{_CGROUP_ROOT}/memory{path.rstrip('/')}/memory.oom_control"
        else:
            continue
        if os.path.exists(candidate):
            return candidate
    return None


def _oom_kills(path: str | None) -> int | None:
    text = _read(path) if path else None
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == "oom_kill":
            return int(value)
    return None


def _kernel_record(pid: int) -> str | None:
    """The kernel's log line about killing ``pid`` for memory, if it can be read."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    found = None
    try:
        while True:
            try:
                record = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except OSError:  # EPIPE: a record was overwritten while reading; go on
                continue
            message = record.partition(";")[2].strip()
            if f"Killed process {pid} " in message or f"Killed process {pid}," in message:
                found = message
    finally:
        os.close(fd)
    return found


class MemoryWatch:
    """What is known about one worker's memory (see the module docstring)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss = 0                 # bytes, at the last sample
        self.sampled_at = 0.0        # time.monotonic() of that sample
        self._counter: str | None = None
        self._kills_before: int | None = None
        self.sample()

    def sample(self, dying: bool = False) -> None:
        """Its RSS, its cgroup and that cgroup's OOM kills so far.  The count is
        the baseline of the next death, so a kill long before (of this worker's
        neighbour, say) is not taken for its own; ``dying``: its exit is
        pending, and a kill since the last sample is what ``explain`` looks for."""
        statm = _read(f"/proc/{self.pid}/statm")
        if statm and statm.split()[1] != "0":  # 0: a zombie, nothing left to measure
            self.rss = int(statm.split()[1]) * _PAGE
            self.sampled_at = time.monotonic()
        counter = _oom_counter_file(self.pid)
        if counter is not None and (counter != self._counter or not dying):
            self._kills_before = None if dying else _oom_kills(counter)
            self._counter = counter

    def explain(self, returncode: int | None) -> str:
        """A clause for WorkerDied: the out-of-memory killer or not, and the last RSS."""
        if returncode != -signal.SIGKILL:
            return ""
        record = _kernel_record(self.pid)
        kills = _oom_kills(self._counter)
        counted = (kills is not None and self._kills_before is not None
                   and kills > self._kills_before)
        if record or counted:
            evidence = [f'the kernel logged "{record}"'] if record else []
            if counted:
                evidence.append(f"its memory cgroup's oom_kill count went from "
                                f"{self._kills_before} to {kills}")
            cause = ("the kernel's out-of-memory killer ended it (" + "; ".join(evidence) +
                     "): use fewer workers, a smaller prefetch, or less memory per item "
                     "(README: Out of memory)")
        elif kills is None:
            cause = ("whether the out-of-memory killer did it is unknown (neither the "
                     "kernel's log nor the cgroup's memory events can be read here)")
        else:
            cause = "not by the out-of-memory killer (its memory cgroup counted no kill)"
        if self.sampled_at:
            ago = time.monotonic() - self.sampled_at
            cause += f"; its last known RSS was {self.rss / 2**20:.0f} MiB, {ago:.1f} s before"
        return cause
