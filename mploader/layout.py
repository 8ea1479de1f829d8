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
object array.  The items of a batch follow one rule for every leaf, scalars
as arrays: the same structure and the same dtype (a Python ``int`` is an
int64, a ``float`` a float64), and the same shape unless padded.  An item that
breaks it fails alone, named with the leaf, and the others are batched
(under ``on_error="skip"`` the batch comes out without it); the layout the
batch keeps is the one most of its items have.

A CPU ``torch.Tensor`` leaf (MONAI's ``MetaTensor`` too, its metadata left
behind) is taken as the numpy array over its memory, same dtype and shape;
torch is never imported here, only recognised when the worker has it.
"""
from __future__ import annotations

import cmath
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

ALIGN_BYTES = 64  # TensorFlow's EIGEN_MAX_ALIGN_BYTES: aligned arrays are used in place
_SCALARS = (bool, int, float, np.bool_, np.number)
_NUMBERS = (int, float, complex, np.number)
_BOOLS = (bool, np.bool_)
_STRINGS = (str, bytes)
# dtype kind -> (the pad values it takes, how to say it); any other kind takes _NUMBERS
_PAD_KINDS = {"b": (_BOOLS, "a bool"), "U": ((str,), "a str"), "S": ((bytes,), "bytes")}


class UnsupportedResult(TypeError):
    """fn returned something that cannot be laid out in shared memory."""


class PaddingDoesNotFit(UnsupportedResult):
    """The loader's padding (a pad value, a padded shape) does not fit fn's
    result: a mistake of the settings, not of an item, so it is raised
    whatever ``on_error`` says (skipping would skip every item)."""


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

    def __post_init__(self) -> None:
        """Every pad value is one scalar (a number, bool, str or bytes): anything
        else is refused here, at construction, not at the first batch."""
        def check(value: Any, path: tuple) -> None:
            if value is not None and not isinstance(value, _SCALARS + _STRINGS):
                raise PaddingDoesNotFit(
                    f"padding_values gives {path_text(path)} {value!r}, a "
                    f"{type(value).__name__}: a pad value is one number, bool, str or bytes "
                    "(or None for the dtype's zero), or a nest of them like the result")
        map_nest(check, self.values)

    def check_signature(self, signature: Any) -> None:
        """Each pad value against the dtype the signature gives its leaf (a nest
        of ``tf.TensorSpec``, read by duck typing: TensorFlow is not imported)."""
        def check(spec: Any, path: tuple) -> None:
            value, dtype = self.value_at(path), getattr(spec, "dtype", None)
            numpy_dtype = getattr(dtype, "as_numpy_dtype", None)
            if value is None or numpy_dtype is None:
                return
            dtype = np.dtype(numpy_dtype)
            if dtype.kind == "O":  # tf.string: the leaf's width is known only per batch
                if not isinstance(value, _STRINGS):
                    raise PaddingDoesNotFit(
                        f"the padding value {value!r} of {path_text(path)} does not fit "
                        "its dtype string: give a str or bytes")
                return
            _pad_value(value, dtype, path)
        map_nest(check, signature)

    def value_at(self, path: tuple) -> Any:
        """The pad value of a leaf; None: its dtype's zero ('' for strings)."""
        return _at(self.values, path)

    def shape_at(self, path: tuple, rank: int) -> tuple[Any, ...]:
        shape = _at(self.shapes, path)
        if shape is None:
            return (None,) * rank
        if not isinstance(shape, (tuple, list)):
            raise PaddingDoesNotFit(f"padded_shapes gives {path_text(path)} {shape!r}, not "
                                    "a shape (a tuple of ints or None)")
        return tuple(shape)

    def check(self, result: Any) -> None:
        """Every key and position the padding names exists in the result (a
        typo would silently pad with the defaults).  Checked against the
        layout most of a batch's items share: an item of another structure
        fails alone, a padding that names what the batch lacks is the settings' error."""
        _check_nest(self.shapes, result, "padded_shapes")
        _check_nest(self.values, result, "padding_values")


