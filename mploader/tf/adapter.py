"""The TensorFlow side: ``loader.dataset()`` as ``tf.data.Dataset.from_generator``.

The only module that imports TensorFlow, and only when ``dataset()`` is
called; workers never import it.  TensorFlow calls the generator function once
per iterator (every epoch, every ``repeat``), and each call starts a new pass
of the loader on the same workers.
"""
from __future__ import annotations

import atexit
import json
import os
import pickle
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Iterator

import numpy as np

from .. import pool as pool_module
from ..errors import MPLoaderError, PassAbandoned, SignatureMismatch
from ..layout import Padding
from ..nest import map_nest, path_text
from ..passes import MIN_GROUP_ITEMS, NOT_READY, Row
from .grouping import (PASS_TAGS, SURELY_TAKEN_AFTER_CALLS, TAG_SHIFT, Deferred, GroupSpec,
                       elements_per_call, stack)
from .signature import Leaf, SignatureCheck


def _spec(value: Any, path: tuple, batch_dim: int | None, batched: bool,
          padding: Padding | None) -> Any:
    import tensorflow as tf
    array = np.asarray(value)
    dtype = tf.string if array.dtype.kind in "OSU" else tf.as_dtype(array.dtype)
    shape = list(array.shape)
    if padding is not None and isinstance(value, np.ndarray) and array.ndim > 1:
        shape[1:] = padding.shape_at(path, array.ndim - 1)  # None: the batch's largest
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
    full = loader.drop_remainder and loader.config.on_error == "raise"
    batch_dim = loader.batch_size if full else None
    index, result = loader.pipeline.first_result()
    _check_keys(result, ())
    origin = ("inferred from fn's result on " +
              (f"the batch starting at source index {index}" if batched else f"source index {index}"))
    return map_nest(lambda v, path: _spec(v, path, batch_dim, batched, loader.padding),
                    result), origin


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

    Each call gives one element, or a chunk of small ones, or rows of a
    group of large ones (grouping.py).

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
    ``repeat``.  The rest of an epoch restored by ``load_state_dict`` after
    the dataset was made ends its repetition the same way.
    """

    def __init__(self, loader: Any, expected: int | None, check: SignatureCheck,
                 leaves: Any, per_call: int, read_tag: Callable[[], int] | None,
                 group: bytes = b"") -> None:
        self.loader = loader
        self.expected = expected
        self.check = check
        self.leaves = leaves            # the signature as Leaf specs
        self.per_call = per_call        # elements per call at most (grouping.py)
        self.read_tag = read_tag        # the tag of the element last taken; None: untagged
        self.group = group              # the pickled GroupSpec: workers group per_call items
        self.passes = 0                 # passes started, to tag their elements
        self.end_next_call = False      # the last pass ended this repetition early
        self.short: str | None = None   # a pass ended early without an interrupt

    def generate(self) -> Iterator[Any]:
        if _exiting:
            return  # see _let_tensorflow_threads_out
        if self.end_next_call:
            self.end_next_call = False
            return
        if self.short is not None:
            raise RuntimeError(self.short)
        rest = self.loader.pipeline.pending_elements()  # a restored epoch: its rest only
        expected = self.expected if rest is None or self.expected is None else rest
        one_pass = self.loader.pipeline.start_pass(self.per_call if self.group else 0,
                                                   self.group)
        stats = self.loader.pipeline.stats
        count = 0
        try:
            if self.read_tag is None:
                for element in self._checked(one_pass):
                    count += 1
                    stats.handoff_calls += 1
                    stats.handoff_elements += 1
                    yield element
            else:
                for number, elements in self._groups(one_pass):
                    count += len(elements)
                    stats.handoff_calls += 1
                    stats.handoff_elements += len(elements)
                    yield self._tagged(number, elements)
        except PassAbandoned:
            if not _exiting:
                raise
            return  # closed at exit: end the stream, so TensorFlow stops asking
        except (MPLoaderError, SignatureMismatch) as exc:
            raise _for_tensorflow(exc) from None
        finally:
            one_pass.close()
        # ``repeat`` calls again only after a repetition that gave elements,
        # and only a dataset with a count has ``repeat`` (see make_dataset).
        ends_early = self.expected is not None and count > 0
        if one_pass.interrupted:
            self.end_next_call = ends_early
        elif expected is not None and count < expected:
            self.short = (f"a pass of the loader gave {count} elements where len(loader) "
                          f"says {expected}: the source's len() does not match "
                          "what iterating it gives")
        elif expected is not None and expected < self.expected:
            self.end_next_call = ends_early


    def _checked(self, one_pass: Any) -> Iterator[Any]:
        """The pass's elements, each counted as taken once it passed the
        check: an element that does not fit is not handed out, so a state
        saved after the error resumes at it (as a group's does)."""
        while True:
            try:
                element, record = one_pass.take()
            except StopIteration:
                one_pass.apply(one_pass.leftover())  # skips at the end, the pass's end
                return
            except BaseException:
                one_pass.apply(one_pass.leftover())  # what was handed out before the error
                raise
            self.check.check(element, one_pass.last_index)
            one_pass.apply(record)
            yield element

    def _groups(self, one_pass: Any) -> Iterator[tuple[int, list]]:
        """(number of the last, elements) per call: the element the consumer
        waits for, then, up to ``per_call``, those ready without waiting.  A
        failure goes out after the elements before it, on the next call.  Each
        element's record (epochs.Record) waits in a Deferred until the
        consumer took the element (grouping.py)."""
        self.passes = self.passes % PASS_TAGS + 1
        deferred = Deferred(self.passes, self.read_tag, one_pass.apply)
        one_pass.progress.settle = deferred.settle
        number, elements = 0, []
        entries: list = []  # (element number, its record)
        call_ends: deque[int] = deque()  # number of the last element of each call
        while True:
            try:
                element, record = one_pass.take(wait=not elements)
                if element is not NOT_READY and type(element) is not Row:  # rows: checked
                    self.check.check(element, one_pass.last_index)        # by their worker
            except StopIteration:
                break
            except BaseException:
                entries.append((number, one_pass.leftover()))
                deferred.add(entries)
                if elements:
                    yield number, elements
                raise
            if element is not NOT_READY:
                number += 1
                elements.append(element)
                entries.append((number, record))
            if elements and (element is NOT_READY or len(elements) == self.per_call
                             or _one_whole_group(element, elements)):
                deferred.add(entries)
                yield number, elements
                elements, entries = [], []
                call_ends.append(number)
                if len(call_ends) > SURELY_TAKEN_AFTER_CALLS:
                    deferred.settle_through(call_ends.popleft())
        entries.append((number, one_pass.leftover()))  # the pass's end, skips at its end
        deferred.add(entries)
        if elements:
            yield number, elements

    def _tagged(self, number: int, elements: list) -> tuple[np.ndarray, Any]:
        """What one call gives TensorFlow: (tags, the elements stacked).
        Rows of one group (a group's rows are consecutive) go as slices of
        its arrays, no copy; rows of several short groups are stacked."""
        last = (self.passes << TAG_SHIFT) + number
        tags = np.arange(last - len(elements) + 1, last + 1, dtype=np.int64)
        first = elements[0]
        if type(first) is Row and first.group is elements[-1].group:
            return tags, map_nest(lambda column, _: column[first.row:first.row + len(elements)],
                                  first.group)
        return tags, stack([_value(element) for element in elements], self.leaves)


def _one_whole_group(element: Any, elements: list) -> bool:
    """The call holds exactly one group, whole, ``element`` its last row,
    and long enough to go alone: MIN_GROUP_ITEMS rows or more (shorter
    groups share calls, stacked: a copy costs less than a call)."""
    return (type(element) is Row and element.last and len(elements) == element.row + 1
            >= MIN_GROUP_ITEMS)


def _value(element: Any) -> Any:
    """An element as a nest of arrays (a group's row: views of its arrays)."""
    if type(element) is Row:
        return map_nest(lambda column, _: column[element.row], element.group)
    return element


def _for_tensorflow(exc: BaseException) -> BaseException:
    """The error as TensorFlow should carry it: its first line, then the rest once.

    TensorFlow turns the exception into a status message made of
    ``"Type: str(exc)"`` followed by the whole formatted exception (every
    frame it passed through, then ``str(exc)`` again), and logs that message
    twice more on stderr.  So ``str`` keeps only the first line (where, which
    item, which worker), and the rest (the worker's traceback) travels as a
    note, which formatting prints once, after the frames.  mploader's own
    frames say nothing to the user, so the traceback starts empty.
    """
    head, sep, rest = str(exc).partition("\n")
    if sep and rest.strip() and hasattr(exc, "add_note"):  # notes: Python 3.11+
        exc.args = (head,)
        exc.add_note(rest.strip("\n"))
    return exc.with_traceback(None)


_exiting = False
_exit_hook_registered = False
_EXIT_WAIT_S = 3.0  # for TensorFlow threads to leave Python at exit
# A thread that ended its stream comes back once more, to finalize the
# generator's iterator: no thread inside for this long means all are done.
_EXIT_QUIET_S = 0.1
_TF_PY_FUNC_FILE = os.path.join("tensorflow", "python", "ops", "script_ops.py")


def _let_tensorflow_threads_out() -> None:
    """At exit: stop every pool, then wait until no TensorFlow thread runs Python.

    TensorFlow destroys an iterator still alive at exit during finalization,
    and waits for its threads (a ``.prefetch()`` after ``dataset()``, Keras's
    own); a thread that is inside the generator then needs the GIL, Python
    ends it, and the exit hangs.  So, first, every pool closes: a thread
    waiting in a pass ends it (PassAbandoned) and leaves; a thread that comes
    back for more finds ``_exiting`` and ends its stream at once.  Then this
    hook waits, with the GIL released, until no other thread is inside
    TensorFlow's Python function wrapper (where ``from_generator`` runs the
    generator) for ``_EXIT_QUIET_S`` in a row, ``_EXIT_WAIT_S`` at most.  A
    thread in TensorFlow's C++ holds no Python frame, so
    ``sys._current_frames`` shows exactly those inside.  The streams end
    normally rather than with an error, so TensorFlow's threads see their end
    and stop asking; what remains is a hazard of timing, not a certainty.
    """
    global _exiting
    _exiting = True
    pool_module.close_open_pools()
    deadline = time.monotonic() + _EXIT_WAIT_S
    quiet_since = time.monotonic()
    me = threading.get_ident()
    while time.monotonic() < deadline:
        if any(ident != me and _in_py_func(frame)
               for ident, frame in sys._current_frames().items()):
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= _EXIT_QUIET_S:
            return
        time.sleep(0.002)


def _in_py_func(frame: Any) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.endswith(_TF_PY_FUNC_FILE):
            return True
        frame = frame.f_back
    return False


def make_dataset(loader: Any) -> Any:
    import tensorflow as tf

    from .. import interrupts
    interrupts.install()
    global _exit_hook_registered
    if not _exit_hook_registered:  # after TensorFlow's import: runs before its hooks
        atexit.register(_let_tensorflow_threads_out)
        _exit_hook_registered = True
    if loader.output_signature is not None:
        signature, origin = loader.output_signature, "given as output_signature"
    else:
        signature, origin = infer_signature(loader)
    try:
        count: int | None = len(loader)
    except TypeError:
        count = None
    if loader.config.on_error != "raise":
        count = None  # skips make a pass shorter than len()
    leaves = _leaves(signature)
    check = SignatureCheck(leaves, origin)
    per_call, grouped = _elements_per_call(loader, signature, leaves, tf)
    if per_call == 1:
        stream = _Stream(loader, count, check, leaves, 1, None)
        dataset = tf.data.Dataset.from_generator(stream.generate, output_signature=signature)
    else:
        with tf.init_scope(), tf.device("/cpu:0"):
            last_taken = tf.Variable(0, dtype=tf.int64, trainable=False,
                                     name="mploader_last_taken")
        stream = _Stream(loader, count, check, leaves, per_call,
                         lambda: int(last_taken.numpy()),
                         pickle.dumps(GroupSpec(leaves, origin)) if grouped else b"")

        def taken(tag: Any, element: Any) -> Any:
            with tf.control_dependencies([last_taken.assign(tag, read_value=False)]):
                return tf.nest.map_structure(tf.identity, element)

        chunks = (tf.TensorSpec((None,), tf.int64), tf.nest.map_structure(
            lambda spec: tf.TensorSpec((None, *spec.shape), spec.dtype), signature))
        dataset = tf.data.Dataset.from_generator(stream.generate, output_signature=chunks)
        if grouped:
            # A slice of a group's tensor is used in place (it is aligned);
            # unbatch would copy every large element once more.
            dataset = dataset.flat_map(lambda tags, element: tf.data.Dataset.from_tensor_slices(
                (tags, element)))
        else:
            dataset = dataset.unbatch()
        dataset = dataset.map(taken)
    # The workers already compute ahead (prefetch tasks each), so TensorFlow's
    # injected prefetch buys nothing here; it would go past the point where
    # elements are counted (the generator, or the tags), so the state would
    # count what it read ahead; and its background thread is what can be
    # inside the generator when the interpreter finalizes: TensorFlow's
    # iterator destructor then waits for a thread that waits for the GIL
    # (a bare from_generator over a slow generator hangs at exit that way).
    options = tf.data.Options()
    options.experimental_optimization.inject_prefetch = False
    # TensorFlow's autotuning thread makes ending an iterator wait: in about
    # a third of the passes measured here, the iterator's destructor (the end
    # of a ``for`` loop, of a Keras epoch) held the consumer for about two
    # thirds of the pass's own time (2 s after a 3 s epoch; bare
    # ``from_generator`` alike).  Nothing before the user's own steps has a
    # knob to tune (the workers compute ahead), so autotuning is off; an
    # AUTOTUNE after ``dataset()`` then takes TensorFlow's default (a map's
    # parallelism: the cores), and ``with_options`` of the user's turns it
    # back on.
    options.autotune.enabled = False
    if loader.shard[1] > 1:
        # The loader reads its shard already.  TensorFlow's auto-shard cannot
        # split a generator by files, and its fallback (DATA) would run every
        # element's preprocessing on every host, then drop (K-1)/K of it.
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.OFF)
    dataset = dataset.with_options(options)
    if count is not None:
        dataset = dataset.repeat().take(count)  # see _Stream
    return dataset


