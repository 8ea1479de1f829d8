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

Through ``loader.dataset()``, large elements of one fixed signature come in
*groups* (tf/grouping.py): the worker writes each item's result into its row
of one column per leaf (:class:`GroupLayout`), laid out before the first
item from the signature, so every value has exactly the signature's dtype.

A CPU ``torch.Tensor`` leaf (MONAI's ``MetaTensor`` too, its metadata left
behind) is taken as the numpy array over its memory, same dtype and shape;
torch is never imported here, only recognised when the worker has it.
"""
from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import PaddingDoesNotFit, UnsupportedResult
from .nest import at, map_nest, path_text

ALIGN_BYTES = 64  # TensorFlow's EIGEN_MAX_ALIGN_BYTES: aligned arrays are used in place
_SCALARS = (bool, int, float, np.bool_, np.number)
_NUMBERS = (int, float, complex, np.number)
_BOOLS = (bool, np.bool_)
_STRINGS = (str, bytes)
# dtype kind -> (the pad values it takes, how to say it); any other kind takes _NUMBERS
_PAD_KINDS = {"b": (_BOOLS, "a bool"), "U": ((str,), "a str"), "S": ((bytes,), "bytes")}


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
            if value is not None and not isinstance(value, _NUMBERS + _BOOLS + _STRINGS):
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
            rank = getattr(getattr(spec, "shape", None), "rank", None)
            if value is None or numpy_dtype is None or rank is not None and rank < 2:
                return  # a scalar leaf per item (rank 1 with the batch axis): never padded
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
        return at(self.values, path)

    def shape_at(self, path: tuple, rank: int) -> tuple[Any, ...]:
        shape = at(self.shapes, path)
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
    elif path and nest is not None and not isinstance(result, (np.ndarray, dict, tuple, list)):
        raise PaddingDoesNotFit(f"{what} names {path_text(path)}, where the result has a "
                                f"{type(result).__name__}: only array leaves are padded")


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN_BYTES) * ALIGN_BYTES


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A new array at a 64-byte aligned address.  TensorFlow converts an
    aligned array without copying it; numpy's own are aligned to 16 or 32
    bytes, so TensorFlow copies each once more (into fresh memory, which is
    what costs on a host where pages fault in slowly)."""
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    raw = np.empty(nbytes + ALIGN_BYTES, np.uint8)
    start = -raw.ctypes.data % ALIGN_BYTES
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def aligned_copy(array: np.ndarray) -> np.ndarray:
    """``array.copy()`` at a 64-byte aligned address (see aligned_empty)."""
    out = aligned_empty(array.shape, array.dtype)
    np.copyto(out, array, casting="no")
    return out


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
    torch = sys.modules.get("torch")  # once per call, not per leaf

    def leaf(value: Any, path: tuple) -> Any:
        nonlocal end
        value = _sendable(value, path, torch)
        if isinstance(value, np.ndarray):
            offset = _aligned(end)
            writes.append((offset, value))
            end = offset + value.nbytes
            return ArrayRef(offset, value.shape, value.dtype)
        return value

    trees = tuple(map_nest(leaf, result) for result in results)
    return trees, writes, end


def _sendable(value: Any, path: tuple, torch: Any) -> Any:
    """A leaf as an unbatched result sends it: an array (a tensor as its
    array), or a scalar or string as it is; anything else is an error naming it."""
    value = _from_torch(value, path, torch)
    if isinstance(value, np.ndarray):
        _check_array(value, path)
        return value
    if isinstance(value, _SCALARS + _STRINGS):
        return value
    raise _unsupported(value, path)


