"""The resource budget of a pool, in one place: descriptors and address space.

Descriptors.  Every worker costs the parent exactly
``PARENT_FDS_PER_WORKER`` descriptors for its whole life: its pidfd, the
write end of its task pipe, the read end of its result pipe, and the one
mapping of its arena (Python's ``mmap`` keeps a descriptor; the arena's own
descriptor is closed once the worker has it).  ``prefetch`` costs none: all
of a worker's slots live in its arena (slots.py).  While one worker starts,
``START_FDS`` more are open for a moment (the worker's pipe ends, the arena,
subprocess's error pipe).  A pool is checked against ``RLIMIT_NOFILE`` before
anything is created, so a pool that does not fit fails at once with an error
that says how many workers fit and how to raise the limit, never half-way
through a pass.

Address space.  A worker's arena reserves ``slots * stride`` bytes of address
space in the parent (no memory: the file is sparse).  The stride is the
largest result one task can return; it shrinks when many workers and slots
share ``_ADDRESS_BUDGET_BYTES`` (per pool, so about 60 of the largest pools,
or about 110 default ones on 2 cores, whose slots include the consumer's
leases, can be alive in one process).
"""
from __future__ import annotations

import mmap
import os
import resource

PARENT_FDS_PER_WORKER = 4
START_FDS = 6
_SPARE_FDS = 32  # for the rest of the program: files it opens, TensorFlow's own
_ADDRESS_BUDGET_BYTES = 2 << 40  # per pool, of the 128 TiB a 64-bit Linux process can map
_MAX_STRIDE_BYTES = 16 << 30


def open_fds() -> int:
    """How many descriptors this process has open now."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir opened
    except FileNotFoundError:  # no /proc: count by probing
        return sum(1 for fd in range(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
                   if _is_open(fd))


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def workers_that_fit() -> int:
    """How many more workers this process's descriptor limit allows."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(0, (soft - open_fds() - START_FDS - _SPARE_FDS) // PARENT_FDS_PER_WORKER)


def check_workers(num_workers: int) -> None:
    """Raise ValueError when ``num_workers`` workers would exceed RLIMIT_NOFILE."""
    fit = workers_that_fit()
    if num_workers <= fit:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = open_fds() + START_FDS + _SPARE_FDS + num_workers * PARENT_FDS_PER_WORKER
    ceiling = "unlimited" if hard == resource.RLIM_INFINITY else hard
    suggest = max(need, 4096) if hard == resource.RLIM_INFINITY else min(hard, max(need, 4096))
    raise ValueError(
        f"num_workers={num_workers} needs about {need} file descriptors "
        f"({PARENT_FDS_PER_WORKER} per worker, plus {open_fds()} open now), but the "
        f"soft limit RLIMIT_NOFILE is {soft}: at most {fit} workers fit.  Use fewer "
        f"workers, or raise the limit (its hard limit is {ceiling}) before creating the loader: "
        f"`ulimit -n {suggest}` "
        "in the shell, or resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard)) in Python")


def leases_per_worker(num_workers: int, at_least: int, per_pool: int) -> int:
    """Results a worker's consumer may hold as views of its slots: ``per_pool``
    shared by the workers, at least ``at_least`` each; only ``at_least`` under
    an ``RLIMIT_AS`` cap, where every slot more shrinks the largest result."""
    if resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY:
        return at_least
    return max(at_least, per_pool // num_workers)


def slot_stride(num_workers: int, slots_per_worker: int) -> int:
    """Bytes of address space per slot: the largest result a task may return.

    Under an ``RLIMIT_AS`` cap, the arenas take at most a quarter of it; a
    result larger than the stride is an error that names both sizes.
    """
    slots = max(1, num_workers * slots_per_worker)
    share = min(_MAX_STRIDE_BYTES, _ADDRESS_BUDGET_BYTES // slots)
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        share = min(share, limit // (4 * slots))
    return max(mmap.PAGESIZE, share - share % mmap.PAGESIZE)
