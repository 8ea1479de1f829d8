"""The TensorFlow side: ``loader.dataset()`` as ``tf.data.Dataset.from_generator``.

The only module that imports TensorFlow, and only when ``dataset()`` is
called; workers never import it.  TensorFlow calls the generator function once
per iterator (every epoch, every ``repeat``), and each call starts a new pass
of the loader on the same workers.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from .layout import map_nest, path_text
from .signature import Leaf, SignatureCheck


def _spec(value: Any, batch_dim: int | None, batched: bool) -> Any:
    import tensorflow as tf
    array = np.asarray(value)
    dtype = tf.string if array.dtype.kind in "OSU" else tf.as_dtype(array.dtype)
    shape = list(array.shape)
    if batched:
        shape[0] = batch_dim
    return tf.TensorSpec(shape=shape, dtype=dtype)


def infer_signature(loader: Any) -> tuple[Any, str]:
    """TensorSpecs from fn's first result, and where they came from.

    Shapes are taken as they are: give ``output_signature`` with ``None``
    dimensions when they vary between items.  The batch dimension is fixed
    only when every batch is full (``drop_remainder`` and ``on_error="raise"``).
    """
    batched = loader.batch_size is not None
    full = loader.drop_remainder and loader._options.on_error == "raise"
    batch_dim = loader.batch_size if full else None
    index, result = loader._first_result()
    _check_keys(result, ())
    origin = ("inferred from fn's result on " +
              (f"the batch starting at source index {index}" if batched else f"source index {index}"))
    return map_nest(lambda v, _p: _spec(v, batch_dim, batched), result), origin


def _check_keys(value: Any, path: tuple) -> None:
    """tf.data sorts dict keys, so they must all be str."""
    if isinstance(value, dict):
        for key, sub in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"fn's result has a dict key {key!r} ({type(key).__name__}) at "
                    f"{path_text(path)}; TensorFlow needs str keys: use {str(key)!r}")
            _check_keys(sub, path + (key,))
    elif isinstance(value, (tuple, list)):
        for i, sub in enumerate(value):
            _check_keys(sub, path + (i,))


def _leaves(spec: Any) -> Any:
    """The signature as signature.Leaf specs (TensorFlow-free, for the check)."""
    import tensorflow as tf
    if isinstance(spec, dict):
        return {key: _leaves(sub) for key, sub in spec.items()}
    if isinstance(spec, (tuple, list)):
        return tuple(_leaves(sub) for sub in spec)
    if not isinstance(spec, tf.TensorSpec):
        return None  # ragged, sparse...: left to TensorFlow
    dtype = None if spec.dtype == tf.string else np.dtype(spec.dtype.as_numpy_dtype)
    shape = None if spec.shape.rank is None else tuple(spec.shape.as_list())
    return Leaf(dtype, shape)


class _Stream:
    """What one dataset remembers between calls of its generator function.

    A pass that ended on Ctrl-C ends the element stream *normally*: TensorFlow
    returns end-of-sequence to the main thread, which then runs Python's own
    SIGINT handler and raises a plain KeyboardInterrupt that ``except
    KeyboardInterrupt`` catches.  Raising on TensorFlow's thread instead makes
    TensorFlow convert an error while the main thread's signal is pending,
    and pybind11 reports ``RuntimeError: ... MISMATCH ... REPLACED BY
    KeyboardInterrupt``.  The count of elements is therefore given by
    ``repeat().take(n)``, not ``assert_cardinality`` (whose error on a short
    stream meets the same mismatch): after an interrupted pass ``repeat`` calls
    the generator again, which ends at once, and an empty repetition ends
    ``repeat``.
    """

    def __init__(self, loader: Any, expected: int | None, check: SignatureCheck) -> None:
        self.loader = loader
        self.expected = expected
        self.check = check
        self.interrupted = False
        self.short: str | None = None   # a pass ended early without an interrupt

    def generate(self) -> Iterator[Any]:
        if self.interrupted:
            self.interrupted = False
            return
        if self.short is not None:
            raise RuntimeError(self.short)
        one_pass = self.loader._iterate(route_interrupts=True)
        count = 0
        try:
            for element in one_pass:
                self.check.check(element, f"source index {one_pass.last_index}")
                count += 1
                yield element
        finally:
            one_pass.close()
        if one_pass.interrupted:
            self.interrupted = True
        elif self.expected is not None and count < self.expected:
            self.short = (f"a pass of the loader gave {count} elements where len(loader) "
                          f"says {self.expected}: the source's len() does not match "
                          "what iterating it gives")


def make_dataset(loader: Any) -> Any:
    import tensorflow as tf

    from . import interrupts
    interrupts.install()
    if loader.output_signature is not None:
        signature, origin = loader.output_signature, "given as output_signature"
    else:
        signature, origin = infer_signature(loader)
    try:
        count: int | None = len(loader)
    except TypeError:
        count = None
    if loader._options.on_error != "raise":
        count = None  # skips make a pass shorter than len()
    stream = _Stream(loader, count, SignatureCheck(_leaves(signature), origin))
    dataset = tf.data.Dataset.from_generator(stream.generate, output_signature=signature)
    # The workers already compute ahead (prefetch tasks each), so TensorFlow's
    # injected prefetch buys nothing here, and its background thread is what
    # can be inside the generator when the interpreter finalizes: TensorFlow's
    # iterator destructor then waits for a thread that waits for the GIL
    # (a bare from_generator over a slow generator hangs at exit that way).
    options = tf.data.Options()
    options.experimental_optimization.inject_prefetch = False
    dataset = dataset.with_options(options)
    if count is not None:
        dataset = dataset.repeat().take(count)  # see _Stream
    return dataset