class GroupLayout:
    """The slot of a *group*: consecutive items of one fixed signature, each
    leaf a column of ``count`` rows, columns one after another (64-byte
    aligned), so the consumer takes rows ``[i:j]`` of every column as one
    array each, without a copy (tf/grouping.py).

    ``spec`` is the signature as a nest of tf/signature.Leaf, every leaf a
    fixed shape and number dtype.  Each item's result goes into its row as
    soon as fn returns it (:meth:`row`), as an unbatched result does, so a
    fn that fills and returns one buffer every time gives each item its own
    values.
    """

    def __init__(self, spec: Any, count: int) -> None:
        self._spec = spec
        leaves: list[tuple[tuple, tuple, np.dtype]] = []
        map_nest(lambda leaf, path: leaves.append((path, leaf.shape, leaf.dtype)), spec)
        self._columns, self.nbytes = _columns(leaves, count)

    def row(self, result: Any, row: int, check: Callable[[Any], None]) -> list[Write]:
        """The writes that put ``result`` into ``row``.  Its leaves are read as
        an unbatched result's (UnsupportedResult else), then ``check`` sees
        them as the consumer would (it raises SignatureMismatch), so each
        value written has exactly the signature's dtype and shape: a
        Python number takes the dtype the check found it fits."""
        torch = sys.modules.get("torch")
        sent = map_nest(lambda value, path: _sendable(value, path, torch), result)
        check(sent)
        return [(offset + row * size, np.asarray(at(sent, path), dtype))
                for path, (offset, size, dtype) in self._columns.items()]

    def tree(self, rows: int) -> Any:
        """The group's first ``rows`` rows, as the Result's tree."""
        return map_nest(lambda leaf, path: ArrayRef(self._columns[path][0], (rows, *leaf.shape),
                                                    leaf.dtype), self._spec)


def _columns(leaves: list[tuple[tuple, tuple, np.dtype]], count: int
             ) -> tuple[dict[tuple, tuple[int, int, np.dtype]], int]:
    """One column of ``count`` rows per leaf (path, a row's shape, dtype),
    one after another, each 64-byte aligned: {path: (offset, row bytes,
    dtype)}, and the bytes they take (a group's or a worker batch's slot)."""
    columns: dict[tuple, tuple[int, int, np.dtype]] = {}
    end = 0
    for path, shape, dtype in leaves:
        offset = _aligned(end)
        size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        columns[path] = (offset, size, dtype)
        end = offset + count * size
    return columns, end


def _from_torch(value: Any, path: tuple, torch: Any) -> Any:
    """A CPU ``torch.Tensor`` leaf as the numpy array over its memory (no copy,
    no cast; a subclass such as MONAI's ``MetaTensor`` as a plain tensor, its
    metadata left behind); any other value unchanged.  A tensor numpy cannot
    hold as it is (on a device, sparse or nested, bfloat16) is an error naming
    the leaf.  ``torch``: the module when the worker has it (fn's own code
    imported it; mploader never does), else None: looked up once per result."""
    if torch is None or not isinstance(value, torch.Tensor):
        return value
    where = f"fn returned a torch tensor at {path_text(path)}"
    if value.device.type != "cpu":
        raise UnsupportedResult(
            f"{where} on device {value.device}: only CPU tensors can be placed in shared "
            "memory; return x.cpu() (mploader never moves a tensor off its device itself)")
    if value.layout != torch.strided or value.is_nested:
        raise UnsupportedResult(f"{where} with layout {value.layout}: return a dense, "
                                "strided tensor (for a sparse one, x.to_dense())")
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
    if dtype.kind == "O" or (isinstance(value, int) and dtype.kind == "u"):
        raise UnsupportedResult(f"fn returned the Python int {value} at {path_text(path)}, "
                                "outside int64: return it as a numpy scalar of the dtype "
                                "you mean (np.uint64(...)), or as a str")
    return dtype


# One item's leaf as the batch sees it: ("array", dtype, shape, or rank when
# padded), ("scalar", dtype), ("string", str or bytes); a container at a path:
# ("dict",) or ("sequence",) (what it holds is at the paths below it).
Kind = tuple