def _elements_per_call(loader: Any, signature: Any, leaves: Any, tf: Any
                       ) -> tuple[int, bool]:
    """(elements per generator call, whether the workers group them)
    (grouping.py): several only for fixed-shape elements one at a time
    (batches are groups already; a generator fn's samples are not laid out
    by item), in a signature of plain tuples and dicts, and where the
    variable that tracks what the consumer took is an ordinary one (not
    inside ``tf.function``, nor in a distribution strategy's scope, which
    would make it a distributed one)."""
    if loader.batch_size is not None or not _plain_nest(signature, tf):
        return 1, False
    if not tf.executing_eagerly() or tf.distribute.has_strategy():
        return 1, False
    per_call, grouped = elements_per_call(leaves)
    if grouped and loader.config.samples:
        return 1, False
    return per_call, grouped


def _plain_nest(spec: Any, tf: Any) -> bool:
    if type(spec) is dict:
        return all(_plain_nest(sub, tf) for sub in spec.values())
    if type(spec) is tuple:
        return all(_plain_nest(sub, tf) for sub in spec)
    return isinstance(spec, tf.TensorSpec)


def checkpointable(loader: Any) -> Any:
    """A ``tf.train.Checkpoint`` dependency holding ``loader.state_dict()``.

    TensorFlow cannot checkpoint a generator dataset, so the input position is
    saved as the loader's state (a JSON string), next to the model.
    """
    import tensorflow as tf

    class LoaderState(tf.train.experimental.PythonState):
        def serialize(self) -> str:
            return json.dumps(loader.state_dict())

        def deserialize(self, string_value: Any) -> None:
            text = string_value.decode() if isinstance(string_value, bytes) else string_value
            loader.load_state_dict(json.loads(text))

    return LoaderState()


