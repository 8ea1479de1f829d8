"""(i) Many workers for a fn that waits: processes, threads, or both.

Run by run.py in a fresh interpreter.  ``fn`` sleeps 20 ms (a read from
network storage) and returns 256 KiB, so K items in flight can give at most
K / 0.02 items/s whatever the cores: the *efficiency* of a way to run it is
its steady rate over that ideal.  For K = 4, 16, 64 items in flight:

- mploader with K processes of one thread (``processes``), one process of K
  threads (``threads``), and 4 processes of K/4 threads (``both``), each
  consumed three ways: ``for x in loader``, ``loader.dataset().batch(32)``,
  and ``MPLoader(..., batch_size=32).dataset()`` (batched in the workers);
- at the largest K, the mploader rows again while another process keeps
  one core busy (``--loaded``);
- at the largest K, the ``dataset().batch(32)`` rows again over a pass of
  LONG_PASS_S: a pass's start (its first groups) and its end (the last
  groups, drained after the workers finish) cost about the same time in
  any pass, so the longer pass shows the rate in between;
- at the largest K, over both pass lengths, TensorFlow's own generator
  path fed by a producer that costs nothing (``bare_paced``): a bare
  ``from_generator`` whose generator gives the ready result on the ideal
  schedule (K results every 20 ms from its first call), ``.batch(32)``;
  what a hand-off of one element per generator call reaches at this
  pass length, whoever makes the elements;
- at the largest K, PyTorch's DataLoader (K worker processes), Grain's
  DataLoader (K workers) and ``tf.data`` ``map(numpy_function, num_parallel_calls=K)``
  with ``.batch(32)`` (on a sixteenth of the items: it keeps about as many
  calls in flight as there are cores, so a whole pass would take minutes),
  when installed.

Each run makes its loader, runs one whole pass untimed (the workers start,
TensorFlow traces), then times a second pass from its first request to its
last element (not the iterator's end: see workloads.consume), so filling the
pipeline counts; the ideal time of a pass is its rounds of in-flight tasks (a
worker batch runs its 32 items one after another on one thread). Grain starts
new worker processes every pass, so its rate is taken from its first element
to its last instead (which favours it). Runs alternate, repetition by
repetition, so the machine's drift hits them alike; medians. Prints one JSON
line, and a line per run on stderr (its time).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import consume  # noqa: E402

SLEEP_S = 0.02
RESULT = np.ones(64 << 10, np.float32)  # 256 KiB
IN_FLIGHT = (4, 16, 64)
MODES = {"processes": lambda k: (k, 1), "threads": lambda k: (1, k),
         "both": lambda k: (4, k // 4)}
CONSUMERS = ("loop", "dataset_batch32", "batch_size32")
PEERS = ("torch", "grain", "tf_map")
PASS_S = 1.0  # ideal time of a timed pass (filling and draining the pipeline count in it)
LONG_PASS_S = 4.0  # the same, for the rows that show what the start and the end cost
BARE_PACED = "bare from_generator, results ready at the ideal pace, batch(32)"
TF_MAP_SHARE = 16  # tf.data's map runs a fraction of the items: its threads are the cores


def fn(i: int) -> np.ndarray:
    time.sleep(SLEEP_S)
    return RESULT


def _pass_s(make_iterable) -> float:
    """Seconds of a timed pass, after an untimed one: from its first request
    to its last element (workloads.consume)."""
    consume(make_iterable())
    start = time.perf_counter()
    return consume(make_iterable()).last - start


def _ideal_s(n: int, k: int, task_items: int = 1) -> float:
    """A pass's rounds of k tasks in flight, each task_items x SLEEP_S."""
    return -(-n // (task_items * k)) * task_items * SLEEP_S


class _BusyCore:
    """Another process keeps one core busy (a pure-Python loop) while a run
    is timed: the consumer and the workers then share what is left."""

    def __enter__(self) -> "_BusyCore":
        self._child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        return self

    def __exit__(self, *exc: object) -> None:
        self._child.kill()
        self._child.wait()


def _mploader(n: int, processes: int, threads: int, consumer: str, tf) -> float:
    from mploader import MPLoader
    batch = 32 if consumer == "batch_size32" else None
    spec = tf.TensorSpec((None, RESULT.size) if batch else (RESULT.size,), tf.float32)
    with MPLoader(fn, n, num_workers=processes, threads_per_worker=threads,
                  batch_size=batch, output_signature=spec) as loader:
        if consumer == "loop":
            elapsed = _pass_s(lambda: loader)
        else:
            ds = loader.dataset()
            elapsed = _pass_s(lambda: ds.batch(32) if consumer == "dataset_batch32" else ds)
        _check_no_tensorflow(loader.worker_pids())
    return _ideal_s(n, processes * threads, batch or 1) / elapsed


def _check_no_tensorflow(pids: list[int]) -> None:
    """Fail if a worker loaded TensorFlow: each such worker costs seconds of
    CPU and about 200 MiB to start, which at 64 workers is minutes and many GiB
    (what made this section fail in a full run: see _tf_map_fn)."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                loaded = "libtensorflow" in f.read()
        except OSError:
            continue  # a worker that just exited
        if loaded:
            raise RuntimeError(f"worker {pid} has loaded TensorFlow: fn carries a reference "
                               "to it (an attribute TensorFlow set on fn?)")


def _tf_map_fn(i):
    """fn for tf.data's map, a function of its own: TensorFlow's autograph sets
    an attribute (``ag_dnc_wrapper__``, a TensorFlow function) on the function
    that tf.numpy_function is given, and cloudpickle ships a function's
    attributes, so after a tf_map run every later loader of ``fn`` made its
    workers import TensorFlow."""
    return fn(i)


class _Items:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        return fn(i)


def _peer(peer: str, n: int, k: int, tf) -> float:
    if peer == "torch":
        from torch.utils.data import DataLoader
        loader = DataLoader(_Items(n), batch_size=None, num_workers=k,
                            multiprocessing_context="fork", persistent_workers=True)
        elapsed = _pass_s(lambda: loader)
        del loader
        return _ideal_s(n, k) / elapsed
    if peer == "grain":
        import grain.python as gp
        loader = gp.DataLoader(
            data_source=_Items(n),
            sampler=gp.IndexSampler(num_records=n, shard_options=gp.NoSharding(),
                                    shuffle=False, num_epochs=1),
            worker_count=k)
        timed = consume(loader)
        return timed.after_first / (timed.last - timed.first) / (k / SLEEP_S)
    n = max(64, n // TF_MAP_SHARE)  # ~cores in flight, whatever num_parallel_calls says
    ds = tf.data.Dataset.range(n).map(
        lambda i: tf.numpy_function(_tf_map_fn, [i], tf.float32),
        num_parallel_calls=k).batch(32)
    return _ideal_s(n, k) / _pass_s(lambda: ds)


def _bare_paced(n: int, k: int, tf) -> float:
    """A bare from_generator fed on the ideal schedule (see the module docstring)."""
    def paced():
        start = time.perf_counter()
        for i in range(n):
            wait = start + (i // k + 1) * SLEEP_S - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            yield RESULT
    ds = tf.data.Dataset.from_generator(
        paced, output_signature=tf.TensorSpec((RESULT.size,), tf.float32))
    return _ideal_s(n, k) / _pass_s(lambda: ds.batch(32))


def _installed(peer: str) -> bool:
    import importlib.util
    module = {"torch": "torch", "grain": "grain", "tf_map": "tensorflow"}[peer]
    return importlib.util.find_spec(module) is not None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="fewer items (a smoke test)")
    parser.add_argument("--in-flight", default=",".join(map(str, IN_FLIGHT)),
                        help="items in flight, comma-separated")
    parser.add_argument("--loaded", action="store_true",
                        help="also run the mploader rows of the most in flight with one core busy")
    parser.add_argument("--consumers", default=",".join(CONSUMERS), help="comma-separated")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help="comma-separated, those installed run; '' for none")
    parser.add_argument("--long-pass", action=argparse.BooleanOptionalAction, default=True,
                        help=f"the dataset_batch32 rows of the most in flight over a "
                             f"{LONG_PASS_S:.0f} s pass")
    args = parser.parse_args()
    consumers = [c for c in CONSUMERS if c in args.consumers.split(",")]
    peers = [p for p in PEERS if p in args.peers.split(",") and _installed(p)]
    import tensorflow as tf
    # (in flight, name, how, one core busy, ideal seconds of a pass)
    rows: list[tuple[int, str, tuple, bool, float]] = []
    in_flight = [int(k) for k in args.in_flight.split(",")]
    for k in in_flight:
        for mode, shape in MODES.items():
            processes, threads = shape(k)
            if mode == "both" and threads == 1:
                continue  # 4 x 1 is the processes row
            rows += [(k, f"mploader {mode} {processes}x{threads} {consumer}",
                      ("mploader", processes, threads, consumer), False, PASS_S)
                     for consumer in consumers]
        if k == max(in_flight):  # the peers where the difference shows: most in flight
            rows += [(k, peer, (peer,), False, PASS_S) for peer in peers]
            if "dataset_batch32" in consumers:
                rows.append((k, BARE_PACED, ("bare_paced",), False, PASS_S))
    most = [row for row in rows if row[0] == max(in_flight) and row[2][0] == "mploader"]
    if args.loaded:
        rows += [(k, f"{name}, one core busy", how, True, pass_s)
                 for k, name, how, _, pass_s in most]
    if args.long_pass:
        rows += [(k, f"{name}, a {LONG_PASS_S:.0f} s pass", how, False, LONG_PASS_S)
                 for k, name, how, _, _ in most if how[3] == "dataset_batch32"]
        if "dataset_batch32" in consumers:
            rows.append((max(in_flight), f"{BARE_PACED}, a {LONG_PASS_S:.0f} s pass",
                         ("bare_paced",), False, LONG_PASS_S))
    runs: dict[tuple[int, str], list[float]] = {(k, name): [] for k, name, _, _, _ in rows}
    started = time.perf_counter()
    for rep in range(args.reps):
        for k, name, how, busy, pass_s in rows:
            n = max(64, int(args.scale * pass_s * k / SLEEP_S))
            run_started = time.perf_counter()
            with _BusyCore() if busy else contextlib.nullcontext():
                if how[0] == "mploader":
                    runs[(k, name)].append(_mploader(n, *how[1:], tf))
                elif how[0] == "bare_paced":
                    runs[(k, name)].append(_bare_paced(n, k, tf))
                else:
                    runs[(k, name)].append(_peer(how[0], n, k, tf))
            # progress on stderr: where the time went, and the context of a failure
            print(f"(i) rep {rep + 1}/{args.reps}, {k} in flight, {name}, {n} items: "
                  f"{runs[(k, name)][-1]:.2f} in {time.perf_counter() - run_started:.1f} s "
                  f"({time.perf_counter() - started:.0f} s in all)", file=sys.stderr, flush=True)
    out = {"reps": args.reps, "sleep_s": SLEEP_S, "result_bytes": RESULT.nbytes,
           "tf_cpu_allocator_use_bfc": os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", ""),
           "rows": [{"in_flight": k, "how": name,
                     "efficiency": statistics.median(runs[(k, name)]),
                     "min": min(runs[(k, name)]), "max": max(runs[(k, name)])}
                    for k, name, _, _, _ in rows]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