def _describe(kind: Kind | None) -> str:
    if kind is None:
        return "nothing"
    if kind[0] == "array":
        form = f"{kind[2]}-d" if isinstance(kind[2], int) else f"shape {kind[2]}"
        return f"a {form} array of {kind[1]}"
    if kind[0] == "string":
        return f"a {kind[1].__name__}"
    if kind[0] == "scalar":
        return f"a scalar of {kind[1]}"
    return f"a {kind[0]} (a tuple or list)" if kind[0] == "sequence" else "a dict"


class _Item:
    """One result of a batch, walked once: its leaves and their kinds by path,
    its containers, and its layout (what the batch votes on: every path's
    kind, in any dict order)."""

    __slots__ = ("result", "leaves", "kinds", "layout")

    def __init__(self, result: Any, padded: bool, torch: Any) -> None:
        self.result = result
        self.leaves: dict[tuple, Any] = {}
        self.kinds: dict[tuple, Kind] = {}
        self._walk(result, (), padded, torch)
        self.layout = frozenset(self.kinds.items())

    def _walk(self, value: Any, path: tuple, padded: bool, torch: Any) -> None:
        if isinstance(value, (tuple, list)):
            self.kinds[path] = ("sequence",)
            for key, part in enumerate(value):
                self._walk(part, path + (key,), padded, torch)
        elif isinstance(value, dict):
            self.kinds[path] = ("dict",)
            for key, part in value.items():
                self._walk(part, path + (key,), padded, torch)
        else:
            try:
                value = _from_torch(value, path, torch)
                self.kinds[path] = _kind(value, path, padded)
            except UnsupportedResult:
                raise
            except Exception as exc:  # noqa: BLE001 - a leaf nothing here can read
                raise UnsupportedResult(f"cannot read {path_text(path)}: "
                                        f"{type(exc).__name__}: {exc}") from exc
            self.leaves[path] = value

    def arrays(self) -> Iterator[tuple[tuple, Kind]]:
        return ((path, kind) for path, kind in self.kinds.items() if kind[0] == "array")

    def converted(self) -> Any:
        """The result with its leaves as the batch takes them (tensors as arrays)."""
        return map_nest(lambda _value, path: self.leaves[path], self.result)


def _kind(value: Any, path: tuple, padded: bool) -> Kind:
    if isinstance(value, np.ndarray):
        _check_array(value, path)
        return ("array", value.dtype, value.ndim if padded else value.shape)
    if isinstance(value, _STRINGS):
        return ("string", str if isinstance(value, str) else bytes)
    if isinstance(value, _SCALARS):
        return ("scalar", _scalar_dtype(value, path))
    raise _unsupported(value, path)


def _odd_one(item: _Item, index: int, like: _Item, like_index: int, padded: bool
             ) -> UnsupportedResult:
    """The error of an item whose layout is not the batch's: the first path
    (outermost first) where the two differ, and what each has there."""
    rule = ("padding changes sizes, never structures, dtypes or ranks" if padded else
            "give every item the same structure, dtypes and shapes, or use batch_size=None")
    paths = sorted(item.kinds.keys() | like.kinds.keys(), key=lambda p: (len(p), repr(p)))
    path = next(p for p in paths if item.kinds.get(p) != like.kinds.get(p))
    return UnsupportedResult(
        f"cannot batch {path_text(path)}: source index {index} gave "
        f"{_describe(item.kinds.get(path))}, the batch's other items "
        f"{_describe(like.kinds.get(path))} (source index {like_index}); {rule}")


def _settings_problem(padding: Padding, item: _Item) -> PaddingDoesNotFit | None:
    """What in the padding does not fit this item's layout (a key it lacks, a
    pad value its dtype cannot hold, a shape of another rank), or None."""
    try:
        padding.check(item.converted())
        for path, kind in item.arrays():
            _checked_shape(padding, path, kind[2])
            _pad_value(padding.value_at(path), kind[1], path)
    except PaddingDoesNotFit as exc:
        return exc
    return None


