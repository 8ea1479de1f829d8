"""The messages that cross the pipes between the parent and a worker.

Only these small frozen dataclasses cross a pipe; array data never does (it
lives in the worker's shared-memory slots, see ``slots.py``).  Every message is
pickled whole with :func:`encode` and read with :func:`decode`.

parent -> worker, on the task pipe:  Bootstrap (once), then Task ...; EOF = stop.
worker -> parent, on the result pipe: Ready or StartFailed (once), then Result ...
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

PROTOCOL = pickle.HIGHEST_PROTOCOL


@dataclass(frozen=True)
class Bootstrap:
    """Everything a fresh worker interpreter needs before its first task."""
    sys_path: tuple[str, ...]
    fn: bytes                   # cloudpickled user function
    worker_init: bytes | None   # cloudpickled worker_init, or None
    seed: int | None            # None: item_rng() is not reproducible
    stack_batches: bool         # True when batch_size is set


@dataclass(frozen=True)
class Task:
    """Run fn over ``items`` (source ``indices``) and write the results to ``slot``.

    ``key`` identifies the task across passes, so results of an abandoned pass
    can be recognised and dropped.
    """
    key: tuple[int, int]        # (pass_id, task_seq)
    slot: int
    epoch: int
    indices: tuple[int, ...]
    items: tuple[Any, ...]


@dataclass(frozen=True)
class Failure:
    """An exception raised by user code, as text (see errors.WorkerError)."""
    index: int | None
    item: str                   # repr of the source item, shortened; "" for worker_init
    exc_type: str
    message: str
    traceback: str


@dataclass(frozen=True)
class Result:
    """The outcome of one Task.

    ``tree`` holds the results with every array replaced by a
    ``layout.ArrayRef`` into ``slot``: one stacked nest with ``batch_size``,
    else a tuple with one nest per item; it is ``None`` when every item failed.
    ``indices`` are the source indices the tree holds, in order (a task with
    failed items holds fewer than it had).  ``capacity`` is the slot's size in
    bytes after the worker grew it; ``nbytes`` what this result used of it.
    """
    key: tuple[int, int]
    slot: int
    capacity: int
    nbytes: int
    tree: Any
    indices: tuple[int, ...]
    failures: tuple[Failure, ...]
    busy_s: float               # time the worker spent on this task


@dataclass(frozen=True)
class Ready:
    """The worker imported fn and ran worker_init."""
    pid: int


@dataclass(frozen=True)
class StartFailed:
    """Unpickling fn or running worker_init raised; the worker then exits."""
    failure: Failure


def encode(message: object) -> bytes:
    return pickle.dumps(message, protocol=PROTOCOL)


def decode(data: bytes) -> Any:
    return pickle.loads(data)
