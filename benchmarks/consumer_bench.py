"""(h) The consumer side: how fast elements get from the workers into TensorFlow.

Run by run.py in a fresh interpreter.  fn returns a ready array (the same
one every time), so only the hand-off is timed.  Three elements: an int64
scalar, a 224x224x3 float32 image (0.57 MiB), a 64x64x64 float32 volume
(1 MiB); four ways to consume them:

- ``bare``: ``tf.data.Dataset.from_generator`` over a plain generator, ``.batch(32)``;
- ``dataset_batch32``: ``MPLoader(fn, n).dataset().batch(32)``;
- ``batch_size32``: ``MPLoader(fn, n, batch_size=32).dataset()`` (batched in the workers);
- ``loader``: ``for x in MPLoader(fn, n)``, no TensorFlow.

Elements/s are steady rates (from the first element to the last), and the
parent's CPU per element (user + system, getrusage: TensorFlow's threads
included, the workers not).  Peers alternate, repetition by repetition
(A, B, C, D, A, B, ...), so the machine's drift hits them alike; medians.
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import READY, consume  # noqa: E402

from mploader import MPLoader  # noqa: E402

# element -> elements per measurement (about 2-3 s at the bare rate here)
ELEMENTS = {"int64_scalar": 12800, "image_224x224x3_f32": 3200, "volume_64x64x64_f32": 1280}
PEERS = ("bare", "dataset_batch32", "batch_size32", "loader")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(iterable, batched: bool) -> tuple[float, float]:
    """(steady elements/s, parent CPU ms per element) over one pass: from the
    first element to the last (workloads.consume)."""
    cpu_first = []
    timed = consume(iterable, len if batched else (lambda _: 1),
                    at_first=lambda: cpu_first.append(_cpu_s()))
    return (timed.after_first / (timed.last - timed.first),
            1000 * (_cpu_s() - cpu_first[0]) / timed.after_first)


def measure(element: str, peer: str, n: int, workers: int, tf) -> tuple[float, ...]:
    fn, spec = READY[element]
    signature = tf.TensorSpec(spec[1], tf.as_dtype(spec[0]))
    if peer == "bare":
        def generate():
            for i in range(n):
                yield fn(i)
        ds = tf.data.Dataset.from_generator(generate, output_signature=signature).batch(32)
        return timed(ds, batched=True)
    batch = 32 if peer == "batch_size32" else None
    loader_signature = (tf.TensorSpec((None,) + spec[1], signature.dtype) if batch
                        else signature)
    with MPLoader(fn, n, num_workers=workers, batch_size=batch,
                  output_signature=loader_signature) as loader:
        if peer == "loader":
            return timed(loader, batched=False)
        ds = loader.dataset()
        rate, cpu = timed(ds.batch(32) if peer == "dataset_batch32" else ds, batched=True)
        return rate, cpu, loader.stats()["elements_per_tensorflow_call"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="fewer elements (a smoke test)")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help="comma-separated; bare always runs (the ratios' base)")
    args = parser.parse_args()
    import tensorflow as tf
    chosen = ["bare"] + [p for p in PEERS if p != "bare" and p in args.peers.split(",")]
    runs: dict[str, dict[str, list[tuple[float, ...]]]] = {
        e: {p: [] for p in chosen} for e in ELEMENTS}
    for _ in range(args.reps):
        for element, n in ELEMENTS.items():
            for peer in chosen:
                runs[element][peer].append(
                    measure(element, peer, max(64, int(n * args.scale)), args.workers, tf))
    out = {"workers": args.workers, "reps": args.reps, "elements": {},
           # TensorFlow's CPU allocator, as the environment chose it (run.py's (h) rows)
           "tf_cpu_allocator_use_bfc": os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "")}
    for element, peers in runs.items():
        bare = peers["bare"]
        out["elements"][element] = {peer: {
            "per_s": statistics.median(r[0] for r in done),
            "cpu_ms": statistics.median(r[1] for r in done),
            "x_bare": statistics.median(r[0] / b[0] for r, b in zip(done, bare)),
            "x_bare_min": min(r[0] / b[0] for r, b in zip(done, bare)),
            "x_bare_max": max(r[0] / b[0] for r, b in zip(done, bare)),
            # through dataset(): elements per call of TensorFlow's generator (tf/grouping.py)
            "per_call": (statistics.median(r[2] for r in done)
                         if all(len(r) > 2 for r in done) else None),
        } for peer, done in peers.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
