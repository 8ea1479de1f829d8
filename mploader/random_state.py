"""Per-item random state: the same item gets the same random numbers on any worker.

Why: every worker unpickles its own copy of ``fn``, so any random state that
``fn`` carries (a MONAI transform's ``RandomState``, an albumentations
``Compose``'s generators, a ``numpy.random.Generator`` in a closure) starts
identical in every worker, and the first items of two workers got the same
augmentation; random state that lives on from item to item made the output
depend on which worker ran which items.  So before each item the worker sets
every random source ``fn`` may draw from to a state derived from
``(seed, epoch, index)`` with ``numpy.random.SeedSequence``, never from the
worker id or the time.  A seeded loader therefore gives identical output for
any ``num_workers``, ordered or not, after a worker restart too; and with
``seed=None`` the loader draws one seed for all its workers, so every item
still gets its own random stream (a new one in every run), never a copy of
its neighbour's.

What is set per item, with a seed or without one (then from the drawn seed):

- ``item_rng()``: the item's own ``numpy.random.Generator`` (PCG64).
- numpy's legacy global generator (``numpy.random.*``, which nnU-Net's
  batchgenerators uses) and Python's ``random``, with a seed only: without
  one, each worker's globals are seeded from the operating system's entropy
  when it starts, so no two workers share a stream, and seeding them per item
  would cost every item some microseconds for nothing.
- torch's global generator (TorchIO, batchgeneratorsv2, ``torch.rand`` in fn),
  when the worker has imported torch; mploader never imports it (seconds and
  hundreds of MB for workers that do not use it) but a worker notices fn's own
  ``import torch`` and seeds it at once (:class:`_SeedTorchOnImport`).  CUDA's
  generators too, once the worker has initialised CUDA.
- The random objects reachable from ``fn``, each with its own seed, an int in
  ``[0, 2**32)``: any object whose class has a method
  ``set_random_state(seed=...)`` (MONAI's ``Randomizable``; the protocol for
  your own objects) or ``set_random_seed(seed)`` (albumentations 2.x ``Compose``
  and transforms); and ``numpy.random.Generator``, ``RandomState``,
  ``random.Random`` and ``torch.Generator`` objects, reseeded in place (those
  held by an object of the protocol are left to it).  The method is called
  before every item, with ``seed=`` as a keyword: keep it cheap.  A seed given
  to a library's pipeline (``A.Compose(..., seed=137)``) is replaced per item:
  the loader's ``seed`` is the one that makes a run reproducible.

Nothing is imported to find them: the worker walks ``fn`` once, after it lands
and after ``worker_init`` (:func:`find_random_objects`), through closures, the
globals its code names (and the attributes it names of a module global),
defaults, ``functools.partial`` arguments, bound ``self``, a callable
object's ``__call__``, instance attributes, lists, tuples and dict values;
never into modules, classes (a transform kept as a class attribute is not
found), sets (their order differs between processes) or arrays; without
calling the objects' methods or properties; and within bounds: depth,
elements per container, and two budgets, values walked into (objects,
containers) and values passed over (plain scalars, strings, arrays, values
seen already: these cost the first budget nothing and are never queued, so
a fn holding big plain metadata beside its transforms is walked whole, in
milliseconds, once).  A walk that a budget stops is not silent: the worker
sends a note that the loader logs (logger ``"mploader"``, once per text),
naming what was not walked; ``item_scope`` warns.  What a bound leaves
unwalked under a MONAI object that was found (a ``Compose``'s transforms, a
dictionary transform's array transform) is still reseeded: that object is
reseeded through its own ``set_random_state``, which passes seeds on, not
the in-place fast path (:func:`_reseed_monai`).  An object that ``fn``
builds itself, on its first call, cannot be found; reseed it at the top of
``fn``: ``t.set_random_state(seed=int(mploader.item_rng().integers(2**32)))``.

``prepare`` (the cached, deterministic stage) runs in a scope of its own,
derived from the item itself (a digest of its bytes as the task carries it:
plain pickle for ints, strings, floats, bytes...), neither its index nor
the loader's seed nor the epoch, since its results are cached by the item:
a prepare that draws random numbers draws the same ones for the same item at
any index, in every epoch and every run, with or without the cache (a
directory cache's key holds neither seed nor index).  An item of a class
defined in ``__main__`` travels by value, in bytes that differ between runs:
its prepare draws are the same within a run only.  ``item_rng()`` raises
there.

Replay one item in the parent with ``item_scope(seed, epoch, index, fn=fn)``:
it sets the same sources, fn's objects included, as the worker did.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import importlib.util
import inspect
import itertools
import logging
import random
import sys
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

class _Running(threading.local):
    """What runs on this thread (threads_per_worker: each thread its own item)."""
    scope: "_ItemScope | None" = None      # of the item running: item_rng()
    seeding: "_Seeding | None" = None      # the scope running: a torch imported inside it


_running = _Running()

# A scope's words (uint32) from its SeedSequence: words 0-7 seed item_rng's
# PCG64 (word 0 the legacy globals too, as it always did); torch and the
# objects take the words after them, so no two generators share a seed.
_TORCH_WORD = 8
_FIRST_OBJECT_WORD = 10

_MAX_DEPTH = 12            # hops from fn
_MAX_LOOKS = 100_000       # values walked into (objects, containers, functions), in all
_MAX_PASSED = 1_000_000    # values passed over (plain: scalars, arrays...; or seen), in all
_MAX_PER_CONTAINER = 10_000  # elements looked at in one list, tuple or dict
_NAMED = 4                 # unwalked values a note names

log = logging.getLogger("mploader")


class _ItemScope:
    """An item's random origin, its SeedSequence made only when something draws."""
    __slots__ = ("seed", "key", "_sequence", "rng")

    def __init__(self, seed: int | None, key: tuple[int, ...]) -> None:
        self.seed, self.key = seed, key
        self._sequence: np.random.SeedSequence | None = None
        self.rng: np.random.Generator | None = None

    @property
    def sequence(self) -> np.random.SeedSequence:
        if self._sequence is None:
            self._sequence = np.random.SeedSequence(self.seed, spawn_key=self.key)
        return self._sequence


