"""The Ray backend gives what the local backend gives: the same values in the
same order with a seed, batched or not, a state either one resumes, and work
spread over the cluster's nodes as num_cpus and resources ask."""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pytest

import mploader
from mploader import MPLoader, RayBackend
from mploader.testing import assert_resume_exact

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.usefixtures("no_actor_left")


def augment(i: int) -> dict[str, Any]:
    """Per-item random numbers and an array whose shape varies with the item."""
    rng = mploader.item_rng()
    return {"image": rng.normal(size=(3 + i % 4, 5)).astype(np.float32),
            "label": np.int64(i), "draw": rng.random()}


def fixed(i: int) -> dict[str, Any]:
    rng = mploader.item_rng()
    return {"image": rng.integers(0, 255, size=(16, 16), dtype=np.uint8), "draw": rng.random()}


def two_samples(i: int) -> Any:
    rng = mploader.item_rng()
    for _ in range(2):
        yield np.full(3, i) + rng.random(3)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def _run(fn: Any, backend: Any, workers: int, **options: Any) -> list[Any]:
    with MPLoader(fn, 30, num_workers=workers, seed=7, shuffle=True, backend=backend,
                  **options) as loader:
        return [x for _ in range(2) for x in loader]  # two epochs


@pytest.mark.parametrize("fn, options", [
    (augment, {}),
    (fixed, {"batch_size": 4}),
    (augment, {"batch_size": 4, "padded_shapes": {"image": (6, 5)}}),
    (two_samples, {"samples_per_item": 2, "batch_size": 3}),
], ids=["items", "batches", "padded-batches", "samples"])
def test_a_seeded_ray_run_gives_the_local_runs_output(fn: Any, options: dict[str, Any]) -> None:
    local = _run(fn, "process", 2, **options)
    remote = _run(fn, RayBackend(), 3, **options)
    assert len(remote) == len(local)
    assert all(_same(a, b) for a, b in zip(local, remote))


def where(i: int) -> dict[str, Any]:
    time.sleep(0.05)
    return {"node": ray.get_runtime_context().get_node_id(), "pid": np.int64(os.getpid())}


def test_work_lands_on_both_nodes(cluster: Any) -> None:
    nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert len(nodes) == 2
    seen: list[Any] = []
    with MPLoader(where, 40, num_workers=4, backend="ray") as loader:
        # Actors take work once started; 4 actors of 1 CPU on two nodes of 2
        # CPUs each: both nodes, once every actor runs (a pass or two).
        for _ in range(5):
            seen += list(loader)
            if len({int(x["pid"]) for x in seen}) == 4:
                break
    assert {x["node"] for x in seen} == nodes
    assert len({int(x["pid"]) for x in seen}) == 4


def test_resources_place_the_actors(cluster: Any) -> None:
    second = next(node["NodeID"] for node in ray.nodes()
                  if node["Alive"] and "second" in node["Resources"])
    with MPLoader(where, 12, num_workers=2,
                  backend=RayBackend(num_cpus=0.5, resources={"second": 1})) as loader:
        assert {x["node"] for x in loader} == {second}


@pytest.mark.parametrize("workers", [(3, 2), (2, 3)], ids=["ray-to-local", "local-to-ray"])
def test_a_state_resumes_on_the_other_backend(workers: tuple[int, int]) -> None:
    def make_loader(num_workers: int) -> MPLoader:
        backend = "ray" if num_workers == 3 else "process"  # 3 workers: the Ray run
        return MPLoader(fixed, 20, num_workers=num_workers, seed=3, shuffle=True,
                        batch_size=3, backend=backend)
    # 7 batches an epoch: interrupted after 0, 2, 4 and 6 of them, and at its end
    assert assert_resume_exact(make_loader, epochs=1, every=2, workers=workers) == 5


_WORKER = None  # set by worker_init in each actor


def remember(worker_id: int) -> None:
    global _WORKER
    _WORKER = worker_id


def whose(i: int) -> int:
    return _WORKER


def test_worker_init_runs_once_per_actor_and_its_state_lasts() -> None:
    with MPLoader(whose, 20, num_workers=2, worker_init=remember, backend="ray") as loader:
        first, second = list(loader), list(loader)
    assert set(first) | set(second) <= {0, 1}


def test_stats_and_results_of_a_ray_run() -> None:
    with MPLoader(fixed, 10, num_workers=2, backend="ray") as loader:
        values = list(loader)
        stats = loader.stats()
    assert stats["items"] == 10 and len(stats["worker_busy_fraction"]) == 2
    assert all(v["image"].shape == (16, 16) for v in values)


# -- dataset(): TensorFlow on the driver, the workers Ray actors (.venv-ray
# -- holds tensorflow-cpu for these; the actors never import it)


def _through_dataset(backend: Any, workers: int, tail: Any, **options: Any) -> list[Any]:
    with MPLoader(fixed, 30, num_workers=workers, seed=7, shuffle=True, backend=backend,
                  **options) as loader:
        return list(tail(loader.dataset().repeat(2)).as_numpy_iterator())  # two epochs


@pytest.mark.parametrize("options, tail, batches", [
    ({}, lambda ds: ds.batch(4), 15),          # 60 items, batched across the epochs
    ({"batch_size": 4}, lambda ds: ds, 16),    # 2 epochs of 8 (the last one short)
], ids=["dataset-batch", "batch_size"])
def test_a_seeded_ray_dataset_gives_the_local_datasets_output(options: dict[str, Any],
                                                             tail: Any, batches: int) -> None:
    local = _through_dataset("process", 2, tail, **options)
    remote = _through_dataset(RayBackend(), 3, tail, **options)
    assert len(remote) == len(local) == batches
    assert all(_same(a, b) for a, b in zip(local, remote))


def test_a_state_saved_under_dataset_on_ray_resumes_on_the_local_backend() -> None:
    def make_loader(num_workers: int) -> MPLoader:
        backend = "ray" if num_workers == 3 else "process"  # 3 workers: the Ray run
        return MPLoader(fixed, 20, num_workers=num_workers, seed=3, shuffle=True,
                        batch_size=3, backend=backend)
    assert assert_resume_exact(make_loader, epochs=1, every=3, workers=(3, 2),
                               via="dataset") == 4  # after 0, 3, 6 batches and at the end
