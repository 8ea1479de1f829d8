"""The key of a directory cache: a recipe of what determines prepare's results.

A directory cache outlives the run that filled it and is shared by other jobs,
so its key must change whenever what ``prepare`` computes can change.
:func:`recipe` walks what prepare reaches and fingerprints each part (the list
is in index.py's docstring); the recipe's JSON form, hashed, is the salt of
every item's key (index.py), and is kept beside the entries so that
:func:`differences` can say why a later run missed.

The walk is one pickle per site (a default, a closure value, a global...),
whose ``persistent_id`` sees every object on the way: functions, classes and
modules become names in the recipe (the user's own are queued and
fingerprinted in their turn, so each is walked once, cycles included, and the
depth of the Python stack is that of one value's nesting, not of the call
graph); sets are sorted (their order follows string hashes, which differ
between processes); arrays are hashed in place.  Nothing in the recipe
depends on ``id()``, addresses, hash order or where the code's files are
(unless prepare reads a path, e.g. ``__file__``: then its value keys), so two
processes running the same code agree, wherever the script lives.  So torch
tensors are hashed by value (their pickle holds a storage's address), and a
random generator (numpy's ``RandomState``, ``Generator`` and bit generators,
``random.Random``, ``torch.Generator``) is keyed by its type alone: its state
is seeded from the operating system in every process (a MONAI or
albumentations ``Compose`` holds some), and mploader reseeds those prepare
reaches before each item from the item (random_state.py) anyway.

An item's pickle names classes and functions (its class, a function it
holds) without their code: :class:`ItemCode` finds them, as a pickle of the
item sees them, and fingerprints each once per loader, as a recipe of its own
(its code, the values that reads, its library's version); each item's key
takes the fingerprints of those its pickle names (index.py).

Some things cannot be fingerprinted: a value that does not pickle, compiled
code of the user's own (a C extension: no bytecode to read), a value nested
deeper than the interpreter's recursion limit.  With ``strict`` (no
``cache_version`` given) they are a :class:`CacheError`; otherwise each is
named in the recipe's ``unfingerprinted`` list and the rest is still keyed.
"""
from __future__ import annotations

import ctypes
import dis
import functools
import hashlib
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import io
import json
import os
import pickle
import platform
import random
import sys
import types
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import cloudpickle

from ..errors import CacheError
from ..shipping import TENSORFLOW_MARKS, nested_codes

FORMAT = 1  # of the recipe: a change of what goes into it changes every key
PREPARE = "(prepare)"  # the values entry of prepare itself: a bound object, partial arguments
WORKER_INIT = "(worker_init)"  # ... of worker_init: what it sets up, prepare may use

_PLAIN = frozenset({str, bytes, int, float, bool, complex, type(None), tuple, list, dict})
_SCALARS = frozenset({str, bytes, int, float, bool, complex, type(None)})
_LIBRARY_DIRS = frozenset({"site-packages", "dist-packages"})  # where pip, conda, Debian install
_STDLIB = os.path.dirname(os.path.realpath(os.__file__)) + os.sep  # a venv does not copy it
_EXTENSIONS = tuple(importlib.machinery.EXTENSION_SUFFIXES)
_CLASS_SKIPPED = frozenset({
    "__dict__", "__weakref__", "__module__", "__qualname__", "__doc__", "__annotations__",
    "__annotate__", "__firstlineno__", "__static_attributes__",
    "__slotnames__",  # copyreg's cache, added to the class on the first pickle of an instance
    "_abc_impl"})     # abc's registry of subclass checks, a cache too
_LRU_WRAPPER = type(functools.lru_cache(maxsize=None)(lambda: None))
_UNFINGERPRINTED = "unfingerprinted"


@dataclass(frozen=True)
class Recipe:
    """What went into a directory cache's salt, by name (JSON-serialisable).

    ``code`` and ``values`` map a function or class (``module:qualname``,
    ``#2`` after a second object of the same name), or a module of the user's
    own, to a digest: of its code (a class: its bases and attributes), and of
    the values its code reads (defaults, closure, globals, attributes; for
    ``(prepare)``: prepare's own state).  ``libraries``: top-level package ->
    version.  ``unfingerprinted``: what was left out, ``cache_version`` given.
    """
    prepare: str
    python: str
    cache_version: str | int | None
    code: dict[str, str]
    values: dict[str, str]
    libraries: dict[str, str]
    unfingerprinted: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "prepare": self.prepare, "python": self.python,
                "cache_version": self.cache_version, "code": self.code, "values": self.values,
                "libraries": self.libraries, "unfingerprinted": list(self.unfingerprinted)}

    @classmethod
    def from_json(cls, data: Any) -> Recipe:
        """The recipe ``to_json`` gave; ValueError for anything else (another format)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a recipe of this format")
        try:
            return cls(str(data["prepare"]), str(data["python"]), data["cache_version"],
                       dict(data["code"]), dict(data["values"]), dict(data["libraries"]),
                       tuple(data["unfingerprinted"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"a damaged recipe: {exc}") from None

    def salt(self) -> bytes:
        """The digest of the recipe, as every item's key takes it (index.py)."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(text.encode(), digest_size=16, person=b"mploader-recipe").digest()


