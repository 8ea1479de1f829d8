"""Every element checked against the dataset's signature before TensorFlow sees it.

``tf.data.Dataset.from_generator`` casts each element to its
``output_signature`` without a word: an item whose volume is float64 where the
signature (inferred from item 0) says int64 arrives as garbage.  Medical
volumes differ in dtype from file to file, so this is a realistic way to train
on the wrong data.  :class:`SignatureCheck` compares each leaf's dtype and
shape with the signature (no copy: a few attribute reads per leaf) and raises
:class:`SignatureMismatch` naming the item, the leaf, what was expected and
where that expectation came from, and the fix.

Rules: arrays and numpy scalars must have exactly the signature's dtype.
Python scalars have no declared width, so a Python ``int`` fits any integer
dtype that holds its value, a ``float`` any float dtype, a ``bool`` only
``bool``.  ``str`` and ``bytes`` (and string arrays) fit ``tf.string``.
Shapes must match, ``None`` dimensions matching any size.

This module does not import TensorFlow: the adapter translates the
signature into :class:`Leaf` specs first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import SignatureMismatch
from ..nest import path_text

_STRING_KINDS = "OSU"


@dataclass(frozen=True)
class Leaf:
    """What one leaf of the signature allows: ``dtype`` None means a string."""
    dtype: np.dtype | None
    shape: tuple[int | None, ...] | None   # None: any rank

    def describe(self) -> str:
        dtype = "string" if self.dtype is None else str(self.dtype)
        if self.shape is None:
            return f"{dtype} of any shape"
        return f"{dtype} of shape {tuple(self.shape)}"


def _fits_scalar(value: Any, leaf: Leaf) -> bool:
    if leaf.shape not in (None, ()):
        return False
    if isinstance(value, (str, bytes)):
        return leaf.dtype is None
    if leaf.dtype is None:
        return False
    if isinstance(value, bool):
        return leaf.dtype == np.bool_
    if isinstance(value, int):
        if leaf.dtype.kind not in "iu":
            return False
        info = np.iinfo(leaf.dtype)
        return info.min <= value <= info.max
    if isinstance(value, float):
        return leaf.dtype.kind == "f"
    return False


def _got(value: Any) -> str:
    if isinstance(value, (np.ndarray, np.generic)):
        return f"{value.dtype} of shape {tuple(np.shape(value))}"
    return f"a Python {type(value).__name__} ({value!r:.40})"


class SignatureCheck:
    """Checks elements against a nest of :class:`Leaf`; ``origin`` says where
    the signature came from (inferred from which item, or given)."""

    def __init__(self, spec: Any, origin: str) -> None:
        self.spec = spec
        self._origin = origin

    def check(self, element: Any, index: int | None) -> None:
        """Raise SignatureMismatch if ``element`` (of source ``index``) does not fit."""
        self._check(element, self.spec, (), index)

    def _check(self, value: Any, spec: Any, path: tuple, index: int | None) -> None:
        if spec is None:
            return  # a spec TensorFlow checks itself (ragged, sparse)
        if isinstance(spec, dict):
            if not isinstance(value, dict) or value.keys() != spec.keys():
                self._fail(index, path, f"a dict with keys {sorted(spec)}", _keys(value))
            for key, sub in spec.items():
                self._check(value[key], sub, path + (key,), index)
        elif isinstance(spec, tuple):
            if not isinstance(value, (tuple, list)) or len(value) != len(spec):
                self._fail(index, path, f"a tuple of {len(spec)}", _keys(value))
            for i, sub in enumerate(spec):
                self._check(value[i], sub, path + (i,), index)
        elif isinstance(value, (np.ndarray, np.generic)):
            if not _fits_array(value, spec):
                self._fail(index, path, spec.describe(), _got(value))
        elif not _fits_scalar(value, spec):
            self._fail(index, path, spec.describe(), _got(value))

    def _fail(self, index: int | None, path: tuple, expected: str, got: str) -> None:
        raise SignatureMismatch(
            f"source index {index}: {path_text(path)} is {got}, but the dataset's signature says "
            f"{expected} ({self._origin}).  TensorFlow would cast or reject it, so "
            "mploader stops here rather than change your data.  Fix: give "
            "output_signature with the dtype you want and None for dimensions that "
            "vary between items, or convert in fn (e.g. np.asarray(x, np.float32)).")


def _fits_array(value: np.ndarray | np.generic, leaf: Leaf) -> bool:
    if leaf.dtype is None:
        if value.dtype.kind not in _STRING_KINDS:
            return False
    elif value.dtype != leaf.dtype:
        return False
    if leaf.shape is None:
        return True
    shape = np.shape(value)
    return len(shape) == len(leaf.shape) and all(
        want is None or want == got for want, got in zip(leaf.shape, shape))


def _keys(value: Any) -> str:
    if isinstance(value, dict):
        return f"a dict with keys {sorted(map(str, value))}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return _got(value)
