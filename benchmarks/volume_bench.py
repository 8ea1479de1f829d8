"""(j) Large volumes: the hand-off's rate and its peak memory, per element size.

Run by run.py.  ``fn`` allocates and fills a float32 volume of S MiB, so
what is timed is the hand-off of large results, not their making.  Peers:

- ``bare``: ``tf.data.Dataset.from_generator`` over ``fn`` in the parent, ``.batch(2)``;
- ``dataset_batch2``: ``MPLoader(fn, n).dataset().batch(2)``;
- ``batch_size2``: ``MPLoader(fn, n, batch_size=2).dataset()``;
- ``slow_consumer``: ``MPLoader(fn, n).dataset().batch(2)`` read by a consumer that
  spends 3x the bare time per batch (a training step): memory, not rate.

Each measurement runs in a fresh interpreter (``--one``), so no allocator keeps
memory of an earlier one; peers alternate repetition by repetition.  Rate:
elements/s from the first element to the last (workloads.consume).  Peak
memory: a thread samples, every 10 ms, the anonymous memory of the parent
and its workers and the shared memory of the loader's arenas (tree_bytes:
no page counted twice, libraries not counted), and reports the peak above the parent's before the
first pass, in elements of S MiB.  The workers' own interpreters (tens of MiB
each) are in that figure.  What the loader adds is the peak above bare's (what
TensorFlow's consumer itself holds: the element it converts, the batch it
fills, the batch handed out), run by run; its bound is :func:`bound`.  Prints
one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import consume  # noqa: E402

PEERS = ("bare", "dataset_batch2", "batch_size2", "slow_consumer")
SIZES_MIB = (32, 256)
ELEMENTS = {32: 48, 256: 24}   # per measurement: a few seconds at the bare rate here
SAMPLE_S = 0.01


def make_volume(mib: int):
    """fn: a fresh float32 volume of ``mib`` MiB, filled with its index."""
    import numpy as np
    side = round((mib * (1 << 20) // 4) ** (1 / 3))
    shape = (side, side, (mib * (1 << 20) // 4) // (side * side))

    def volume(i: int) -> np.ndarray:
        out = np.empty(shape, np.float32)
        out.fill(i)
        return out
    return volume, shape


def volume_bytes(mib: int) -> int:
    """The bytes of one volume of ``mib`` MiB (its cube's sides are rounded)."""
    import numpy as np
    return int(np.prod(make_volume(mib)[1])) * 4


def tree_bytes(pid: int) -> int:
    """The anonymous memory of ``pid`` and its children (the loader's
    workers) plus the shared memory of the loader's arenas, from counters
    the kernel keeps (RssAnon in /proc/PID/status; the blocks of each
    ``memfd:mploader-*`` file a process holds, each file once), so a sample
    costs the same whatever is mapped.  (Pss from smaps_rollup walks every
    page table: at 256 MiB elements, sampling it every 10 ms cut the
    loader's measured rate by 40-45%, bare's, with less mapped, by 10%.)"""
    anon = 0
    arenas: dict[tuple[int, int], int] = {}
    pids = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):  # workers start from a spawner thread
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                anon += next(int(line.split()[1]) << 10 for line in f
                             if line.startswith("RssAnon:"))
            for fd in os.listdir(f"/proc/{p}/fd"):
                if os.readlink(f"/proc/{p}/fd/{fd}").startswith("/memfd:mploader-"):
                    st = os.stat(f"/proc/{p}/fd/{fd}")
                    arenas[(st.st_dev, st.st_ino)] = st.st_blocks * 512
        except (OSError, StopIteration):
            pass  # a worker that just exited, or a descriptor just closed
    return anon + sum(arenas.values())


