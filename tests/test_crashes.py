"""A worker that dies or hangs becomes an error (or a replacement), never a hang.

Crash table, "what at where": each way of dying, at source index 5.
"""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from mploader import MPLoader, WorkerDied, WorkerError, WorkerTimeout

from . import helpers
from .procs import wait_gone

DETECT_BOUND_S = 2.0  # what a user observes; generous on a loaded machine


@pytest.mark.parametrize("how, signal_name, exitcode", [
    ("sigkill", "SIGKILL", None),     # what the kernel's OOM killer does
    ("segfault", "SIGSEGV", None),    # a crash in C code
    ("exit3", None, 3),               # os._exit in a library
])
def test_worker_death_at_item_raises_worker_died(monkeypatch, how, signal_name, exitcode):
    monkeypatch.setenv("MPLOADER_TEST_DEATH", how)
    with MPLoader(helpers.die_on_5, range(40), num_workers=2) as loader:
        pids = loader.worker_pids()
        seen = []
        died_at = time.monotonic()
        with pytest.raises(WorkerDied) as info:
            for x in loader:
                seen.append(x)
                died_at = time.monotonic()
        detected = time.monotonic() - died_at
        err = info.value
        assert err.signal_name == signal_name and err.exitcode == exitcode
        assert err.indices[0] == 5 and err.pid in pids and err.worker_id in (0, 1)
        assert f"worker {err.worker_id} (pid {err.pid})" in str(err)
        assert (signal_name or f"exited with code {exitcode}") in str(err)
        assert seen == list(range(5))  # every item before the death, then the error
        assert detected < DETECT_BOUND_S
        assert not wait_gone(pids, 0.5 + DETECT_BOUND_S), "the other workers were not stopped"
        # The loader starts a fresh pool for its next pass.
        monkeypatch.setenv("MPLOADER_TEST_DEATH", "none")
        assert list(loader) == list(range(40))
        assert not set(loader.worker_pids()) & set(pids)


def _exit_at_2500(i: int) -> int:
    if i == 2500:
        os._exit(3)
    return i


@pytest.mark.parametrize("fn, error, options", [
    (helpers.hang_on_2500, WorkerTimeout, {"timeout": 1.0}),
    (_exit_at_2500, WorkerDied, {}),
    (_exit_at_2500, WorkerDied, {"batch_size": 10}),
], ids=["timeout", "crash", "crash-in-batch"])
def test_a_killed_worker_s_finished_items_go_out_before_its_error(fn, error, options):
    """Tiny items travel in chunks of many: the items of the killed worker's
    chunk that it had finished come before the error, which names only the
    items not handed out, and the state resumes at the item that failed."""
    with MPLoader(fn, range(4000), num_workers=2, **options) as loader:
        seen = []
        with pytest.raises(error) as info:
            for x in loader:
                seen.extend(np.atleast_1d(x).tolist())
        assert seen == list(range(2500))
        assert info.value.indices[0] == 2500 and 2499 not in info.value.indices
        assert loader.state_dict()["position"] == 2500


def test_a_python_memory_error_is_an_item_error_with_its_traceback():
    def hungry(x):
        if x == 2:
            raise MemoryError("Unable to allocate 1.00 PiB")
        return x
    with MPLoader(hungry, range(5), num_workers=1) as loader:
        with pytest.raises(WorkerError) as info:
            list(loader)
    assert info.value.exc_type == "MemoryError" and info.value.index == 2


def test_a_worker_killed_from_outside_is_named():
    with MPLoader(helpers.sleep_forever_on_3, range(10), num_workers=2) as loader:
        it = iter(loader)
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        victim = loader.worker_pids()[1]
        os.kill(victim, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerDied) as info:
            list(it)
        assert time.monotonic() - start < DETECT_BOUND_S
    assert info.value.pid == victim and info.value.signal_name == "SIGKILL"


def test_restart_replaces_a_dead_worker_and_reruns_its_items(monkeypatch):
    def flaky(x):  # item 5 kills the first worker that runs it, in this process only once
        import os
        marker = os.environ["MARKER"]
        if x == 5 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(3)
        return x
    monkeypatch.setenv("MARKER", str(os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                  f"mploader-restart-{os.getpid()}")))
    try:
        with MPLoader(flaky, range(30), num_workers=2, on_worker_death="restart") as loader:
            before = loader.worker_pids()
            assert list(loader) == list(range(30))
            after = loader.worker_pids()
            assert len(after) == 2 and len(set(before) & set(after)) == 1
            assert loader.stats()["worker_restarts"] == 1
    finally:
        os.remove(os.environ["MARKER"])


def test_restart_gives_up_on_an_item_that_kills_two_workers(monkeypatch):
    monkeypatch.setenv("MPLOADER_TEST_DEATH", "sigkill")
    with MPLoader(helpers.die_on_5, range(20), num_workers=2, on_worker_death="restart") as loader:
        with pytest.raises(WorkerDied, match="source index 5 has now ended 2 workers"):
            list(loader)


def test_timeout_names_the_item_and_elapsed_time_and_kills_the_worker():
    with MPLoader(helpers.sleep_forever_on_3, range(10), num_workers=2, timeout=0.5) as loader:
        pids = loader.worker_pids()
        start = time.monotonic()
        with pytest.raises(WorkerTimeout) as info:
            list(loader)
        assert time.monotonic() - start < 0.5 + DETECT_BOUND_S
    err = info.value
    assert err.index == 3 and err.elapsed >= 0.5 and err.pid in pids
    assert "source index 3 ran" in str(err) and "over the timeout of 0.5 s" in str(err)


def test_timeout_with_restart_reruns_the_item_on_a_new_worker(tmp_path):
    fn = helpers.stall_once(str(tmp_path / "stalled"))
    with MPLoader(fn, range(12), num_workers=2, timeout=0.5,
                  on_worker_death="restart") as loader:
        assert list(loader) == list(range(12))
        assert loader.stats()["worker_restarts"] == 1


def test_large_results_live_in_anonymous_memory_not_dev_shm():
    """100 MB results: more than Docker's default 64 MB /dev/shm could hold."""
    with MPLoader(lambda i: np.full(100 * 2**20, i, np.uint8), range(3), num_workers=1) as loader:
        for i, block in enumerate(loader):
            assert block.shape == (100 * 2**20,) and block[0] == i and block[-1] == i
        with open(f"/proc/{loader.worker_pids()[0]}/maps") as f:
            maps = f.read()
    assert "/memfd:mploader-w0" in maps