def recipe(prepare: Callable[[Any], Any], cache_version: str | int | None, where: str,
           worker_init: Callable[[int], Any] | None = None, *,
           versions: dict[str, str] | None = None, what: str = "prepare itself") -> Recipe:
    """The recipe of ``prepare``'s results for the directory cache ``where``
    (and of ``worker_init``'s: what it sets up in a worker, prepare may use).

    Without ``cache_version``, whatever cannot be fingerprinted is a
    CacheError (a key that ignored it could serve another prepare's results);
    with it, it is listed in the recipe, and the version keys it.
    ``versions``: libraries' versions already found (top-level package ->
    version), shared by the recipes of one loader; ``what``: how an error
    names ``prepare`` (ItemCode takes recipes of what items refer to).
    """
    walk = _Walk(strict=cache_version is None, where=where, versions=versions)
    walk.start(prepare, worker_init, what)
    return Recipe(
        prepare=describe(prepare),
        python=f"{sys.implementation.name} {platform.python_version()}",
        cache_version=cache_version,
        code=walk.code, values=walk.values, libraries=dict(sorted(walk.libraries.items())),
        unfingerprinted=tuple(walk.unfingerprinted))


def check_in_worker(prepare: Callable[[Any], Any], worker_init: Callable[[int], Any] | None,
                    expected: dict[str, Any], where: str) -> None:
    """(worker) CacheError unless the prepare this worker runs has the
    recipe the parent keyed the directory's entries by.

    A worker imports the user's modules from their files; the parent
    fingerprinted the modules it has in memory.  They differ when a module
    was edited after the parent imported it (a notebook's kernel), or when
    the parent changed a module's global at run time (``config.size = 2``: a
    worker sees the file's value).  Entries keyed by the parent's view but
    computed by other code would be served to a later run that has that
    view for real: the check refuses first.
    """
    parents = Recipe.from_json(expected)
    mine = recipe(prepare, parents.cache_version, where, worker_init)
    if mine.salt() != parents.salt():
        raise CacheError(
            f"the workers do not run the prepare that this process keyed cache={where!r} by: "
            f"{'; '.join(differences(mine, parents))}.  Workers import your modules from "
            "their files: a module edited after this process imported it (reload it, or "
            "restart), or a module's global changed while this process runs (the workers "
            "see the file's value: give the value to prepare instead, e.g. with "
            "functools.partial) would make them compute what this process does not key")


def describe(prepare: Any) -> str:
    """prepare by name: ``module:qualname``, and what it is when not a plain function."""
    if isinstance(prepare, functools.partial):
        return f"functools.partial({describe(prepare.func)})"
    owner = getattr(prepare, "__self__", None)
    bound = owner is not None and not isinstance(owner, types.ModuleType)
    if isinstance(prepare, types.MethodType):
        return f"{describe(prepare.__func__)} bound to a {type(owner).__qualname__}"
    if isinstance(prepare, (types.FunctionType, types.BuiltinFunctionType, type)):
        text = f"{prepare.__module__}:{prepare.__qualname__}"
        return f"{text} bound to a {type(owner).__qualname__}" if bound else text
    kind = type(prepare)
    return f"a {kind.__module__}:{kind.__qualname__} object"


def differences(mine: Recipe, other: Recipe) -> list[str]:
    """Why an entry of ``other`` is not one of ``mine``, one line per difference."""
    found = []
    if mine.prepare != other.prepare:
        found.append(f"prepare is {mine.prepare}, was {other.prepare}")
    if mine.python != other.python:
        found.append(f"Python {other.python} -> {mine.python}")
    if mine.cache_version != other.cache_version:
        found.append(f"cache_version {_version_text(other.cache_version)} -> "
                     f"{_version_text(mine.cache_version)}")
    for name, new, old in _changed(mine.libraries, other.libraries):
        found.append(f"{name} {old} -> {new}" if new and old else _one_side(name, new))
    for name, new, old in _changed(mine.code, other.code):
        found.append(f"prepare's code changed in {name}" if new and old else _one_side(name, new))
    for name, new, old in _changed(mine.values, other.values):
        if name == PREPARE and mine.prepare != other.prepare:
            continue  # another prepare: said above
        if new and old:
            found.append(_values_changed(name))
        elif name not in mine.code and name not in other.code:  # (else said above)
            found.append(_one_side(name, new))
    for text in sorted(set(mine.unfingerprinted) ^ set(other.unfingerprinted)):
        side = "now" if text in mine.unfingerprinted else "then"
        found.append(f"left out of the key {side} only: {text}")
    return found


def _version_text(version: str | int | None) -> str:
    return "not given" if version is None else repr(version)


def _changed(mine: dict[str, str], other: dict[str, str]
             ) -> Iterator[tuple[str, str | None, str | None]]:
    """(name, mine, other) of each name whose entries differ, by name."""
    for name in sorted(mine.keys() | other.keys()):
        if mine.get(name) != other.get(name):
            yield name, mine.get(name), other.get(name)


def _one_side(name: str, mine: str | None) -> str:
    return f"{name} is used now, was not" if mine else f"{name} was used, is not now"


