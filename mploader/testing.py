"""Checks users can run on their own pipeline: does a resume give exactly the
stream an uninterrupted run gives?

Resume bugs are the most reported defect of training input pipelines, and
they hide: a resumed run that repeats or skips a few elements trains without
a word.  :func:`assert_resume_exact` proves, on *your* loader (your source,
``fn``, shuffle, shards, batching, ``on_error``), that interrupting it after
any element, saving ``state_dict()``, and restoring into a fresh loader with
another ``num_workers`` continues the stream element for element.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .nest import map_nest

__all__ = ["assert_resume_exact"]


def assert_resume_exact(make_loader: Callable[[int], Any], *, epochs: int = 2,
                        every: int = 1, workers: tuple[int, int] = (2, 1),
                        via: str = "loop") -> int:
    """Interrupt the loader ``make_loader`` builds after every ``every``-th
    element and at every epoch's end, restore, and compare with a run that
    was never interrupted; returns the number of interruptions checked.

    ``make_loader(num_workers)`` builds a fresh loader (an ``MPLoader``) each
    time: the uninterrupted run and each interrupted one use
    ``workers[0]`` workers, the resumed ones ``workers[1]``.  ``epochs``
    passes are interrupted, and the stream is compared up to the end of the
    pass after them.  ``every=1`` interrupts after every element; a larger
    value skips some (one that is a multiple of ``samples_per_item`` never
    interrupts an item part-way through its samples).  ``via``: ``"loop"`` (``for x in loader``) or
    ``"dataset"`` (``loader.dataset()``, TensorFlow).  Raises
    ``AssertionError`` naming the first element that differs: the epoch, its
    position in the epoch, the interruption, and both values.

    Give the loader a ``seed`` when it shuffles or draws random numbers: a
    drawn seed is restored from the state for the order, but the items'
    random numbers of a fresh loader without a seed are new.  The loader must
    be ``ordered=True``: with ``ordered=False`` the stream's order depends on
    timing, so no two runs are alike element for element.
    """
    if via not in ("loop", "dataset"):
        raise ValueError(f"via must be 'loop' or 'dataset', not {via!r}")
    if not (isinstance(every, int) and every >= 1 and isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"every and epochs must be ints >= 1, not {every!r} and {epochs!r}")
    with make_loader(workers[0]) as loader:  # one epoch more: what follows the last cut
        expected = [_digests(_pass(loader, via)) for _ in range(epochs + 1)]
    checked = 0
    for epoch, stream in enumerate(expected[:epochs]):
        cuts = sorted(set(range(0, len(stream), every)) | {len(stream)})
        for cut in cuts:
            _check_cut(make_loader, workers, via, expected, epoch, cut)
            checked += 1
    return checked


def _check_cut(make_loader: Callable[[int], Any], workers: tuple[int, int], via: str,
               expected: list[list[bytes]], epoch: int, cut: int) -> None:
    """Run to element ``cut`` of ``epoch``, save, restore elsewhere, go on to the end."""
    with make_loader(workers[0]) as first:
        got = [_digests(_pass(first, via)) for _ in range(epoch)]
        passes = _pass(first, via)
        got.append(_digests(value for _, value in zip(range(cut), passes)))  # no read past
        state = first.state_dict()
        passes.close()
    with make_loader(workers[1]) as resumed:
        resumed.load_state_dict(state)
        rest = _digests(_pass(resumed, via))
        if cut == len(expected[epoch]) and rest == [] or cut < len(expected[epoch]):
            got[epoch] += rest  # the rest of the interrupted epoch (none at its end)
        else:
            got.append(rest)   # the state had rolled over: that pass was the next epoch
        while len(got) < len(expected):
            got.append(_digests(_pass(resumed, via)))
    where = f"interrupted after element {cut} of epoch {epoch}, resumed"
    for e, (want, have) in enumerate(zip(expected, got)):
        for position, (a, b) in enumerate(zip(want, have)):
            if a != b:
                raise AssertionError(f"{where}: epoch {e}, element {position} differs: "
                                     f"expected {_text(a)}, got {_text(b)}")
        if len(want) != len(have):
            raise AssertionError(f"{where}: epoch {e} has {len(have)} elements, the "
                                 f"uninterrupted run {len(want)}")


def _pass(loader: Any, via: str) -> Iterator[Any]:
    """One pass (one epoch) over the loader, as numpy nests."""
    if via == "loop":
        yield from loader
    else:
        yield from loader.dataset().as_numpy_iterator()


def _digests(values: Any) -> list[bytes]:
    """Each element as bytes that say its structure, dtypes, shapes and values."""
    return [repr(map_nest(_leaf, value)).encode() for value in values]


def _leaf(value: Any, _path: tuple) -> Any:
    array = np.asarray(value)
    if array.dtype.kind == "O":
        return ("object", array.shape, repr(array.tolist()))
    return (str(array.dtype), array.shape, array.tobytes())


def _text(digest: bytes) -> str:
    text = digest.decode(errors="replace")
    return text if len(text) <= 300 else text[:300] + "..."
