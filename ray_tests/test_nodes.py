"""A whole node's death: the loader's actors pinned to a node of their own
(a custom resource only it has), the node removed mid-pass.

With ``on_worker_death="raise"`` the pass ends with WorkerDied naming the
items the node's actors owed, at once; with ``"restart"`` new actors wait
for a node that can hold them (a warning says so), then the pass goes on
and hands out every item once, in order, and a node's death is no item's
fault: items running on two nodes that die are not struck out.

Nodes are added to the session's cluster and removed again by each test
(``nodes``): the head and the second node, which the other tests use, are
never touched, and a test ends only once the GCS counts its nodes dead.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from mploader import MPLoader, PassAbandoned, RayBackend, WorkerDied
from mploader import ray_backend

from conftest import _OBJECT_STORE_BYTES, alive_workers, pids_gone

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.usefixtures("no_actor_left")

PINNED = "doomed"  # the resource only the nodes these tests add have
_BIG = 1 << 18     # int32 elements: 1 MiB a result, so results lie in the node's object store


class Nodes:
    """Adds nodes that hold ``PINNED`` to the cluster, and removes them."""

    def __init__(self, cluster: Any) -> None:
        self._cluster = cluster
        self.added: list[Any] = []

    def add(self) -> Any:
        node = self._cluster.add_node(num_cpus=2, resources={PINNED: 2},
                                      object_store_memory=_OBJECT_STORE_BYTES)
        self._cluster.wait_for_nodes()
        self.added.append(node)
        return node

    def remove(self, node: Any) -> None:
        self._cluster.remove_node(node)
        self.added.remove(node)


def _pinned_nodes_alive() -> list[str]:
    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and PINNED in n.get("Resources", {})]


@pytest.fixture
def nodes(cluster: Any) -> Iterator[Nodes]:
    made = Nodes(cluster)
    try:
        yield made
    finally:
        for node in list(made.added):
            made.remove(node)
        deadline = time.monotonic() + 30
        while (alive := _pinned_nodes_alive()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, f"nodes added by the test still alive: {alive}"


def slow_and_big(i: int, hang_while: str = "") -> np.ndarray:
    if hang_while and os.path.exists(hang_while):
        open(f"{hang_while}.{i}", "w").close()  # says: item i hangs here
        while os.path.exists(hang_while):
            time.sleep(0.1)
    time.sleep(0.1)
    return np.full(_BIG, i, np.int32)


def _pinned(workers: int, **options: Any) -> MPLoader:
    return MPLoader(slow_and_big, 40, num_workers=workers,
                    backend=RayBackend(resources={PINNED: 1}), **options)


def _on_node(node: Any) -> list[int]:
    """The pids of the mploader actors alive on ``node``; asserts that every
    live one is there (the test would prove nothing otherwise)."""
    actors = alive_workers()
    assert actors and all(a["Address"]["NodeID"] == node.node_id for a in actors), actors
    return [a["Pid"] for a in actors]


class Consumer:
    """Iterates ``it`` on a thread, so that a hang is a failed test, not a stuck run."""

    def __init__(self, it: Iterator[np.ndarray]) -> None:
        self.got: list[int] = []
        self.error: BaseException | None = None
        self.ended_at = 0.0
        self._it = it
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for value in self._it:
                assert value.shape == (_BIG,) and (value == value[0]).all()
                self.got.append(int(value[0]))
        except BaseException as exc:  # noqa: BLE001 - what the test checks
            self.error = exc
        self.ended_at = time.monotonic()

    def join(self, loader: MPLoader, within: float) -> None:
        """Wait until the pass ends; past ``within`` s, close the loader and fail."""
        self._thread.join(within)
        if self._thread.is_alive():
            loader.close(timeout=5)
            self._thread.join(10)
            pytest.fail(f"the pass hung: still running {within} s later, after items "
                        f"{self.got}")


def test_a_nodes_death_is_worker_died_naming_the_items_its_actors_owed(nodes: Nodes) -> None:
    node = nodes.add()
    with _pinned(2) as loader:
        it = iter(loader)
        first = [int(next(it)[0]) for _ in range(6)]
        pids = _on_node(node)
        assert len(pids) == 2
        nodes.remove(node)
        removed = time.monotonic()
        consumer = Consumer(it)
        consumer.join(loader, within=60)
    assert consumer.ended_at - removed < 30, "the node's death took long to notice"
    got = first + consumer.got
    assert got == list(range(len(got)))  # in order up to the death, nothing skipped
    error = consumer.error
    assert isinstance(error, WorkerDied), repr(error)
    # it names the items owed from the first not handed out on, none handed out
    assert error.indices and min(error.indices) == len(got), (got, error.indices)
    assert error.pid in pids and f"on node {node.node_id[:12]}" in str(error)
    assert not alive_workers()
    assert pids_gone(pids, within=10)


def _wait_until(what: Any, within: float, consumer: Consumer) -> None:
    deadline = time.monotonic() + within
    while not what() and time.monotonic() < deadline:
        assert consumer.error is None, repr(consumer.error)
        time.sleep(0.1)
    assert consumer.error is None, repr(consumer.error)
    assert what(), f"not within {within} s: {_cluster_now()}"


def _cluster_now() -> str:
    """The nodes and the loader's actors, for a failure's message."""
    nodes = [(n["NodeID"][:8], n["Alive"], n.get("Resources", {}).get(PINNED))
             for n in ray.nodes()]
    actors = [(a["Address"]["NodeID"][:8], a["State"], a["Pid"])
              for a in ray._private.state.actors().values()
              if a["ActorClassName"] == "_RayWorker"]
    return f"nodes (id, alive, {PINNED}): {nodes}; actors (node, state, pid): {actors}"


def _waiting_for_placement() -> bool:
    """Both of the loader's actors wait for a node (none holds PINNED)."""
    actors = alive_workers()
    return len(actors) == 2 and all(a["State"] == "PENDING_CREATION" for a in actors)