def _checked_shape(padding: Padding, path: tuple, rank: int) -> tuple[Any, ...]:
    wanted = padding.shape_at(path, rank)
    if len(wanted) != rank or not all(
            size is None or (isinstance(size, (int, np.integer)) and not isinstance(size, bool)
                             and size >= 0) for size in wanted):
        raise PaddingDoesNotFit(
            f"padded_shapes gives {path_text(path)} the shape {tuple(wanted)!r}; the result "
            f"there has {rank} dimensions: give one int >= 0 or None per dimension")
    return wanted


def _pad_value(value: Any, dtype: np.dtype, path: tuple) -> Any:
    """The pad value as a scalar of ``dtype``; an error when it does not fit,
    never a conversion that changes it: a number for a number (an integer
    exactly, in an integer or a float leaf; a float within range and not
    flushed to zero, its nearest value in the leaf's precision; NaN and
    infinities as given), a bool for a bool, a str for a str leaf and bytes
    for a bytes leaf, within the leaf's width."""
    if value is None:
        return np.zeros((), dtype)[()]
    problem = None
    wanted, kind = _PAD_KINDS.get(dtype.kind, (_NUMBERS, "a number"))
    if not isinstance(value, wanted) or (wanted is _NUMBERS and isinstance(value, _BOOLS)):
        problem = f"is a {type(value).__name__}, not {kind}"
    elif dtype.kind in "iu" and (isinstance(value, (complex, np.complexfloating))
                                 or not float(value).is_integer()):
        problem = "is not an integer"
    elif dtype.kind in "iu" and not np.iinfo(dtype).min <= int(value) <= np.iinfo(dtype).max:
        problem = f"is out of its range [{np.iinfo(dtype).min}, {np.iinfo(dtype).max}]"
    else:
        try:
            with np.errstate(over="ignore", invalid="ignore", under="ignore"):
                converted = np.array(value, dtype=dtype)
            problem = _changed(value, converted, dtype)
        except (TypeError, ValueError, OverflowError) as exc:
            problem = f"cannot be converted ({exc})"
    if problem is not None:
        raise PaddingDoesNotFit(f"the padding value {value!r} of {path_text(path)} does not "
                                f"fit its dtype {dtype}: it {problem}")
    return converted[()]


def _changed(value: Any, converted: np.ndarray, dtype: np.dtype) -> str | None:
    """How converting ``value`` into ``dtype`` changed it, or None."""
    if dtype.kind in "US":
        return (f"is longer than the leaf's width ({dtype}), and would be cut"
                if converted.item() != value else None)
    if dtype.kind not in "fc":
        return None if converted.item() == value else "is not a value of it"
    if isinstance(value, (int, np.integer)) and converted.item() != value:
        return f"is an integer it cannot hold exactly (it would become {converted.item()!r})"
    parts = [(complex(value).real, converted.real), (complex(value).imag, converted.imag)]
    for given, got in parts:
        if np.isfinite(given) and not np.isfinite(got):
            return "is out of its range"
        if given != 0 and got == 0:
            return "is too small for it, and would become 0"
    return None


def _chosen_layout(items: dict[int, _Item], padding: Padding | None) -> int:
    """The position of the item whose layout the batch keeps: one the padding
    fits, then the one most items share, then the earliest.  A padding that
    fits none of them is the settings' error, raised."""
    votes = Counter(item.layout for item in items.values())
    firsts: dict[frozenset, int] = {}
    for position, item in items.items():
        firsts.setdefault(item.layout, position)
    problems = {layout: None if padding is None else _settings_problem(padding, items[first])
                for layout, first in firsts.items()}
    best = max(firsts, key=lambda layout: (problems[layout] is None, votes[layout],
                                           -firsts[layout]))
    if problems[best] is not None:
        raise problems[best]
    return firsts[best]


