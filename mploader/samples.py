"""Batches of samples, for a ``fn`` that yields several samples per item.

A batch of ``batch_size`` samples may hold samples of several items (the
last ones of one volume, the first ones of the next), so it cannot be stacked
in one worker: the pass hands the samples out in order and this module stacks
them in the parent, one copy per batch.  The samples of a batch count as handed
out (epochs.py) only when the batch is, so a state saved from another thread
while a batch is gathered does not count them.  An error met while gathering
comes after the samples gathered before it, as a short batch: no sample is
lost; with ``drop_remainder=True`` (a batch is always full) the error comes at
once, and the samples of the unfinished batch are dropped with the pass.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from .epochs import Record
from .errors import UnsupportedResult
from .nest import leaves, path_text, stack_nests


def stack(samples: list[Any], indices: list[int | None]) -> Any:
    """The samples' nests stacked leaf by leaf along a new first axis."""
    flat = [leaves(sample) for sample in samples]
    paths = [path for path, _ in flat[0]]
    for found, index in zip(flat[1:], indices[1:]):
        if [path for path, _ in found] != paths:
            raise UnsupportedResult(
                f"cannot batch: a sample of source index {index} has another structure "
                f"than the batch's first sample (of source index {indices[0]})")
    return stack_nests(samples, lambda values, path: _column(values, path, indices))


def _column(values: list[Any], path: tuple, indices: list[int | None]) -> np.ndarray:
    """One leaf of every sample, stacked; never a cast between types."""
    if isinstance(values[0], np.ndarray):
        return _stack_arrays(values, path, indices)
    for value, index in zip(values[1:], indices[1:]):
        if type(value) is not type(values[0]):
            raise UnsupportedResult(
                f"cannot batch {path_text(path)}: the batch's first sample (of source "
                f"index {indices[0]}) has a {type(values[0]).__name__} there, a sample "
                f"of source index {index} a {type(value).__name__}; give every sample "
                "the same type (mploader does not cast)")
    return np.array(values, dtype=object if isinstance(values[0], (str, bytes)) else None)


def _stack_arrays(arrays: list[np.ndarray], path: tuple, indices: list[int | None]) -> Any:
    first = arrays[0]
    for array, index in zip(arrays[1:], indices[1:]):
        if not isinstance(array, np.ndarray):
            raise UnsupportedResult(
                f"cannot batch {path_text(path)}: the batch's first sample (of source "
                f"index {indices[0]}) has an array there, a sample of source index "
                f"{index} a {type(array).__name__}")
        if array.shape != first.shape or array.dtype != first.dtype:
            raise UnsupportedResult(
                f"cannot batch {path_text(path)}: a sample of source index {indices[0]} "
                f"has shape {first.shape} {first.dtype}, one of source index {index} "
                f"{array.shape} {array.dtype}; give every sample the same shape")
    return np.stack(arrays)


class SampleBatches(Iterator[Any]):
    """A pass's samples, ``batch_size`` at a time (see the module docstring)."""

    def __init__(self, one_pass: Any, batch_size: int, drop_remainder: bool) -> None:
        self.one_pass = one_pass
        self._size = batch_size
        self._drop = drop_remainder
        self._error: BaseException | None = None  # met after a short batch: raised next
        self.last_index: int | None = None

    def __next__(self) -> Any:
        """The next batch; its samples' records are applied when it is
        returned, so the state counts a batch, never part of one."""
        batch, record = self.take()
        self.one_pass.apply(record)
        return batch

    def take(self) -> tuple[Any, Record]:
        """(next batch, its samples' record) for a consumer that counts the
        batch as taken itself (:meth:`apply`), as passes.Pass.take; what
        was handed out with no batch after it is applied here."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        one_pass = self.one_pass
        samples, indices, record = [], [], Record(one_pass.epoch)
        while len(samples) < self._size:
            try:
                sample, taken = one_pass.take()
            except StopIteration:
                break
            except Exception as exc:
                if not samples or self._drop:  # drop_remainder: never a short batch
                    one_pass.apply(record + one_pass.leftover())  # skips stay out
                    raise
                self._error = exc  # the samples before it first, as a short batch
                break
            except BaseException:
                one_pass.apply(record + one_pass.leftover())
                raise
            samples.append(sample)
            record += taken
            indices.append(one_pass.last_index)
        record += one_pass.leftover()  # the pass's end, skips after the last sample
        if not samples or (self._drop and len(samples) < self._size and self._error is None):
            one_pass.apply(record)
            raise StopIteration
        try:
            batch = stack(samples, indices)
        except Exception:
            # Samples that cannot be batched end the pass, and are not counted
            # as handed out: a resume meets them again.
            one_pass.close()
            raise
        self.last_index = indices[0]
        return batch, record

    def leftover(self) -> Record:
        return self.one_pass.leftover()

    def apply(self, record: Record) -> None:
        self.one_pass.apply(record)

    @property
    def interrupted(self) -> bool:
        return self.one_pass.interrupted

    def close(self) -> None:
        self.one_pass.close()
