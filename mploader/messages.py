"""The messages that cross the pipes between the parent and a worker, and their framing.

Only these small frozen dataclasses cross a pipe; array data never does (it
lives in the worker's shared-memory slots, see ``slots.py``).

parent -> worker, on the task pipe:  Bootstrap (once), then Task ...; EOF = stop.
worker -> parent, on the result pipe: Ready or StartFailed (once), then Result ...

Framing: every message is one frame, an 8-byte little-endian length followed by
the pickled message.  The parent's ends of both pipes are non-blocking (see
pool.py NOTE [Shutdown], the lock rule), so it cannot use a blocking
``Connection``: it keeps a per-worker outbound buffer, and parses inbound
bytes with :class:`FrameReader` as they arrive.  The worker's ends block; it
uses :func:`read_frame` and :func:`write_frame`.

Items travel with cloudpickle, each item in its own pickle (:class:`ItemEncoder`),
so a class defined in the user's script reaches a fresh interpreter, and an
item that cannot be decoded there fails alone, named, instead of the task.
"""
from __future__ import annotations

import io
import os
import pickle
import struct
from dataclasses import dataclass
from typing import Any

import cloudpickle

from .errors import ItemNotPicklable

PROTOCOL = pickle.HIGHEST_PROTOCOL
_HEADER = struct.Struct("<Q")


@dataclass(frozen=True)
class Bootstrap:
    """Everything a fresh worker interpreter needs before its first task."""
    sys_path: tuple[str, ...]
    fn: bytes                   # cloudpickled user function
    worker_init: bytes | None   # cloudpickled worker_init, or None
    code_files: dict[str, str]  # the file names cloudpickle drops (see shipping.py)
    seed: int                   # given, or drawn once per loader: every item's random state (random_state.py)
    stack_batches: bool         # True when batch_size is set (and fn yields no samples)
    samples: bool = False       # fn yields samples (a generator fn, or samples_per_item)
    samples_per_item: int | None = None  # the count every item's generator must yield
    prepare: bytes | None = None  # cloudpickled prepare, whose results are cached (cache/index.py)
    cache: str | None = None    # "memory", a cache directory, or None: prepare is not cached
    cache_trust: str = "user"   # whose entries a cache directory's worker reads (cache/stores.py)
    cache_recipe: dict[str, Any] | None = None  # a directory's key (cache/keys.check_in_worker)
    padding: Any = None         # layout.Padding: batches of items whose shapes vary
    seed_given: bool = True     # False: seed was drawn, the global generators are left alone
    threads: int = 1            # threads running fn in the worker (threads_per_worker)
    copy_fn_per_thread: bool = True  # each thread unpickles its own fn and prepare


@dataclass(frozen=True)
class Task:
    """Run fn over the items (source ``indices``) and write the results to ``slot``.

    ``key`` identifies the task across passes, so results of an abandoned pass
    can be recognised and dropped.  ``items`` holds every item's own pickle,
    back to back; ``ends[i]`` is where item i's pickle ends.  ``capacity`` is
    how many bytes of the slot are reserved, as the parent knows it (it frees
    idle slots, see slots.py).
    """
    key: tuple[int, int]        # (pass_id, task_seq)
    slot: int
    capacity: int
    epoch: int
    indices: tuple[int, ...]
    items: bytes
    ends: tuple[int, ...]
    keys: tuple[bytes, ...] = ()  # with prepare: each item's cache key (cache/index.py)
    cached: tuple[Any, ...] = ()  # shared-memory cache: each item's entry place, or None
    group: bytes = b""            # items of a group: the pickled tf/grouping.GroupSpec


@dataclass(frozen=True)
class Failure:
    """An exception raised by user code, as text (see errors.WorkerError)."""
    index: int | None
    item: str                   # repr of the source item, shortened; "" when unknown
    exc_type: str
    message: str
    traceback: str
    sample: int | None = None   # a generator fn: the samples it yielded before the error
    stage: str = "worker_init"  # with index None: what failed at the worker's start


