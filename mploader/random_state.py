"""Per-item random state: the same item gets the same random numbers on any worker.

Each item's state is derived from ``(seed, epoch, index)`` with
``numpy.random.SeedSequence``, never from the worker id or the time, so a
seeded loader produces identical output for any ``num_workers`` and any timing.
Inside ``fn``, call :func:`item_rng` for a ``numpy.random.Generator``.  When a
seed is given, the legacy global generators (``numpy.random.*`` functions and
the ``random`` module) are also seeded per item, so existing code that uses
them becomes reproducible without changes.
"""
from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np

_scope: "_ItemScope | None" = None


class _ItemScope:
    __slots__ = ("seed", "epoch", "index", "rng")

    def __init__(self, seed: int | None, epoch: int, index: int) -> None:
        self.seed = seed
        self.epoch = epoch
        self.index = index
        self.rng: np.random.Generator | None = None

    def sequence(self) -> np.random.SeedSequence:
        return np.random.SeedSequence(self.seed, spawn_key=(self.epoch, self.index))


def item_rng() -> np.random.Generator:
    """The random generator of the item that ``fn`` is processing now.

    Created on first use and derived from (seed, epoch, index).  Raises
    ``RuntimeError`` outside an item (use :func:`item_scope` to replay one).
    """
    if _scope is None:
        raise RuntimeError(
            "mploader.item_rng() is only available while fn runs on an item: "
            "inside an MPLoader worker, or inside mploader.item_scope(...)")
    if _scope.rng is None:
        _scope.rng = np.random.Generator(np.random.PCG64(_scope.sequence()))
    return _scope.rng


@contextlib.contextmanager
def item_scope(seed: int | None, epoch: int, index: int) -> Iterator[None]:
    """Run code as the worker runs item ``index`` of pass ``epoch``.

    Workers use it for every item; users can use it to replay one item in the
    parent, e.g. ``with item_scope(seed=0, epoch=1, index=17): fn(source[17])``
    gives exactly what the loader produced for that item.
    """
    global _scope
    outer, _scope = _scope, _ItemScope(seed, epoch, index)
    if seed is not None:
        legacy = int(_scope.sequence().generate_state(1)[0])
        np.random.seed(legacy)
        random.seed(legacy)
    try:
        yield
    finally:
        _scope = outer
