"""Checks by pid and /proc, shared by the tests and benchmarks/lifecycle.py."""
from __future__ import annotations

import os
import time

LEAK_GRACE_S = 5.0  # generous: CI is a loaded 2-core machine


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def alive(pid: int) -> bool:
    """True while ``pid`` is an mploader worker that has not exited (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z" and b"mploader.worker" in cmdline


def wait_gone(pids, within: float = LEAK_GRACE_S) -> list[int]:
    """Wait up to ``within`` seconds for every pid to be gone; return the survivors."""
    deadline = time.monotonic() + within
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)
