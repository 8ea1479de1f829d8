"""Three tf.data pipelines people write around Python code, and the same with mploader.

    python examples/from_tf_data.py

1. ``ds.map(lambda p: tf.numpy_function(fn, [p], ...), num_parallel_calls=AUTOTUNE)``
2. ``ds.map(lambda p: tf.py_function(eager_fn, [p], ...))`` where eager_fn calls ``.numpy()``
3. A SIGTERM handler that calls ``os._exit`` so that a job killed by its scheduler
   does not hang in its input pipeline (and, with hand-made multiprocessing,
   leaves its workers and /dev/shm segments behind).  With mploader the job
   ends cleanly with the handler, and without it.

Each pattern runs both ways on the same data, the outputs are compared, and the
script checks at the end that no worker process of its own remains.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import tensorflow as tf

from clean_exit import leftovers, shm_entries, worker_alive
from mploader import MPLoader

N_ITEMS = int(os.environ.get("EXAMPLE_ITEMS", "200"))  # the test runs fewer


def augment(index: np.int64) -> np.ndarray:
    """Python-heavy preprocessing of one item: a loop that holds the GIL."""
    rng = np.random.default_rng(int(index))
    image = rng.normal(size=(32, 32)).astype(np.float32)
    total = 0.0
    for _ in range(30):                     # pure Python, as real glue code often is
        for row in image.tolist():
            total += sum(abs(v) for v in row)
    return image / np.float32(total)


def eager_augment(index: tf.Tensor) -> np.ndarray:
    """The tf.py_function flavour: receives an EagerTensor."""
    return augment(index.numpy())


def timed(name: str, dataset) -> list:
    start = time.perf_counter()
    out = [np.asarray(x) for x in dataset]
    print(f"  {name:<58} {len(out) / (time.perf_counter() - start):8.1f} items/s")
    return out


def pattern_1_numpy_function(workers: set[int]) -> None:
    print("1. map(tf.numpy_function(fn), num_parallel_calls=AUTOTUNE)")
    source = tf.data.Dataset.range(N_ITEMS)
    before = timed("before: tf.data threads, one GIL", source.map(
        lambda i: tf.numpy_function(augment, [i], tf.float32),
        num_parallel_calls=tf.data.AUTOTUNE))
    with MPLoader(augment, source) as loader:       # the tf.data source is read as numpy
        workers.update(loader.worker_pids())
        after = timed(f"after:  MPLoader(fn, ds).dataset(), {loader.num_workers} workers",
                      loader.dataset())
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def pattern_2_py_function(workers: set[int]) -> None:
    print("2. map(tf.py_function(eager_fn))")
    source = tf.data.Dataset.range(N_ITEMS)
    before = timed("before: tf.py_function, eager tensors", source.map(
        lambda i: tf.py_function(eager_augment, [i], tf.float32)))
    # The function only needs numpy: drop the .numpy() wrapper and pass indices.
    with MPLoader(augment, range(N_ITEMS)) as loader:
        workers.update(loader.worker_pids())
        after = timed(f"after:  MPLoader(fn, range(n)).dataset(), {loader.num_workers} workers",
                      loader.dataset())
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def _child(keep_handler: bool) -> None:
    """Pattern 3's training job, with or without its os._exit SIGTERM handler."""
    if keep_handler:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    loader = MPLoader(lambda i: time.sleep(60) or i, range(8), num_workers=2,
                      output_signature=tf.TensorSpec((), tf.int64))
    print(" ".join(map(str, loader.worker_pids())), flush=True)
    # With a Python handler, iterate in Python: TensorFlow's GetNext holds the
    # main thread in C++, where Python cannot run any signal handler.
    for _ in (loader if keep_handler else loader.dataset()):  # every worker busy in fn
        pass


def _sigterm_job(keep_handler: bool) -> None:
    child = subprocess.Popen([sys.executable, __file__, "--child", str(keep_handler)],
                             stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    pids = [int(p) for p in child.stdout.readline().split()]
    time.sleep(1.0)
    child.send_signal(signal.SIGTERM)    # what a cluster scheduler does
    child.wait(30)
    start = time.perf_counter()
    while any(worker_alive(p) for p in pids) and time.perf_counter() - start < 5:
        time.sleep(0.01)
    left = [p for p in pids if worker_alive(p)]
    how = "with its os._exit handler" if keep_handler else "with no handler, through dataset()"
    print(f"  {how}: the job exited ({child.returncode}); its {len(pids)} workers were gone "
          f"{time.perf_counter() - start:.3f} s later; left: {left or 'none'}")
    assert not left


def pattern_3_exit_handler() -> None:
    print("3. SIGTERM to a job whose workers are busy")
    _sigterm_job(keep_handler=True)
    _sigterm_job(keep_handler=False)
    print("  os._exit skips every cleanup, yet the kernel ends mploader's workers (each set\n"
          "  PR_SET_PDEATHSIG) and their shared memory has no name that could leak: the\n"
          "  handler, a workaround for pools that hang at exit, is no longer needed.")


def main() -> int:
    if "--child" in sys.argv:
        _child(keep_handler=sys.argv[-1] == "True")
        return 0
    shm_before = shm_entries()
    workers: set[int] = set()
    pattern_1_numpy_function(workers)
    pattern_2_py_function(workers)
    pattern_3_exit_handler()
    left, new_shm = leftovers(workers, shm_before)
    print(f"clean: {len(workers)} workers started by this script, {len(left)} remain; "
          f"new /dev/shm entries: {new_shm or 'none'}")
    return 1 if left or new_shm else 0


if __name__ == "__main__":
    sys.exit(main())
