"""mploader: Python preprocessing on every core for TensorFlow, stopped cleanly every time.

    from mploader import MPLoader
    ds = MPLoader(load_and_augment, paths).dataset()

Modules, one job each:
    loader.py        the public MPLoader
    sources.py       reading the source (sequence, int, iterable, tf.data) in passes
    epochs.py        the order of an epoch (shuffle), its shards, and the resume state
    passes.py        one pass: dispatch tasks, gather results, order, errors, timeouts
    samples.py       batches of the samples of a generator fn (they span items)
    pool.py          the worker processes: one state machine each, start, watch, stop
                     (NOTE [Shutdown], the lock rule)
    resources.py     the descriptor and address-space budget of a pool
    memory_deaths.py whether a killed worker was killed for memory, and its last RSS
    worker.py        the worker process and its main loop
    slots.py         a worker's shared-memory arena: status page and slots
    layout.py        how a result nest is laid out in a slot
    messages.py      the wire messages and their framing
    random_state.py  per-item random state (item_rng)
    signature.py     every element checked against the dataset's signature
    interrupts.py    Ctrl-C while TensorFlow's threads run the consumer
    cache.py         the cache of prepare's results, from the parent
    cache_keys.py    a cache directory's key: the recipe of prepare's results
    cache_stores.py  the cache's stores, from a worker; whose entries it reads
    bottleneck.py    where a pass's time went, and a hint
    grouping.py      several small elements per TensorFlow generator call
    tf_adapter.py    the TensorFlow adapter (the only module that imports TensorFlow)
    errors.py        the errors users catch
"""
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import CacheError, MPLoaderError, WorkerDied, WorkerError, WorkerTimeout
    from .loader import MPLoader
    from .passes import PassAbandoned, Skipped
    from .random_state import item_rng, item_scope
    from .signature import SignatureMismatch

__version__ = "0.1.0"

# Each public name and its module, imported on first use: a worker imports
# ``mploader.worker``, which imports this package first, and the parent's
# modules (the loader, its passes, the pool, epochs...) are none of its
# business; importing them cost every worker's start about 60 ms here.
_HOMES = {"MPLoader": "loader", "MPLoaderError": "errors", "WorkerError": "errors",
          "WorkerDied": "errors", "WorkerTimeout": "errors", "CacheError": "errors",
          "PassAbandoned": "passes",
          "Skipped": "passes", "SignatureMismatch": "signature", "item_rng": "random_state",
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