def pack_batch(results: list[Any], indices: tuple[int, ...], padding: Padding | None = None
               ) -> tuple[Any, list[Write | PadWrite], int, dict[int, UnsupportedResult]]:
    """Stack the results of consecutive items along a new first axis (padded
    to one shape per leaf with ``padding``): (tree, writes, bytes, rejected).

    ``rejected`` maps the position of each item left out to its error: a leaf
    that cannot be sent, a layout other than the batch's (see _chosen_layout),
    a size over ``padded_shapes``.  ``tree`` is None when every item was
    rejected.  Errors of the padding itself are raised.
    """
    padded, torch = padding is not None, sys.modules.get("torch")
    rejected: dict[int, UnsupportedResult] = {}
    items: dict[int, _Item] = {}
    for position, result in enumerate(results):
        try:
            items[position] = _Item(result, padded, torch)
        except UnsupportedResult as exc:
            rejected[position] = exc
    if not items:
        return None, [], 0, rejected
    first = _chosen_layout(items, padding)
    like = items[first]
    for position, item in list(items.items()):
        if item.layout != like.layout:
            rejected[position] = _odd_one(item, indices[position], like, indices[first], padded)
            del items[position]
    if padding is not None:  # items over a fixed size, every leaf checked before any is sized
        for path, kind in like.arrays():
            wanted = _checked_shape(padding, path, kind[2])
            for position, item in list(items.items()):
                over = [(axis, n, size) for axis, (n, size)
                        in enumerate(zip(item.leaves[path].shape, wanted))
                        if size is not None and n > size]
                if over:
                    axis, n, size = over[0]
                    rejected[position] = UnsupportedResult(
                        f"cannot pad {path_text(path)}: source index {indices[position]} has "
                        f"{n} along axis {axis}, more than padded_shapes allows ({size})")
                    del items[position]
        if not items:
            return None, [], 0, rejected
    writes: list[Write | PadWrite] = []
    end = 0
    stacked: dict[tuple, Any] = {}
    for path, kind in like.kinds.items():
        if kind[0] in ("dict", "sequence"):
            continue
        column = [item.leaves[path] for item in items.values()]
        if kind[0] == "string":
            stacked[path] = np.array(column, dtype=object)
            continue
        offset = _aligned(end)
        if kind[0] == "scalar":
            array = np.asarray(column, dtype=kind[1])  # one dtype: no value changes
            writes.append((offset, array))
            end = offset + array.nbytes
            stacked[path] = ArrayRef(offset, array.shape, array.dtype)
            continue
        if padding is not None:
            wanted = padding.shape_at(path, kind[2])
            shape = tuple(max(v.shape[axis] for v in column) if size is None else size
                          for axis, size in enumerate(wanted))
            value = _pad_value(padding.value_at(path), kind[1], path)
        else:
            shape, value = kind[2], None
        size = int(np.prod(shape)) * kind[1].itemsize
        writes.extend((offset + i * size, v, shape, value) if padding is not None
                      else (offset + i * size, v) for i, v in enumerate(column))
        end = offset + size * len(column)
        stacked[path] = ArrayRef(offset, (len(column),) + shape, kind[1])
    tree = map_nest(lambda _v, path: stacked[path], like.result)
    return tree, writes, end, rejected