def _values_changed(name: str) -> str:
    if name in (PREPARE, WORKER_INIT):
        return (f"{name[1:-1]}'s own state changed (its bound object, partial arguments, or "
                "its object)")
    if ":" not in name:
        return f"the attributes prepare's code reads from module {name} changed"
    return f"the values read by {name} changed (defaults, closure, globals or attributes)"


# -- whose code is it --------------------------------------------------------------------

def origin(module_name: str | None) -> str:
    """Whose the module is: ``"stdlib"`` (built in, frozen, or under the
    interpreter's own library), ``"library"`` (its file under a directory
    named site-packages or dist-packages, where pip, conda and Debian install),
    ``"compiled"`` (a C extension of the user's own), ``"user"`` (any other:
    ``__main__``, the user's scripts and packages, a package installed in
    editable mode), or ``"unknown"`` (not imported, or no name)."""
    module = sys.modules.get(module_name) if module_name else None
    if module is None:
        return "unknown"
    if module_name == "__main__":
        return "user"
    spec = getattr(module, "__spec__", None)
    return _whose(spec.origin if spec is not None else None, getattr(module, "__file__", None),
                  getattr(module, "__path__", ()))


def _whose(spec_origin: str | None, path: str | None, paths: Any) -> str:
    """origin() of a module (or of a module's spec, not imported yet)."""
    if spec_origin in ("built-in", "frozen"):
        return "stdlib"
    if path is None:  # a namespace package, or a module made at run time
        path = next(iter(paths or ()), None)
        if path is None:
            return "user"
    path = os.path.realpath(path)
    if _LIBRARY_DIRS.intersection(path.split(os.sep)):
        return "library"
    if path.startswith(_STDLIB):
        return "stdlib"
    return "compiled" if path.endswith(_EXTENSIONS) else "user"


@functools.lru_cache(maxsize=None)
def _distributions() -> dict[str, list[str]]:
    """Top-level package -> the distributions that install it (read once: ~50 ms)."""
    return importlib.metadata.packages_distributions()


def library_version(top: str) -> str:
    """A library's installed version, from its distribution's metadata, with a
    digest of its RECORD (the hash of every file it installed: a reinstall of
    other files under the same version changes it).  A library with no
    metadata (put on ``PYTHONPATH``, copied into a site-packages by hand) has
    nothing that changes when its files do: its ``__version__``, if any, and
    the digest of its files (:func:`_files_digest`), never ``"unknown"``."""
    names = _distributions().get(top)
    if names is None:  # (or installed since this process looked: a worker would see it)
        _distributions.cache_clear()
        names = _distributions().get(top, ())
    found = []
    for name in sorted(set(names)):
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        text = dist.version if name.lower() == top.lower() else f"{name} {dist.version}"
        record = dist.read_text("RECORD")
        if record:
            text += f" (files {hashlib.blake2b(record.encode(), digest_size=4).hexdigest()})"
        found.append(text)
    if found:
        return "; ".join(found)
    try:  # (not imported yet: a worker, before prepare imports it)
        version = getattr(importlib.import_module(top), "__version__", None)
    except Exception:  # noqa: BLE001 - the library's own import error
        version = None
    code = f"code {_files_digest(top)}"
    return f"{version} ({code})" if isinstance(version, str) else code


_SOURCE_SUFFIXES = (".py", ".pyi", ".pyx", ".pxd")