def item_rng() -> np.random.Generator:
    """The random generator of the item that ``fn`` is processing now.

    Created on first use and derived from (seed, epoch, index).  Raises
    ``RuntimeError`` outside an item (use :func:`item_scope` to replay one).
    """
    scope = _running.scope
    if scope is None:
        raise RuntimeError(
            "mploader.item_rng() is only available while fn runs on an item: "
            "inside an MPLoader worker, or inside mploader.item_scope(...)")
    if scope.rng is None:
        scope.rng = np.random.Generator(np.random.PCG64(scope.sequence))
    return scope.rng


class RandomObject:
    """An object reachable from fn that keeps random state, and how to reseed it."""
    __slots__ = ("path", "target", "reseed")

    def __init__(self, path: str, target: Any, reseed: Callable[[Any, int], None]) -> None:
        self.path = path        # how it is reached, e.g. fn.aug.transforms[1]
        self.target = target
        self.reseed = reseed    # (object, seed)

    def apply(self, seed: int) -> None:
        try:
            self.reseed(self.target, seed)
        except Exception as exc:
            raise RuntimeError(
                f"mploader could not reseed {self.path} ({_type_name(self.target)}) for this "
                f"item: {_DESCRIPTIONS[self.reseed]} with seed={seed} raised "
                f"{type(exc).__name__}: {exc}") from exc


def find_random_objects(root: Any, name: str = "fn") -> tuple[RandomObject, ...]:
    """The objects reachable from ``root`` that keep their own random state,
    breadth first (an object before the ones it holds, in the same order in
    every process that unpickled the same ``root``).  Bounded: see the limits
    above; values it cannot read (an attribute that raises) are passed over."""
    return _walk(root, name).objects


