"""Several small elements per call of TensorFlow's generator (see adapter.py).

``tf.data.Dataset.from_generator`` calls Python once per element, and that
call (the GIL, the py_func machinery, one tensor per leaf) costs more than
the element itself when it is small: a bare ``from_generator`` of int64
scalars spends about 0.3 ms of CPU per element here.  So, for elements that
are small and have one fixed shape, the stream hands TensorFlow a *chunk*
per call: the element the consumer waits for, plus every further one the
workers have ready right now (never waiting for more), stacked per leaf;
``unbatch`` splits it again.

Large elements would pay two copies to be stacked here, so the *workers*
group them: a task of a dataset's pass carries up to ``MAX_GROUP_ELEMENTS``
consecutive items (``MAX_GROUP_BYTES`` at most), and its worker writes each
result, as soon as fn returns it, into its row of one column per leaf
(layout.GroupLayout).  A call then hands TensorFlow rows of those columns
as they lie in shared memory, no copy, and ``flat_map(from_tensor_slices)``
splits them, using each row in place (``unbatch`` would copy each one).  The worker checks each result against the signature exactly as
the consumer checks one element (a Python number must fit the signature's
dtype, and is written in it), so a result that does not fit is the same
SignatureMismatch, named by its item, after the elements before it.
Elements of over half ``MAX_GROUP_BYTES`` stay one per call: a volume
costs far more to copy than its call.

The element stream is the same either way: order, values (each leaf
converted to the signature's dtype exactly as TensorFlow converts one
element, after the same signature check), errors at their positions (the
elements before a failure go out as a chunk first), skips, cardinality.

The resume position stays exact.  A chunk's elements wait in TensorFlow
until the consumer takes them, so each element's record (``Pass.take``)
is kept here, and applied to the epoch's progress only for the
elements the consumer has taken.  Each element carries a tag (its pass and
its number in the pass) that a ``map`` after ``unbatch`` writes to a
variable as the element goes by; ``state_dict()`` reads it (Progress.settle).
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..epochs import Record
from ..layout import aligned_empty
from ..nest import at, map_nest, stack_nests
from .signature import Leaf

MAX_ELEMENT_BYTES = 64 << 10  # larger elements: grouped by the workers
MAX_CHUNK_BYTES = 1 << 20
MAX_CHUNK_ELEMENTS = 256
MAX_GROUP_BYTES = 8 << 20  # larger elements: one per call
MAX_GROUP_ELEMENTS = 8
MIN_ALIGNED_BYTES = 64 << 10  # smaller stacks: TensorFlow's copy costs less than the checks
TAG_SHIFT = 40  # tag = pass number << TAG_SHIFT | element number in the pass (from 1)
PASS_TAGS = (1 << (63 - TAG_SHIFT)) - 1  # pass numbers 1..PASS_TAGS, then round again
# Calls after which a call's elements are surely taken: TensorFlow asks for a
# call only once ``unbatch`` gave out the last one, through the map that
# counts them (nothing buffers in between); a margin over that one.
SURELY_TAKEN_AFTER_CALLS = 4
_UNBATCH_KINDS = "biufc"  # bool, integers, floats, complex

@dataclass(frozen=True)
class GroupSpec:
    """What a worker needs to lay out a group (Task.group, layout.GroupLayout)
    and to check each item as the consumer would: the signature, and where
    it came from (its errors say)."""
    leaves: Any  # a nest of Leaf
    origin: str


def elements_per_call(spec: Any) -> tuple[int, bool]:
    """(how many elements of signature ``spec``, a nest of Leaf, one call
    may carry; whether the workers lay them out as a group): several only
    for fixed-shape numbers, stacked here when small, grouped by the
    workers when large, and one per call when a group would be one
    element."""
    leaves: list[Leaf | None] = []
    map_nest(lambda leaf, _: leaves.append(leaf), spec)
    nbytes = 0
    for leaf in leaves:
        if leaf is None or leaf.dtype is None or leaf.shape is None or None in leaf.shape:
            return 1, False  # strings, ragged, varying shapes
        if leaf.dtype.kind not in _UNBATCH_KINDS or 0 in leaf.shape:
            return 1, False  # unbatch fails on ml_dtypes' float8 and int4; crashes on empty leaves
        nbytes += leaf.dtype.itemsize * int(np.prod(leaf.shape, dtype=np.int64))
    if not leaves:
        return 1, False
    if nbytes <= MAX_ELEMENT_BYTES:
        return max(1, min(MAX_CHUNK_ELEMENTS, MAX_CHUNK_BYTES // nbytes)), False
    group = max(1, min(MAX_GROUP_ELEMENTS, MAX_GROUP_BYTES // nbytes))
    return group, group > 1


def stack(elements: list[Any], spec: Any) -> Any:
    """The elements as one nest of arrays, each leaf ``(len(elements), *shape)``
    in the signature's dtype (tuples for lists, as TensorFlow reads them)."""
    return stack_nests(elements, lambda values, path: _column(values, at(spec, path).dtype))


def _column(values: list[Any], dtype: np.dtype) -> np.ndarray:
    """One leaf's values stacked.  Arrays of the signature's dtype and one
    shape (rows of groups, large results) go into a 64-byte aligned array,
    which TensorFlow uses in place (layout.aligned_empty): into numpy's own
    it would copy them a second time.  Anything else (Python numbers, which
    take the dtype as TensorFlow converts one element) as numpy makes it."""
    first = values[0]
    if (type(first) is np.ndarray and first.dtype == dtype
            and first.nbytes * len(values) >= MIN_ALIGNED_BYTES
            and all(type(value) is np.ndarray and value.dtype == dtype
                    and value.shape == first.shape for value in values)):
        return np.stack(values, out=aligned_empty((len(values), *first.shape), dtype))
    return np.asarray(values, dtype)


class Deferred:
    """The records (epochs.Record) of a pass's elements, applied once the
    consumer took each element (see the module docstring).

    ``add`` runs on the thread that drives the pass, ``settle`` on whichever
    asks for the state: a lock of its own, held to apply records in order
    (each takes the progress's lock after it, never the other way round).
    """

    def __init__(self, tag: int, read_tag: Callable[[], int],
                 apply: Callable[[Record], None]) -> None:
        self.tag = tag
        self._read_tag = read_tag
        self._apply = apply
        self._lock = threading.Lock()
        self._entries: deque[tuple[int, Record]] = deque()  # (element number, record)

    def add(self, entries: list[tuple[int, Record]]) -> None:
        """Each entry's record counts once its element ``number`` (from 1)
        was taken; a call's entries at once, before TensorFlow can take any
        of its elements."""
        with self._lock:
            self._entries.extend(entry for entry in entries if entry[1])

    def settle(self) -> None:
        """Apply the records of every element the consumer has taken."""
        last = self._read_tag()
        self.settle_through(last & ((1 << TAG_SHIFT) - 1) if last >> TAG_SHIFT == self.tag
                            else 0)

    def settle_through(self, taken: int) -> None:
        """Apply the records of the elements up to number ``taken``; the
        pass calls it too, for calls surely taken, so that records do not
        pile up over an epoch nobody saves mid-way."""
        with self._lock:  # applied in order, before another thread's state() reads
            while self._entries and self._entries[0][0] <= taken:
                self._apply(self._entries.popleft()[1])
