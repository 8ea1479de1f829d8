"""The benchmark workloads: module-level functions of an index, so every peer
(spawned PyTorch and Grain workers included) can import them by name."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "medical_3d"))

ONE_MIB_F64 = (1 << 20) // 8


@dataclass
class Timed:
    """One pass read by :func:`consume`: perf_counter seconds."""
    elements: int     # all of them
    after_first: int  # those after the first: the steady rate's
    first: float      # when the first arrived
    last: float       # when the last arrived
    end: float        # when the iterator said it had no more


def consume(iterable: Iterable[Any], size: Callable[[Any], int] = lambda _: 1,
            at_first: Callable[[], Any] = lambda: None) -> Timed:
    """Read ``iterable`` to its end, ``size(element)`` counting each (a
    consumer's step can run there too); ``at_first()`` runs as the first
    element arrives.

    Rates run to the last element, never to the iterator's end: ending a
    ``tf.data`` iterator destroys it, and TensorFlow's autotuning thread then
    holds that destructor, in some runs, for about as long as the pass took
    (2 s after a 3 s pass of a bare ``from_generator``, measured here), which
    is no part of the hand-off of any peer.
    """
    elements, first_size, first, last = 0, 0, None, None
    for x in iterable:
        last = time.perf_counter()
        elements += size(x)
        if first is None:
            first, first_size = last, elements
            at_first()
        del x  # what the next element may reuse (peak memory, leased slots)
    end = time.perf_counter()
    if first is None or last is None:
        raise RuntimeError("the pass gave no element")
    return Timed(elements, elements - first_size, first, last, end)
GIL_LOOP = int(os.environ.get("MPLOADER_BENCH_GIL_LOOP", "150000"))  # ~15 ms of Python


def gil_bound(i):
    """(a) Pure-Python work holding the GIL, then a 1 MiB array."""
    total = 0
    for k in range(GIL_LOOP):
        total += (k * k + i) % 7
    return np.full(ONE_MIB_F64, total, np.float64)


_cases: list | None = None


def medical(i):
    """(b) The medical demo's preprocessing of case i (cases listed in $MPLOADER_BENCH_CASES)."""
    global _cases
    import pipeline
    if _cases is None:
        _cases = json.loads(Path(os.environ["MPLOADER_BENCH_CASES"]).read_text())
    return pipeline.preprocess(_cases[i % len(_cases)], np.random.default_rng(i))


def tiny(i):
    """(c) Nothing to compute: exposes the cost per item."""
    return np.int64(i)


_big: np.ndarray | None = None
BIG_BYTES = int(os.environ.get("MPLOADER_BENCH_BIG_BYTES", str(32 << 20)))


def big(i):
    """(d) A 32 MiB array made once per process: measures bandwidth, not compute."""
    global _big
    if _big is None:
        _big = np.full(BIG_BYTES, 7, np.uint8)
    return _big


# name -> (function, TF output dtypes as strings, TF output shapes)
WORKLOADS = {
    "gil_bound": (gil_bound, ["float64"], [(ONE_MIB_F64,)]),
    "medical": (medical, ["float32", "float32"], [(32, 32, 32, 1), (32, 32, 32, 1)]),
    "tiny": (tiny, ["int64"], [()]),
    "big": (big, ["uint8"], [(BIG_BYTES,)]),
}


_IMAGE = np.full((224, 224, 3), 0.5, np.float32)
_VOLUME = np.full((64, 64, 64), 0.5, np.float32)


def ready_scalar(i):
    """(h) An int64 scalar: the hand-off's cost per element."""
    return np.int64(i)


def ready_image(i):
    """(h) A ready 224x224x3 float32 image (0.57 MiB), the same every time."""
    return _IMAGE


def ready_volume(i):
    """(h) A ready 64x64x64 float32 volume (1 MiB), the same every time."""
    return _VOLUME


# element -> (function, (numpy dtype, shape)) for the consumer section (h)
READY = {
    "int64_scalar": (ready_scalar, ("int64", ())),
    "image_224x224x3_f32": (ready_image, ("float32", (224, 224, 3))),
    "volume_64x64x64_f32": (ready_volume, ("float32", (64, 64, 64))),
}
