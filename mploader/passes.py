"""One pass over the source: read items, send tasks, gather results, yield them in order.

A ``Pass`` is the iterator behind ``iter(loader)`` and behind every iterator
of ``loader.dataset()``.  It runs on whatever thread calls ``next()`` and
holds the pool's lock while it works, waiting in short slices so that a
``close()`` from another thread, a Ctrl-C, a dead worker or an overdue item
are all noticed within one slice (the lock rule: pool.py NOTE [Shutdown]).

Only one pass is current per loader: starting a new pass abandons the previous
one, whose next ``next()`` raises :class:`PassAbandoned` (never a silent,
short epoch).  The abandoned pass's tasks still finish in the workers (at most
``prefetch`` per worker); their results are recognised by the pass id in the
task key and dropped, so no stale item reaches the new pass.

Tasks are chunks of consecutive source items: ``batch_size`` items with
batching, a group's through ``dataset()`` for large elements
(tf/grouping.py: each item then comes out as a :class:`Row` of its group),
else one item, or several when items are tiny.  Each task costs a
message each way, so when the workers report under ``_TARGET_TASK_S`` of work
per item and small results, the pass grows its chunks (up to
``_MAX_CHUNK_ITEMS`` items and ``_MAX_TASK_BYTES`` of pickled items) to spend
one round trip on that much work.  Results of a chunk are copied out; a
single item's result can be handed out as views of the slot (see slots.py).

Ordered output waits for the oldest task; the others may run ahead of it by
at most ``2 * prefetch`` tasks per worker, so one slow item cannot make the fast
workers fill every slot with results nobody can take yet.

A pass holds its loader only weakly (the loader holds its current pass), so
``del loader`` stops the workers at once, without the garbage collector; the
iterator ``iter(loader)`` (loader.py) is what keeps a loader alive while a
loop over it runs.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import os
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from . import interrupts
from .bottleneck import PassClock
from .cache.index import Cache
from .epochs import Progress, Record
from .errors import (ItemNotPicklable, MPLoaderError, PaddingDoesNotFit, PassAbandoned,
                     SignatureMismatch, WorkerDied, WorkerError, WorkerTimeout, not_the_owner,
                     short_repr)
from .messages import Failure, ItemEncoder, Result, Task
from .backend import Backend, Delivered, Died

log = logging.getLogger("mploader")

WAIT_SLICE_S = 0.05  # longest blind wait: bounds the reaction to close() and Ctrl-C
# While the consumer takes results already here, the workers' pipes are
# still read, and tasks sent, this often (and at most a tenth of the time,
# whatever a backend's poll costs): a consumer behind the workers (TensorFlow
# working through a backlog of groups) otherwise read and sent nothing, and
# 64 sleep-bound workers each sat idle 60-75 ms at a time.
POLL_EVERY_S = 2e-3
_MAX_ITEM_STRIKES = 2  # an item that kills this many workers is reported, not retried
_TARGET_TASK_S = 0.5e-3  # worker time per task that outweighs its two pipe messages
# A group's worker time at most: a group is handed out when its last item is
# done, so its length is latency at a pass's start (a few training steps).
# Groups of slow items may be long: a group's call costs TensorFlow more
# than one element's (it slices the group as a dataset of its own), so
# groups of one or two items cost more than they save.
_GROUP_TASK_S = 200e-3
# A group this long goes to TensorFlow in a call of its own; shorter ones
# are copied into shared calls (tf/adapter.py).  Groups shrinking at a
# pass's end stop here at the most (Feed._min_group).
MIN_GROUP_ITEMS = 4
# What a call of the generator costs the consumer, about (the parent's CPU
# per group at 64 sleep-bound workers on 2 cores): far more than an element.
_GROUP_CALL_S = 1e-3
_MAX_CHUNK_ITEMS = 64
_MAX_TASK_BYTES = 32 << 10  # pickled items per chunk: a task and its result stay small
_SMALL_RESULT_BYTES = 32 << 10  # result bytes (arrays and message) per item worth chunking
_LEARN_RATE = 0.25  # weight of the newest result in the moving averages


@dataclass(frozen=True)
class Chunk:
    """Consecutive items that make one task, encoded once (a retry sends the same bytes)."""
    seq: int                      # position of the task in the pass
    indices: tuple[int, ...]      # source indices
    items: tuple[Any, ...]
    encoded: bytes
    ends: tuple[int, ...]
    steps: tuple[int, ...]        # the items' steps in the epoch (epochs.py), as indices
    dropped: tuple[int, ...] = ()  # steps of items skipped after killing workers
    keys: tuple[bytes, ...] = ()  # with prepare: the items' cache keys (cache/index.py)
    solo: bool = False            # a suspect of a death: runs alone on its worker


class Row(NamedTuple):
    """One item's value in a group (tf/grouping.py): row ``row`` of every
    leaf of ``group``, the group's arrays; ``last``: its last row."""
    group: Any
    row: int
    last: bool


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
    samples: bool = False         # fn yields several samples per item (a generator)
    threads: int = 1              # threads per worker, each running an item at a time
    group_items: int = 0          # items per group (tf/grouping.py); 0: no groups
    group_spec: bytes = b""       # the pickled tf/grouping.GroupSpec the workers lay them out by

    @property
    def stacked(self) -> bool:
        """Batches stacked by the workers (with samples, the parent batches)."""
        return self.batch_size is not None and not self.samples


