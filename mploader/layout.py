"""How one task's result is laid out in a shared-memory slot.

A result is a nest: tuples (lists are read as tuples, the only sequence type
``tf.data`` accepts) and dicts whose leaves are numpy arrays, numpy or Python
scalars, ``str`` or ``bytes``.  The worker writes every array into the slot at
a 64-byte aligned offset (so TensorFlow can use the memory without a copy) and
sends the nest back with each array replaced by an :class:`ArrayRef`.  Scalars
and strings are tiny and travel inside the message.

Without ``batch_size`` a task may still carry several consecutive items (when
items are tiny, see passes.py); their results are laid out one after another.
With ``batch_size`` the worker stacks the items of a task along a new first
axis directly in the slot: numeric scalars become 1-D arrays, strings a 1-D
object array.
"""
from __future__ import annotations

import cmath
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

ALIGN_BYTES = 64  # TensorFlow's EIGEN_MAX_ALIGN_BYTES: aligned arrays are used in place
_SCALARS = (bool, int, float, np.bool_, np.number)
_STRINGS = (str, bytes)


class UnsupportedResult(TypeError):
    """fn returned something that cannot be laid out in shared memory."""


@dataclass(frozen=True)
class ArrayRef:
    """An array written at ``offset`` bytes into the task's slot."""
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype


Write = tuple[int, np.ndarray]  # (offset in the slot, array to copy there)
# (offset, array, the padded shape it goes into, the pad value around it)
PadWrite = tuple[int, np.ndarray, tuple[int, ...], Any]


@dataclass(frozen=True)
class Padding:
    """Batches of items whose array shapes vary, padded (a ``padded_batch``).

    ``shapes``: a nest like the result, one shape per array leaf, each
    dimension an int or None (the largest in the batch), or None for every
    leaf padded to the largest; ``values``: the pad value, one for every leaf
    or a nest like the result.
    """
    shapes: Any = None
    values: Any = None

    def value_at(self, path: tuple) -> Any:
        """The pad value of a leaf; None: its dtype's zero ('' for strings)."""
        return _at(self.values, path)

    def shape_at(self, path: tuple, rank: int) -> tuple[Any, ...]:
        shape = _at(self.shapes, path)
        if shape is None:
            return (None,) * rank
        if not isinstance(shape, (tuple, list)):
            raise UnsupportedResult(f"padded_shapes gives {path_text(path)} {shape!r}, not "
                                    "a shape (a tuple of ints or None)")
        return tuple(shape)

    def check(self, result: Any) -> None:
        """Every key and position the padding names exists in the result (a
        typo would silently pad with the defaults)."""
        _check_nest(self.shapes, result, "padded_shapes")
        _check_nest(self.values, result, "padding_values")


def _check_nest(nest: Any, result: Any, what: str, path: tuple = ()) -> None:
    if isinstance(nest, dict):
        if not isinstance(result, dict):
            raise UnsupportedResult(f"{what} gives a dict for {path_text(path)}, where the "
                                    f"result has a {type(result).__name__}")
        for key, sub in nest.items():
            if key not in result:
                raise UnsupportedResult(
                    f"{what} names {path_text(path + (key,))}, which the result does not "
                    f"have (its keys there: {', '.join(map(repr, result))})")
            _check_nest(sub, result[key], what, path + (key,))
    elif isinstance(nest, (tuple, list)) and isinstance(result, (tuple, list)):
        if len(nest) != len(result):
            raise UnsupportedResult(f"{what} gives {len(nest)} entries for {path_text(path)}, "
                                    f"where the result has {len(result)}")
        for i, (sub, part) in enumerate(zip(nest, result)):
            _check_nest(sub, part, what, path + (i,))
    elif isinstance(nest, (tuple, list)) and isinstance(result, dict):
        raise UnsupportedResult(f"{what} gives a {type(nest).__name__} for {path_text(path)}, "
                                "where the result has a dict: give a dict with its keys")


def _at(nest: Any, path: tuple) -> Any:
    """The part of ``nest`` at ``path``; a leaf (or None) stands for all below it."""
    for key in path:
        if isinstance(nest, dict):
            nest = nest.get(key)
        elif isinstance(nest, (tuple, list)):
            nest = nest[key] if key < len(nest) else None
        else:
            return nest
    return nest


def path_text(path: tuple) -> str:
    """'result[0]["image"]' for the path (0, "image")."""
    return "result" + "".join(f"[{key!r}]" for key in path)


def map_nest(fn: Callable[[Any, tuple], Any], value: Any, path: tuple = ()) -> Any:
    """Apply fn(leaf, path) to every leaf; tuples and lists come back as tuples."""
    if isinstance(value, (tuple, list)):
        return tuple(map_nest(fn, v, path + (i,)) for i, v in enumerate(value))
    if isinstance(value, dict):
        return {k: map_nest(fn, v, path + (k,)) for k, v in value.items()}
    return fn(value, path)


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN_BYTES) * ALIGN_BYTES


