"""The Ray backend's overhead: mploader on Ray against a bare Ray actor pool
doing the same work, and against the local backend.

Work: a sleep-bound fn (20 ms per item, a 256 KiB array out), so the figures
measure what carries the results, not the cores.  For each worker count:

- bare: N Ray actors, 2 calls in flight per actor, results taken in order
  (``ray.get``), the ceiling of any loader on the same actors;
- ray: ``MPLoader(..., backend="ray")``, its for-loop;
- ray_dataset_batch32: the same loader through ``loader.dataset().batch(32)``
  (TensorFlow; left out where it is not installed);
- local: ``MPLoader(...)``, the local backend's for-loop.

Run it where Ray may start a local instance (or with RAY_ADDRESS set), e.g.
in a loopback-only namespace as the tests do (``make bench``'s section (k)
runs it so)::

    unshare -n bash -c 'ip link set lo up && .venv-ray/bin/python benchmarks/ray_bench.py'

Every peer is started and run once untimed (its workers start, TensorFlow
traces), then the peers run one pass each over ``--items`` items per
repetition, repetitions outer, so the machine's drift hits them alike.
Rates are medians of ``--repeats``; ratios are taken run by run (a
repetition's runs pair up), median and range.  Prints a table, then one JSON
line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import numpy as np

from mploader import MPLoader
from workloads import consume

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


def dataset_rate(ds: Any) -> float:
    """Elements/s of one pass over ``ds`` (batches of a leading dimension),
    from its first request to its last element (workloads.consume)."""
    started = time.perf_counter()
    timed = consume(ds, lambda batch: int(batch.shape[0]))
    return timed.elements / (timed.last - started)


def measure(workers: int, items: int, repeats: int, tf: Any) -> dict[str, list[float]]:
    """Items/s of each peer, one run per repetition, repetitions outer."""
    import ray
    actors = [ray.remote(num_cpus=1)(_Bare).remote() for _ in range(workers)]
    ray.get([a.work.remote(0) for a in actors])
    spec = tf.TensorSpec((OUT_BYTES // 4,), tf.float32) if tf is not None else None
    on_ray = MPLoader(work, items, num_workers=workers, backend="ray", output_signature=spec)
    local = MPLoader(work, items, num_workers=workers)
    peers: dict[str, Callable[[], float]] = {
        "bare": lambda: bare_rate(ray, actors, items),
        "ray": lambda: loader_rate(on_ray)}
    if tf is not None:
        ds = on_ray.dataset().batch(32)
        peers["ray_dataset_batch32"] = lambda: dataset_rate(ds)
    peers["local"] = lambda: loader_rate(local)
    try:
        for run in peers.values():  # untimed: every worker starts, TensorFlow traces
            run()
        rates: dict[str, list[float]] = {name: [] for name in peers}
        for _ in range(repeats):
            for name, run in peers.items():
                rates[name].append(run())
    finally:
        on_ray.close()
        local.close()
        for actor in actors:
            ray.kill(actor)
    return rates


def summary(rates: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Each peer's median items/s, and its ratios to bare, run by run."""
    out = {}
    for name, runs in rates.items():
        row = {"per_s": statistics.median(runs)}
        ratios = [r / b for r, b in zip(runs, rates["bare"])]
        row.update(x_bare=statistics.median(ratios), x_bare_min=min(ratios),
                   x_bare_max=max(ratios))
        if name.startswith("ray"):
            ratios = [r / b for r, b in zip(runs, rates["local"])]
            row.update(x_local=statistics.median(ratios), x_local_min=min(ratios),
                       x_local_max=max(ratios))
        out[name] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    try:
        import tensorflow as tf
    except ImportError:
        tf = None  # no dataset() peer
    import ray
    # the bare actors and the loader's run side by side: 2 logical CPUs a worker
    ray.init(num_cpus=2 * max(args.workers), include_dashboard=False,
             logging_level="WARNING")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, Ray {ray.__version__}; fn sleeps "
          f"{SLEEP_S * 1e3:.0f} ms and returns {OUT_BYTES >> 10} KiB; {args.items} items, "
          f"medians of {args.repeats} interleaved runs", flush=True)
    print(f"{'workers':>7} {'bare Ray':>10} {'mploader Ray':>13} {'Ray .batch(32)':>15} "
          f"{'local':>10} {'Ray/bare':>9} {'ds/bare':>8} {'Ray/local':>10}   (items/s)",
          flush=True)
    figures = {}
    for workers in args.workers:
        rows = summary(measure(workers, args.items, args.repeats, tf))
        figures[str(workers)] = rows
        ds = rows.get("ray_dataset_batch32")
        print(f"{workers:>7} {rows['bare']['per_s']:>10.1f} {rows['ray']['per_s']:>13.1f} "
              f"{ds['per_s'] if ds else float('nan'):>15.1f} {rows['local']['per_s']:>10.1f} "
              f"{rows['ray']['x_bare']:>9.2f} {ds['x_bare'] if ds else float('nan'):>8.2f} "
              f"{rows['ray']['x_local']:>10.2f}", flush=True)
    version = ray.__version__
    ray.shutdown()
    out = {"items": args.items, "reps": args.repeats, "sleep_s": SLEEP_S,
           "result_bytes": OUT_BYTES, "ray": version, "workers": figures}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
