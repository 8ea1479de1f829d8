"""The Ray backend keeps the failure promises: named errors, skip, timeouts,
actor deaths (raised or restarted), a bounded close that leaves no actor, no
actor after the driver's SIGKILL, and clear errors for bad input."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Any

import numpy as np
import pytest

from mploader import (MPLoader, PassAbandoned, RayBackend, WorkerDied, WorkerError,
                      WorkerTimeout)

from conftest import alive_workers, child, pids_gone

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.usefixtures("no_actor_left")


def broken(i: int) -> int:
    if i == 5:
        raise KeyError(f"no such case {i}")
    return i


def test_an_error_in_fn_is_a_worker_error_with_index_and_remote_traceback() -> None:
    with MPLoader(broken, 10, num_workers=2, backend="ray") as loader:
        it = iter(loader)
        assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
        with pytest.raises(WorkerError) as raised:
            next(it)
    error = raised.value
    assert error.index == 5 and error.item == "5" and error.exc_type == "KeyError"
    assert "no such case 5" in error.message
    assert __file__ in error.remote_traceback and "in broken" in error.remote_traceback


def test_on_error_skip_skips_the_item_and_says_so() -> None:
    with MPLoader(broken, 10, num_workers=2, backend="ray", on_error="skip") as loader:
        assert list(loader) == [0, 1, 2, 3, 4, 6, 7, 8, 9]
        assert [(s.index, s.exc_type) for s in loader.skipped] == [(5, "KeyError")]


def failing_init(worker_id: int) -> None:
    raise RuntimeError("no GPU here")


def test_worker_init_failure_is_named() -> None:
    with MPLoader(abs, 4, num_workers=1, worker_init=failing_init, backend="ray") as loader:
        with pytest.raises(WorkerError, match="no GPU here") as raised:
            list(loader)
    assert raised.value.index is None and "in worker_init" in str(raised.value)


def stuck(i: int) -> int:
    if i == 4:
        time.sleep(60)
    return i


def test_an_item_over_its_timeout_is_a_worker_timeout() -> None:
    with MPLoader(stuck, 10, num_workers=2, timeout=1.5, backend="ray") as loader:
        it = iter(loader)
        assert [next(it) for _ in range(4)] == [0, 1, 2, 3]
        started = time.monotonic()
        with pytest.raises(WorkerTimeout) as raised:
            next(it)
        assert time.monotonic() - started < 8
    assert raised.value.index == 4 and 1.5 < raised.value.elapsed < 5
    assert 4 in raised.value.indices


def slow(i: int) -> np.ndarray:
    time.sleep(0.1)
    return np.full(4, i)


def _kill_a_busy_actor(loader: MPLoader) -> int:
    """SIGKILL one of the loader's actors (every node is on this machine)."""
    pid = loader.worker_pids()[0]
    os.kill(pid, signal.SIGKILL)
    return pid


def test_a_killed_actor_is_worker_died_naming_the_items_it_owed() -> None:
    with MPLoader(slow, 40, num_workers=2, backend="ray") as loader:
        it = iter(loader)
        got = [int(next(it)[0]) for _ in range(6)]
        pid = _kill_a_busy_actor(loader)
        with pytest.raises(WorkerDied) as raised:
            for x in it:
                got.append(int(x[0]))
    assert got == list(range(len(got)))  # in order up to the death, nothing skipped
    error = raised.value
    assert error.pid == pid and error.indices and min(error.indices) == len(got)
    assert "Ray actor" in str(error)


def test_with_restart_a_killed_actor_loses_and_repeats_nothing() -> None:
    with MPLoader(slow, 40, num_workers=2, backend="ray",
                  on_worker_death="restart") as loader:
        it = iter(loader)
        got = [int(next(it)[0]) for _ in range(6)]
        _kill_a_busy_actor(loader)
        got += [int(x[0]) for x in it]
        assert got == list(range(40))
        assert loader.stats()["worker_restarts"] == 1
        assert [int(x[0]) for x in loader] == list(range(40))  # the next epoch too