def _check_array(array: np.ndarray, path: tuple) -> None:
    if type(array) not in (np.ndarray, np.memmap):
        raise UnsupportedResult(
            f"fn returned a {type(array).__name__} at {path_text(path)}; only its raw "
            "data would reach the consumer (a masked array's mask, a matrix's "
            "shape rules would be lost): return np.asarray(x), or for a masked "
            "array x.filled(value) and np.ma.getmaskarray(x)")
    if array.dtype.hasobject:
        raise UnsupportedResult(
            f"fn returned an array of dtype {array.dtype} at {path_text(path)}; "
            "object arrays cannot be placed in shared memory: return a numeric, "
            "bool or fixed-width string array instead")


def _unsupported(value: Any, path: tuple) -> UnsupportedResult:
    return UnsupportedResult(
        f"fn returned a {type(value).__name__} at {path_text(path)}; supported "
        "leaves are numpy arrays, numpy or Python scalars, str and bytes, in "
        "tuples, lists or dicts")


def pack_items(results: list[Any], base: int = 0) -> tuple[tuple[Any, ...], list[Write], int]:
    """Lay out unbatched results one after another from ``base`` bytes into
    the slot: (trees, writes, bytes needed from the slot's start)."""
    writes: list[Write] = []
    end = base

    def leaf(value: Any, path: tuple) -> Any:
        nonlocal end
        if isinstance(value, np.ndarray):
            _check_array(value, path)
            offset = _aligned(end)
            writes.append((offset, value))
            end = offset + value.nbytes
            return ArrayRef(offset, value.shape, value.dtype)
        if isinstance(value, _SCALARS + _STRINGS):
            return value
        raise _unsupported(value, path)

    trees = tuple(map_nest(leaf, result) for result in results)
    return trees, writes, end


def _flatten(value: Any) -> tuple[Any, list[tuple[tuple, Any]]]:
    """(skeleton, [(path, leaf), ...]); equal skeletons mean equal structure."""
    leaves: list[tuple[tuple, Any]] = []

    def leaf(v: Any, path: tuple) -> None:
        leaves.append((path, v))

    return map_nest(leaf, value), leaves


def _padded_column(column: list[np.ndarray], indices: tuple[int, ...], path: tuple,
                   padding: Padding) -> tuple[tuple[int, ...], Any]:
    """(the batch's shape for this leaf without its first axis, the pad value),
    after checking every item's array: same dtype and rank, within a given shape."""
    head = column[0]
    wanted = padding.shape_at(path, head.ndim)
    for v, index in zip(column, indices):
        if not isinstance(v, np.ndarray) or v.dtype != head.dtype or v.ndim != head.ndim:
            got = f"{v.ndim}-d {v.dtype}" if isinstance(v, np.ndarray) else type(v).__name__
            raise UnsupportedResult(
                f"cannot pad {path_text(path)}: source index {indices[0]} gave a "
                f"{head.ndim}-d {head.dtype} array, source index {index} gave {got} "
                "(padding changes sizes, never dtypes or ranks)")
    if len(wanted) != head.ndim or not all(
            size is None or (isinstance(size, (int, np.integer)) and not isinstance(size, bool)
                             and size >= 0) for size in wanted):
        raise UnsupportedResult(
            f"padded_shapes gives {path_text(path)} the shape {tuple(wanted)!r}; the result "
            f"there has {head.ndim} dimensions: give one int >= 0 or None per dimension")
    shape = []
    for axis, size in enumerate(wanted):
        largest = max(v.shape[axis] for v in column)
        if size is not None and largest > size:
            index, v = next((i, v) for i, v in zip(indices, column) if v.shape[axis] > size)
            raise UnsupportedResult(
                f"cannot pad {path_text(path)}: source index {index} has {v.shape[axis]} "
                f"along axis {axis}, more than padded_shapes allows ({size})")
        shape.append(largest if size is None else size)
    return tuple(shape), _pad_value(padding.value_at(path), head.dtype, path)


def _pad_value(value: Any, dtype: np.dtype, path: tuple) -> Any:
    """The pad value as a scalar of ``dtype``; an error when it does not fit:
    integers exactly, floats within range (NaN and infinities as given)."""
    if value is None:
        return np.zeros((), dtype)[()]
    problem = None
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            converted = np.array(value, dtype=dtype)
        if converted.ndim != 0:
            problem = "is not a single value"
        elif dtype.kind in "iub" and (not float(np.asarray(value).real).is_integer()
                                      or converted.item() != value):
            problem = "is not a value of it"
        elif (dtype.kind in "fc" and cmath.isfinite(complex(value))
              and not np.isfinite(converted)):
            problem = "is out of its range"
    except (TypeError, ValueError, OverflowError) as exc:
        problem = f"cannot be converted ({exc})"
    if problem is not None:
        raise UnsupportedResult(f"the padding value {value!r} of {path_text(path)} does not "
                                f"fit its dtype {dtype}: it {problem}")
    return converted[()]