def _files_digest(top: str) -> str:
    """A digest of the files of the top-level module or package ``top``, as
    its spec finds them: every source file's path (relative) and contents;
    any other file's (compiled, data) path, size and modification time, not
    read (a library without metadata can be large, and this is taken by every
    worker).  Python's caches (``__pycache__``, ``.pyc``) are left out."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return "none"  # no module of that name: a CacheError of the worker's own import
    roots = sorted(spec.submodule_search_locations or ())
    files: list[tuple[str, str]] = []  # (path to hash it by, path on disk)
    if not roots and spec.has_location and spec.origin:
        files.append((os.path.basename(spec.origin), spec.origin))
    for number, root in enumerate(roots):
        for folder, folders, names in os.walk(root):
            folders[:] = sorted(name for name in folders if name != "__pycache__")
            relative = os.path.relpath(folder, root)
            files += [(f"{number}/{relative}/{name}", os.path.join(folder, name))
                      for name in sorted(names) if not name.endswith((".pyc", ".pyo"))]
    digest = hashlib.blake2b(digest_size=8)
    for name, path in files:
        digest.update(f"{len(name)}:{name}".encode())
        try:
            if name.endswith(_SOURCE_SUFFIXES):
                with open(path, "rb") as f:
                    data = f.read()
                digest.update(len(data).to_bytes(8, "little") + data)
            else:
                found = os.stat(path)
                digest.update(f"{found.st_size},{found.st_mtime_ns};".encode())
        except OSError:
            digest.update(b"unreadable;")
    return digest.hexdigest()


# -- the walk ----------------------------------------------------------------------------

class _Unfingerprintable(Exception):
    """A part of what prepare reaches whose effect on its results cannot be fingerprinted."""


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, walk: _Walk) -> None:
        super().__init__(file, protocol=4)
        self._walk = walk

    def persistent_id(self, obj: Any) -> Any:
        kind = type(obj)
        if kind in _PLAIN:
            if kind is dict and len(obj) > 1 \
                    and type(next(iter(obj.values()))) is types.MethodType:
                return self._walk.method_table(obj)
            return None
        return self._walk.persistent(obj)


class _Sites:
    """The half of a walk that pickles values (a *site*: one value and where
    it was found) into digests: plain data by its bytes, arrays and tensors
    by value, and, in place of functions, classes, modules and code, the
    names and digests the walk (:class:`_Walk`, which this is the base of)
    gives them."""

    _strict: bool
    _where: str
    _start: str
    unfingerprinted: list[str]

    # -- a site: one value, pickled --------------------------------------------------

    def _digest(self, where: str, value: Any) -> str:
        try:
            buffer = io.BytesIO()
            _Pickler(buffer, self).dump(value)
        except RecursionError:
            reason = "it is nested too deeply to pickle"
        except _Unfingerprintable as exc:
            reason = str(exc)
        except Exception as exc:  # noqa: BLE001 - whatever its pickling raised
            reason = f"pickling it failed with {type(exc).__name__}: {exc}"
        else:
            return hashlib.blake2b(buffer.getbuffer(), digest_size=16).hexdigest()
        self._refuse(where, value, reason)
        return _UNFINGERPRINTED

    def _refuse(self, where: str, value: Any, reason: str) -> None:
        """A CacheError, strict; else note what the key leaves out."""
        kind = type(value)
        reached = "" if self._start in ("prepare itself", where) \
            else f"; reached from {self._start}"  # (an item's class: how it was reached)
        what = f"{where} (a {'' if kind.__module__ == 'builtins' else kind.__module__ + '.'}" \
               f"{kind.__qualname__}{reached})"
        if self._strict:
            raise CacheError(
                f"cache={self._where!r} cannot key prepare's results: {what} cannot be "
                f"fingerprinted: {reason}.  A directory cache outlives this run and is shared "
                "with other jobs, so its key must change whenever what prepare computes can "
                "change, and mploader does not guess.  Pass cache_version='...' to key it "
                "yourself (and change it whenever that changes; all else prepare uses stays "
                "fingerprinted), or use cache='memory'") from None
        self.unfingerprinted.append(what)  # not the reason: it may name a file, an address

    def _digests(self, sites: list[tuple[str, Any]]) -> str:
        digest = hashlib.blake2b(digest_size=16)
        for where, value in sites:
            digest.update(f"{where}={self._digest(where, value)};".encode())
        return digest.hexdigest()

    def _element(self, value: Any) -> bytes:
        """A set's element as bytes, to sort by."""
        if type(value) in _SCALARS:
            return pickle.dumps(value, protocol=4)
        buffer = io.BytesIO()
        _Pickler(buffer, self).dump(value)
        return buffer.getvalue()

    def persistent(self, obj: Any) -> Any:
        """What a pickle of a site writes in place of ``obj``, or None: pickle it."""
        kind = type(obj)
        if kind is types.FunctionType:
            return ("function", self._name_function(obj))
        if isinstance(obj, type):
            return ("class", self._name_class(obj))
        if isinstance(obj, types.ModuleType):
            return ("module", self._name_module(obj))
        if kind is types.BuiltinFunctionType and (
                obj.__self__ is None or isinstance(obj.__self__, types.ModuleType)):
            return ("builtin", self._name_builtin(obj))  # (else a method: its object pickles)
        if isinstance(obj, _random_kinds()):  # its state: the OS's entropy, reseeded per item
            return ("random generator", kind)
        self._note_library(kind.__module__)
        if kind is set or kind is frozenset:  # in the order of the elements, not of hashes
            return (kind.__name__, tuple(sorted(self._element(e) for e in obj)))
        if kind is types.CodeType:
            return ("code", self._code_digest(obj))
        if kind is staticmethod or kind is classmethod:
            return (kind.__name__, obj.__func__)
        if kind is property:
            return ("property", obj.fget, obj.fset, obj.fdel)
        if kind is functools.cached_property:  # (holds a lock before Python 3.12)
            return ("cached_property", obj.func, obj.attrname)
        if kind is types.MappingProxyType:
            return ("mappingproxy", dict(obj))
        if kind is _LRU_WRAPPER:  # pickled by name: its function is what computes
            return ("lru_cache", obj.__wrapped__)
        numpy = sys.modules.get("numpy")
        if numpy is not None and kind is numpy.ndarray and obj.dtype.fields is None \
                and not obj.dtype.hasobject:  # hashed in place, not copied into the pickle
            data = hashlib.blake2b(numpy.ascontiguousarray(obj), digest_size=16).hexdigest()
            fortran = obj.flags.f_contiguous and not obj.flags.c_contiguous  # as a pickle keeps
            return ("ndarray", obj.dtype.str, obj.shape, fortran, data)
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, getattr(torch, "Tensor", ())):
            return _tensor_value(obj, torch)
        return None

    def method_table(self, table: dict[Any, Any]) -> Any:
        """A library object's dict of its own bound methods (albumentations'
        target -> function) in the order of its keys, not of its making: a
        library builds such a table from a set, in the order of string
        hashes, which differ between processes; it looks them up by key.
        Any other dict keeps its order (a user's dict of steps may be run in
        order): None."""
        methods = list(table.values())
        owner = getattr(methods[0], "__self__", None)
        if owner is None or self._origin(type(owner).__module__) != "library" or not all(
                type(method) is types.MethodType and method.__self__ is owner
                for method in methods):
            return None
        return ("method table", tuple(sorted(((self._element(key), value)
                                              for key, value in table.items()),
                                             key=lambda entry: entry[0])))


