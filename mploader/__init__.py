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
    tf_adapter.py    the TensorFlow adapter (the only module that imports TensorFlow)
    errors.py        the errors users catch
"""
from .errors import MPLoaderError, WorkerDied, WorkerError, WorkerTimeout
from .loader import MPLoader
from .passes import PassAbandoned, Skipped
from .random_state import item_rng, item_scope
from .signature import SignatureMismatch

__all__ = ["MPLoader", "MPLoaderError", "WorkerError", "WorkerDied", "WorkerTimeout",
           "PassAbandoned", "Skipped", "SignatureMismatch", "item_rng", "item_scope"]
__version__ = "0.1.0"
