"""mploader: Python preprocessing on every core for TensorFlow, stopped cleanly every time.

    from mploader import MPLoader
    ds = MPLoader(load_and_augment, paths).dataset()

Where things live, by side (each module's docstring says why it is so):

    loader.py          the public MPLoader: options and the public API
    config.py          the options, checked once and frozen
    errors.py          every public exception, under MPLoaderError
    testing.py         assert_resume_exact, the resume check users run
  the parent's pipeline
    pipeline.py        a loader's pool, passes, epoch state and counters (the lock rule)
    sources.py         reading the source (sequence, int, iterable, tf.data) in passes
    epochs.py          the order of an epoch (shuffle), its shards, the resume state,
                       and Epochs, the one owner of the epoch's state
    passes.py          one pass: dispatch tasks, gather results, order, errors, timeouts
    samples.py         batches of the samples of a generator fn (they span items)
    bottleneck.py      where a pass's time went, and a hint
    interrupts.py      Ctrl-C while another thread (TensorFlow's) runs the consumer
  the worker pool, behind a backend seam
    backend.py         the contract between the pipeline and whatever runs the workers:
                       ordering, who owns a result's memory, what a death looks like
    pool.py            the local backend, worker processes: one state machine each,
                       start, watch, stop (NOTE [Shutdown], the lock rule)
    resources.py       the descriptor and address-space budget of a pool
    memory_deaths.py   whether a killed worker was killed for memory, and its last RSS
    ray_backend.py     the Ray backend (RayBackend): workers as Ray actors, results
                       through Ray's object store; imports Ray only when used
  the workers' side
    worker.py          the worker process and its main loop
    random_state.py    per-item random state (item_rng, torch, MONAI and other objects)
    shipping.py        fn, worker_init and prepare sent by value, with their file names
  the ground both sides stand on
    messages.py        the wire messages and their framing
    slots.py           a worker's shared-memory arena: status page and slots
    layout.py          how a result nest is laid out in a slot, batched and padded
  tf/                  TensorFlow, imported only there and only when asked for
  cache/               prepare's cache: keys, the parent's index, the workers' stores

The data path of one element:

    source --(items, in the epoch's order: epochs.py)--> passes.py --(tasks)--> backend
                                                                           (pool.py)
      --> worker.py: fn(item) under its random state, result laid out (layout.py)
          in the worker's shared-memory slot (slots.py)
      --(Result: where in the slot)--> passes.py: reordered, errors at their positions,
          each value with its Record (the steps of the epoch it completes)
      --> for x in loader   |   tf/adapter.py: from_generator, signature checked
          (the epoch's progress advances by the Record when the consumer takes the value)
"""
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import (CacheError, MPLoaderError, PaddingDoesNotFit, PassAbandoned,
                         SignatureMismatch, UnsupportedResult, WorkerDied, WorkerError,
                         WorkerTimeout)
    from .loader import MPLoader
    from .passes import Skipped
    from .ray_backend import RayBackend
    from .random_state import item_rng, item_scope

__version__ = "0.1.0"

# Each public name and its module, imported on first use: a worker imports
# ``mploader.worker``, which imports this package first, and the parent's
# modules (the loader, its passes, the pool, epochs...) are none of its
# business; importing them cost every worker's start about 60 ms here.
_HOMES = {"MPLoader": "loader", "MPLoaderError": "errors", "WorkerError": "errors",
          "WorkerDied": "errors", "WorkerTimeout": "errors", "CacheError": "errors",
          "PassAbandoned": "errors", "SignatureMismatch": "errors",
          "UnsupportedResult": "errors", "PaddingDoesNotFit": "errors",
          "Skipped": "passes", "RayBackend": "ray_backend", "item_rng": "random_state",
          "item_scope": "random_state"}
__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'mploader' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__ + ["__version__"])