class _Walk(_Sites):
    """One recipe's walk: what it found so far, and what is still to fingerprint."""

    def __init__(self, strict: bool, where: str,
                 versions: dict[str, str] | None = None) -> None:
        self._strict = strict
        self._where = where
        self.code: dict[str, str] = {}
        self.values: dict[str, str] = {}
        self.libraries: dict[str, str] = {}
        self._versions = {} if versions is None else versions  # library -> version, found
        self._start = "prepare itself"  # how the errors name what the walk started from
        self.unfingerprinted: list[str] = []
        self._names: dict[int, str] = {}   # id -> name of what is named (kept alive below)
        self._alive: list[Any] = []
        self._taken: set[str] = set()
        self._queue: deque[tuple[Callable[[Any, str], None], Any, str]] = deque()
        self._modules: dict[str, types.ModuleType] = {}  # the user's own, reached
        self._attributes: set[str] = set()  # every name the user's code reads
        self._origins: dict[str | None, str] = {}
        self._codes: dict[int, str] = {}

    def start(self, prepare: Any, worker_init: Any, what: str = "prepare itself") -> None:
        """Fingerprint prepare (and worker_init) and all they reach, until
        nothing new is found."""
        self._start = what
        self.values[PREPARE] = self._digest(what, prepare)
        if worker_init is not None:
            self.values[WORKER_INIT] = self._digest("worker_init itself", worker_init)
        while True:
            while self._queue:
                walk, obj, name = self._queue.popleft()
                walk(obj, name)
            # A module's attributes are those named in any code walked: a name
            # read as module.attr.  Walking them may find more code, more names.
            before = (len(self._attributes), len(self._modules))
            for name, module in list(self._modules.items()):
                self.values[name] = self._digests(
                    [(f"the attribute `{attr}` of module {name}", value)
                     for attr, value in self._module_attributes(module)])
            if not self._queue and before == (len(self._attributes), len(self._modules)):
                return

    # -- names: what the recipe lists ---------------------------------------------------

    def _origin(self, module_name: str | None) -> str:
        if module_name not in self._origins:
            self._origins[module_name] = origin(module_name)
        return self._origins[module_name]

    def _note_library(self, module_name: str | None, whose: str | None = None) -> None:
        if module_name and (whose or self._origin(module_name)) == "library":
            top = module_name.split(".")[0]
            if top not in self.libraries:
                if top not in self._versions:
                    self._versions[top] = library_version(top)
                self.libraries[top] = self._versions[top]

    def _named(self, obj: Any, name: str,
               walk: Callable[[Any, str], None] | None = None) -> str:
        """Give ``obj`` its name (another object of that name: ``#2``, ``#3``...),
        and queue it for ``walk``."""
        if walk is not None:
            base, number = name, 2
            while name in self._taken:
                name, number = f"{base}#{number}", number + 1
            self._taken.add(name)
            self._queue.append((walk, obj, name))
        self._names[id(obj)] = name
        self._alive.append(obj)
        return name

    @staticmethod
    def _compiled(name: str, module_name: str | None) -> _Unfingerprintable:
        module = sys.modules.get(module_name) if module_name else None
        place = getattr(module, "__file__", None) or "no file"
        return _Unfingerprintable(
            f"{name} is compiled code ({place}) that is neither Python's nor an installed "
            "library's, so it has no bytecode to fingerprint and no version")

    def _name_function(self, fn: types.FunctionType) -> str:
        known = self._names.get(id(fn))
        if known is not None:
            return known
        name = f"{fn.__module__}:{fn.__qualname__}"
        if self._origin(fn.__module__) in ("library", "stdlib"):
            self._note_library(fn.__module__)  # its version keys its code
            wraps = fn.__closure__ or "__wrapped__" in fn.__dict__
            return self._named(fn, name, self._library_function if wraps else None)
        return self._named(fn, name, self._function)

    def _name_class(self, cls: type) -> str:
        known = self._names.get(id(cls))
        if known is not None:
            return known
        name = f"{cls.__module__}:{cls.__qualname__}"
        where = self._origin(cls.__module__)
        if where == "compiled":
            raise self._compiled(name, cls.__module__)
        if where in ("library", "stdlib"):
            self._note_library(cls.__module__)
            return self._named(cls, name)
        return self._named(cls, name, self._class)

    def _name_module(self, module: types.ModuleType) -> str:
        name = module.__name__
        where = self._origin(name)
        if where == "compiled":
            raise self._compiled(f"module {name}", name)
        if where in ("user", "unknown"):
            self._modules.setdefault(name, module)
        self._note_library(name)
        return name

    def _name_builtin(self, fn: types.BuiltinFunctionType) -> str:
        module = fn.__self__.__name__ if fn.__self__ is not None else fn.__module__
        name = f"{module}:{fn.__qualname__}"
        if self._origin(module) not in ("library", "stdlib"):
            raise self._compiled(name, module)
        self._note_library(module)
        return name

    # -- the walk of what was named ---------------------------------------------------

    def _function(self, fn: types.FunctionType, name: str) -> None:
        """A function of the user's own: its code, and the values it reads."""
        code = fn.__code__
        self.code[name] = self._code_digest(code)
        names, attributes, imports = _names(code)
        self._attributes.update(attributes)
        for level, module, fromlist in imports:
            self._reach_import(fn, name, level, module, fromlist)
        sites = [(f"the defaults of {name}", fn.__defaults__),
                 (f"the keyword defaults of {name}", fn.__kwdefaults__)]
        sites += self._closure(fn, name)
        sites += [(f"the global `{n}` of {name}", fn.__globals__[n])
                  for n in names if n in fn.__globals__]
        attributes = {k: v for k, v in fn.__dict__.items() if k not in TENSORFLOW_MARKS}
        if attributes:  # TensorFlow's marks never reach the workers (shipping.py)
            sites.append((f"the attributes of {name}", attributes))
        self.values[name] = self._digests(sites)

    def _reach_import(self, fn: types.FunctionType, name: str, level: int, module: str,
                      fromlist: tuple[str, ...]) -> None:
        """A module that ``fn`` imports when it runs (an ``import`` inside it),
        and the submodules it imports from it: the user's own are imported
        here, to be walked; a library's only keys its version."""
        try:
            full = importlib.util.resolve_name("." * level + module,
                                               fn.__globals__.get("__package__"))
        except (ImportError, ValueError):
            return  # it fails in the worker too: nothing it computes is cached
        parts = full.split(".")
        wanted = [".".join(parts[:n]) for n in range(1, len(parts) + 1)]
        wanted += [f"{full}.{sub}" for sub in fromlist if sub != "*"]
        for module_name in wanted:
            found = sys.modules.get(module_name)
            if found is None:
                try:
                    spec = importlib.util.find_spec(module_name)
                except (ImportError, ValueError):
                    spec = None
                if spec is None:  # not a module (a name from it), or fails in the worker too
                    continue
                whose = _whose(spec.origin, spec.origin if spec.has_location else None,
                               spec.submodule_search_locations)
                if whose in ("library", "stdlib"):  # its version is enough: not imported here
                    self._note_library(module_name, whose)
                    continue
                try:
                    found = importlib.import_module(module_name)
                except Exception as exc:  # noqa: BLE001 - the module's own error
                    self._refuse(f"the module {module_name} that {name} imports", exc,
                                 f"importing it failed with {type(exc).__name__}: {exc}")
                    continue
            self.persistent(found)

    def _closure(self, fn: types.FunctionType, name: str) -> list[tuple[str, Any]]:
        sites = []
        for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            try:
                sites.append((f"the closure value `{var}` of {name}", cell.cell_contents))
            except ValueError:  # an empty cell
                sites.append((f"the empty closure cell `{var}` of {name}", None))
        return sites

    def _library_function(self, fn: types.FunctionType, name: str) -> None:
        """A library's function is keyed by its version; but a decorator's
        wrapper holds the user's function in its closure or ``__wrapped__``:
        those, and the closure's plain values (the decorator's arguments), key
        too.  The rest of a library's state is its own business."""
        sites = [(where, value) for where, value in self._closure(fn, name)
                 if type(value) in _SCALARS or isinstance(value, (types.FunctionType, type))]
        if "__wrapped__" in fn.__dict__:
            sites.append((f"the function {name} wraps", fn.__dict__["__wrapped__"]))
        self.values[name] = self._digests(sites)

    def _class(self, cls: type, name: str) -> None:
        """A class of the user's own: its bases, metaclass and attributes (its
        methods are named here and walked as functions)."""
        sites = [(f"the bases of {name}", cls.__bases__), (f"the metaclass of {name}", type(cls))]
        sites += [(f"the class attribute `{key}` of {name}", value)
                  for key, value in sorted(vars(cls).items()) if key not in _CLASS_SKIPPED]
        self.code[name] = self._digests(sites)

    def _code_digest(self, code: types.CodeType) -> str:
        """Bytecode, names, constants (nested code by digest), flags; never the
        file name or line numbers: a script moved elsewhere keys the same."""
        known = self._codes.get(id(code))
        if known is not None:
            return known
        digest = hashlib.blake2b(digest_size=16)
        buffer = io.BytesIO()
        _Pickler(buffer, self).dump(code.co_consts)  # frozensets sorted, code by digest
        shape = (code.co_name, code.co_names, code.co_varnames, code.co_freevars,
                 code.co_cellvars, code.co_argcount, code.co_posonlyargcount,
                 code.co_kwonlyargcount, code.co_flags)
        for part in (code.co_code, getattr(code, "co_exceptiontable", b""),
                     buffer.getvalue(), repr(shape).encode()):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
        self._codes[id(code)] = found = digest.hexdigest()
        self._alive.append(code)
        return found

    def _module_attributes(self, module: types.ModuleType) -> Iterator[tuple[str, Any]]:
        """The module's attributes that some walked code reads by name; not its
        dunders (``x.__dict__`` in any code would key a whole namespace,
        ``x.__file__`` where the project lives)."""
        for attr in sorted(self._attributes):
            if attr.startswith("__") and attr.endswith("__"):
                continue
            try:
                yield attr, getattr(module, attr)
            except Exception:  # noqa: BLE001 - absent (or a lazy attribute that fails)
                continue