class _Walk:
    """What :func:`_walk` found, and ``note``: what it left unwalked when a
    budget stopped it (None when it did not), for the user to read."""
    __slots__ = ("objects", "note")

    def __init__(self, objects: tuple[RandomObject, ...], note: str | None) -> None:
        self.objects, self.note = objects, note


def _walk(root: Any, name: str = "fn") -> _Walk:
    """Breadth first from ``root``.  A queue entry holds its value, the path
    of its holder and the step from it (the path is only spelled out for the
    values walked into), its depth, and its owner: the nearest random object
    found above it, which is reseeded through its own ``set_random_state``
    when a bound leaves part of what it holds unwalked (``cut``)."""
    found: list[RandomObject] = []
    cut: set[int] = set()  # indices in found
    ways: dict[type, Callable[[Any, int], None] | None] = {}
    leaves = _LEAVES + _torch_leaves()
    plain: dict[type, bool] = dict.fromkeys(_ATOMS, True)
    seen = {id(root)} | _global_generators()
    queue: collections.deque = collections.deque([(root, name, "", 0, -1)])
    call = inspect.getattr_static(type(root), "__call__", None)
    if type(call) is types.FunctionType:  # a callable object: its code's globals too
        queue.append((call, name, ".__call__", 1, -1))
    looks = passed = 0
    stopped: str | None = None  # the path of the value whose children the walk stopped in
    while queue:
        obj, holder, step, depth, owner = queue.popleft()
        path = _path(holder, step)
        reseed = _cached_way(ways, type(obj))
        if reseed is not None:
            found.append(RandomObject(path, obj, reseed))
            owner = len(found) - 1
        if reseed in _GENERATORS:
            continue
        if depth == _MAX_DEPTH:
            if reseed is not None:  # what it holds is not walked: its own method reaches it
                cut.add(owner)
            continue
        mine = reseed is not None
        for child, child_step in _children(obj):
            kind = type(child)
            is_plain = plain.get(kind)
            if is_plain is None:
                is_plain = plain[kind] = issubclass(kind, leaves)
            if is_plain or id(child) in seen or (
                    mine and _cached_way(ways, kind) in _GENERATORS):
                # Nothing random to walk into, or walked already, or a generator
                # of an object that reseeds itself (its own business): not a
                # look, but bounded too (a huge graph of plain values).
                passed += 1
                if passed > _MAX_PASSED:
                    stopped = path
                    break
                continue
            looks += 1
            if looks > _MAX_LOOKS:
                stopped = path
                break
            seen.add(id(child))
            queue.append((child, path, child_step, depth + 1, owner))
        else:
            if _is_cut(obj):  # a container longer than _MAX_PER_CONTAINER
                if owner >= 0:
                    cut.add(owner)
            continue
        break  # a budget is spent
    note = None
    if stopped is not None:
        cut.update(entry[4] for entry in queue if entry[4] >= 0)
        if owner >= 0:
            cut.add(owner)
        note = _stopped_note(name, stopped, [_path(e[1], e[2]) for e in
                                             itertools.islice(queue, _NAMED)], len(queue))
    for index in cut:  # a MONAI object whose own method reaches what the walk did not
        obj = found[index]
        if obj.reseed is _reseed_monai and _propagates(type(obj.target)):
            found[index] = RandomObject(obj.path, obj.target, _reseed_set_random_state)
    return _Walk(tuple(found), note)


def _path(holder: str, step: Any) -> str:
    kind = type(step)
    if kind is int:
        return f"{holder}[{step}]"
    if kind is tuple:
        return f"{holder}[{_key_text(step[0])}]"
    return holder + step


def _is_cut(obj: Any) -> bool:
    """Whether :func:`_children` left elements of a list, tuple or dict out."""
    kind = type(obj)
    for base in (list, tuple, dict):
        if issubclass(kind, base):
            return base.__len__(obj) > _MAX_PER_CONTAINER
    return False