def test_close_is_bounded_and_leaves_no_actor_alive() -> None:
    loader = MPLoader(stuck, [4, 4, 4, 4], num_workers=2, backend="ray")
    outcome: list[Any] = []

    def consume() -> None:
        try:
            outcome.append(list(loader))
        except BaseException as exc:  # noqa: BLE001 - what close() made of it
            outcome.append(exc)
    thread = threading.Thread(target=consume)
    thread.start()
    deadline = time.monotonic() + 60
    while len(loader.worker_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # both actors inside fn's sleep
    pids = loader.worker_pids()
    started = time.monotonic()
    loader.close(timeout=3)
    assert time.monotonic() - started < 3.5
    thread.join(5)
    assert isinstance(outcome[0], PassAbandoned)
    assert not alive_workers()
    assert pids_gone(pids, within=5)


def test_the_drivers_sigkill_leaves_no_actor(cluster: Any) -> None:
    script = child(f"""
        import sys, time
        from mploader import MPLoader, RayBackend
        def busy(i):
            time.sleep(0.5)
            return i
        loader = MPLoader(busy, 1000, num_workers=2,
                          backend=RayBackend(address={cluster.address!r}))
        it = iter(loader)
        next(it)
        while len(loader.worker_pids()) < 2:
            next(it)
        print(*loader.worker_pids(), flush=True)
        for _ in it:
            pass
    """)
    try:
        line = script.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2, (line, script.stderr.read() if script.poll() is not None else "")
        assert not pids_gone(pids, within=0.5)
        script.send_signal(signal.SIGKILL)
        script.wait(10)
    finally:
        script.kill()
        script.wait()
    assert pids_gone(pids, within=30)


def test_an_unreachable_address_is_a_clear_error_naming_it() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    script = child(f"""
        from mploader import MPLoader, RayBackend
        try:
            MPLoader(abs, 4, num_workers=1, backend=RayBackend(address={address!r}))
        except ConnectionError as exc:
            print("ConnectionError:", exc)
    """, env={"RAY_ADDRESS": ""})
    out, err = script.communicate(timeout=60)
    assert f"ConnectionError: cannot reach the Ray cluster at '{address}'" in out, err


def test_a_missing_ray_says_how_to_install_it() -> None:
    script = child("""
        import sys
        sys.modules["ray"] = None  # as if Ray were not installed
        from mploader import MPLoader, RayBackend
        assert list(MPLoader(abs, 3, num_workers=1)) == [0, 1, 2]  # the local backend
        try:
            MPLoader(abs, 3, num_workers=1, backend="ray")
        except ImportError as exc:
            print(exc)
    """)
    out, err = script.communicate(timeout=60)
    assert "pip install mploader[ray]" in out, err


def test_import_mploader_never_imports_ray() -> None:
    script = child("""
        import sys
        import mploader, mploader.loader, mploader.config
        from mploader import MPLoader, RayBackend
        RayBackend(address="127.0.0.1:1", num_cpus=2)
        assert list(MPLoader(abs, 3, num_workers=1)) == [0, 1, 2]
        print("ray imported:", "ray" in sys.modules)
    """)
    out, err = script.communicate(timeout=60)
    assert "ray imported: False" in out, err


def test_more_cpus_than_any_node_has_is_an_error_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(ValueError, match="no node of the Ray cluster can hold one worker"):
        MPLoader(abs, 4, num_workers=1, backend=RayBackend(num_cpus=64))
    assert time.monotonic() - started < 10


def test_more_workers_than_the_cluster_holds_is_a_warning_and_runs(
        caplog: pytest.LogCaptureFixture) -> None:
    with MPLoader(abs, 8, num_workers=6, backend="ray") as loader:  # 4 CPUs in all
        assert list(loader) == list(range(8))
    assert "holds at most 4 workers" in caplog.text


def test_what_cannot_be_pickled_is_named() -> None:
    lock = threading.Lock()
    with pytest.raises(TypeError, match="cannot be sent to the worker"):
        MPLoader(lambda i: (lock, i)[1], 4, num_workers=1, backend="ray")
    with MPLoader(abs, [1, 2, threading.Lock()], num_workers=1, backend="ray") as loader:
        with pytest.raises(TypeError, match="source index 2 cannot be pickled"):
            list(loader)


def test_bad_backend_options_are_named() -> None:
    with pytest.raises(ValueError, match="backend must be"):
        MPLoader(abs, 4, backend="spark")
    with pytest.raises(ValueError, match="num_cpus"):
        RayBackend(num_cpus=-1)
    with pytest.raises(ValueError, match="threads_per_worker"):
        MPLoader(abs, 4, num_workers=1, threads_per_worker=2, backend="ray")