class BatchRows:
    """A worker batch laid out as fn gives each item's result, so a result is
    read before fn runs again: a fn that fills and returns one buffer every
    time gives each item its own values (a batch stacked from the results at
    the end had every row equal to the last), and the copy into shared memory
    overlaps the items still to come instead of following the last one.

    The first result plans one column per leaf for ``count`` rows (as
    :func:`pack_batch` would stack it); each result of the same layout goes
    straight into its row.  A result of another layout, or any batch with
    ``padding`` (its sizes are known only at the end), is kept as a snapshot
    (its arrays copied, rows already written read back), and :meth:`finish`
    stacks the snapshots with :func:`pack_batch`, which chooses the layout
    and names the odd items exactly as before.  ``slots`` is the worker's
    SlotWriter (or any object with its ``write`` and ``region``).
    """

    def __init__(self, slots: Any, slot: int, capacity: int, count: int,
                 padding: Padding | None) -> None:
        self._slots, self._slot, self.capacity = slots, slot, capacity
        self._count = count
        self._padding = padding
        self._torch = sys.modules.get("torch")
        self._like: _Item | None = None  # the layout the columns follow
        self._columns: dict[tuple, tuple[int, int, np.dtype]] = {}  # number leaves: offset, row bytes, dtype
        self._strings: dict[tuple, list[Any]] = {}
        self._rows: list[_Item] = []  # written in place, in order
        self._snapshots: list[Any] | None = None if padding is None else []  # None: in place
        self._nbytes = 0

    def add(self, value: Any) -> None:
        """Take the next done item's result; UnsupportedResult for a leaf that
        cannot be sent (the item fails alone, as in :func:`pack_batch`)."""
        item = _Item(value, self._padding is not None, self._torch)
        item.result = item.converted()  # its containers as they are now: fn may reuse them
        if self._snapshots is None and self._like is None:
            self._plan(item)
        if self._snapshots is None and item.layout != self._like.layout:
            self._snapshots = [self._snapshot(row) for row in range(len(self._rows))]
        if self._snapshots is not None:
            self._snapshots.append(map_nest(
                lambda leaf, _path: leaf.copy() if isinstance(leaf, np.ndarray) else leaf,
                item.result))
            return
        row = len(self._rows)
        writes: list[Write] = []
        for path, leaf in item.leaves.items():
            if path in self._strings:
                self._strings[path].append(leaf)
            else:
                offset, size, dtype = self._columns[path]
                writes.append((offset + row * size, np.asarray(leaf, dtype)))
        self.capacity = self._slots.write(self._slot, self.capacity, writes, self._nbytes)
        self._rows.append(item)

    def _plan(self, item: _Item) -> None:
        """Columns for ``count`` rows of ``item``'s layout, reserved in the
        slot; when that does not fit (a first item larger than the rest, a
        batch near the slot's limit), the batch is stacked from snapshots,
        so what it needs is what its items turn out to need."""
        self._strings = {path: [] for path, kind in item.kinds.items() if kind[0] == "string"}
        self._columns, end = _columns(
            [(path, kind[2] if kind[0] == "array" else (), kind[1])
             for path, kind in item.kinds.items() if kind[0] in ("array", "scalar")],
            self._count)
        try:
            self.capacity = self._slots.write(self._slot, self.capacity, [], end)
        except (UnsupportedResult, MemoryError):
            self._snapshots = []
            return
        self._like, self._nbytes = item, end

    def _snapshot(self, row: int) -> Any:
        """Row ``row``'s result again, its arrays read back from the slot."""
        region = self._slots.region(self._slot, self._nbytes)
        item = self._rows[row]

        def leaf(value: Any, path: tuple) -> Any:
            if path not in self._columns or item.kinds[path][0] == "scalar":
                return item.leaves[path]  # scalars and strings are immutable
            offset, size, dtype = self._columns[path]
            return np.ndarray(item.kinds[path][2], dtype, buffer=region,
                              offset=offset + row * size).copy()
        return map_nest(leaf, item.result)

    def finish(self, indices: tuple[int, ...]
               ) -> tuple[Any, int, dict[int, UnsupportedResult]]:
        """(tree, bytes, rejected) of the batch of ``indices`` (the items
        added, in order), as :func:`pack_batch` gives them; the slot holds it."""
        if self._snapshots is not None:
            tree, writes, nbytes, rejected = pack_batch(self._snapshots, indices, self._padding)
            if tree is not None:
                self.capacity = self._slots.write(self._slot, self.capacity, writes, nbytes)
            return tree, nbytes, rejected
        if self._like is None:
            return None, 0, {}
        rows = len(self._rows)

        def leaf(_value: Any, path: tuple) -> Any:
            if path in self._strings:
                return np.array(self._strings[path], dtype=object)
            offset, _size, dtype = self._columns[path]
            kind = self._like.kinds[path]
            return ArrayRef(offset, (rows,) + (kind[2] if kind[0] == "array" else ()), dtype)
        return map_nest(leaf, self._like.result), self._nbytes, {}


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
        return aligned_copy(view) if copy else view

    return map_nest(leaf, tree)
