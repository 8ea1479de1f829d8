"""One pass over the source: dispatch tasks, gather results, yield them in order.

A ``Pass`` is the iterator behind ``iter(loader)`` and behind every iterator
of ``loader.dataset()``.  It runs on whatever thread calls ``next()`` and
holds the pool's lock while it works, waiting in short slices so that a
``close()`` from another thread, a Ctrl-C, a dead worker or an overdue item
are all noticed within one slice.

Only one pass is current per loader: starting a new pass abandons the previous
one.  The abandoned pass's tasks still finish in the workers (at most
``prefetch`` per worker); their results are recognised by the pass id in the
task key and dropped, so no stale item reaches the new pass.

Tasks are chunks of consecutive source items: ``batch_size`` items with
batching, else one item, or several when items are tiny.  Each task costs a
message each way, so when the workers report under ``_TARGET_TASK_S`` of work
per item and small results, the pass grows its chunks (up to
``_MAX_CHUNK_ITEMS``) to spend one round trip on that much work.  Results of a
chunk are copied out; a single item's result can be handed out as views of
the slot (see slots.py).
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import interrupts
from .errors import WorkerDied, WorkerError, WorkerTimeout
from .messages import Failure, Ready, Result, StartFailed, Task
from .pool import Exited, WorkerHandle, WorkerPool

log = logging.getLogger("mploader")

WAIT_SLICE_S = 0.05  # longest blind wait: bounds the reaction to close() and Ctrl-C
_MAX_ITEM_STRIKES = 2  # an item that kills this many workers is reported, not retried
_TARGET_TASK_S = 0.5e-3  # worker time per task that outweighs its two pipe messages
_MAX_CHUNK_ITEMS = 64
_SMALL_RESULT_BYTES = 64 << 10  # chunked results are copied out: only for small ones
_LEARN_RATE = 0.25  # weight of the newest result in the moving averages


@dataclass(frozen=True)
class Chunk:
    """Consecutive items that make one task."""
    seq: int                      # position of the task in the pass
    indices: tuple[int, ...]
    items: tuple[Any, ...]


@dataclass(frozen=True)
class Options:
    """The loader options a pass needs."""
    ordered: bool
    prefetch: int
    timeout: float | None
    on_error: str                 # "raise" | "skip"
    on_worker_death: str          # "raise" | "restart"
    batch_size: int | None
    drop_remainder: bool


@dataclass(frozen=True)
class Skipped:
    """An item dropped by ``on_error="skip"``."""
    index: int | None
    item: str                     # repr of the source item, shortened
    worker_id: int
    exc_type: str
    message: str


class PassAbandoned(RuntimeError):
    """The loader started a newer pass, or was closed, while this one was in use."""


class Pass(Iterator[Any]):
    """Iterator over one pass; see the module docstring."""

    def __init__(self, loader: Any, pool: WorkerPool, items: Iterator[Any],
                 pass_id: int, epoch: int, options: Options) -> None:
        self._loader = loader  # for the stats it keeps, and to know the current pass
        self._pool = pool
        self._items = items
        self._pass_id = pass_id
        self._epoch = epoch
        self._opt = options
        self._chunk_items = options.batch_size or 1  # grows for tiny unbatched items
        # Moving averages of worker time and bytes per item; the time starts
        # high, so chunks grow only after several quick items in a row.
        self._item_s = 4 * _TARGET_TASK_S
        self._item_bytes = 0.0
        self._next_index = 0                  # source index of the next item read
        self._next_task = 0                   # seq of the next new task
        self._retry: deque[Chunk] = deque()   # chunks to run again, after a death
        self._ready: dict[int, tuple[WorkerHandle, Result]] = {}  # seq -> result
        self._pending: deque[tuple[int, Any]] = deque()  # (worker, value or Failure) to hand out
        self._next_seq = 0                    # ordered: the seq to yield next
        self._source_done = False
        self._finished = False
        self._strikes: dict[int, int] = {}    # source index -> workers it killed
        interrupts.forget_pending()

    # -- iteration ---------------------------------------------------------------

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        try:
            with self._pool.lock:
                return self._next_locked()
        except BaseException as exc:
            self._finished = True
            if not isinstance(exc, (StopIteration, WorkerError, PassAbandoned)):
                # A dead worker, a Ctrl-C, an error in the source: the pool's
                # state is not trusted any more.  Stop it now; the loader
                # starts a fresh one for its next pass.
                self._loader._discard_pool(self._pool)
            self.close()
            raise

    def _next_locked(self) -> Any:
        while True:
            if self._pool.closing or self._loader._current_pass is not self:
                raise PassAbandoned(
                    "this iteration of the loader was abandoned: the loader was "
                    "closed, or a newer iteration started (each loader runs one "
                    "pass at a time; use a second MPLoader for concurrent passes)")
            if self._pending:  # items of a chunk already here: no need to dispatch first
                found = self._take_ready()
                if found is not None:
                    return found[0]
            self._dispatch()
            found = self._take_ready()
            if found is not None:
                return found[0]
            if (self._source_done and not self._retry and not self._ready
                    and not self._pending and not self._in_flight()):
                raise StopIteration
            started = time.perf_counter()
            events = self._pool.wait(WAIT_SLICE_S)
            self._loader._stats.waited_s += time.perf_counter() - started
            for handle, message in events:
                self._handle(handle, message)
            self._check_timeouts()
            interrupts.raise_if_interrupted()

    def close(self) -> None:
        """Stop dispatching and give back the slots of results never yielded."""
        self._finished = True
        with self._pool.lock:
            for handle, result in self._ready.values():
                handle.ring.release(result.slot)
            self._ready.clear()
            self._pending.clear()

    # -- dispatch --------------------------------------------------------------------

    def _next_chunk(self) -> Chunk | None:
        if self._retry:
            return self._retry.popleft()
        if self._source_done:
            return None
        items = tuple(itertools.islice(self._items, self._chunk_items))
        full = len(items) == self._chunk_items
        if not items or (self._opt.drop_remainder and not full):
            self._source_done = True
            return None
        self._source_done = not full
        first, self._next_index = self._next_index, self._next_index + len(items)
        self._next_task += 1
        return Chunk(self._next_task - 1, tuple(range(first, self._next_index)), items)

    def _learn_chunk_size(self, result: Result) -> None:
        """Size unbatched chunks so one task carries about _TARGET_TASK_S of work.

        Moving averages per item, so one quick item among slow ones does not
        make a chunk of slow items.
        """
        count = len(result.indices) + len(result.failures)
        self._item_s += _LEARN_RATE * (result.busy_s / count - self._item_s)
        self._item_bytes += _LEARN_RATE * (result.nbytes / count - self._item_bytes)
        if self._item_bytes > _SMALL_RESULT_BYTES or self._item_s <= 0:
            self._chunk_items = 1
        else:
            self._chunk_items = max(1, min(_MAX_CHUNK_ITEMS, math.ceil(_TARGET_TASK_S / self._item_s)))

    def _dispatch(self) -> None:
        """Give each worker with room one task at a time, round robin."""
        while True:
            sent = False
            for handle in self._pool.live():
                if len(handle.outstanding) >= self._opt.prefetch:
                    continue
                slot = handle.ring.acquire()
                if slot is None:
                    continue
                chunk = self._next_chunk()
                if chunk is None:
                    handle.ring.release(slot)
                    return
                self._pool.send(handle, Task((self._pass_id, chunk.seq), slot, self._epoch,
                                             chunk.indices, chunk.items))
                self._loader._stats.tasks += 1
                sent = True
            if not sent:
                return

    def _in_flight(self) -> bool:
        return any(key[0] == self._pass_id
                   for h in self._pool.live() for key in h.outstanding)

    # -- results ---------------------------------------------------------------------

    def _take_ready(self) -> tuple[Any] | None:
        """(value,) for the next value to yield, or None; raises for a failed item."""
        while True:
            if self._pending:
                worker_id, outcome = self._pending.popleft()
                if isinstance(outcome, Failure):
                    self._report(worker_id, outcome)
                    continue
                return (outcome,)
            if not self._ready:
                return None
            seq = self._next_seq if self._opt.ordered else next(iter(self._ready))
            if seq not in self._ready:
                return None
            if self._opt.ordered:
                self._next_seq += 1
            self._unpack(*self._ready.pop(seq))

    def _unpack(self, handle: WorkerHandle, result: Result) -> None:
        """Queue a task's values and failures, in source order, and free or lease its slot."""
        ring, worker_id = handle.ring, handle.worker_id
        failures = [(f.index, f) for f in result.failures]
        if result.tree is None:
            ring.release(result.slot)
            values = []
        elif self._opt.batch_size is not None:  # one stacked batch; its failures first
            batch = ring.open_result(result.slot, result.capacity, result.tree)
            values, failures = [(math.inf, batch)], [(-1, f) for _, f in failures]
        elif len(result.indices) == 1 and not failures:  # a lone item: views may do
            value = ring.open_result(result.slot, result.capacity, result.tree[0])
            values = [(result.indices[0], value)]
        else:
            trees = ring.open_result(result.slot, result.capacity, result.tree, copy=True)
            values = list(zip(result.indices, trees))
        self._loader._stats.count(len(result.indices))
        for _, outcome in sorted(values + failures, key=lambda pair: pair[0]):
            self._pending.append((worker_id, outcome))

    def _report(self, worker_id: int, failure: Failure) -> None:
        if self._opt.on_error == "raise":
            raise WorkerError(failure.exc_type, failure.message, failure.traceback,
                              worker_id, failure.index, failure.item)
        log.warning("skipped source index %s (item %s): %s: %s (worker %d)",
                    failure.index, failure.item, failure.exc_type, failure.message, worker_id)
        self._loader.skipped.append(Skipped(failure.index, failure.item, worker_id,
                                            failure.exc_type, failure.message))

    def _handle(self, handle: WorkerHandle, message: Any) -> None:
        if isinstance(message, Result):
            handle.outstanding.pop(message.key, None)
            handle.last_result_at = time.monotonic()
            handle.busy_s += message.busy_s
            if message.key[0] == self._pass_id:
                self._ready[message.key[1]] = (handle, message)
                if self._opt.batch_size is None:
                    self._learn_chunk_size(message)
            else:
                handle.ring.release(message.slot)  # from an abandoned pass
        elif isinstance(message, StartFailed):
            f = message.failure
            raise WorkerError(f.exc_type, f.message, f.traceback, handle.worker_id, None)
        elif isinstance(message, Exited):
            self._on_death(handle, message.returncode)
        else:
            assert isinstance(message, Ready), message

    # -- deaths and timeouts ------------------------------------------------------------

    def _lost_chunks(self, handle: WorkerHandle) -> list[Chunk]:
        return [Chunk(key[1], o.task.indices, o.task.items)
                for key, o in handle.outstanding.items() if key[0] == self._pass_id]

    def _on_death(self, handle: WorkerHandle, returncode: int,
                  overdue: tuple[int, float, float] | None = None) -> None:
        """Raise WorkerDied (WorkerTimeout when ``overdue`` = (index, elapsed, limit)),
        or replace the worker and queue its items again."""
        lost = self._lost_chunks(handle)
        indices = tuple(i for chunk in lost for i in chunk.indices)
        error = (WorkerTimeout(handle.worker_id, handle.pid, *overdue, indices) if overdue
                 else WorkerDied(handle.worker_id, handle.pid, returncode, indices))
        if self._opt.on_worker_death != "restart":
            raise error
        for index in indices:
            self._strikes[index] = self._strikes.get(index, 0) + 1
            if self._strikes[index] >= _MAX_ITEM_STRIKES:
                raise WorkerDied(handle.worker_id, handle.pid, returncode, indices,
                                 detail=f"source index {index} has now ended "
                                        f"{_MAX_ITEM_STRIKES} workers, so it is not "
                                        "retried again") from error
        log.warning("%s; starting a new worker %d and running its items again",
                    error, handle.worker_id)
        self._pool.replace(handle)
        self._retry.extend(sorted(lost, key=lambda c: c.seq))
        self._loader._stats.restarts += 1

    def _check_timeouts(self) -> None:
        if self._opt.timeout is None:
            return
        now = time.monotonic()
        for handle in self._pool.live():
            if not handle.outstanding:
                continue
            head = next(iter(handle.outstanding.values()))  # the one it is running
            elapsed = now - max(head.sent_at, handle.last_result_at)
            limit = self._opt.timeout * len(head.task.indices)
            if elapsed > limit:
                returncode = self._pool.kill(handle)
                self._on_death(handle, returncode, (head.task.indices[0], elapsed, limit))