def keras_callback(loader: Any, verbose: bool = True, name: str = "mploader") -> Any:
    """A Keras callback that makes the loader's epoch follow Keras's epoch, and
    says at each epoch's end where its input time went.

    ``model.fit`` resumed by ``BackupAndRestore`` starts at the interrupted
    epoch's number; the loader of a fresh process would start at epoch 0, with
    another order.  Keras creates each epoch's iterator after
    ``on_epoch_begin``, so setting the epoch there decides the pass's order.
    At the epoch's end the pass's report (bottleneck.py) goes into the logs
    (``<name>_consumer_wait``, ``<name>_worker_busy``: Keras's History keeps
    them) and, with ``verbose``, its hint is printed.  The report is the
    loader's pass that the epoch read (with ``steps_per_epoch`` over a
    repeated dataset, that pass so far).
    """
    import tensorflow as tf

    class FollowKerasEpochs(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            loader.follow_epoch(epoch)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            report = loader.epoch_report()
            if report is None:
                return
            if logs is not None:
                logs[f"{name}_consumer_wait"] = report["consumer_wait_fraction"]
                logs[f"{name}_worker_busy"] = report["worker_busy_fraction"]
            if verbose:
                print(f"{name}, epoch {report['epoch']}: {report['elements_per_s']:.1f} "
                      f"elements/s; {report['hint']}", flush=True)

    return FollowKerasEpochs()
