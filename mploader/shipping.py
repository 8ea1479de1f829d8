"""How the user's functions travel to the workers: cloudpickle, with their file names.

cloudpickle ships functions of ``__main__``, lambdas and closures by value.
To make its payloads deterministic it replaces every shipped code object's
file name with ``"<dynamic-code>"``, so a worker's traceback would read
``File "<dynamic-code>", line 13, in load_case``, without the file or its
source line.  The parent therefore sends the real file names alongside
(:func:`ship`), keyed by function name and first line, and the worker puts
them back into the code objects (:func:`land`); ``traceback`` then shows the
file, the line and, when the file exists, the source line.

TensorFlow marks the functions it is given: ``tf.numpy_function(fn, ...)``
and ``tf.py_function`` attach their TensorFlow wrapper to ``fn`` itself
(``fn.ag_dnc_wrapper__``, to tie the two lifetimes), and autograph attaches
``autograph_info__``.  cloudpickle ships a function's attributes with it,
so the ``fn`` a user moves from ``Dataset.map`` to mploader would make every
worker import TensorFlow (hundreds of MiB each, seconds to start) to unpickle
a wrapper it never calls.  :func:`ship` leaves those attributes out of the
payload (the user's functions keep them), and the cache's key leaves them
out too (cache/keys.py), so the workers' recipe is the parent's.
"""
from __future__ import annotations

import functools
import io
import types
from typing import Any, Callable

import cloudpickle

_DYNAMIC = "<dynamic-code>"  # what cloudpickle writes as co_filename
_DEPTH = 3  # functions reached through globals and closures, no further
TENSORFLOW_MARKS = ("ag_dnc_wrapper__", "autograph_info__")  # see the module docstring

Files = dict[str, str]  # "name:first line" -> file name


def _key(code: types.CodeType) -> str:
    return f"{code.co_name}:{code.co_firstlineno}"


def _functions(fn: Any, depth: int = _DEPTH) -> list[types.FunctionType]:
    """fn, and the functions it reaches through its globals and closure
    (through a bound method's function and a ``functools.partial``'s too)."""
    found: list[types.FunctionType] = []
    todo: list[tuple[Any, int]] = [(fn, depth)]
    seen: set[int] = set()
    while todo:
        obj, left = todo.pop()
        if isinstance(obj, types.MethodType):
            obj = obj.__func__
        elif isinstance(obj, functools.partial):
            todo.append((obj.func, left))
            continue
        if not isinstance(obj, types.FunctionType) or id(obj) in seen:
            continue
        seen.add(id(obj))
        found.append(obj)
        if left == 0:
            continue
        names = obj.__code__.co_names
        todo += [(obj.__globals__.get(name), left - 1) for name in names]
        todo += [(cell.cell_contents, left - 1) for cell in obj.__closure__ or ()
                 if _filled(cell)]
    return found


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def nested_codes(code: types.CodeType) -> list[types.CodeType]:
    """A code object and every code object nested in it."""
    nested = [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return [code] + [inner for c in nested for inner in nested_codes(c)]


def ship(fn: Callable | None, name: str) -> tuple[bytes | None, Files]:
    """(cloudpickle of ``fn``, the file names of the code it carries)."""
    if fn is None:
        return None, {}
    if not callable(fn):
        raise TypeError(f"{name} must be callable, not {type(fn).__name__}")
    try:
        payload = _dumps(fn)
    except Exception as exc:
        raise TypeError(f"{name} ({fn!r}) cannot be sent to the worker processes: "
                        f"cloudpickle failed with {type(exc).__name__}: {exc}") from exc
    files = {_key(code): code.co_filename
             for f in _functions(fn) for code in nested_codes(f.__code__)}
    return payload, files


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, leaving TensorFlow's marks off every function it ships
    by value (see the module docstring): however ``fn`` reaches them (inner
    functions, a partial's arguments, a callable's attributes, defaults),
    and without touching the user's functions."""

    def reducer_override(self, obj: Any) -> Any:
        reduced = super().reducer_override(obj)
        if (isinstance(obj, types.FunctionType) and reduced is not NotImplemented
                and any(mark in obj.__dict__ for mark in TENSORFLOW_MARKS)):
            make, args, (state, slots), *rest = reduced
            state = {k: v for k, v in state.items() if k not in TENSORFLOW_MARKS}
            return (make, args, (state, slots), *rest)
        return reduced


def _dumps(obj: Any) -> bytes:
    with io.BytesIO() as file:
        _Pickler(file, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(obj)
        return file.getvalue()


def _restored(code: types.CodeType, files: Files) -> types.CodeType:
    consts = tuple(_restored(c, files) if isinstance(c, types.CodeType) else c
                   for c in code.co_consts)
    filename = files.get(_key(code), code.co_filename) if code.co_filename == _DYNAMIC \
        else code.co_filename
    return code.replace(co_filename=filename, co_consts=consts)


def land(payload: bytes, files: Files) -> Any:
    """(worker) Unpickle a shipped function and give its code its file names back."""
    fn = cloudpickle.loads(payload)
    for function in _functions(fn):
        if any(c.co_filename == _DYNAMIC for c in nested_codes(function.__code__)):
            function.__code__ = _restored(function.__code__, files)
    return fn
