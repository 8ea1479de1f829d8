"""The Ray backend's tests: one 2-node Ray cluster on loopback for the whole run.

``make test-ray`` runs them inside a private network namespace with only
loopback up, so every address Ray binds is 127.0.0.1.  The cluster
(``ray.cluster_utils.Cluster``): a head node with 2 CPUs and a second node
with 2 CPUs and a custom resource ``second``, each its own raylet and object
store, so results really cross from one node's object store to the driver's.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray")  # .venv-ray holds .[test,ray]

_OBJECT_STORE_BYTES = 128 << 20  # per node: small, this machine runs other work


@pytest.fixture(scope="session")
def cluster() -> Iterator[Any]:
    from ray.cluster_utils import Cluster
    made = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "object_store_memory": _OBJECT_STORE_BYTES,
        "include_dashboard": False})
    made.add_node(num_cpus=2, resources={"second": 4}, object_store_memory=_OBJECT_STORE_BYTES)
    made.wait_for_nodes()
    ray.init(address=made.address, logging_level="WARNING")
    try:
        yield made
    finally:
        ray.shutdown()
        made.shutdown()


@pytest.fixture
def no_actor_left(cluster: Any) -> Iterator[None]:
    """Fails a test that leaves an actor of mploader alive when it ends."""
    yield
    deadline = time.monotonic() + 10
    while (alive := alive_workers()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"actors left alive: {alive}"


def alive_workers() -> list[dict[str, Any]]:
    """The mploader actors the cluster's GCS holds alive, any driver's (the
    actor table: ray.util.state needs the dashboard, which ``ray`` alone lacks)."""
    return [a for a in ray._private.state.actors().values()
            if a["ActorClassName"] == "_RayWorker" and a["State"] != "DEAD"]


def pids_gone(pids: list[int], within: float) -> bool:
    """Every process of ``pids`` ended within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{pid}") and not _zombie(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def child(code: str, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen:
    """A child interpreter running ``code`` (stdout and stderr piped)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, **kwargs)
