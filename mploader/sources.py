"""What a loader reads: a sequence, an int, any iterable, or a tf.data.Dataset.

Items are read in the parent, one pass at a time, and sent to the workers with
their source index.  A ``tf.data.Dataset`` is read as numpy
(``as_numpy_iterator``), so ``ds.map(fn, num_parallel_calls=N)`` becomes
``MPLoader(fn, ds)``; this module recognises it without importing TensorFlow.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any


def _is_tf_dataset(source: Any) -> bool:
    return (type(source).__module__.startswith("tensorflow")
            and hasattr(source, "as_numpy_iterator") and hasattr(source, "cardinality"))


class Source:
    """A re-readable view of the user's source; one ``items()`` call per pass."""

    def __init__(self, source: Any) -> None:
        self._source = source
        self._one_shot = False
        self._read = False  # a one-shot iterator was handed to a pass or to first()
        self._pushed_back: list[Any] = []
        if isinstance(source, (str, bytes, os.PathLike)):
            raise TypeError(f"source={source!r} is a single path; a source is a collection "
                            f"of items: pass [{source!r}] for one item")
        if isinstance(source, bool):
            raise TypeError("source must be a sequence, an int, an iterable or a "
                            "tf.data.Dataset, not a bool")
        if isinstance(source, int):
            if source < 0:
                raise ValueError(f"source={source}: an int source must be >= 0")
            self.length: int | None = source
        elif _is_tf_dataset(source):
            cardinality = int(source.cardinality())
            self.length = cardinality if cardinality >= 0 else None
        elif isinstance(source, Sequence) or (hasattr(source, "__len__")
                                              and hasattr(source, "__getitem__")
                                              and not isinstance(source, (dict, str, bytes))):
            self.length = len(source)
        elif isinstance(source, Iterable):
            self.length = None
            self._one_shot = iter(source) is source
        else:
            raise TypeError(f"source must be a sequence, an int, an iterable or a "
                            f"tf.data.Dataset, not {type(source).__name__}")

    def items(self) -> Iterator[Any]:
        """The items of one pass, in source order."""
        source = self._source
        if isinstance(source, int):
            return iter(range(source))
        if _is_tf_dataset(source):
            return source.as_numpy_iterator()
        if self.length is not None:
            return (source[i] for i in range(self.length))
        if self._one_shot:
            self._check_unread()
            self._read = True
            pushed, self._pushed_back = self._pushed_back, []
            return itertools.chain(pushed, source)
        return iter(source)

    @property
    def kind(self) -> str:
        """The source's type name, for messages."""
        return type(self._source).__name__

    @property
    def indexable(self) -> bool:
        """Items can be read by source index (an int, or a sequence)."""
        return self.length is not None and not _is_tf_dataset(self._source)

    def item(self, index: int) -> Any:
        """The item at ``index`` of an indexable source."""
        return index if isinstance(self._source, int) else self._source[index]

    def _check_unread(self) -> None:
        if self._read:
            raise RuntimeError(
                "the source is an iterator (a generator?), which can be read only "
                "once, and a pass already read it; give MPLoader a sequence or a "
                "re-iterable object to iterate it more than once")

    def head(self, count: int) -> list[Any]:
        """The first ``count`` items (fewer if the source is shorter), without
        losing them from a one-shot iterator: they go first in the next pass."""
        if not self._one_shot:
            return list(itertools.islice(self.items(), count))
        self._check_unread()
        missing = count - len(self._pushed_back)
        if missing > 0:
            self._pushed_back += itertools.islice(self._source, missing)
        return self._pushed_back[:count]
