"""The parent's side of a loader: its worker pool, its passes, and their counters.

``MPLoader`` (loader.py) keeps the options and the public API; a
``Pipeline`` owns what runs: the pool (started once, reused by every pass,
replaced after a death or Ctrl-C), the pass under way (a newer one abandons
it), the epoch's state (epochs.Epochs: the one owner of which epoch a pass
runs and where it stands), and the reports of finished passes.  It is also
the seam the adapters use (tf/adapter.py): :meth:`first_result`,
:meth:`pending_elements`, :meth:`start_pass` and :attr:`stats`, so no adapter
reaches into the loader.

Lock rule: ``lock`` (re-entrant) guards the pool box, the pass under way and
the epoch's state; it is held only across bounded work (starting or closing
a pool is bounded by ``close_timeout``), never while waiting on a worker.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any

from . import resources
from .backend import Backend
from .bottleneck import PassClock
from .cache.index import Cache
from .config import Config
from .epochs import Epochs, Plan, Progress
from .errors import not_the_owner
from .messages import Bootstrap
from .passes import Options, Pass, Skipped, Stats
from .pool import WorkerPool
from .samples import SampleBatches
from .sources import Source

# Results the consumer may hold as zero-copy views of the workers' slots (see
# slots.py and resources.leases_per_worker): at least _MIN_LEASES per worker,
# and _POOL_LEASES in all, so that a TensorFlow ``.batch(32)`` after
# ``dataset()``, which holds 32 elements until its batch is built, holds
# views, not copies (a copy goes into fresh memory, whose page faults cost
# more than the copy; `make bench` section (h)).
_MIN_LEASES = 8
_POOL_LEASES = 64
_PROBE_ITEMS = 32  # with on_error="skip", items tried to infer output_signature
_REPORTS_KEPT = 100  # epochs whose timing stats() keeps


def close_pool(box: list[Backend | None], timeout: float, cache: Cache | None = None
               ) -> None:
    """Close the pool in ``box`` (and, for good, the cache); shared by close(),
    a pass that discards its pool, and the loader's garbage-collection
    finalizer (which holds the box, never the loader)."""
    pool, box[0] = box[0], None
    if pool is not None:
        pool.close(timeout)
    if cache is not None:
        cache.close()


class Pipeline:
    """A loader's pool and passes (see the module docstring)."""

    def __init__(self, config: Config, options: Options, source: Source, epochs: Epochs,
                 bootstrap: Bootstrap, cache: Cache | None) -> None:
        self.config, self.options, self.source = config, options, source
        self.epochs, self.cache = epochs, cache
        self._bootstrap = bootstrap
        self.lock = threading.RLock()
        self.box: list[Backend | None] = [None]  # shared with the loader's finalizer
        self.stats = Stats(started_at=time.perf_counter())
        self.skipped: list[Skipped] = []  # items dropped by on_error="skip"
        self.closed = False
        self._owner_pid = os.getpid()
        self._passes = 0   # pass ids, probes included
        self._current: Pass | None = None
        self._reports: list[dict[str, Any]] = []  # of finished passes (bottleneck.py)

    # -- pool --------------------------------------------------------------------

    def ensure_pool(self) -> Backend:
        if os.getpid() != self._owner_pid:
            raise not_the_owner(self._owner_pid)
        if self.closed:
            raise RuntimeError("this MPLoader is closed")
        if self.box[0] is None:
            # One slot per task in flight, plus room for results the consumer
            # still holds as zero-copy views (see slots.py).
            prefetch, workers = self.options.prefetch, self.config.num_workers
            leases = resources.leases_per_worker(workers, _MIN_LEASES, _POOL_LEASES)
            if self.config.backend != "process":  # ray_backend.RayBackend
                self.box[0] = self._ray_pool(prefetch + leases)
                return self.box[0]
            self.box[0] = WorkerPool(workers, self._bootstrap,
                                     slots_per_worker=prefetch + leases,
                                     max_leases=leases, keep_free=prefetch,
                                     cache=self.cache.memory if self.cache else None,
                                     threads=self.config.threads_per_worker)
        return self.box[0]

    def _ray_pool(self, slots: int) -> Backend:
        """The Ray backend's actors; a memory cache is shared memory of this
        host, which actors on other nodes cannot map."""
        if self.cache is not None and self.cache.memory is not None:
            raise ValueError("cache='memory' is shared memory of this machine, which Ray "
                             "actors on other nodes cannot use: pass cache=None (prepare "
                             "runs every time) or a cache directory every node can reach")
        return self.config.backend.start(self.config.num_workers, self._bootstrap, slots)

    def _discard_pool(self, pool: Backend) -> None:
        """Stop a pool whose state can no longer be trusted (a death, Ctrl-C)."""
        with self.lock:
            if self.box[0] is pool:
                close_pool(self.box, self.config.close_timeout)  # the cache stays

    def close(self, timeout: float) -> None:
        with self.lock:  # no pass can start a pool while this one closes
            self.closed = True
            close_pool(self.box, timeout, self.cache)

    # -- passes --------------------------------------------------------------------

    def _start(self, items: Any, epoch: int, options: Options,
               progress: Progress | None = None, route_interrupts: bool = False) -> Pass:
        """A pass over ``items``, (step, source index, item) triples; without
        ``progress`` it is a probe, whose skips are not recorded either."""
        with self.lock:
            pool = self.ensure_pool()
            self.abandon_current()
            self._passes += 1
            clock = None if progress is None else PassClock(
                epoch, via_tensorflow=route_interrupts, batched=options.batch_size is not None,
                cached=self.cache is not None, workers=pool.workers, stats=self.stats,
                threads=self.config.threads_per_worker)
            self._current = Pass(pool, items, self._passes, epoch, options, self.stats,
                                 self.skipped if progress is not None else None,
                                 self._discard_pool, progress, route_interrupts,
                                 self.cache, clock)
            return self._current

    def abandon_current(self) -> None:
        """The pass under way, if any, ends (its report kept); its next() raises."""
        with self.lock:
            if self._current is not None:
                self._keep_report(self._current)
                self._current.abandon()
                self._current = None

    def _keep_report(self, one_pass: Pass) -> None:
        """Keep where a finished pass's time went (stats()["epochs"])."""
        if one_pass.clock is not None and one_pass.clock.elements:
            self._reports.append(one_pass.clock.report())
            del self._reports[:-_REPORTS_KEPT]

    def iterate(self, route_interrupts: bool = False, options: Options | None = None) -> Any:
        """A new pass, the next epoch's (or a restored one's rest);
        ``route_interrupts`` for a pass that runs on TensorFlow's threads (see
        interrupts.py), never for the user's own threads; ``options``: the
        loader's, or the adapter's variant of them."""
        options = options or self.options
        with self.lock:
            self.ensure_pool()
            plan = self.next_plan()
            progress = self.new_progress(plan)
            one_pass = self._start(plan.read(self.source), plan.epoch, options,
                                   progress, route_interrupts)
            self.epochs.begin(plan, progress, lambda: one_pass.running)
            return self._batched(one_pass, options)

    def start_pass(self, group_items: int = 0, group_spec: bytes = b"") -> Any:
        """A new pass driven from TensorFlow's threads (Ctrl-C routed): the
        adapter's; ``group_items`` > 0: its items come in groups of that many,
        laid out by ``group_spec`` (tf/grouping.py)."""
        options = dataclasses.replace(self.options, group_items=group_items,
                                      group_spec=group_spec)
        return self.iterate(route_interrupts=True, options=options)

    def _batched(self, one_pass: Pass, options: Options) -> Any:
        """The pass itself, or its samples in batches (stacked in the parent)."""
        if options.samples and options.batch_size is not None:
            return SampleBatches(one_pass, options.batch_size, options.drop_remainder)
        return one_pass

    def next_plan(self) -> Plan:
        """What the next pass reads (epochs.Epochs decides)."""
        return self.epochs.plan(self.source.length, self.config.shuffle, self.config.shard)

    def new_progress(self, plan: Plan) -> Progress:
        """Progress counted in items, or in samples when fn yields several (their
        count known: else the end of the epoch is known only when reached)."""
        config = self.config
        least = config.batch_size if config.batch_size and config.drop_remainder else 1
        return Progress(plan, least, config.samples_per_item if config.samples else 1)

    def first_result(self) -> tuple[int | None, Any]:
        """(source index, result) of the first source item that gives one
        (batched: the first batch), to infer ``output_signature``.

        With ``on_error="skip"`` it tries up to ``_PROBE_ITEMS`` items, and the
        ones it skips are not recorded (the pass that follows meets them again).
        """
        skip = self.options.on_error == "skip"
        count = _PROBE_ITEMS if skip else (self.config.batch_size or 1)
        head = self.source.head(count)
        if not head:
            raise ValueError("the source is empty: there is no first item to infer "
                             "output_signature from; pass output_signature")
        options = dataclasses.replace(self.options, drop_remainder=False, prefetch=1)
        probe = self._batched(
            self._start(((i, i, item) for i, item in enumerate(head)), epoch=0,
                        options=options), options)
        try:
            value = next(probe)
            return probe.last_index, value
        except StopIteration:
            raise ValueError(
                f"every one of the first {len(head)} items failed in fn (on_error='skip' "
                "skipped them), so output_signature cannot be inferred from a result: "
                "pass output_signature, or fix the items") from None
        finally:
            probe.close()

    def elements(self, steps: int, samples_out: int = 0) -> int:
        """Elements (items, samples, or batches of them) of ``steps`` items, less
        ``samples_out`` samples already handed out."""
        config = self.config
        if config.samples:
            if config.samples_per_item is None:
                raise TypeError("fn yields samples and samples_per_item is not given, "
                                "so the number of elements per epoch is unknown")
            steps = steps * config.samples_per_item - samples_out
        size = config.batch_size
        if size is None:
            return steps
        return steps // size if config.drop_remainder else -(-steps // size)

    def pending_elements(self) -> int | None:
        """Elements of the next pass when it is the rest of a restored epoch, else None."""
        if self.epochs.resume is None:
            return None
        plan = self.next_plan()
        remaining = plan.remaining()
        try:
            return None if remaining is None else self.elements(
                remaining, sum(count for _, count in plan.partial))
        except TypeError:
            return None

    # -- reports ---------------------------------------------------------------------

    def current_report(self) -> dict[str, Any] | None:
        """The newest pass's report, if it handed out an element (not a probe)."""
        one_pass = self._current
        clock = one_pass.clock if one_pass is not None else None
        return clock.report() if clock and clock.elements else None

    def epoch_report(self) -> dict[str, Any] | None:
        with self.lock:
            current = self.current_report()
            return current if current is not None else (self._reports[-1] if self._reports
                                                        else None)

    def counters(self) -> dict[str, Any]:
        """stats(): the counters, each live worker's share, the cache, the epochs."""
        pool = self.box[0]
        if pool is None:
            return self._counters_of([])
        with pool.lock:
            return self._counters_of(pool.live())

    def _counters_of(self, workers: list[Any]) -> dict[str, Any]:
        stats = self.stats
        elapsed = time.perf_counter() - stats.started_at
        threads = self.config.threads_per_worker
        return {
            "items": stats.items,
            "elapsed_s": elapsed,
            "items_per_s": stats.items / elapsed if elapsed > 0 else 0.0,
            "consumer_wait_s": stats.waited_s,
            "items_per_task": stats.items / stats.tasks if stats.tasks else 0.0,
            # Per worker: the share of its threads' time spent on items; its
            # CPU time per second (about 1.0 at most for Python code, whatever
            # the threads: the GIL); the share of its item time spent waiting
            # (I/O, sleep, the GIL) rather than computing.  Busy and waiting:
            # more threads help; busy and computing: more processes.
            "worker_busy_fraction": [h.busy_s / (elapsed * threads) for h in workers],
            "worker_cpu_fraction": [h.cpu_s / elapsed for h in workers],
            "worker_waiting_fraction": [max(0.0, 1.0 - h.cpu_s / h.busy_s) if h.busy_s else 0.0
                                        for h in workers],
            "slots_leased": sum(h.ring.leased for h in workers),
            "shared_memory_bytes": sum(h.ring.reserved_bytes() for h in workers),
            "skipped": len(self.skipped),
            "worker_restarts": stats.restarts,
            "elements_per_tensorflow_call": (stats.handoff_elements / stats.handoff_calls
                                             if stats.handoff_calls else 0.0),
            "cache": self.cache.stats() if self.cache is not None else None,
            "epochs": self._reports + [r for r in [self.current_report()] if r is not None],
        }