def _stopped_note(name: str, stopped: str, waiting: list[str], left: int) -> str:
    more = left - len(waiting)
    named = ", ".join(waiting) + (f" and {more:,} more values" if more > 0 else "")
    return (
        f"mploader: the search for the random objects reachable from {name} stopped at its "
        f"budget ({_MAX_LOOKS:,} values walked into, {_MAX_PASSED:,} passed over) "
        f"without walking all of {stopped}{f', nor {named}' if named else ''}.  Random "
        f"state held there (transforms, generators) is not reseeded per item, so items may "
        f"share augmentations and a seeded run may depend on num_workers (a MONAI Compose or "
        f"other container that was found is reseeded through its own set_random_state, which "
        f"reaches its transforms).  Keep transforms close to {name} (a closure, a module "
        f"global, an attribute of {name}), not beside or inside large data structures, or "
        f"reseed them yourself at the top of {name}: "
        f"t.set_random_state(seed=int(mploader.item_rng().integers(2**32))).")


def report_notes(notes: tuple[str, ...], reported: set[str]) -> None:
    """Log, in the parent, what a worker found wrong in its walk (``Ready.notes``),
    each note once per ``reported``: a walk's warning reaches the user's own
    logging, not only the workers' stderr."""
    for note in notes:
        if note not in reported:
            reported.add(note)
            log.warning("%s", note)


def _cached_way(ways: dict[type, Any], kind: type) -> Callable[[Any, int], None] | None:
    if kind not in ways:
        ways[kind] = _way_to_reseed(kind)
    return ways[kind]


def _children(obj: Any) -> Iterator[tuple[Any, Any]]:
    """(value, step) of what ``obj`` holds (a step: an int, a list's or tuple's
    index; a 1-tuple, a dict's key; else the path's text, see :func:`_path`);
    what cannot be read is left out.  Dispatched on ``type(obj)`` and read with
    the base types' own methods, so that no code of the user's objects runs
    (an ``isinstance`` would read a ``__class__`` property; a list subclass's
    ``__iter__`` may load files)."""
    kind = type(obj)
    try:
        if issubclass(kind, types.FunctionType):
            yield from _function_children(obj)
        elif issubclass(kind, types.MethodType):
            yield obj.__self__, ".__self__"
            yield obj.__func__, ".__func__"
        elif issubclass(kind, functools.partial):
            yield obj.func, ".func"
            yield from ((a, f".args[{i}]") for i, a in enumerate(obj.args))
            yield from ((v, f".keywords[{k!r}]") for k, v in obj.keywords.items())
        elif issubclass(kind, (list, tuple)):
            elements = (list if issubclass(kind, list) else tuple).__iter__(obj)
            yield from zip(itertools.islice(elements, _MAX_PER_CONTAINER), itertools.count())
        elif issubclass(kind, dict):
            for key, value in itertools.islice(dict.items(obj), _MAX_PER_CONTAINER):
                yield value, (key,)
        else:
            yield from _attributes(obj)
    except Exception:  # noqa: BLE001 - e.g. a slot that raises: look no further
        return


def _function_children(fn: types.FunctionType) -> Iterator[tuple[Any, str]]:
    code = fn.__code__
    for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
        try:
            yield cell.cell_contents, f".{name}"
        except ValueError:  # an empty cell
            continue
    names = _global_names(code)
    for name in names:
        value = fn.__globals__.get(name, _ABSENT)
        if issubclass(type(value), types.ModuleType):  # module.attr: the attributes it names
            attributes = vars(value)
            yield from ((attributes[n], f".{name}.{n}") for n in names if n in attributes)
        elif value is not _ABSENT:
            yield value, f".{name}"
    yield from ((d, f".__defaults__[{i}]") for i, d in enumerate(fn.__defaults__ or ()))
    yield from ((v, f".{k}") for k, v in (fn.__kwdefaults__ or {}).items())
    yield from ((v, f".{k}") for k, v in fn.__dict__.items())  # e.g. __wrapped__


def _global_names(code: types.CodeType) -> dict[str, None]:
    """The names a function's code (and the code nested in it) may look up in
    its globals, in order."""
    names = dict.fromkeys(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_global_names(const))
    return names


