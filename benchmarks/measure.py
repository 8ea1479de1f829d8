"""One measurement in a fresh interpreter: one workload through one peer, printed as JSON.

    python benchmarks/measure.py WORKLOAD PEER --n N --reps R --workers W

Run by run.py.  Each repetition builds the peer from scratch, so "overall"
includes its start-up; "steady" counts from the first element to the last.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np

from workloads import WORKLOADS, consume


def tf_signature(name):
    import tensorflow as tf
    _, dtypes, shapes = WORKLOADS[name]
    specs = [tf.TensorSpec(s, d) for s, d in zip(shapes, dtypes)]
    return specs[0] if len(specs) == 1 else tuple(specs)


def peer_serial(name, n, workers):
    fn = WORKLOADS[name][0]
    return (fn(i) for i in range(n)), None


def peer_tf_map(name, n, workers):
    import tensorflow as tf
    fn, dtypes, _ = WORKLOADS[name]
    out = [tf.as_dtype(d) for d in dtypes]
    ds = tf.data.Dataset.range(n).map(lambda i: tf.numpy_function(fn, [i], out),
                                      num_parallel_calls=tf.data.AUTOTUNE)
    return iter(ds), None


def peer_bare_from_generator(name, n, workers):
    """The consumer-side ceiling: from_generator over an in-process generator."""
    import tensorflow as tf
    fn = WORKLOADS[name][0]
    ds = tf.data.Dataset.from_generator(lambda: (fn(i) for i in range(n)),
                                        output_signature=tf_signature(name))
    return iter(ds), None


def peer_memcpy(name, n, workers):
    """The hardware ceiling for big items: one copy of each into fresh memory."""
    fn = WORKLOADS[name][0]
    return (np.array(fn(i), copy=True) for i in range(n)), None


def peer_keras_pydataset(name, n, workers):
    import keras
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter
    fn = WORKLOADS[name][0]

    class Items(keras.utils.PyDataset):
        def __len__(self):
            return n

        def __getitem__(self, i):  # a batch of one item
            out = fn(i)
            return tuple(np.expand_dims(o, 0) for o in out) if isinstance(out, tuple) else out[None]

    ds = Items(workers=workers, use_multiprocessing=True)
    return iter(PyDatasetAdapter(ds, shuffle=False).get_tf_dataset()), None


class _IndexDataset:
    def __init__(self, fn, n):
        self.fn, self.n = fn, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.fn(i)


def _torch(name, n, workers, context):
    from torch.utils.data import DataLoader
    loader = DataLoader(_IndexDataset(WORKLOADS[name][0], n), batch_size=None,
                        num_workers=workers, multiprocessing_context=context)
    return iter(loader), None


def peer_torch_spawn(name, n, workers):
    return _torch(name, n, workers, "spawn")


def peer_torch_fork(name, n, workers):
    return _torch(name, n, workers, "fork")


def peer_grain(name, n, workers):
    import grain.python as gp

    class Apply(gp.MapTransform):
        def map(self, i):
            return WORKLOADS[name][0](int(i))

    loader = gp.DataLoader(
        data_source=_IndexDataset(lambda i: i, n),
        sampler=gp.IndexSampler(num_records=n, shard_options=gp.NoSharding(),
                                shuffle=False, num_epochs=1),
        operations=[Apply()], worker_count=workers)
    return iter(loader), None


def _mploader(name, n, workers, ordered=True, via_tf=False, batch_size=None):
    from mploader import MPLoader
    loader = MPLoader(WORKLOADS[name][0], n, num_workers=workers, ordered=ordered,
                      batch_size=batch_size,
                      output_signature=None if not via_tf or batch_size else tf_signature(name))
    return iter(loader.dataset() if via_tf else loader), loader


def peer_mploader(name, n, workers):
    return _mploader(name, n, workers)


def peer_mploader_unordered(name, n, workers):
    return _mploader(name, n, workers, ordered=False)


def peer_mploader_tf(name, n, workers):
    return _mploader(name, n, workers, via_tf=True)


def peer_mploader_tf_batch64(name, n, workers):
    return _mploader(name, n, workers, via_tf=True, batch_size=64)


PEERS = {k[len("peer_"):]: v for k, v in globals().items() if k.startswith("peer_")}


_CEILING_CHILD = """
import sys, time
sys.path[:0] = {path!r}
from workloads import WORKLOADS
fn = WORKLOADS[{name!r}][0]
fn({start})  # imports and first-call costs, outside the window
print("ready", flush=True)
sys.stdin.readline()  # every process starts its loop at the same moment
begin = time.time()
for i in range({start}, {stop}):
    fn(i)
print(begin, time.time())
"""


def ceiling(name, n, workers):
    """The machine's parallel ceiling for fn: ``workers`` independent
    processes, each running fn serially over its share, started together
    once all are warm; the summed rate, from the first start to the last end
    of their timed loops."""
    shares = [(n * k // workers, n * (k + 1) // workers) for k in range(workers)]
    children = [subprocess.Popen([sys.executable, "-c", _CEILING_CHILD.format(
        path=sys.path, name=name, start=a, stop=b)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True) for a, b in shares]
    for child in children:  # all imported and warm
        assert child.stdout.readline().strip() == "ready"
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    windows = [tuple(map(float, child.communicate()[0].split())) for child in children]
    rate = n / (max(end for _, end in windows) - min(begin for begin, _ in windows))
    return float("nan"), rate, rate, None


def one_run(name, peer, n, workers):
    """(first element s, steady items/s, overall items/s, mploader stats or None)."""
    if peer == "ceiling":
        return ceiling(name, n, workers)
    start = time.perf_counter()
    iterator, loader = PEERS[peer](name, n, workers)
    items_per_element = 64 if peer.endswith("batch64") else 1
    timed = consume(iterator)
    first, last = timed.first, timed.last
    items = n if items_per_element > 1 else timed.elements
    stats = None
    if loader is not None:
        stats = loader.stats()
        loader.close()
    steady = (items - items_per_element) / (last - first) if last > first else float("nan")
    return first - start, steady, items / (last - start), stats


def _import_peer_modules(peer):
    """Import what the peer needs before the clock starts: start-up is measured
    for the loader, not for TensorFlow's or PyTorch's import."""
    if peer.startswith(("tf_", "keras", "bare_from", "mploader_tf")):
        import tensorflow  # noqa: F401
    if peer.startswith("keras"):
        import keras  # noqa: F401
    if peer.startswith("torch"):
        import torch.utils.data  # noqa: F401
    if peer.startswith("grain"):
        import grain.python  # noqa: F401
    if peer.startswith("mploader"):
        import mploader  # noqa: F401


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("peer", choices=sorted(PEERS) + ["ceiling"])
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    _import_peer_modules(args.peer)
    runs = [one_run(args.workload, args.peer, args.n, args.workers) for _ in range(args.reps)]
    print(json.dumps({
        "first_element_s": statistics.median(r[0] for r in runs),
        "steady_items_per_s": statistics.median(r[1] for r in runs),
        "overall_items_per_s": statistics.median(r[2] for r in runs),
        "mploader_stats": runs[-1][3],
    }))


if __name__ == "__main__":
    main()
