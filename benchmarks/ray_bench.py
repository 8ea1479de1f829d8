"""The Ray backend's overhead: mploader on Ray against a bare Ray actor pool
doing the same work, and against the local backend.

Work: a sleep-bound fn (20 ms per item, a 256 KiB array out), so the figures
measure what carries the results, not the cores.  For each worker count:

- bare: N Ray actors, 2 calls in flight per actor, results taken in order
  (``ray.get``), the ceiling of any loader on the same actors;
- ray: ``MPLoader(..., backend="ray")``, its for-loop;
- local: ``MPLoader(...)``, the local backend's for-loop.

Run it where Ray may start a local instance (or with RAY_ADDRESS set), e.g.
in a loopback-only namespace as the tests do::

    unshare -n bash -c 'ip link set lo up && .venv-ray/bin/python benchmarks/ray_bench.py'

Each rate is the median of ``--repeats`` passes over ``--items`` items, after
a first pass that starts every worker.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

import numpy as np

from mploader import MPLoader

SLEEP_S = 0.02
OUT_BYTES = 256 << 10


def work(i: int) -> np.ndarray:
    time.sleep(SLEEP_S)
    return np.full(OUT_BYTES // 4, i, np.float32)


class _Bare:
    """A bare actor: the same work, nothing else."""

    def work(self, i: int) -> np.ndarray:
        return work(i)


def bare_rate(ray: Any, actors: list[Any], items: int) -> float:
    """Items/s of ``actors`` with 2 calls in flight each, taken in order."""
    started = time.perf_counter()
    in_flight: list[Any] = []
    sent = 0
    for _ in range(2 * len(actors)):
        if sent < items:
            in_flight.append(actors[sent % len(actors)].work.remote(sent))
            sent += 1
    for taken in range(items):
        value = ray.get(in_flight.pop(0))
        assert value[0] == taken
        if sent < items:
            in_flight.append(actors[sent % len(actors)].work.remote(sent))
            sent += 1
    return items / (time.perf_counter() - started)


def loader_rate(loader: MPLoader) -> float:
    started = time.perf_counter()
    count = sum(1 for _ in loader)
    return count / (time.perf_counter() - started)


def measure(workers: int, items: int, repeats: int) -> dict[str, float]:
    import ray
    actors = [ray.remote(num_cpus=1)(_Bare).remote() for _ in range(workers)]
    ray.get([a.work.remote(0) for a in actors])
    bare = statistics.median(bare_rate(ray, actors, items) for _ in range(repeats))
    for actor in actors:
        ray.kill(actor)
    rates = {"bare": bare}
    for name, backend in (("ray", "ray"), ("local", "process")):
        with MPLoader(work, items, num_workers=workers, backend=backend) as loader:
            loader_rate(loader)  # starts every worker
            rates[name] = statistics.median(loader_rate(loader) for _ in range(repeats))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    import ray
    ray.init(num_cpus=max(args.workers), include_dashboard=False, logging_level="WARNING")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, Ray {ray.__version__}; fn sleeps "
          f"{SLEEP_S * 1e3:.0f} ms and returns {OUT_BYTES >> 10} KiB; {args.items} items, "
          f"median of {args.repeats}")
    print(f"{'workers':>7} {'bare Ray':>10} {'mploader Ray':>13} {'local':>10} "
          f"{'Ray/bare':>9} {'Ray/local':>10}   (items/s)")
    figures = {}
    for workers in args.workers:
        rates = measure(workers, args.items, args.repeats)
        figures[workers] = rates
        print(f"{workers:>7} {rates['bare']:>10.1f} {rates['ray']:>13.1f} "
              f"{rates['local']:>10.1f} {rates['ray'] / rates['bare']:>9.2f} "
              f"{rates['ray'] / rates['local']:>10.2f}")
    ray.shutdown()
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=1)


if __name__ == "__main__":
    main()