def _attributes(obj: Any) -> Iterator[tuple[Any, str]]:
    """Instance attributes, read past any ``__getattr__`` or ``__getattribute__``."""
    try:
        attributes = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        attributes = {}
    if issubclass(type(attributes), dict):
        for name, value in itertools.islice(dict.items(attributes), _MAX_PER_CONTAINER):
            yield value, f".{name}"
    for kind in type(obj).__mro__:
        slots = kind.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__"):
                try:
                    yield object.__getattribute__(obj, name), f".{name}"
                except AttributeError:  # an empty slot
                    continue


def _key_text(key: Any) -> str:
    return repr(key) if type(key) in (str, int) else f"<{type(key).__name__} key>"


def _type_name(obj: Any) -> str:
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


# -- how each kind of object is reseeded


def _reseed_set_random_state(obj: Any, seed: int) -> None:
    obj.set_random_state(seed=seed)


def _reseed_monai(obj: Any, seed: int) -> None:
    """MONAI's ``set_random_state(seed)`` makes a new ``RandomState(seed)``,
    which first draws OS entropy, an order of magnitude dearer than reseeding
    the object's own one in place, which gives the same state.  What MONAI's overrides add (the
    seed passed on to the transforms they hold) the walk does itself: it found
    those too; an object holding what the walk left unwalked (a bound cut it
    short) is reseeded through its own method instead (:func:`_walk`).  The
    first time, the object may still use the class's shared ``R``: then the
    method gives it its own."""
    state = object.__getattribute__(obj, "__dict__").get("R")
    if isinstance(state, np.random.RandomState):
        state.seed(seed)
    else:
        obj.set_random_state(seed=seed)


def _propagates(kind: type) -> bool:
    """Whether a MONAI class's ``set_random_state`` does more than set its own
    ``R``: ``Compose``'s (``OneOf``, ``RandomOrder``...) reseeds the transforms
    it holds, a dictionary transform's the array transform it wraps."""
    method = getattr(kind, "set_random_state", None)
    return getattr(method, "__qualname__", "") != "Randomizable.set_random_state"


def _reseed_set_random_seed(obj: Any, seed: int) -> None:
    obj.set_random_seed(seed)


def _reseed_generator(obj: np.random.Generator, seed: int) -> None:
    bits = obj.bit_generator
    bits.state = type(bits)(seed).state


def _reseed_seed_method(obj: Any, seed: int) -> None:  # RandomState, random.Random
    obj.seed(seed)


def _reseed_torch_generator(obj: Any, seed: int) -> None:
    obj.manual_seed(seed)


_GENERATORS = (_reseed_generator, _reseed_seed_method, _reseed_torch_generator)
_DESCRIPTIONS = {
    _reseed_set_random_state: "set_random_state(seed=...)",
    _reseed_monai: "set_random_state(seed=...)",
    _reseed_set_random_seed: "set_random_seed(seed)",
    _reseed_generator: "setting its bit generator's state",
    _reseed_seed_method: "seed(seed)",
    _reseed_torch_generator: "manual_seed(seed)",
}


def _way_to_reseed(kind: type) -> Callable[[Any, int], None] | None:
    """How objects of ``kind`` are reseeded, by what they are, never by
    importing their library: a ``set_random_state`` that takes ``seed``
    (albumentations' takes generators: its ``set_random_seed`` is used), then
    ``set_random_seed``, then the generators themselves."""
    if issubclass(kind, np.random.Generator):
        return _reseed_generator
    if issubclass(kind, (np.random.RandomState, random.Random)):
        return _reseed_seed_method
    if kind.__name__ == "Generator" and kind.__module__.split(".")[0] == "torch":
        return _reseed_torch_generator
    try:
        method = getattr(kind, "set_random_state", None)
        if callable(method) and _takes_seed(method):
            module = getattr(method, "__module__", None) or ""
            return _reseed_monai if module.startswith("monai.") else _reseed_set_random_state
        if callable(getattr(kind, "set_random_seed", None)):
            return _reseed_set_random_seed
    except Exception:  # noqa: BLE001 - a class whose attribute lookup raises
        pass
    return None