@dataclass(frozen=True)
class Result:
    """The outcome of one Task.

    ``tree`` holds the results with every array replaced by a
    ``layout.ArrayRef`` into ``slot``: one stacked nest with ``batch_size``,
    the columns of a group (``Task.group``), else a tuple with one nest per
    item; it is ``None`` when every item failed.
    ``indices`` are the source indices the tree holds, in order (a task with
    failed items holds fewer than it had).  ``capacity`` is the slot's
    reserved size in bytes after the worker grew it; ``nbytes`` what this
    result used of it.
    """
    key: tuple[int, int]
    slot: int
    capacity: int
    nbytes: int
    tree: Any
    indices: tuple[int, ...]
    failures: tuple[Failure, ...]
    busy_s: float               # time the worker spent on this task
    cpu_s: float = 0.0          # the worker's CPU time (all its threads) since it was ready
    samples: tuple[int, ...] = ()  # values per index of a generator fn; () for one each
    # with prepare: entries written to the shared-memory cache, (index, place,
    # bytes), and the store's counts (cache/stores.py)
    cached: tuple[tuple[int, Any, int], ...] = ()
    cache: tuple[int, ...] = ()  # cache/stores._Counts.report()


@dataclass(frozen=True)
class Ready:
    """The worker imported fn and ran worker_init (the parent knows its pid)."""
    notes: tuple[str, ...] = ()  # for the parent to log: e.g. random_state's walk cut short


@dataclass(frozen=True)
class StartFailed:
    """Unpickling fn or running worker_init raised; the worker then exits."""
    failure: Failure


def frame(message: object) -> bytes:
    """The bytes that carry ``message`` on a pipe."""
    data = pickle.dumps(message, protocol=PROTOCOL)
    return _HEADER.pack(len(data)) + data


class FrameReader:
    """Collects bytes read from a non-blocking pipe and cuts them into messages."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[Any, int]]:
        """Add ``data``; return every message now complete, with its size in bytes."""
        buffer = self._buffer
        buffer += data
        found = []
        start = 0
        while len(buffer) - start >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer, start)
            end = start + _HEADER.size + size
            if end > len(buffer):
                break
            found.append((pickle.loads(memoryview(buffer)[start + _HEADER.size:end]),
                          _HEADER.size + size))
            start = end
        if start:
            del buffer[:start]
        return found


def _read_exact(fd: int, size: int) -> bytes | None:
    """``size`` bytes from a blocking fd, or None at EOF."""
    chunks = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> Any:
    """The next message on a blocking fd; raises EOFError when the writer closed it."""
    header = _read_exact(fd, _HEADER.size)
    data = None if header is None else _read_exact(fd, _HEADER.unpack(header)[0])
    if data is None:
        raise EOFError
    return pickle.loads(data)


def write_frame(fd: int, message: object) -> None:
    """Write one message to a blocking fd, whole."""
    view = memoryview(frame(message))
    while view:
        view = view[os.write(fd, view):]


PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None)})  # plain pickle decodes anywhere


class ItemEncoder:
    """Each item's own pickle, back to back, and where each ends.

    One cloudpickler for a whole chunk (making one costs more than pickling a
    small item); its memo is cleared between items so each decodes alone.
    Items of plain types decode anywhere, so they take plain pickle, five
    times cheaper.
    """

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._pickler: cloudpickle.CloudPickler | None = None
        self._ends: list[int] = []

    def add(self, items: list[Any], max_bytes: float) -> int:
        """Append items until ``max_bytes`` are reached; returns how many were taken.

        Raises ItemNotPicklable naming the item's position in ``items``.
        """
        out, ends, dumps = self._out, self._ends, pickle.dumps
        for position, item in enumerate(items):
            if out.tell() >= max_bytes:
                return position
            if type(item) in PLAIN_TYPES:
                out.write(dumps(item, PROTOCOL))
            else:
                self._add_by_value(item, position)
            ends.append(out.tell())
        return len(items)

    def _add_by_value(self, item: Any, position: int) -> None:
        if self._pickler is None:
            self._pickler = cloudpickle.CloudPickler(self._out, protocol=PROTOCOL)
        try:
            self._pickler.dump(item)
        except Exception as exc:
            raise ItemNotPicklable(position, exc) from exc
        finally:
            self._pickler.clear_memo()

    def finish(self) -> tuple[bytes, tuple[int, ...]]:
        return self._out.getvalue(), tuple(self._ends)


def item_bytes(task: Task, position: int) -> memoryview:
    """Item ``position``'s own pickle in a task: for items of plain types the
    same bytes in every process and every run (what prepare's random scope
    is derived from, see random_state.WorkerRandomness.prepare)."""
    start = task.ends[position - 1] if position else 0
    return memoryview(task.items)[start:task.ends[position]]


def decode_item(task: Task, position: int) -> Any:
    """Item ``position`` of a task (raises whatever unpickling it raises)."""
    return pickle.loads(item_bytes(task, position))