def pack_batch(results: list[Any], indices: tuple[int, ...], padding: Padding | None = None
               ) -> tuple[Any, list[Write | PadWrite], int]:
    """Stack the results of consecutive items along a new first axis (padded
    to one shape per leaf with ``padding``)."""
    if padding is not None:
        padding.check(results[0])
    skeleton, first = _flatten(results[0])
    columns: list[list[Any]] = [[v] for _, v in first]
    for result, index in zip(results[1:], indices[1:]):
        other_skeleton, leaves = _flatten(result)
        if other_skeleton != skeleton:
            raise UnsupportedResult(
                f"cannot batch: source index {index} returned a different "
                f"structure than source index {indices[0]}")
        for column, (_, v) in zip(columns, leaves):
            column.append(v)
    writes: list[Write | PadWrite] = []
    end = 0
    stacked: list[Any] = []
    for (path, head), column in zip(first, columns):
        if isinstance(head, np.ndarray) and padding is not None:
            for v in column:
                if isinstance(v, np.ndarray):
                    _check_array(v, path)
            shape, value = _padded_column(column, indices, path, padding)
            size = int(np.prod(shape)) * head.itemsize
            offset = _aligned(end)
            writes.extend((offset + i * size, v, shape, value) for i, v in enumerate(column))
            end = offset + size * len(column)
            stacked.append(ArrayRef(offset, (len(column),) + shape, head.dtype))
        elif isinstance(head, np.ndarray):
            for v, index in zip(column, indices):
                if isinstance(v, np.ndarray):
                    _check_array(v, path)
                if not isinstance(v, np.ndarray) or v.shape != head.shape or v.dtype != head.dtype:
                    got = (f"shape {v.shape} {v.dtype}" if isinstance(v, np.ndarray)
                           else type(v).__name__)
                    raise UnsupportedResult(
                        f"cannot batch {path_text(path)}: source index {indices[0]} "
                        f"gave shape {head.shape} {head.dtype}, source index {index} "
                        f"gave {got}; give every item the same shape, or use "
                        "batch_size=None")
            _check_array(head, path)
            offset = _aligned(end)
            writes.extend((offset + i * head.nbytes, v) for i, v in enumerate(column))
            end = offset + head.nbytes * len(column)
            stacked.append(ArrayRef(offset, (len(column),) + head.shape, head.dtype))
        elif all(isinstance(v, _STRINGS) for v in column):
            stacked.append(np.array(column, dtype=object))
        elif all(isinstance(v, _SCALARS) for v in column):
            array = np.asarray(column)
            offset = _aligned(end)
            writes.append((offset, array))
            end = offset + array.nbytes
            stacked.append(ArrayRef(offset, array.shape, array.dtype))
        else:
            raise _unsupported(next(v for v in column if not isinstance(v, _SCALARS)), path)
    rebuilt = iter(stacked)
    tree = map_nest(lambda _v, _p: next(rebuilt), skeleton)
    return tree, writes, end


def copy_writes(region: np.ndarray, writes: list[Write | PadWrite]) -> None:
    """Copy each array to its offset in ``region`` (a uint8 array), never
    casting; a padded one into the corner of its padded shape, the rest filled."""
    for write in writes:
        offset, array = write[0], write[1]
        if len(write) == 2:
            np.copyto(np.ndarray(array.shape, array.dtype, buffer=region, offset=offset),
                      array, casting="no")
            continue
        target = np.ndarray(write[2], array.dtype, buffer=region, offset=offset)
        if target.shape != array.shape:
            target.fill(write[3])
        corner = tuple(slice(0, n) for n in array.shape) + (Ellipsis,)  # a view, even 0-d
        np.copyto(target[corner], array, casting="no")


def unpack(tree: Any, region: np.ndarray, copy: bool) -> Any:
    """Rebuild a result nest over ``region`` (a uint8 array over the slot).

    With ``copy=False`` every array is a view whose ``base`` is ``region``, so
    ``region`` stays alive exactly as long as any part of the result does: the
    slot ring relies on this to know when a slot can be reused.
    """
    def leaf(value: Any, _path: tuple) -> Any:
        if not isinstance(value, ArrayRef):
            return value
        view = np.ndarray(value.shape, value.dtype, buffer=region, offset=value.offset)
        return view.copy() if copy else view

    return map_nest(leaf, tree)