def _takes_seed(method: Callable) -> bool:
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # no signature to read
        return False
    return any((p.name == "seed" and p.kind != p.POSITIONAL_ONLY) or p.kind == p.VAR_KEYWORD
               for p in parameters)


_ABSENT = object()
_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes, bytearray, range,
                    slice, memoryview, type(Ellipsis)})
# Not walked into: nothing random to find there, or (sets) no order that is
# the same in every process.
_LEAVES = (type, types.ModuleType, np.ndarray, np.generic, types.BuiltinFunctionType,
           types.CodeType, types.MethodWrapperType, types.WrapperDescriptorType,
           set, frozenset)


def _torch_leaves() -> tuple[type, ...]:
    torch = sys.modules.get("torch")
    return (torch.Tensor,) if isinstance(getattr(torch, "Tensor", None), type) else ()


def _global_generators() -> set[int]:
    """The ids of the global generators, seeded per item as globals: found as
    objects they would be seeded twice, differently."""
    torch = sys.modules.get("torch")
    mtrand = getattr(np.random, "mtrand", None)
    globals_ = (getattr(mtrand, "_rand", None), getattr(random, "_inst", None),
                getattr(torch, "default_generator", None))
    return {id(g) for g in globals_ if g is not None}


# -- seeding


def _seed_torch(seed: int) -> None:
    torch = sys.modules.get("torch")
    generator = getattr(torch, "default_generator", None)
    if generator is None:  # torch is not imported, or is being imported
        return
    generator.manual_seed(seed)  # not torch.manual_seed: it also seeds every device, lazily
    cuda = getattr(torch, "cuda", None)
    if cuda is not None and cuda.is_initialized():
        cuda.manual_seed_all(seed)


class _Seeding:
    """The scope an item (or prepare) runs in: every random source set from
    ``SeedSequence(seed, spawn_key=key)`` on entry, the outer scope back on
    exit.  A class rather than a generator context manager, and nothing
    derived that nothing uses: it runs for every item, and a loader of tiny
    items runs hundreds of thousands a second."""
    __slots__ = ("_scope", "_objects", "_globals", "_outer")

    def __init__(self, seed: int | None, key: tuple[int, ...], objects: tuple[RandomObject, ...],
                 globals_: bool) -> None:
        self._scope = _ItemScope(seed, key)
        self._objects = objects
        self._globals = globals_  # numpy's and Python's global generators too
        self._outer: tuple[Any, Any] = (None, None)

    def torch_seed(self, words: np.ndarray | None = None) -> int:
        if words is None:
            words = self._scope.sequence.generate_state(_FIRST_OBJECT_WORD)
        return (int(words[_TORCH_WORD]) & 0x7FFF_FFFF) << 32 | int(words[_TORCH_WORD + 1])

    def enter(self, item: bool) -> None:
        """Set the sources; ``item``: as an item (``item_rng()`` works), else as prepare."""
        torch = sys.modules.get("torch")
        if self._globals or self._objects or getattr(torch, "default_generator", None):
            words = self._scope.sequence.generate_state(_FIRST_OBJECT_WORD + len(self._objects))
            if self._globals:
                np.random.seed(int(words[0]))
                random.seed(int(words[0]))
            _seed_torch(self.torch_seed(words))
            for obj, word in zip(self._objects, words[_FIRST_OBJECT_WORD:]):
                obj.apply(int(word))
        running = _running
        self._outer = running.scope, running.seeding
        running.scope, running.seeding = (self._scope if item else None), self

    def __enter__(self) -> None:
        self.enter(item=True)

    def __exit__(self, *exc_info: Any) -> None:
        _running.scope, _running.seeding = self._outer


class _PrepareSeeding(_Seeding):
    __slots__ = ()

    def __enter__(self) -> None:
        self.enter(item=False)


