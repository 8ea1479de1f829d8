"""Batches of samples, for a ``fn`` that yields several samples per item.

A batch of ``batch_size`` samples may hold samples of several items (the
last ones of one volume, the first ones of the next), so it cannot be stacked
in one worker: the pass hands the samples out in order and this module stacks
them in the parent, one copy per batch.  The pass counts a sample as handed
out when it is taken into a batch (epochs.py), so a resume continues after
the last batch handed out.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from .layout import UnsupportedResult, map_nest, path_text


def stack(samples: list[Any], indices: list[int | None]) -> Any:
    """The samples' nests stacked leaf by leaf along a new first axis."""
    flat = [_leaves(sample) for sample in samples]
    paths = [path for path, _ in flat[0]]
    for leaves, index in zip(flat[1:], indices[1:]):
        if [path for path, _ in leaves] != paths:
            raise UnsupportedResult(f"cannot batch: a sample of source index {index} has "
                                    f"another structure than one of source index {indices[0]}")
    columns = iter([np.asarray([leaves[i][1] for leaves in flat]
                               if not isinstance(flat[0][i][1], np.ndarray)
                               else _stack_arrays([leaves[i][1] for leaves in flat],
                                                  paths[i], indices))
                    for i in range(len(paths))])
    return map_nest(lambda _v, _p: next(columns), samples[0])


def _leaves(value: Any) -> list[tuple[tuple, Any]]:
    found: list[tuple[tuple, Any]] = []
    map_nest(lambda v, path: found.append((path, v)), value)
    return found


def _stack_arrays(arrays: list[np.ndarray], path: tuple, indices: list[int | None]) -> Any:
    first = arrays[0]
    for array, index in zip(arrays[1:], indices[1:]):
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
        self.last_index: int | None = None

    def __next__(self) -> Any:
        samples, indices = [], []
        for value in self.one_pass:
            samples.append(value)
            indices.append(self.one_pass.last_index)
            if len(samples) == self._size:
                break
        if not samples or (self._drop and len(samples) < self._size):
            raise StopIteration
        self.last_index = indices[0]
        return stack(samples, indices)

    @property
    def interrupted(self) -> bool:
        return self.one_pass.interrupted

    def close(self) -> None:
        self.one_pass.close()