def _check_nest(nest: Any, result: Any, what: str, path: tuple = ()) -> None:
    if isinstance(nest, dict):
        if not isinstance(result, dict):
            raise PaddingDoesNotFit(f"{what} gives a dict for {path_text(path)}, where the "
                                    f"result has a {type(result).__name__}")
        for key, sub in nest.items():
            if key not in result:
                raise PaddingDoesNotFit(
                    f"{what} names {path_text(path + (key,))}, which the result does not "
                    f"have (its keys there: {', '.join(map(repr, result))})")
            _check_nest(sub, result[key], what, path + (key,))
    elif isinstance(nest, (tuple, list)) and isinstance(result, (tuple, list)):
        if len(nest) != len(result):
            raise PaddingDoesNotFit(f"{what} gives {len(nest)} entries for {path_text(path)}, "
                                    f"where the result has {len(result)}")
        for i, (sub, part) in enumerate(zip(nest, result)):
            _check_nest(sub, part, what, path + (i,))
    elif isinstance(nest, (tuple, list)) and isinstance(result, dict):
        raise PaddingDoesNotFit(f"{what} gives a {type(nest).__name__} for {path_text(path)}, "
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
        value = from_torch(value, path)
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


def from_torch(value: Any, path: tuple) -> Any:
    """A CPU ``torch.Tensor`` leaf as the numpy array over its memory (no copy,
    no cast; a subclass such as MONAI's ``MetaTensor`` as a plain tensor, its
    metadata left behind); any other value unchanged.  A tensor numpy cannot
    hold as it is (on a device, sparse, bfloat16) is an error naming the leaf."""
    torch = sys.modules.get("torch")  # only if fn's own code imported it
    if torch is None or not isinstance(value, torch.Tensor):
        return value
    where = f"fn returned a torch tensor at {path_text(path)}"
    if value.device.type != "cpu":
        raise UnsupportedResult(
            f"{where} on device {value.device}: only CPU tensors can be placed in shared "
            "memory; return x.cpu() (mploader never moves a tensor off its device itself)")
    if value.layout != torch.strided:
        raise UnsupportedResult(f"{where} with layout {value.layout}: return x.to_dense()")
    tensor = value.as_subclass(torch.Tensor).detach().resolve_conj().resolve_neg()
    try:
        return tensor.numpy()
    except TypeError as exc:  # a dtype numpy lacks: bfloat16, float8, complex32, ...
        raise UnsupportedResult(
            f"{where} of dtype {value.dtype}, which numpy has no dtype for; convert it "
            "yourself, e.g. x.float() (mploader never casts)") from exc


def _scalar_dtype(value: Any, path: tuple) -> np.dtype:
    """The dtype a scalar leaf stacks as: a numpy scalar's own, int64 for a
    Python int, float64 for a float, complex128 for a complex, bool for a bool."""
    if isinstance(value, np.generic):
        return value.dtype
    dtype = np.asarray(value).dtype
    if dtype.kind == "O":
        raise UnsupportedResult(f"fn returned {value!r} at {path_text(path)}, an int that "
                                "no integer dtype holds")
    return dtype


# One item's leaf as the batch sees it: ("array", dtype, shape, or rank when
# padded), ("scalar", dtype) or ("string",).
Kind = tuple


def _kind(value: Any, path: tuple, padded: bool) -> Kind:
    if isinstance(value, np.ndarray):
        _check_array(value, path)
        return ("array", value.dtype, value.ndim if padded else value.shape)
    if isinstance(value, _STRINGS):
        return ("string",)
    if isinstance(value, _SCALARS):
        return ("scalar", _scalar_dtype(value, path))
    raise _unsupported(value, path)


def _describe(kind: Kind | None) -> str:
    if kind is None:
        return "nothing"
    if kind[0] == "array":
        form = f"{kind[2]}-d" if isinstance(kind[2], int) else f"shape {kind[2]}"
        return f"a {form} array of {kind[1]}"
    return "a string" if kind[0] == "string" else f"a scalar of {kind[1]}"


class _Item:
    """One result of a batch: its leaves by path, and its layout."""

    def __init__(self, result: Any, padded: bool) -> None:
        self.leaves: dict[tuple, Any] = {}

        def leaf(value: Any, path: tuple) -> None:
            value = from_torch(value, path)
            self.kinds[path] = _kind(value, path, padded)
            self.leaves[path] = value

        self.kinds: dict[tuple, Kind] = {}
        self.skeleton = map_nest(leaf, result)
        # What the batch votes on: each leaf's kind by path, in any dict order.
        self.layout = frozenset(self.kinds.items())


def _odd_one(item: _Item, index: int, like: _Item, like_index: int, padded: bool
             ) -> UnsupportedResult:
    """The error of an item whose layout is not the batch's."""
    rule = ("padding changes sizes, never structures, dtypes or ranks" if padded else
            "give every item the same structure, dtypes and shapes, or use batch_size=None")
    if item.skeleton != like.skeleton or item.kinds.keys() != like.kinds.keys():
        return UnsupportedResult(
            f"cannot batch: source index {index} returned a different structure than "
            f"the batch's other items (source index {like_index}); {rule}")
    path = next(p for p in like.kinds if item.kinds.get(p) != like.kinds[p])
    return UnsupportedResult(
        f"cannot batch {path_text(path)}: source index {index} gave "
        f"{_describe(item.kinds.get(path))}, the batch's other items {_describe(like.kinds[path])} "
        f"(source index {like_index}); {rule}")


def _padded_shape(column: list[np.ndarray], path: tuple, padding: Padding
                  ) -> tuple[tuple[int, ...], list[int]]:
    """(the leaf's shape in the batch without its first axis, the positions of
    items that exceed a size padded_shapes fixes)."""
    head = column[0]
    wanted = padding.shape_at(path, head.ndim)
    if len(wanted) != head.ndim or not all(
            size is None or (isinstance(size, (int, np.integer)) and not isinstance(size, bool)
                             and size >= 0) for size in wanted):
        raise PaddingDoesNotFit(
            f"padded_shapes gives {path_text(path)} the shape {tuple(wanted)!r}; the result "
            f"there has {head.ndim} dimensions: give one int >= 0 or None per dimension")
    too_large = [position for position, v in enumerate(column)
                 if any(size is not None and n > size for n, size in zip(v.shape, wanted))]
    fitting = [v for position, v in enumerate(column) if position not in too_large] or column
    shape = tuple(max(v.shape[axis] for v in fitting) if size is None else size
                  for axis, size in enumerate(wanted))
    return shape, too_large


def _pad_value(value: Any, dtype: np.dtype, path: tuple) -> Any:
    """The pad value as a scalar of ``dtype``; an error when it does not fit,
    never a conversion that changes it: a number for a number (integers
    exactly, floats within range and not flushed to zero; NaN and infinities as
    given), a bool for a bool, a str for a str leaf and bytes for a bytes
    leaf, within the leaf's width."""
    if value is None:
        return np.zeros((), dtype)[()]
    problem = None
    wanted, kind = _PAD_KINDS.get(dtype.kind, (_NUMBERS, "a number"))
    if not isinstance(value, wanted) or (wanted is _NUMBERS and isinstance(value, _BOOLS)):
        problem = f"is a {type(value).__name__}, not {kind}"
    else:
        try:
            with np.errstate(over="ignore", invalid="ignore", under="ignore"):
                converted = np.array(value, dtype=dtype)
            if dtype.kind in "US" and converted.item() != value:
                problem = f"is longer than the leaf's width ({dtype}), and would be cut"
            elif dtype.kind in "iu" and (not float(np.asarray(value).real).is_integer()
                                         or converted.item() != value):
                problem = "is not a value of it"
            elif dtype.kind in "fc" and cmath.isfinite(complex(value)):
                if not np.isfinite(converted):
                    problem = "is out of its range"
                elif value != 0 and converted == 0:
                    problem = "is too small for it, and would become 0"
        except (TypeError, ValueError, OverflowError) as exc:
            problem = f"cannot be converted ({exc})"
    if problem is not None:
        raise PaddingDoesNotFit(f"the padding value {value!r} of {path_text(path)} does not "
                                f"fit its dtype {dtype}: it {problem}")
    return converted[()]


def pack_batch(results: list[Any], indices: tuple[int, ...], padding: Padding | None = None
               ) -> tuple[Any, list[Write | PadWrite], int, dict[int, UnsupportedResult]]:
    """Stack the results of consecutive items along a new first axis (padded
    to one shape per leaf with ``padding``): (tree, writes, bytes, rejected).

    ``rejected`` maps the position of each item left out to its error: a leaf
    that cannot be sent, a layout other than the batch's (the layout most items
    have; on a tie, the earliest), a size over ``padded_shapes``.  ``tree`` is
    None when every item was rejected.  Errors of the batch's own settings
    (a pad value or padded shape that does not fit) are raised.
    """
    padded = padding is not None
    rejected: dict[int, UnsupportedResult] = {}
    items: dict[int, _Item] = {}
    for position, result in enumerate(results):
        try:
            items[position] = _Item(result, padded)
        except UnsupportedResult as exc:
            rejected[position] = exc
    if not items:
        return None, [], 0, rejected
    votes = Counter(item.layout for item in items.values())
    first = next(p for p, item in items.items() if votes[item.layout] == max(votes.values()))
    like = items[first]
    if padding is not None:
        padding.check(results[first])
    for position, item in list(items.items()):
        if item.layout != like.layout or item.skeleton != like.skeleton:
            rejected[position] = _odd_one(item, indices[position], like, indices[first], padded)
            del items[position]
    shapes: dict[tuple, tuple[tuple[int, ...], Any]] = {}
    for path, kind in like.kinds.items():
        if kind[0] == "array" and padding is not None:
            column = [item.leaves[path] for item in items.values()]
            shape, too_large = _padded_shape(column, path, padding)
            shapes[path] = shape, _pad_value(padding.value_at(path), kind[1], path)
            for position in [list(items)[k] for k in too_large]:
                axis, n, size = next((axis, n, size) for axis, (n, size) in enumerate(
                    zip(items[position].leaves[path].shape, padding.shape_at(path, kind[2])))
                    if size is not None and n > size)
                rejected[position] = UnsupportedResult(
                    f"cannot pad {path_text(path)}: source index {indices[position]} has {n} "
                    f"along axis {axis}, more than padded_shapes allows ({size})")
                del items[position]
    if not items:
        return None, [], 0, rejected
    writes: list[Write | PadWrite] = []
    end = 0
    stacked: dict[tuple, Any] = {}
    for path, kind in like.kinds.items():
        column = [item.leaves[path] for item in items.values()]
        if kind[0] == "string":
            stacked[path] = np.array(column, dtype=object)
            continue
        if kind[0] == "scalar":
            column = [np.asarray(column, dtype=kind[1])]  # one dtype: no value changes
        head = column[0]
        shape, value = shapes.get(path, (head.shape if kind[0] == "array" else None, None))
        offset = _aligned(end)
        if kind[0] == "scalar":
            writes.append((offset, head))
            end = offset + head.nbytes
            stacked[path] = ArrayRef(offset, head.shape, head.dtype)
            continue
        size = int(np.prod(shape)) * head.itemsize
        writes.extend((offset + i * size, v, shape, value) if padding is not None
                      else (offset + i * size, v) for i, v in enumerate(column))
        end = offset + size * len(column)
        stacked[path] = ArrayRef(offset, (len(column),) + shape, head.dtype)
    tree = map_nest(lambda _v, path: stacked[path], like.skeleton)
    return tree, writes, end, rejected


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
