"""The seam between the parent's pipeline and whatever runs the workers.

The pipeline (passes.py) drives one *backend*: today the local process pool
(pool.py); a second implementation (a cluster's actors) plugs in here without
touching the pipeline.  This module is the contract both sides keep.

Contract
--------
Workers.  ``backend.workers`` lists one :class:`Worker` per worker id, in a
fixed order; ``live()`` those that take tasks.  A worker runs the tasks sent
to it one at a time, in the order they were sent, and answers each with
exactly one ``Delivered`` event, unless it dies first.

Ordering.  Events come out of ``wait()`` in the order they arrived; results of
one worker arrive in the order it ran them.  Nothing orders results *between*
workers: putting them in the epoch's order is the pipeline's job (Reorder).

Memory.  A task names a slot of its worker's result memory, taken by
``send()`` (``has_room()`` says whether one is free).  A ``Delivered`` result
owns that slot until it is given back: :meth:`Delivered.open` makes the
values (views of the slot for one item, copies for a chunk), and
:meth:`Delivered.release` gives the slot back once nothing refers to it (a
view keeps it leased until the consumer drops it: slots.py).  A result never
opened must be released.  The slots of tasks lost with a dead worker are
freed by the backend.

Deaths.  A worker that exits is one ``Died`` event, after every result it
sent was delivered: ``lost`` holds the tasks it owed, in send order,
``blamed`` the items it was running when it died, as (task key, source
index), the overdue one first (one per thread of the worker; empty when it
was between items), ``overdue`` why the backend killed it for a timeout
(``kill_overdue``).  The dead worker takes no more tasks until ``replace()``
starts a new one in its place.  A worker that dies before it was ready makes
the backend *failed*: ``raise_if_failed()`` raises that error from then on.

Threads.  Every call but ``close()`` is made under ``backend.lock``, held only
across bounded waits (``wait(timeout)`` returns within ``timeout``); ``close()``
may come from any thread, sets ``closing`` first, and returns within its
bound whatever the workers do (NOTE [Shutdown] in pool.py).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from .messages import Result, Task


class ResultMemory(Protocol):
    """Where one worker's results lie (slots.SlotRing for local processes)."""

    def open_result(self, slot: int, nbytes: int, tree: Any, copy: bool = False) -> Any: ...

    def release(self, slot: int) -> None: ...


class Worker(Protocol):
    """What the pipeline sees of one worker."""
    worker_id: int
    outstanding: dict[tuple[int, int], Outstanding]  # sent, not answered, in send order
    ring: ResultMemory


@dataclass(frozen=True)
class Outstanding:
    """A task sent to a worker whose Result has not been read yet."""
    task: Task
    payload: Any  # the sender's own record of it, handed back with its result or death


@dataclass(frozen=True)
class Overdue:
    """Why the backend killed a worker: source ``index`` ran ``elapsed`` s > ``limit``."""
    index: int
    elapsed: float
    limit: float


@dataclass(frozen=True)
class Delivered:
    """Event: a worker's Result, owning its slot until :meth:`release`."""
    handle: Worker
    result: Result
    sent: Any                # the payload given to send(), None if unknown
    wire_bytes: int          # size of the message on the wire

    def open(self, tree: Any, copy: bool = False) -> Any:
        """The values of ``tree`` (part of the result's layout): views of the
        slot, which stays leased while they live, or copies (``copy``), after
        which the slot is free again."""
        return self.handle.ring.open_result(self.result.slot, self.result.nbytes, tree, copy)

    def release(self) -> None:
        """Give the slot back unopened (a result nobody will take)."""
        self.handle.ring.release(self.result.slot)


@dataclass(frozen=True)
class Died:
    """Event: a worker exited (see the module docstring)."""
    handle: Worker
    returncode: int
    lost: tuple[Outstanding, ...]
    blamed: tuple[tuple[tuple[int, int], int], ...]  # (task key, source index) running
    overdue: Overdue | None
    memory: str = ""         # for a SIGKILL: out of memory or not, and the last RSS


class Backend(Protocol):
    """The operations the pipeline uses; see the module docstring."""
    lock: threading.RLock
    closing: bool
    owner_pid: int
    workers: list[Any]

    def live(self) -> list[Any]:
        """Workers that take tasks."""

    def any_pending(self) -> bool:
        """True while some worker may still produce an event."""

    def raise_if_failed(self) -> None:
        """Raise the error that makes every pass fail (a worker died starting)."""

    def has_room(self, handle: Any, prefetch: int) -> bool:
        """Fewer than ``prefetch`` tasks outstanding and a free slot."""

    def send(self, handle: Any, make_task: Callable[[int, int], Task], payload: Any) -> None:
        """Take a slot of ``handle`` and send ``make_task(slot, capacity)``;
        ``payload`` comes back with its result or its death."""

    def owes(self, pass_id: int) -> bool:
        """Some worker (one being killed too) owes a task of pass ``pass_id``."""

    def wait(self, timeout: float) -> list[Delivered | Died]:
        """The events that arrive within ``timeout`` seconds."""

    def kill_overdue(self, limit: float) -> None:
        """Kill every worker whose current item has run over ``limit`` s."""

    def replace(self, handle: Any) -> Any:
        """A new worker in place of a dead one."""

    def shrink(self) -> None:
        """A pass ended: spare result memory goes back once idle (slots.py)."""

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker within ``timeout`` seconds; idempotent, any thread."""