# -- what items refer to -------------------------------------------------------------------

_REFERENCES = frozenset({types.FunctionType, types.BuiltinFunctionType})
_MISSING = object()


def _tensor_value(tensor: Any, torch: Any) -> tuple[Any, ...]:
    """A torch tensor by value, as an array: its pickle holds its storage's
    address (so no two processes agree), and copies the storage whole.
    Its class (a Parameter, MONAI's MetaTensor) and the attributes of its
    own (a MetaTensor's affine and metadata) key too."""
    try:
        data = tensor.detach()
        if data.layout != torch.strided:  # sparse: its values, not its encoding
            data = data.to_dense()
        if data.device.type == "meta":  # no values: its dtype and shape are all
            digest = "meta"
        else:
            data = data.resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
            data = data.view(torch.uint8)  # (bool, complex, bfloat16: numpy has none)
            size = data.numel()
            view = (ctypes.c_ubyte * size).from_address(data.data_ptr()) if size else b""
            digest = hashlib.blake2b(view, digest_size=16).hexdigest()
    except Exception as exc:  # noqa: BLE001 - quantized, nested...: whatever torch raised
        raise _Unfingerprintable(
            f"the values of a torch tensor ({tensor.dtype}, layout {tensor.layout}) could "
            f"not be read: {type(exc).__name__}: {exc}") from None
    return ("tensor", type(tensor), str(tensor.dtype), tuple(tensor.shape),
            bool(tensor.requires_grad), tensor.device.type, digest,
            dict(getattr(tensor, "__dict__", None) or {}) or None)