class Peak:
    """The highest tree_bytes() seen, sampled on a thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_bytes(os.getpid()))
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_bytes(os.getpid()))


def bound(peer: str, workers: int, volume_bytes: int) -> int:
    """The loader's bound over what the consumer holds, in bytes: per
    worker, results waiting or being written up to ``max(prefetch x S,
    64 MiB)`` for results of S bytes (its slot: whole pages; a worker batch
    of 2 with batch_size2), plus the one ``fn`` is making; bare has no
    workers."""
    import inspect

    from mploader import MPLoader
    from mploader.slots import PAGE_BYTES, RUN_AHEAD_BYTES
    if peer == "bare":
        return 0
    prefetch = inspect.signature(MPLoader).parameters["prefetch"].default  # what the peers use
    per_result = -(-volume_bytes * (2 if peer == "batch_size2" else 1) // PAGE_BYTES) * PAGE_BYTES
    waiting = max(prefetch * per_result, RUN_AHEAD_BYTES // per_result * per_result)
    return workers * (waiting + per_result)


def one(mib: int, peer: str, n: int, workers: int, step_s: float) -> dict:
    """One measurement, in this (fresh) interpreter."""
    import tensorflow as tf

    from mploader import MPLoader
    fn, shape = make_volume(mib)
    spec = tf.TensorSpec(shape, tf.float32)
    start = tree_bytes(os.getpid())
    loader = None
    if peer == "bare":
        def generate():
            for i in range(n):
                yield fn(i)
        ds = tf.data.Dataset.from_generator(generate, output_signature=spec).batch(2)
    elif peer == "batch_size2":
        loader = MPLoader(fn, n, num_workers=workers, batch_size=2,
                          output_signature=tf.TensorSpec((None,) + shape, tf.float32))
        ds = loader.dataset()
    else:
        loader = MPLoader(fn, n, num_workers=workers, output_signature=spec)
        ds = loader.dataset().batch(2)
    def step(batch: Any) -> int:
        if peer == "slow_consumer":
            time.sleep(step_s)
        return len(batch)
    with Peak() as peak:
        timed = consume(ds, step)
    if loader is not None:
        loader.close()
    return {"per_s": timed.after_first / (timed.last - timed.first),
            "peak_elements": (peak.peak - start) / (mib << 20)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="smaller volumes (a smoke test)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES_MIB)), help="MiB, comma-separated")
    parser.add_argument("--one", nargs=5, metavar=("MIB", "PEER", "N", "WORKERS", "STEP_S"))
    args = parser.parse_args()
    if args.one:
        mib, peer, n, workers, step_s = args.one
        print(json.dumps(one(int(mib), peer, int(n), int(workers), float(step_s))))
        return
    bases = [int(s) for s in args.sizes.split(",")]
    sizes = [max(1, int(s * args.scale)) for s in bases]
    runs = {s: {p: [] for p in PEERS} for s in sizes}
    steps = {}
    for _ in range(args.reps):
        for size, base in zip(sizes, bases):
            n = ELEMENTS.get(base, 48)
            for peer in PEERS:
                # the slow consumer's step: 3x the time bare takes per batch of 2
                step = 3 * 2 / statistics.median(r["per_s"] for r in runs[size]["bare"]) \
                    if peer == "slow_consumer" else 0.0
                steps[size] = step or steps.get(size, 0.0)
                done = subprocess.run(
                    [sys.executable, __file__, "--one", str(size), peer, str(n),
                     str(args.workers), str(step)],
                    capture_output=True, text=True, timeout=600)
                lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
                if done.returncode != 0 or not lines:
                    raise SystemExit(f"{size} MiB, {peer}: " +
                                     (done.stderr.strip().splitlines() or ["no output"])[-1])
                runs[size][peer].append(json.loads(lines[-1]))
    out = {"workers": args.workers, "reps": args.reps, "sizes": {}}
    for size, peers in runs.items():
        bare = peers["bare"]
        out["sizes"][str(size)] = {"slow_step_s": steps[size], "peers": {peer: {
            "per_s": statistics.median(r["per_s"] for r in done),
            "x_bare": statistics.median(r["per_s"] / b["per_s"] for r, b in zip(done, bare)),
            "x_bare_min": min(r["per_s"] / b["per_s"] for r, b in zip(done, bare)),
            "x_bare_max": max(r["per_s"] / b["per_s"] for r, b in zip(done, bare)),
            "peak_elements": statistics.median(r["peak_elements"] for r in done),
            "peak_max": max(r["peak_elements"] for r in done),
            # what the loader adds to what TensorFlow's consumer holds (bare's
            # peak, run by run), against its bound (see BOUND_DOC)
            "over_bare": statistics.median(r["peak_elements"] - b["peak_elements"]
                                           for r, b in zip(done, bare)),
            "over_bare_max": max(r["peak_elements"] - b["peak_elements"]
                                 for r, b in zip(done, bare)),
            "bound": bound(peer, args.workers, volume_bytes(int(size))) / (int(size) << 20),
        } for peer, done in peers.items()}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