def test_with_restart_node_deaths_lose_and_repeat_nothing_and_blame_no_item(
        nodes: Nodes, tmp_path: Any, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two nodes die under the pass, each while its actors run the same items
    (those of the first death, run again first): a node's death is no item's
    fault, so no item is struck out ("has now ended 2 workers")."""
    monkeypatch.setattr(ray_backend, "_PLACEMENT_WARNING_S", 1.0)
    hang = tmp_path / "hang"  # while it exists, fn hangs: the actors are mid-item
    node = nodes.add()
    loader = MPLoader(functools.partial(slow_and_big, hang_while=str(hang)), 40,
                      num_workers=2, backend=RayBackend(resources={PINNED: 1}),
                      on_worker_death="restart")
    with loader, caplog.at_level(logging.WARNING, logger="mploader"):
        it = iter(loader)
        first = [int(next(it)[0]) for _ in range(6)]
        _on_node(node)
        nodes.remove(node)
        consumer = Consumer(it)
        # No node holds PINNED now: the new actors wait, and a warning says so
        # (what it says of the cluster depends on how soon Ray's views of it
        # catch up: test_the_placement_warning_says_what_waits checks the text).
        _wait_until(lambda: "waited over" in caplog.text, 30, consumer)
        assert f"'{PINNED}': 1.0" in caplog.text
        assert not consumer.ended_at, "the pass ended with no worker to run it"

        hang.touch()
        node = nodes.add()  # Cluster.add_node wants the main thread
        # Both new actors hang in an item the first node's death left owed
        # (6-9, after the 6 handed out), each the first of the task it runs
        # again: the item that death would have blamed, were a node's death
        # an item's fault.  Which two depends on which death was seen first.
        def hanging() -> list[int]:
            return sorted(int(p.suffix[1:]) for p in tmp_path.glob("hang.*"))
        _wait_until(lambda: len(hanging()) == 2, 30, consumer)
        assert set(hanging()) <= {6, 7, 8, 9}, hanging()
        _on_node(node)
        nodes.remove(node)
        _wait_until(_waiting_for_placement, 30, consumer)

        hang.unlink()
        node = nodes.add()
        consumer.join(loader, within=60)
        assert consumer.error is None, repr(consumer.error)
        got = first + consumer.got
        assert got == list(range(40)), got  # every item once, in order
        assert loader.stats()["worker_restarts"] == 4
        _on_node(node)
        assert [int(x[0]) for x in loader] == list(range(40))  # the next epoch too
    assert "starting a new worker" in caplog.text


def test_close_while_the_pass_waits_for_placement_abandons_it_and_kills_the_waiting_actors(
        nodes: Nodes, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """With "restart", the node's death leaves new actors no node can hold,
    and the pass waits for them; close() from another thread ends that wait
    within its bound: the consumer gets PassAbandoned, the waiting actors are
    killed, and a node that could hold them, added later, starts none."""
    monkeypatch.setattr(ray_backend, "_PLACEMENT_WARNING_S", 1.0)
    node = nodes.add()
    loader = _pinned(2, on_worker_death="restart", close_timeout=5)
    took: list[float] = []

    def close() -> None:
        began = time.monotonic()
        loader.close()
        took.append(time.monotonic() - began)
    closer = threading.Thread(target=close, daemon=True)
    try:
        with caplog.at_level(logging.WARNING, logger="mploader"):
            it = iter(loader)
            first = [int(next(it)[0]) for _ in range(4)]
            _on_node(node)
            nodes.remove(node)
            consumer = Consumer(it)
            _wait_until(_waiting_for_placement, 30, consumer)
            _wait_until(lambda: "so the pass waits" in caplog.text, 30, consumer)
        assert not consumer.ended_at, "the pass ended with no worker to run it"

        closer.start()
        closer.join(5 + 5)  # close_timeout, and a margin
        assert not closer.is_alive(), "close() ran past its bound"
        consumer.join(loader, within=5)
        assert isinstance(consumer.error, PassAbandoned), repr(consumer.error)
        got = first + consumer.got
        assert got == list(range(len(got))), got  # in order, nothing after the close
        deadline = time.monotonic() + 3  # the GCS's view catches up
        while alive_workers() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive_workers(), _cluster_now()

        nodes.add()  # a node the closed loader's actors could have waited for
        time.sleep(3)
        assert not alive_workers(), _cluster_now()
    finally:
        if not closer.is_alive():  # a close() stuck would hang this one too
            loader.close()
    assert took and took[0] < 5 + 1, took


class _FakeRay:
    """What _warn_unplaced asks of ray: a cluster whose one node lacks PINNED."""

    @staticmethod
    def nodes() -> list[dict[str, Any]]:
        return [{"NodeID": "a", "Alive": True, "Resources": {"CPU": 2.0}},
                {"NodeID": "b", "Alive": False, "Resources": {}}]

    @staticmethod
    def available_resources() -> dict[str, float]:
        return {"CPU": 2.0}

    cluster_resources = available_resources


@pytest.mark.parametrize("running", [0, 1])
def test_the_placement_warning_says_what_waits(
        running: int, caplog: pytest.LogCaptureFixture) -> None:
    """Actors no live node can hold (their node died): the warning says that
    the pass waits (no worker runs) or what it runs on, and what no node has."""
    from mploader.pool import State
    workers = [ray_backend.RayWorkerHandle(i, None, None, None, None, created_at=0.0)
               for i in range(2)]
    workers[1].state = State.READY if running else State.STARTING
    with caplog.at_level(logging.WARNING, logger="mploader"):
        ray_backend._warn_unplaced(_FakeRay(), RayBackend(resources={PINNED: 1}), workers)
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"workers {[0] if running else [0, 1]}: ")
    if running:
        assert "the loader runs on the 1 that started" in warning, warning
    else:
        assert "no worker of this loader runs, so the pass waits" in warning, warning
    assert f"no live node has {PINNED!r} enough for one" in warning, warning
    assert "once a node that has it joins the cluster" in warning, warning
    assert all(w.warned for w in workers if w.state is State.STARTING)
