"""The TensorFlow side: ``loader.dataset()`` as ``tf.data.Dataset.from_generator``.

The only module that imports TensorFlow, and only when ``dataset()`` is
called; workers never import it.  TensorFlow calls the generator function once
per iterator (every epoch, every ``repeat``), and each call starts a new pass
of the loader on the same workers.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from .layout import map_nest


def _spec(value: Any, batch_dim: int | None, batched: bool) -> Any:
    import tensorflow as tf
    array = np.asarray(value)
    dtype = tf.string if array.dtype.kind in "OSU" else tf.as_dtype(array.dtype)
    shape = list(array.shape)
    if batched:
        shape[0] = batch_dim
    return tf.TensorSpec(shape=shape, dtype=dtype)


def infer_signature(loader: Any) -> Any:
    """TensorSpecs from fn's result on source index 0.

    Shapes are taken as they are: give ``output_signature`` with ``None``
    dimensions when they vary between items.  The batch dimension is fixed
    only when every batch is full (``drop_remainder`` and ``on_error="raise"``).
    """
    batched = loader.batch_size is not None
    full = loader.drop_remainder and loader._options.on_error == "raise"
    batch_dim = loader.batch_size if full else None
    return map_nest(lambda v, _p: _spec(v, batch_dim, batched), loader.first_result())


def make_dataset(loader: Any) -> Any:
    import tensorflow as tf

    from . import interrupts
    interrupts.install()
    signature = loader.output_signature or infer_signature(loader)

    def generate() -> Iterator[Any]:
        one_pass = loader._iterate(route_interrupts=True)
        try:
            yield from one_pass
        finally:
            one_pass.close()

    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    # The workers already compute ahead (prefetch tasks each), so TensorFlow's
    # injected prefetch buys nothing here, and its background thread is what
    # can be inside the generator when the interpreter finalizes: TensorFlow's
    # iterator destructor then waits for a thread that waits for the GIL
    # (a bare from_generator over a slow generator hangs at exit that way).
    options = tf.data.Options()
    options.experimental_optimization.inject_prefetch = False
    dataset = dataset.with_options(options)
    try:
        count = len(loader)
    except TypeError:
        return dataset
    if loader._options.on_error == "raise":
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(count))
    return dataset