@contextlib.contextmanager
def item_scope(seed: int | None, epoch: int, index: int, fn: Any = None) -> Iterator[None]:
    """Run code as the worker runs item ``index`` of pass ``epoch``.

    Workers use it for every item; users can use it to replay one item in the
    parent: ``with item_scope(seed=0, epoch=1, index=17, fn=fn): fn(source[17])``
    gives exactly what the loader produced for that item.  It seeds
    ``item_rng()``, numpy's and Python's global generators and torch's (when
    imported); with ``fn``, also the random objects reachable from it, as the
    workers do (MONAI and albumentations transforms, generators: see the
    module's docstring).  ``seed=None`` draws a new seed: a new stream, not a
    replay.  A walk of ``fn`` that a bound cut short is a ``RuntimeWarning``
    (the workers' is logged by the loader, logger ``"mploader"``).
    """
    objects: tuple[RandomObject, ...] = ()
    if fn is not None:
        walk = _walk(fn)
        if walk.note is not None:
            warnings.warn(walk.note, RuntimeWarning, stacklevel=3)
        objects = walk.objects
    with _Seeding(seed, (epoch, index), objects, globals_=True):
        yield


class WorkerRandomness:
    """A worker's per-item seeding: the random objects of ``fn`` and
    ``prepare``, found once (the walk is the costly part), and the scopes
    fn and prepare run in."""

    def __init__(self, seed: int, fn: Any, prepare: Any = None, globals_: bool = True) -> None:
        self._seed = seed
        self._globals = globals_  # the loader was given its seed: see the module docstring
        walks = [_walk(fn)] + ([] if prepare is None else [_walk(prepare, "prepare")])
        self._fn_objects = walks[0].objects
        self._prepare_objects = walks[1].objects if prepare is not None else ()
        # what the walks left unwalked, for the parent to log (Ready.notes)
        self.notes = tuple(w.note for w in walks if w.note is not None)
        if "torch" not in sys.modules and not any(  # (one per process, whatever the threads)
                isinstance(finder, _SeedTorchOnImport) for finder in sys.meta_path):
            sys.meta_path.insert(0, _SeedTorchOnImport())

    def item(self, epoch: int, index: int) -> contextlib.AbstractContextManager[None]:
        """The scope fn runs an item in."""
        return _Seeding(self._seed, (epoch, index), self._fn_objects, self._globals)

    def prepare(self, item: bytes | memoryview) -> contextlib.AbstractContextManager[None]:
        """The scope prepare runs in, from the item itself: ``item`` is its
        encoding as the task carries it (messages.item_bytes).  Not from its
        index (prepare's results are cached by the item: an item at another
        index, in another run or twice in a source, would get its first
        index's draws when cached and other ones when not), nor the loader's
        seed or the epoch (a directory cache's key holds neither), so its
        draws are the same for the same item in every epoch and every run,
        cached or not."""
        return _PrepareSeeding(_prepare_entropy(item), (), self._prepare_objects, True)


def _prepare_entropy(item: bytes | memoryview) -> int:
    """A SeedSequence's entropy from an item's bytes (128 bits of blake2b)."""
    digest = hashlib.blake2b(item, digest_size=16, person=b"mploader-prepare").digest()
    return int.from_bytes(digest, "little")


class _SeedTorchOnImport:
    """Seeds torch as soon as code run in a scope imports it.

    Without it a fn that imports torch itself (a TensorFlow user keeps torch
    out of the parent) would draw its worker's first item from torch's fixed
    default seed, the same in every worker: the first items of two workers
    would get the same augmentation.  It looks at the top-level ``import
    torch`` only, then leaves ``sys.meta_path`` (a finder needs only
    ``find_spec``: importing importlib.abc would slow every worker's start).
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        loader = getattr(spec, "loader", None)
        run = getattr(loader, "exec_module", None)
        if run is None:
            return spec

        def exec_module(module: types.ModuleType) -> None:
            try:
                run(module)
            finally:
                del loader.exec_module  # the instance's patch: the class's method again
            seeding = _running.seeding
            if seeding is not None:
                _seed_torch(seeding.torch_seed())

        try:
            loader.exec_module = exec_module
        except AttributeError:  # a loader with slots: torch goes unseeded until the next item
            pass
        return spec