class ItemCode:
    """The code that items' pickles refer to, for a directory cache's keys.

    An item's pickle names a class (its own class, a class it holds) or a
    function (a callable it holds) by reference, ``module.qualname``: an edit
    of that code would not change the pickle, so a key of the pickle alone
    would serve the old code's results.  :meth:`pickle` pickles an item as
    ``pickle.dumps(item, protocol=4)`` does (the same bytes), noting each
    class and function on the way (``reducer_override``), and gives their
    fingerprints, which the item's key takes (index.py).  Each is
    fingerprinted once (one ItemCode per loader) by a recipe of its own: the
    user's own by its code and what that reads, a library's by its version.
    Python's own are left out (Python's version keys them), so an item of
    ``pathlib.Path`` or of plain containers keys as its pickle alone.  One
    that cannot be found by its name (a lambda, a class made in a function)
    is pickled as its name, and its recipe (code, not lines) keys it.
    """

    def __init__(self, cache_version: str | int | None, where: str,
                 versions: dict[str, str] | None = None) -> None:
        self._version = cache_version
        self._where = where
        self._versions = {} if versions is None else versions
        self.names: dict[str, str] = {}  # name -> fingerprint (hex), for cache_info()
        self._known: dict[int, tuple[Any, bytes, Any]] = {}  # id -> (obj, fingerprint, reduce)
        self._pickler: _ItemPickler | None = _ItemPickler(self)  # None while in use

    def pickle(self, item: Any) -> tuple[bytes | None, list[bytes]]:
        """The item's pickle, and the fingerprints of the code it refers to,
        in the order its pickle meets them.  The pickle is None where only
        cloudpickle can pickle the item (a dict view in it...): then a
        cloudpickle finds what it refers to.  CacheError where that cannot be
        fingerprinted (as for prepare: without cache_version)."""
        pickler, self._pickler = self._pickler or _ItemPickler(self), None  # (re-entered: another)
        try:
            return pickler.pickle(item)
        finally:
            self._pickler = pickler

    def note(self, obj: Any) -> tuple[Any, bytes, Any]:
        """(while pickling an item) A class or function met: (it, its
        fingerprint or b"" for none, what the pickler is to do with it:
        NotImplemented, by its name, or a reduction)."""
        return self._known.get(id(obj)) or self.learn(obj)

    def learn(self, obj: Any) -> tuple[Any, bytes, Any]:
        """note(), the first time ``obj`` is met."""
        owner = obj.__self__ if type(obj) is types.BuiltinFunctionType else None
        if owner is not None and not isinstance(owner, types.ModuleType):
            known: tuple[Any, bytes, Any] = (obj, b"", NotImplemented)  # an object's method
        else:
            module = owner.__name__ if isinstance(owner, types.ModuleType) \
                else getattr(obj, "__module__", None)
            qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", "?")
            name = f"{module}:{qualname}"
            by_name = _found_by_name(obj, module, qualname)
            fingerprint = b""
            if not by_name or origin(module) != "stdlib":
                fingerprint = recipe(obj, self._version, self._where, versions=self._versions,
                                     what=f"{name}, which an item refers to").salt()
                shown, number = name, 2
                while shown in self.names:
                    shown, number = f"{name}#{number}", number + 1
                self.names[shown] = fingerprint.hex()
            known = (obj, fingerprint, NotImplemented if by_name else (str, (name,)))
        self._known[id(obj)] = known  # (obj kept alive: its id stays its own)
        return known