@dataclass(frozen=True)
class Skipped:
    """An item dropped by ``on_error="skip"``."""
    index: int | None
    item: str                     # repr of the source item, shortened
    worker_id: int
    exc_type: str
    message: str


@dataclass
class Stats:
    """Counters a loader keeps across its passes (see MPLoader.stats)."""
    started_at: float
    items: int = 0
    tasks: int = 0
    waited_s: float = 0.0
    restarts: int = 0
    handoff_calls: int = 0      # calls of TensorFlow's generator that gave elements
    handoff_elements: int = 0   # elements they gave
    item_s: float | None = None  # a worker's time per item, as the last pass learned it (Feed)


class Feed:
    """The pass's items, cut into chunks (tasks), in the epoch's order.

    Unbatched chunks are sized so that one task carries about _TARGET_TASK_S
    of work (see the module docstring); a chunk lost with a dead worker goes
    to ``retry`` and is sent again first.  An error of the user's source is
    kept (``error``) and raised by the pass once the items before it are out.
    """

    def __init__(self, items: Iterator[tuple[int, int, Any]], options: Options,
                 cache: Cache | None, pass_id: int, epoch: int, stats: Stats,
                 count: int | None = None, workers: int = 1) -> None:
        self._items = items           # (step, source index, item), in the epoch's order
        self._left = count            # items not read yet; None: not known
        self._in_flight = options.prefetch * workers  # tasks the workers may hold at once
        self._running = options.threads * workers     # items they run at once
        self._pass_id = pass_id
        self._epoch = epoch
        self._opt = options
        self._cache = cache
        # Moving averages of worker time and bytes per item.  The time starts
        # where the last pass left it (the loader's fn, items and workers);
        # in a loader's first pass it starts high, so chunks and groups grow
        # only after several quick items in a row.
        self._stats = stats  # its item_s: the time, one owner across passes
        if stats.item_s is None:
            stats.item_s = 4 * (_GROUP_TASK_S if options.group_items else _TARGET_TASK_S)
        # A batch per task; a group as long as the time allows; else one
        # item, more if tiny (learn).
        self._chunk_items = (options.batch_size if options.stacked
                             else self._group_size() if options.group_items else 1)
        self._item_bytes = 0.0
        self.next_task = 0                   # seq of the next new task
        self.retry: deque[Chunk] = deque()   # chunks to run again, after a death
        self._source_done = False
        self.error: Exception | None = None  # raised once the items before it are out

    @property
    def done(self) -> bool:
        """Every chunk was made and none waits to be sent again."""
        return self._source_done and not self.retry

    def halt(self) -> None:
        """Make no new chunk: the pass ends at an error (chunks to run again still go)."""
        self._source_done = True

    def next_chunk(self) -> Chunk | None:
        if self.retry:
            return self.retry.popleft()
        if self._source_done:
            return None
        read: list[tuple[int, int, Any]] = []
        size = self._next_size()
        try:  # item by item, so the items read before a failing one are kept
            for entry in itertools.islice(self._items, size):
                read.append(entry)
        except Exception as exc:  # the user's source raised: at its position, later
            self.error = exc
            self._source_done = True
        items = [item for _, _, item in read]
        encoder = ItemEncoder()
        try:  # a batch is batch_size items, whatever their bytes
            taken = encoder.add(items, math.inf if self._opt.stacked else _MAX_TASK_BYTES)
        except ItemNotPicklable as exc:
            raise TypeError(f"source index {read[exc.position][1]} cannot be "
                            f"pickled to send to a worker: {exc}") from exc
        if taken < len(read):  # enough bytes for one task: the rest go in the next
            self._items = itertools.chain(read[taken:], self._items)
            read = read[:taken]
        elif len(read) < size:
            self._source_done = True  # (also after a source error: see above)
        if not read or (self._opt.stacked and self._opt.drop_remainder
                        and len(read) < self._opt.batch_size):
            self._source_done = True
            return None
        self.next_task += 1
        if self._left is not None:
            self._left -= len(read)
        encoded, ends = encoder.finish()
        return Chunk(self.next_task - 1, tuple(index for _, index, _ in read),
                     tuple(items[:len(read)]), encoded, ends,
                     steps=tuple(step for step, _, _ in read),
                     keys=(self._cache.keys(tuple(items[:len(read)]), encoded, ends)
                           if self._cache is not None else ()))

    def _group_size(self) -> int:
        """Items per group: as many as _GROUP_TASK_S of work, ``group_items`` at most."""
        return max(1, min(self._opt.group_items,
                           int(_GROUP_TASK_S / max(self._stats.item_s, 1e-9))))

    def _next_size(self) -> int:
        """Items for the next chunk.  A group is also at most its share of
        the items left among the tasks in flight, so groups shrink towards
        the pass's end and the workers finish it together, rather than one
        group apart; but not below _min_group()."""
        if not self._opt.group_items or self._left is None:
            return self._chunk_items
        return max(min(self._chunk_items, self._min_group()),
                   min(self._chunk_items, self._left // self._in_flight))

    def _min_group(self) -> int:
        """The shortest group the consumer keeps up with.  Workers finishing
        groups of g items ask for running / (g x item_s) calls a second, and
        the consumer answers at most 1 / _GROUP_CALL_S: at 64 sleep-bound
        workers groups of one item made it the limit for the last third of
        a pass.  Few workers can have single items, and finish together:
        a floor of 4 there cost 0.02 of the rate at 4 in flight."""
        calls = self._running * _GROUP_CALL_S / max(self._stats.item_s, 1e-9)
        return min(MIN_GROUP_ITEMS, max(1, math.ceil(calls)))

    def may_send(self, outstanding: dict[Any, Any]) -> bool:
        """Whether the next chunk may go to a worker owing ``outstanding``: a
        chunk that must run alone (Recovery) goes to an idle worker, and a
        worker running one gets nothing beside it."""
        if any(sent.payload is not None and sent.payload.solo for sent in outstanding.values()):
            return False
        return not (outstanding and self.retry and self.retry[0].solo)

    def task(self, chunk: Chunk, slot: int, capacity: int) -> Task:
        """The message that sends ``chunk`` to a worker, its result into ``slot``."""
        return Task((self._pass_id, chunk.seq), slot, capacity, self._epoch, chunk.indices,
                    chunk.encoded, chunk.ends, chunk.keys,
                    self._cache.lookup(chunk.keys) if self._cache is not None else (),
                    self._opt.group_spec)

    def learn(self, delivered: Delivered) -> None:
        """Size unbatched chunks so one task carries about _TARGET_TASK_S of
        work, and groups (up to ``group_items``) so one carries at most
        _GROUP_TASK_S.

        Moving averages per item, so one quick item among slow ones does not
        make a chunk of slow items.  Bytes count the arrays and the message
        (strings and bytes travel in it).
        """
        result = delivered.result
        count = max(1, len(result.indices) + len(result.failures))
        item_s = self._stats.item_s = self._stats.item_s + _LEARN_RATE * (
            result.busy_s / count - self._stats.item_s)
        per_item = (result.nbytes + delivered.wire_bytes) / count
        self._item_bytes += _LEARN_RATE * (per_item - self._item_bytes)
        if self._opt.group_items:
            self._chunk_items = self._group_size()
        elif self._item_bytes > _SMALL_RESULT_BYTES or item_s <= 0:
            self._chunk_items = 1
        else:
            self._chunk_items = max(1, min(_MAX_CHUNK_ITEMS, math.ceil(_TARGET_TASK_S / item_s)))


class Reorder:
    """A pass's results, turned into entries in the epoch's order.

    Results arrive as tasks finish, in any order; ``next_entry`` gives what
    the consumer takes next, one entry per value, failure or step handed out:
    with ``ordered`` the oldest task's first (a task whose every item was
    skipped after deaths hands its steps out in its turn), else whichever
    arrived.  Each entry says what it hands out (epochs.py), so a state saved
    between two entries is exact.
    """

    def __init__(self, options: Options, stats: Stats, progress: Progress | None) -> None:
        self._opt = options
        self._stats = stats
        self._ready: dict[int, Delivered] = {}  # seq -> its result
        # (worker, source index, steps it hands out, value or Failure or _NOTHING,
        # the step of an item part-way through its samples or None), in order
        self.pending: deque[tuple[int, int | None, tuple[int, ...], Any, int | None]] = deque()
        # Samples to drop of items begun before a resume: step -> count (epochs.py)
        self._drop_samples = dict(progress.plan.partial) if progress is not None else {}
        self.next_seq = 0                    # ordered: the seq to yield next
        self._empty: dict[int, tuple[int, ...]] = {}  # seq -> steps, every item skipped
        self._fail: dict[int, MPLoaderError] = {}  # ordered: seq -> the death to raise after it
        # unordered: (the seqs still to come, the death to raise once they came)
        self._deaths: list[tuple[set[int], MPLoaderError]] = []

    @property
    def waiting(self) -> bool:
        """Results arrived that are not entries yet."""
        return bool(self._ready)

    def add(self, seq: int, delivered: Delivered) -> None:
        self._ready[seq] = delivered

    def all_skipped(self, seq: int, steps: tuple[int, ...]) -> None:
        """Task ``seq`` will give nothing: every item was dropped after deaths."""
        self._empty[seq] = steps

    def fail(self, seq: int, error: MPLoaderError, rerun: tuple[int, ...]) -> None:
        """A worker died running task ``seq``; ``rerun`` are the tasks it owed
        that run again (its items before the one it died on keep ``seq``).
        Ordered: ``error`` comes right after what task ``seq`` still gives,
        so after every task before it; unordered: once every task of
        ``rerun`` gave its items."""
        if self._opt.ordered:
            self._fail[seq] = error
            if seq not in rerun:
                self.all_skipped(seq, ())
        else:
            self._deaths.append((set(rerun), error))
            self._unpack_failure(None, None)

    def next_entry(self) -> tuple[int, int | None, tuple[int, ...], Any, int | None] | None:
        """The next entry, or None until the result it needs arrives."""
        while not self.pending:
            if self._opt.ordered and self.next_seq in self._empty:
                self.pending.append((-1, None, self._empty.pop(self.next_seq), _NOTHING, None))
                self._unpack_failure(self.next_seq, None)
                self.next_seq += 1
            else:
                if not self._ready:
                    return None
                seq = self.next_seq if self._opt.ordered else next(iter(self._ready))
                if seq not in self._ready:
                    return None
                if self._opt.ordered:
                    self.next_seq += 1
                self._unpack_failure(seq, self._ready.pop(seq))
        return self.pending.popleft()

    def _unpack_failure(self, seq: int | None, delivered: Delivered | None) -> None:
        """Queue task ``seq``'s entries, then a death that waited for them."""
        if delivered is not None:
            self._unpack(delivered)
        if seq in self._fail:
            self.pending.append((-1, None, (), _Death(self._fail.pop(seq)), None))
        for waiting, error in list(self._deaths):
            waiting.discard(seq)
            if not waiting:
                self._deaths.remove((waiting, error))
                self.pending.append((-1, None, (), _Death(error), None))

    def drop(self) -> None:
        """Give back the slots of results never yielded (the pass ends)."""
        for delivered in self._ready.values():
            delivered.release()
        self._ready.clear()
        self.pending.clear()

    def _unpack(self, delivered: Delivered) -> None:
        """Queue a task's values and failures in the epoch's order, and free or lease its slot.

        Each entry carries the steps it hands out (epochs.py): an item's own
        step, or, for a batch, every step of the chunk (its failures, skipped,
        come first and carry none), and the steps of items dropped after they
        killed workers ride on an entry of their own.
        """
        result, chunk = delivered.result, delivered.sent
        worker_id = delivered.handle.worker_id
        step_of = dict(zip(chunk.indices, chunk.steps))
        # (sort key, index, steps handed out, outcome, step part-way or None)
        failures = [((step_of[f.index], f.sample or 0), f.index, (step_of[f.index],),
                     _named(f, chunk), None) for f in result.failures]
        if result.tree is None and not self._opt.samples:
            delivered.release()
            values = []
        elif result.tree is None:  # items that yielded no sample, or failed
            delivered.release()
            values = self._samples(result, step_of, [])
        elif self._opt.stacked and self._short_batch_dropped(result):
            delivered.release()
            values = []
            # Its skips, then its good items as skipped too; the last hands out the steps.
            dropped = [_dropped_with_batch(index, chunk) for index in result.indices]
            failures = [((-1, 0), index, (), f, None) for _, index, _, f, _ in failures] + [
                ((math.inf, 0), f.index, chunk.steps if f is dropped[-1] else (),
                 f, None) for f in dropped]
        elif self._opt.stacked:  # one batch stacked by the worker; its failures first
            batch = delivered.open(result.tree)
            values = [((math.inf, 0), result.indices[0], chunk.steps + chunk.dropped, batch,
                       None)]
            failures = [((-1, 0), index, (), f, None) for _, index, _, f, _ in failures]
        elif self._opt.group_items:  # a group laid out by the worker: a row per item
            group = delivered.open(result.tree)
            last = len(result.indices) - 1
            values = [((step_of[index], 0), index, (step_of[index],),
                       Row(group, row, row == last), None)
                      for row, index in enumerate(result.indices)]
        elif len(result.tree) == 1 and len(result.indices) == 1 and not failures:  # views
            step = step_of[result.indices[0]]
            value = delivered.open(result.tree[0])
            values = [((step, 0), result.indices[0], (step,), value, None)]
        else:
            trees = delivered.open(result.tree, copy=True)
            values = self._samples(result, step_of, trees)
        self._stats.items += len(result.indices)
        outcomes = values + failures
        if chunk.dropped and (not self._opt.stacked or not values):
            outcomes.append(((min(chunk.dropped), 0), None, chunk.dropped, _NOTHING, None))
        if len(outcomes) > len(values):  # values alone are in the epoch's order already
            outcomes.sort(key=lambda entry: entry[0])
        self.pending.extend((worker_id, *entry[1:]) for entry in outcomes)

    def _short_batch_dropped(self, result: Result) -> bool:
        """A worker batch came out short (items skipped, or dropped after they
        killed workers): with drop_remainder=True it is dropped, never handed
        out (a fixed batch size is what drop_remainder promises)."""
        return self._opt.drop_remainder and len(result.indices) < (self._opt.batch_size or 0)

    def _samples(self, result: Any, step_of: dict[int, int], trees: list[Any]) -> list[Any]:
        """Entries for each value of ``result``: an item's last sample hands its
        step out, the ones before count as samples of an item part-way; an
        item that failed after some samples hands its step out with its failure.
        Samples handed out before a resume are dropped."""
        failed = {f.index for f in result.failures}
        counts = result.samples or (1,) * len(result.indices)
        entries, values = [], iter(trees)
        for index, count in zip(result.indices, counts):
            step = step_of[index]
            drop = self._drop_samples.pop(step, 0)
            if count == 0 and index not in failed:  # no sample: only its step is out
                entries.append(((step, 0), index, (step,), _NOTHING, None))
            for sample in range(count):
                value = next(values)
                if sample < drop:
                    continue
                last = sample == count - 1 and index not in failed
                entries.append(((step, sample), index, (step,) if last else (), value,
                                 None if last else step))
        return entries


class Pass(Iterator[Any]):
    """Iterator over one pass; see the module docstring."""

    def __init__(self, pool: Backend, items: Iterator[tuple[int, int, Any]], pass_id: int,
                 epoch: int, options: Options, stats: Stats, skipped: list[Skipped] | None,
                 discard_pool: Callable[[Backend], None], progress: Progress | None = None,
                 route_interrupts: bool = False, cache: Cache | None = None,
                 clock: PassClock | None = None) -> None:
        self._pool = pool
        self.clock = clock            # where its time goes (bottleneck.py); None: a probe
        self._cache = cache
        self._feed = Feed(items, options, cache, pass_id, epoch, stats,  # the items, as tasks
                          progress.plan.remaining() if progress is not None else None,
                          max(1, len(pool.workers)))
        self.progress = progress      # None: a probe, which hands out nothing for good
        self._pass_id = pass_id
        self.epoch = epoch            # the epoch whose steps its records name
        self._opt = options
        self._stats = stats
        self._skipped = skipped   # None: skips are not recorded (a probe)
        self._discard_pool = weakref.WeakMethod(discard_pool)  # see the module docstring
        self._route_interrupts = route_interrupts
        self._window = 2 * options.prefetch * max(1, len(pool.workers))
        self._order = Reorder(options, stats, progress)  # results, in the epoch's order
        self.last_index: int | None = None    # source index of the last value (a batch's first)
        self._finished = False
        self._exhausted = False   # ran to its end (its last record may still wait)
        self._abandoned = False
        self._recovery = Recovery(options, pool)  # what a worker's death means
        self.interrupted = False              # ended by Ctrl-C (see interrupts.py)
        self._handout = Handout(epoch)  # since the last value: the next value's record
        self._poll_due = 0.0  # when the workers' events are read even with a value here
        interrupts.forget_pending()

    # -- iteration ---------------------------------------------------------------

    def __next__(self) -> Any:
        """The next value, counted as taken at once (its record applied)."""
        try:
            value = self._pull(wait=True)
        finally:  # also what was handed out before the end or an error (skips)
            self._apply_pending()
        return value

    def _apply_pending(self) -> None:
        """Apply the record in the making at once: the value goes to the consumer now."""
        if self.progress is not None:
            self._handout.apply_to(self.progress)

    def take(self, wait: bool = True) -> tuple[Any, Record]:
        """(next value, its record) for a consumer that counts the value as
        taken later, by applying the record itself (a batch gathered in the
        parent, TensorFlow's buffer: tf/grouping.py).  Without ``wait``, the
        value is ``NOT_READY`` unless it is here without waiting on a worker.
        Raises like ``next()``; what the pass handed out with no value after
        it (the pass's end, skipped items) is then :meth:`leftover`."""
        value = self._pull(wait)
        return value, (self.leftover() if value is not NOT_READY else Record(self.epoch))

    def leftover(self) -> Record:
        """What the pass handed out since the last value's record."""
        return self._handout.pop()

    def apply(self, record: Record) -> None:
        """The consumer took what ``record`` describes (a probe counts nothing)."""
        if self.progress is not None and record:
            self.progress.apply(record)

    def _pull(self, wait: bool) -> Any:
        if _forked and os.getpid() != self._pool.owner_pid:
            raise not_the_owner(self._pool.owner_pid)
        if self._finished and not self._abandoned:
            raise StopIteration
        try:
            with self._pool.lock:
                return self._next_locked(wait)
        except BaseException as exc:
            self._finished = True
            if (not isinstance(exc, (StopIteration, WorkerError, PassAbandoned,
                                     SignatureMismatch))
                    and exc is not self._feed.error):
                # A dead worker, a Ctrl-C, an error in the source: the pool's
                # state is not trusted any more.  Stop it now; the loader
                # starts a fresh one for its next pass.
                discard = self._discard_pool()
                if discard is not None:
                    discard(self._pool)
            self.close()
            if self.interrupted:  # the workers are stopped; the main thread raises
                raise StopIteration from None
            raise

    def _next_locked(self, wait: bool) -> Any:
        polled = False
        while True:
            if self._abandoned or self._pool.closing:
                raise _abandoned()
            self._pool.raise_if_failed()
            if time.perf_counter() >= self._poll_due and self._poll(0.0):
                self._dispatch()  # before a value is taken: an error here loses none
            found = self._take_ready()
            if found is not None:
                return found[0]
            self._dispatch()
            found = self._take_ready()
            if found is not None:
                return found[0]
            in_flight = self._pool.owes(self._pass_id)
            if self._feed.done and not self._order.waiting and not in_flight:
                self._pool.shrink()  # the pass's bursts are over (see slots.py)
                if self._feed.error is not None:
                    raise self._feed.error  # at its position: every item before it is out
                self._exhausted = self._handout.ended = True
                raise StopIteration
            if self._pool.closing:  # closed re-entrantly (a signal handler) during a wait
                raise _abandoned()
            if polled and not wait:
                return NOT_READY
            if not self._pool.any_pending():
                raise MPLoaderError("no worker of this loader is alive, and the pass has "
                                    "work left; start a new iteration")
            started = time.perf_counter()
            self._poll(WAIT_SLICE_S if wait else 0.0)
            self._stats.waited_s += time.perf_counter() - started
            polled = True
            if self._route_interrupts and interrupts.sigint_pending():
                self.interrupted = True
                raise KeyboardInterrupt("Ctrl-C while waiting for mploader workers")

    def _poll(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the workers' events and act on them;
        whether any arrived."""
        started = time.perf_counter()
        events = self._pool.wait(timeout)
        now = time.perf_counter()
        self._poll_due = now + max(POLL_EVERY_S, 10 * (now - started - timeout))
        for event in events:
            if isinstance(event, Delivered):
                self._on_delivered(event)
            else:
                self._on_death(event)
        if self._opt.timeout is not None:
            self._pool.kill_overdue(self._opt.timeout)
        return bool(events)

    @property
    def running(self) -> bool:
        """Not left (no ``break``, error or newer pass): the consumer may still
        take from it.  A pass that ran to its end still runs: its last
        elements may wait in TensorFlow's buffers, their records not applied
        (the epoch's progress says when the consumer took them all)."""
        return not self._finished or (self._exhausted and not self._abandoned)

    def abandon(self) -> None:
        """A newer pass started: the next ``next()`` raises PassAbandoned."""
        self._abandoned = True
        self.close()

    def close(self) -> None:
        """Stop dispatching and give back the slots of results never yielded."""
        self._finished = True
        with self._pool.lock:
            self._order.drop()

    # -- dispatch --------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Give each worker with room one task at a time, round robin."""
        while True:
            sent = False
            for handle in self._pool.live():
                if not (self._pool.has_room(handle, self._opt.prefetch)
                        and self._feed.may_send(handle.outstanding)):
                    continue
                if (self._opt.ordered and not self._feed.retry
                        and self._feed.next_task >= self._order.next_seq + self._window):
                    return  # far enough ahead of the item the consumer waits for
                chunk = self._feed.next_chunk()
                if chunk is None:
                    return
                self._pool.send(handle, functools.partial(self._feed.task, chunk), chunk)
                self._stats.tasks += 1
                sent = True
            if not sent:
                return

    # -- results ---------------------------------------------------------------------

    def _take_ready(self) -> tuple[Any] | None:
        """(value,) for the next value to yield, or None; raises for a failed item."""
        while True:
            entry = self._order.next_entry()
            if entry is None:
                return None
            worker_id, index, steps, outcome, sampled = entry
            if isinstance(outcome, _Death):
                raise outcome.error  # at its position: the items before it are out
            if isinstance(outcome, Failure):
                self._report(worker_id, outcome)  # raises, unless skipped
            self._handout.add(steps, sampled)
            if outcome is _NOTHING or isinstance(outcome, Failure):
                continue
            self.last_index = index
            if self.clock is not None:
                self.clock.handed_out()
            return (outcome,)

    def _report(self, worker_id: int, failure: Failure) -> None:
        if failure.exc_type == _MISMATCH:  # a group's item the consumer would reject
            raise SignatureMismatch(failure.message)
        if self._opt.on_error == "raise" or failure.exc_type == _SETTINGS_ERROR:
            raise WorkerError(failure.exc_type, failure.message, failure.traceback,
                              worker_id, failure.index, failure.item, failure.sample)
        self._skip(_skipped(worker_id, failure))

    def _skip(self, skipped: Skipped) -> None:
        if self._skipped is None:
            return  # a probe: the pass that follows meets the item again
        log.warning("skipped source index %s (item %s): %s: %s (worker %d)", skipped.index,
                    skipped.item, skipped.exc_type, skipped.message, skipped.worker_id)
        self._skipped.append(skipped)

    def _on_delivered(self, delivered: Delivered) -> None:
        key = delivered.result.key
        if self._cache is not None and delivered.sent is not None:  # whoever's pass it was
            self._cache.learn(delivered.sent.indices, delivered.sent.keys, delivered.result)
        if key[0] != self._pass_id:
            delivered.release()  # from an abandoned pass
            return
        self._order.add(key[1], delivered)
        self._recovery.result_arrived()
        if not self._opt.stacked:
            self._feed.learn(delivered)

    # -- deaths and timeouts ------------------------------------------------------------

    def _on_death(self, died: Died) -> None:
        """Carry out what Recovery decides: a new worker, items to run again,
        the death as an error at its position."""
        lost = sorted((sent.payload for sent in died.lost if sent.task.key[0] == self._pass_id),
                      key=lambda chunk: chunk.seq)
        verdict = self._recovery.judge(died, lost, self._pass_id)
        for skipped in verdict.dropped:
            self._skip(skipped)
        if verdict.replace:
            self._pool.replace(died.handle)
            self._stats.restarts += 1
        self._feed.retry.extend(verdict.rerun)
        for chunk in verdict.skipped_whole:  # every item dropped: nothing to wait for
            if self._opt.ordered:
                self._order.all_skipped(chunk.seq, chunk.dropped)
            else:
                self._handout.add(chunk.dropped)
        if verdict.fail is not None:
            seq, error, rerun = verdict.fail
            self._feed.halt()  # nothing after the error will be handed out
            self._order.fail(seq, error, rerun)


class Handout:
    """What a pass handed out since its last value: the record (epochs.Record)
    in the making, which the next value carries."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.handed: list[int] = []   # steps wholly out
        self.sampled: list[int] = []  # one step per sample of an unfinished item
        self.ended = False            # the pass ran to its end

    def add(self, steps: Iterable[int], sampled: int | None = None) -> None:
        self.handed.extend(steps)
        if sampled is not None:
            self.sampled.append(sampled)

    def pop(self) -> Record:
        """The record so far, and a fresh start."""
        record = Record(self.epoch, tuple(self.handed), tuple(self.sampled), self.ended)
        self.handed, self.sampled, self.ended = [], [], False
        return record

    def apply_to(self, progress: Progress) -> None:
        """Apply the record so far at once; the common case (steps alone)
        without building a Record."""
        if self.sampled or self.ended:
            progress.apply(self.pop())
        elif self.handed:
            handed, self.handed = self.handed, []
            progress.handed(tuple(handed))


@dataclass(frozen=True)
class Verdict:
    """What a worker's death means for the pass (Recovery.judge)."""
    replace: bool                         # start a new worker in its place
    rerun: tuple[Chunk, ...] = ()         # chunks to run again, in order
    skipped_whole: tuple[Chunk, ...] = ()  # chunks whose every item was dropped
    dropped: tuple[Skipped, ...] = ()     # items dropped after they ended workers
    fail: tuple[int, MPLoaderError, tuple[int, ...]] | None = None  # (seq, error, seqs rerun)


class Recovery:
    """What a worker's death means for a pass.

    With ``on_worker_death="raise"`` it ends the pass with WorkerDied (or
    WorkerTimeout) naming the worker and the items it owed, *at its
    position*: the items of its task before the one it died on were finished
    but never sent (a task's results travel together), so they run again on
    another worker (a new one if none is left) and go out first, in order
    after every task before it; then the error.  With ``"restart"`` the
    worker is replaced and its items run again, except an item that has
    ended ``_MAX_ITEM_STRIKES`` workers (raised, or dropped under
    ``on_error="skip"``), and unless workers keep dying with no result in
    between (then the pass ends: a restart loop would never).
    """

    def __init__(self, options: Options, pool: Backend) -> None:
        self._opt = options
        self._pool = pool
        self._strikes: dict[int, int] = {}  # source index -> workers it killed
        self._fruitless = 0                 # restarts since the last result

    def result_arrived(self) -> None:
        self._fruitless = 0

    def judge(self, died: Died, lost: list[Chunk], pass_id: int) -> Verdict:
        """The verdict on a death whose lost chunks of this pass are ``lost``
        (in order); raises when the pass cannot go on at all."""
        handle = died.handle
        indices = tuple(i for chunk in lost for i in chunk.indices)
        self._pool.raise_if_failed()  # it died before it was ready: fatal to the pool
        blamed = tuple(index for key, index in died.blamed if key[0] == pass_id)
        if self._opt.on_worker_death != "restart":
            return self._at_position(died, lost, blamed)
        error = _death_error(died, indices)
        # Several tasks were running (threads): which one ended the worker is
        # unknown, so none is struck; each of them runs again alone, where a
        # death names its one culprit.
        suspects = len({key for key, _ in died.blamed if key[0] == pass_id}) > 1
        dropped = []
        for index in () if suspects else blamed:
            self._strikes[index] = self._strikes.get(index, 0) + 1
            if self._strikes[index] >= _MAX_ITEM_STRIKES:
                final = WorkerDied(handle.worker_id, handle.pid, died.returncode, (index,),
                                   detail=f"source index {index} has now ended "
                                          f"{_MAX_ITEM_STRIKES} workers, so it is not "
                                          "retried again")
                final.__cause__ = error
                if self._opt.on_error != "skip":  # at its position, as any death
                    return self._at_position(died, lost, (index,), final)
                chunk = next(c for c in lost if index in c.indices)
                dropped.append(Skipped(index, short_repr(chunk.items[chunk.indices.index(index)]),
                                       handle.worker_id, "WorkerDied", str(final)))
        self._fruitless += 1
        if self._fruitless > 2 * len(self._pool.workers) + _MAX_ITEM_STRIKES:
            raise WorkerDied(handle.worker_id, handle.pid, died.returncode, indices,
                             detail="workers keep dying between items with no result "
                                    "in between, so they are not restarted again") from error
        log.warning("%s; starting a new worker %d and running its items again",
                    error, handle.worker_id)
        doomed = {skipped.index for skipped in dropped}
        chunks = [_without(chunk, doomed) for chunk in lost]
        if suspects:
            chunks = [dataclasses.replace(c, solo=True) if set(c.indices) & set(blamed) else c
                      for c in chunks]
        return Verdict(True, tuple(c for c in chunks if c.indices),
                       tuple(c for c in chunks if not c.indices), tuple(dropped))

    def _at_position(self, died: Died, lost: list[Chunk], blamed: tuple[int, ...],
                     final: MPLoaderError | None = None) -> Verdict:
        """Raise mode: the death's error after the items before the one the
        worker died on, naming the items it owed that are not handed out
        (or ``final``: restart mode's error for an item that ended too many).
        That item: the one it was killed for (a timeout), else the first in
        the epoch's order of those it was running (``blamed``: one per
        thread), else (it died between items) its first lost task's first.
        Tasks before that one that it had not finished run again whole; a
        worker batch is whole or nothing, so a batch it died in fails whole."""
        if not lost:  # it owed this pass nothing: no position to wait for
            raise _death_error(died, ())
        running = [c for c in lost if set(blamed[:1] if died.overdue else blamed) & set(c.indices)]
        failing = running[0] if running else lost[0]
        earlier = tuple(c for c in lost if c.seq < failing.seq)
        before = ()
        first = next((i for i in failing.indices if i in blamed), None)
        if first is not None and not self._opt.stacked:
            unfinished = failing.indices[failing.indices.index(first):]
            if len(unfinished) < len(failing.indices):
                before = (_without(failing, set(unfinished), handed=False),)
        rerun = earlier + before
        owed = [i for chunk in lost if chunk.seq >= failing.seq for i in chunk.indices]
        detail = "" if died.overdue or len(blamed) < 2 else (
            f"it was running source indices {sorted(blamed)} on its threads, and any "
            "of them may have ended it")
        error = final or _death_error(died, tuple(owed[len(before[0].indices) if before else 0:]),
                                      detail)
        return Verdict(bool(rerun) and not self._pool.live(), rerun,
                       fail=(failing.seq, error, tuple(chunk.seq for chunk in rerun)))


def _death_error(died: Died, indices: tuple[int, ...], detail: str = "") -> MPLoaderError:
    handle, overdue = died.handle, died.overdue
    if overdue is not None:
        return WorkerTimeout(handle.worker_id, handle.pid, overdue.index, overdue.elapsed,
                             overdue.limit, indices)
    return WorkerDied(handle.worker_id, handle.pid, died.returncode, indices,
                      detail="; ".join(filter(None, (died.memory, detail))))


_forked = False  # True in a child forked from this process: only then ask for the pid


def _note_fork() -> None:
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_note_fork)


_NOTHING = object()  # a pending entry that hands out steps and yields no value


@dataclass(frozen=True)
class _Death:
    """A pending entry: the worker death (raise mode) that ends the pass here."""
    error: MPLoaderError


# A failure that says the loader's settings do not fit (layout.py): raised even under "skip".
_SETTINGS_ERROR = f"{PaddingDoesNotFit.__module__}.{PaddingDoesNotFit.__qualname__}"
_MISMATCH = f"{SignatureMismatch.__module__}.{SignatureMismatch.__qualname__}"
NOT_READY = object()  # next_if_ready(): no value without waiting


def _abandoned() -> PassAbandoned:
    return PassAbandoned(
        "this iteration of the loader was abandoned: the loader was closed, or a "
        "newer iteration of it started (each loader runs one pass at a time; use a "
        "second MPLoader for concurrent passes)")


def _without(chunk: Chunk, indices: set[int], handed: bool = True) -> Chunk:
    """``chunk`` less the items at ``indices`` (encoded again); with
    ``handed`` their steps count as handed out with the chunk (dropped)."""
    if not indices.intersection(chunk.indices):
        return chunk
    entries = list(zip(chunk.indices, chunk.items, chunk.steps))
    kept = [entry for entry in entries if entry[0] not in indices]
    encoder = ItemEncoder()
    encoder.add([item for _, item, _ in kept], math.inf)
    keys = dict(zip(chunk.indices, chunk.keys))
    return Chunk(chunk.seq, tuple(i for i, _, _ in kept), tuple(item for _, item, _ in kept),
                 *encoder.finish(), steps=tuple(step for _, _, step in kept),
                 dropped=chunk.dropped + (tuple(s for i, _, s in entries if i in indices)
                                          if handed else ()),
                 keys=tuple(keys[i] for i, _, _ in kept) if chunk.keys else ())


def _skipped(worker_id: int, failure: Failure) -> Skipped:
    """The record of an item that on_error="skip" drops."""
    message = failure.message
    if failure.sample:
        message += f" (after {failure.sample} samples; the item's other samples are dropped)"
    return Skipped(failure.index, failure.item, worker_id, failure.exc_type, message)


def _dropped_with_batch(index: int, chunk: Chunk) -> Failure:
    """The record of a good item dropped with its short batch (on_error="skip"
    with drop_remainder=True): it goes to loader.skipped, so nothing is lost unsaid."""
    item = chunk.items[chunk.indices.index(index)]
    return Failure(index, short_repr(item), "DroppedWithShortBatch",
                   "dropped with its batch: other items of the batch were skipped (failed, "
                   "or dropped after they ended workers), and "
                   "drop_remainder=True never hands out a short batch", "")


def _named(failure: Failure, chunk: Chunk | None) -> Failure:
    """The failure with its item's repr, when the worker could not decode the item."""
    if failure.item or failure.index is None or chunk is None:
        return failure
    item = chunk.items[chunk.indices.index(failure.index)]
    return Failure(failure.index, short_repr(item), failure.exc_type, failure.message,
                   failure.traceback)
