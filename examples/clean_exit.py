"""What the examples print at the end: did any worker or shared-memory segment outlive its loader?"""
from __future__ import annotations

import os


def worker_alive(pid: int) -> bool:
    """True while ``pid`` is a running mploader worker."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"mploader.worker" in f.read()
    except FileNotFoundError:
        return False


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


def leftovers(pids, shm_before: set[str]) -> tuple[list[int], list[str]]:
    """(workers still running, new /dev/shm entries)."""
    return [p for p in pids if worker_alive(p)], sorted(shm_entries() - shm_before)