def _found_by_name(obj: Any, module: str | None, qualname: str) -> bool:
    """Whether a pickle finds ``obj`` by its name, as pickle looks it up."""
    found: Any = sys.modules.get(module) if module else None
    for part in qualname.split("."):
        found = getattr(found, part, _MISSING) if found is not None else _MISSING
        if found is _MISSING:
            return False
    return found is obj


class _ItemPickler(pickle.Pickler):
    """Pickles an item as pickle.dumps does, noting the code it names.  One
    is reused for every item (making one costs more than a small item)."""

    def __init__(self, code: ItemCode) -> None:
        self._buffer = io.BytesIO()
        super().__init__(self._buffer, protocol=4)
        self._code = code
        self._known = code._known  # (read here: this runs for each object of each item)
        self._found: list[bytes] = []

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) in _REFERENCES or isinstance(obj, type):
            known = self._known.get(id(obj)) or self._code.learn(obj)
            if known[1]:
                self._found.append(known[1])
            return known[2]
        return NotImplemented

    def pickle(self, item: Any) -> tuple[bytes | None, list[bytes]]:
        """ItemCode.pickle, with this pickler."""
        buffer, self._found = self._buffer, []
        buffer.seek(0)
        buffer.truncate()
        try:
            self.dump(item)
            return buffer.getvalue(), self._found
        except CacheError:
            raise
        except Exception:  # noqa: BLE001 - what plain pickle refuses: cloudpickle's view
            recorder = _CloudRecorder(self._code)
            try:
                recorder.dump(item)
            except CacheError:
                raise
            except Exception:  # noqa: BLE001 - the encoder pickled it, so this does too
                pass
            return None, recorder.found
        finally:
            self.clear_memo()


class _CloudRecorder(cloudpickle.Pickler):
    """cloudpickle's view of an item, noting the code it names."""

    def __init__(self, code: ItemCode) -> None:
        super().__init__(io.BytesIO(), protocol=4)
        self._code = code
        self.found: list[bytes] = []

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) in _REFERENCES or isinstance(obj, type):
            fingerprint = self._code.note(obj)[1]
            if fingerprint:
                self.found.append(fingerprint)
        return super().reducer_override(obj)


_RANDOM_KINDS: dict[tuple[int, int], tuple[type, ...]] = {}


def _random_kinds() -> tuple[type, ...]:
    """The classes of random generators, of the modules imported (none is imported here)."""
    key = (id(sys.modules.get("numpy.random")), id(sys.modules.get("torch")))
    found = _RANDOM_KINDS.get(key)
    if found is None:
        _RANDOM_KINDS.clear()
        found = _RANDOM_KINDS[key] = _find_random_kinds()
    return found


def _find_random_kinds() -> tuple[type, ...]:
    kinds: list[type] = [random.Random]
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        kinds += [getattr(numpy_random, name, None)
                  for name in ("RandomState", "Generator", "BitGenerator")]
    torch = sys.modules.get("torch")
    if torch is not None:
        kinds.append(getattr(torch, "Generator", None))
    return tuple(kind for kind in kinds if isinstance(kind, type))


_GLOBAL_OPS = frozenset({"LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL", "LOAD_NAME",
                         "STORE_NAME", "DELETE_NAME", "LOAD_FROM_DICT_OR_GLOBALS"})


def _names(code: types.CodeType) -> tuple[list[str], set[str], list[tuple[int, str, tuple]]]:
    """What the code (and the code nested in it) reads by name: (globals,
    attribute names, imports as (level, module, from-list)).  A name op this
    table does not know counts as a global and an attribute both: more keyed,
    never less."""
    globals_, attributes, imports = set(), set(), []
    for inner in nested_codes(code):
        instructions = list(dis.get_instructions(inner))
        for at, instruction in enumerate(instructions):
            if instruction.opcode not in dis.hasname:
                continue
            op, name = instruction.opname, instruction.argval
            if op == "IMPORT_NAME":
                level, fromlist = (instructions[at - 2].argval, instructions[at - 1].argval) \
                    if at >= 2 else (0, None)
                imports.append((level if isinstance(level, int) else 0, name,
                                tuple(fromlist) if isinstance(fromlist, tuple) else ()))
            elif "ATTR" in op or op in ("LOAD_METHOD", "IMPORT_FROM"):
                attributes.add(name)
            else:
                globals_.add(name)
                if op not in _GLOBAL_OPS:
                    attributes.add(name)
    return sorted(globals_), attributes, imports
