"""A worker killed for memory is said to be, with the item and its last RSS.

The out-of-memory killer is real here: the worker moves itself into a memory
cgroup limited to 200 MiB and allocates until the kernel kills it.
"""
from __future__ import annotations

import os
import resource
import signal
import time
import uuid

import numpy as np
import pytest

from mploader import MPLoader, WorkerDied, WorkerError


def _limited_cgroup(limit: int) -> str:
    """A new memory cgroup under this process's own, limited to ``limit`` bytes."""
    for line in open("/proc/self/cgroup").read().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):       # cgroup v1
            base, limit_file = f"/sys/fs/cgroup/memory{path.rstrip('/')}", "memory.limit_in_bytes"
            break
        if controllers == "":                         # cgroup v2
            base, limit_file = f"/sys/fs/cgroup{path.rstrip('/')}", "memory.max"
    else:
        pytest.skip("no memory cgroup here")
    group = f"{base}/mploader-test-{uuid.uuid4().hex[:8]}"
    try:
        os.mkdir(group)
        with open(f"{group}/{limit_file}", "w") as f:
            f.write(str(limit))
    except OSError as exc:
        pytest.skip(f"cannot make a memory cgroup here ({exc}): the out-of-memory "
                    "killer cannot be triggered safely")
    return group


def hog_in(group: str):
    def fn(i):
        if i == 3:
            with open(f"{group}/cgroup.procs", "w") as f:
                f.write(str(os.getpid()))
            time.sleep(0.6)  # one memory sample in the new cgroup
            blocks = []
            while True:
                blocks.append(np.ones(16 << 20, np.uint8))
        return i
    return fn


def test_a_worker_killed_by_the_out_of_memory_killer_is_said_to_be():
    group = _limited_cgroup(200 << 20)
    try:
        with pytest.raises(WorkerDied) as info, \
                MPLoader(hog_in(group), 8, num_workers=2) as loader:
            list(loader)
    finally:
        for _ in range(100):  # the killed worker leaves the cgroup when reaped
            try:
                os.rmdir(group)
                break
            except OSError:
                time.sleep(0.05)
    err = info.value
    text = str(err)
    assert err.signal_name == "SIGKILL" and 3 in err.indices, text
    assert "out-of-memory killer ended it" in text, text
    assert "last known RSS was" in text and "fewer workers" in text, text


def test_a_sigkill_that_is_not_for_memory_is_not_called_one():
    def fn(i):
        if i == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return i
    with pytest.raises(WorkerDied) as info, MPLoader(fn, 8, num_workers=2) as loader:
        list(loader)
    text = str(info.value)
    assert "out-of-memory killer ended it" not in text
    assert ("not by the out-of-memory killer" in text
            or "whether the out-of-memory killer did it is unknown" in text), text


def test_an_allocation_over_rlimit_as_is_a_memory_error_naming_the_item():
    def init(_worker_id):
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    def fn(i):
        return np.ones(4 << 30, np.uint8) if i == 2 else i
    with pytest.raises(WorkerError) as info, \
            MPLoader(fn, 5, num_workers=1, worker_init=init) as loader:
        list(loader)
    assert "MemoryError" in str(info.value) and info.value.index == 2
