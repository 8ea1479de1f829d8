"""The public loader: ``MPLoader(fn, source).dataset()`` or ``for x in loader``.

The loader checks its arguments, ships ``fn`` (cloudpickled, so lambdas,
closures and functions of ``__main__`` work), owns one worker pool for its
whole life, and starts one pass (passes.py) per iteration on that same pool.
"""
from __future__ import annotations

import dataclasses
import logging
import numbers
import os
import secrets
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any, Callable

from . import resources
from .cache.index import Cache, check_cache_bytes, default_cache_bytes
from .cache.stores import TRUSTS
from .config import Config, check
from .epochs import Epochs, Plan, Progress, fingerprint, parse_state
from .errors import not_the_owner
from .messages import Bootstrap
from .bottleneck import PassClock
from .passes import Options, Pass, Skipped, Stats
from .pool import WorkerPool
from .samples import SampleBatches
from .shipping import ship
from .sources import Source

log = logging.getLogger("mploader")

DEFAULT_CLOSE_TIMEOUT_S = 5.0
# Results the consumer may hold as zero-copy views of the workers' slots (see
# slots.py and resources.leases_per_worker): at least _MIN_LEASES per worker,
# and _POOL_LEASES in all, so that
# a TensorFlow ``.batch(32)`` after ``dataset()``, which holds 32 elements
# until its batch is built, holds views, not copies (a copy goes into fresh
# memory, whose page faults cost more than the copy; `make bench` section (h)).
_MIN_LEASES = 8
_POOL_LEASES = 64
_PROBE_ITEMS = 32  # with on_error="skip", items tried to infer output_signature
_REPORTS_KEPT = 100  # epochs whose timing stats() keeps


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _default_workers() -> int:
    """One worker per core, as many as the descriptor limit allows."""
    cores, fit = _cpu_count(), resources.workers_that_fit()
    if fit < cores:
        log.warning("num_workers=None: using %d workers, not one per core (%d), because the "
                    "file descriptor limit (RLIMIT_NOFILE) allows no more; raise it with "
                    "`ulimit -n` to use every core", max(1, fit), cores)
    return max(1, min(cores, fit))


def _close_pool(box: list[WorkerPool | None], timeout: float, cache: Cache | None = None
                ) -> None:
    """Close the pool in ``box`` (and, for good, the cache); shared by close(),
    a pass that discards its pool, and the garbage-collection finalizer."""
    pool, box[0] = box[0], None
    if pool is not None:
        pool.close(timeout)
    if cache is not None:
        cache.close()


def _make_cache(prepare: Callable[[Any], Any] | None, cache: Any, cache_bytes: int | None,
                cache_version: str | int | None, cache_trust: str,
                worker_init: Callable[[int], Any] | None) -> Cache | None:
    """The cache of prepare's results (cache/index.py), after checking its arguments."""
    if prepare is None:
        check(cache == "memory" and cache_bytes is None,
               "cache and cache_bytes need prepare=: the cache holds prepare's results "
               "(pass prepare=your_loading_function)")
        return None
    check(cache is None or (isinstance(cache, (str, os.PathLike)) and os.fspath(cache) != ""),
           f"cache must be 'memory', a directory path or None, not {cache!r}")
    memory = cache == "memory"
    check(cache_bytes is None or memory,
           "cache_bytes is the budget of cache='memory'; a directory cache is bounded "
           "by its disk, and cache=None caches nothing")
    check(cache_bytes is None or (isinstance(cache_bytes, numbers.Integral)
                                   and not isinstance(cache_bytes, bool) and cache_bytes >= 0),
           f"cache_bytes must be an int >= 0 (bytes) or None, not {cache_bytes!r}")
    check(cache_version is None or (isinstance(cache_version, (str, int))
                                     and not isinstance(cache_version, bool)),
           f"cache_version must be a str, an int or None, not {cache_version!r}")
    check(cache_trust in TRUSTS,
           f"cache_trust must be one of {', '.join(map(repr, TRUSTS))}, not {cache_trust!r}")
    if cache is None:
        return None
    where = "memory" if memory else os.path.abspath(os.fspath(cache))
    budget = None
    if memory:
        budget = default_cache_bytes() if cache_bytes is None else int(cache_bytes)
        check_cache_bytes(budget)
    return Cache(where, budget, prepare, cache_version, cache_trust, worker_init)


class Pipeline:
    """What the package's adapters (tf/adapter.py) use of a loader's passes,
    and nothing more: the seam between the public loader and the code that
    hands its elements to a framework, so that no adapter reaches into the
    loader's private members."""

    def __init__(self, loader: MPLoader) -> None:
        self._loader = loader

    @property
    def stats(self) -> Stats:
        """The loader's counters (an adapter adds its hand-off calls)."""
        return self._loader._stats

    def first_result(self) -> tuple[int | None, Any]:
        """(source index, fn's result) of the first item that gives one: a probe
        pass, whose skips are not recorded."""
        return self._loader._first_result()

    def pending_elements(self) -> int | None:
        """Elements of the next pass when it is the rest of a restored epoch, else None."""
        return self._loader._pending_elements()

    def start_pass(self) -> Any:
        """A new pass driven from TensorFlow's threads (Ctrl-C routed, see interrupts.py)."""
        return self._loader._iterate(route_interrupts=True)


class MPLoader:
    """Run ``fn`` over ``source`` in a pool of worker processes that this loader owns.

    Workers are fresh interpreters (never forked, never importing your
    ``__main__`` or TensorFlow); results come back through shared memory; the
    pool is reused by every pass and stopped deterministically by
    :meth:`close`, by the ``with`` block, when the loader is garbage collected,
    or at interpreter exit.  See README.md for every option.
    """

    def __init__(self, fn: Callable[[Any], Any], source: Any, *,
                 num_workers: int | None = None, ordered: bool = True,
                 batch_size: int | None = None, drop_remainder: bool = False,
                 padded_shapes: Any = None, padding_values: Any = None,
                 prefetch: int = 2, output_signature: Any = None,
                 worker_init: Callable[[int], Any] | None = None,
                 seed: int | None = None, shuffle: bool = False, shard: Any = None,
                 samples_per_item: int | None = None,
                 prepare: Callable[[Any], Any] | None = None, cache: Any = "memory",
                 cache_bytes: int | None = None, cache_version: str | int | None = None,
                 cache_trust: str = "user",
                 timeout: float | None = None,
                 on_error: str = "raise", on_worker_death: str = "raise",
                 close_timeout: float = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        self._source = Source(source)
        self.config = config = Config.of(
            fn, self._source, num_workers=_default_workers() if num_workers is None else num_workers,
            ordered=ordered, batch_size=batch_size, drop_remainder=drop_remainder,
            padded_shapes=padded_shapes, padding_values=padding_values, prefetch=prefetch,
            output_signature=output_signature, seed=seed, shuffle=shuffle, shard=shard,
            samples_per_item=samples_per_item, timeout=timeout, on_error=on_error,
            on_worker_death=on_worker_death, close_timeout=close_timeout)
        # The order's seed: given, or drawn once per loader (state_dict() keeps it);
        # the workers' too, so that with seed=None every item still has its own
        # random stream (random_state.py).
        self._epochs = Epochs(config.seed if config.seed is not None else secrets.randbits(63))
        self._options = Options(ordered=ordered, prefetch=prefetch, timeout=timeout,
                                on_error=on_error, on_worker_death=on_worker_death,
                                batch_size=batch_size, drop_remainder=drop_remainder,
                                samples=config.samples)
        fn_payload, fn_files = ship(fn, "fn")
        init_payload, init_files = ship(worker_init, "worker_init")
        prepare_payload, prepare_files = ship(prepare, "prepare")
        self._cache = _make_cache(prepare, cache, cache_bytes, cache_version, cache_trust,
                                  worker_init)
        self._bootstrap = Bootstrap(
            sys_path=tuple(os.path.abspath(p) if p == "" else p for p in sys.path),
            fn=fn_payload, worker_init=init_payload,
            code_files={**init_files, **prepare_files, **fn_files},
            seed=self._epochs.seed, seed_given=config.seed is not None,
            stack_batches=self._options.stacked, samples=config.samples,
            samples_per_item=config.samples_per_item, prepare=prepare_payload,
            padding=config.padding,
            cache=self._cache.where if self._cache is not None else None,
            cache_trust=cache_trust,
            cache_recipe=(self._cache.recipe.to_json()
                          if self._cache is not None and self._cache.recipe is not None
                          else None))
        self.skipped: list[Skipped] = []  # items dropped by on_error="skip"
        self._stats = Stats(started_at=time.perf_counter())
        self._lock = threading.RLock()
        self._owner_pid = os.getpid()
        self._closed = False
        self._passes = 0   # pass ids, probes included
        self._current_pass: Pass | None = None
        self._reports: list[dict[str, Any]] = []  # of finished passes (bottleneck.py)
        # The pool lives in a box shared with the finalizer, which must not
        # hold the loader itself.
        self._box: list[WorkerPool | None] = [None]
        self._finalizer = weakref.finalize(self, _close_pool, self._box, config.close_timeout,
                                           self._cache)
        self._ensure_pool()  # start now: worker start-up overlaps the caller's set-up

    # Read-only views of the frozen config: an option cannot change under running workers.
    num_workers = property(lambda self: self.config.num_workers, doc="Worker processes.")
    batch_size = property(lambda self: self.config.batch_size,
                          doc="Items (or samples) per batch, or None.")
    drop_remainder = property(lambda self: self.config.drop_remainder)
    padding = property(lambda self: self.config.padding, doc="layout.Padding, or None.")
    shuffle = property(lambda self: self.config.shuffle)
    shard = property(lambda self: self.config.shard, doc="(index, count) of this loader's shard.")
    output_signature = property(lambda self: self.config.output_signature)
    samples_per_item = property(lambda self: self.config.samples_per_item)

    @property
    def pipeline(self) -> Pipeline:
        """The package's interface to this loader's passes (for its adapters)."""
        return Pipeline(self)

    # -- pool --------------------------------------------------------------------

    def _ensure_pool(self) -> WorkerPool:
        if os.getpid() != self._owner_pid:
            raise not_the_owner(self._owner_pid)
        if self._closed:
            raise RuntimeError("this MPLoader is closed")
        if self._box[0] is None:
            # One slot per task in flight, plus room for results the consumer
            # still holds as zero-copy views (see slots.py).
            prefetch = self._options.prefetch
            leases = resources.leases_per_worker(self.num_workers, _MIN_LEASES, _POOL_LEASES)
            self._box[0] = WorkerPool(self.num_workers, self._bootstrap,
                                      slots_per_worker=prefetch + leases,
                                      max_leases=leases, keep_free=prefetch,
                                      cache=self._cache.memory if self._cache else None)
        return self._box[0]

    def _discard_pool(self, pool: WorkerPool) -> None:
        """Stop a pool whose state can no longer be trusted (a death, Ctrl-C)."""
        with self._lock:
            if self._box[0] is pool:
                _close_pool(self._box, self.config.close_timeout)  # the cache stays

    # -- iteration -----------------------------------------------------------------

    def _start_pass(self, items: Any, epoch: int, options: Options,
                    progress: Progress | None = None, route_interrupts: bool = False) -> Pass:
        """A pass over ``items``, (step, source index, item) triples; without
        ``progress`` it is a probe, whose skips are not recorded either."""
        with self._lock:
            pool = self._ensure_pool()
            if self._current_pass is not None:
                self._keep_report(self._current_pass)
                self._current_pass.abandon()
            self._passes += 1
            clock = None if progress is None else PassClock(
                epoch, via_tensorflow=route_interrupts, batched=self.batch_size is not None,
                cached=self._cache is not None, workers=pool.workers, stats=self._stats)
            self._current_pass = Pass(pool, items, self._passes, epoch, options, self._stats,
                                      self.skipped if progress is not None else None,
                                      self._discard_pool, progress, route_interrupts,
                                      self._cache, clock)
            return self._current_pass

    def _keep_report(self, one_pass: Pass) -> None:
        """Keep where a finished pass's time went (stats()["epochs"])."""
        if one_pass.clock is not None and one_pass.clock.elements:
            self._reports.append(one_pass.clock.report())
            del self._reports[:-_REPORTS_KEPT]

    def epoch_report(self) -> dict[str, Any] | None:
        """Where the time of the newest pass (epoch) went so far: elements,
        seconds, the fraction the consumer waited on the workers, the workers'
        busy fraction, ``bound`` ("input", "consumer", "source" or "balanced")
        and a one-line hint, from its first element to its last.  None before
        any element."""
        with self._lock:
            current = self._current_report()
            return current if current is not None else (self._reports[-1] if self._reports
                                                        else None)

    def __iter__(self) -> Iterator[Any]:
        """Start a new pass over the source (a new epoch) on the same workers."""
        return self._iterate()

    def _iterate(self, route_interrupts: bool = False) -> Any:
        """A new pass; ``route_interrupts`` for a pass that runs on TensorFlow's
        threads (see interrupts.py), never for the user's own threads."""
        with self._lock:
            self._ensure_pool()
            plan = self._next_plan()
            progress = self._new_progress(plan)
            one_pass = self._start_pass(plan.read(self._source), plan.epoch, self._options,
                                        progress, route_interrupts)
            self._epochs.begin(plan, progress, lambda: one_pass.running)
            return self._batched(one_pass, self._options)

    def _batched(self, one_pass: Pass, options: Options) -> Any:
        """The pass itself, or its samples in batches (stacked in the parent)."""
        if options.samples and options.batch_size is not None:
            return SampleBatches(one_pass, options.batch_size, options.drop_remainder)
        return one_pass

    def _next_plan(self) -> Plan:
        """What the next pass reads (epochs.Epochs decides)."""
        return self._epochs.plan(self._source.length, self.shuffle, self.shard)

    def _new_progress(self, plan: Plan) -> Progress:
        """Progress counted in items, or in samples when fn yields several (their
        count known: else the end of the epoch is known only when reached)."""
        least = self.batch_size if self.batch_size and self.drop_remainder else 1
        return Progress(plan, least,
                        self.samples_per_item if self._options.samples else 1)

    def first_result(self) -> Any:
        """fn's result for the first source item that gives one (batched: the
        first batch); used to infer ``output_signature``."""
        return self._first_result()[1]

    def _first_result(self) -> tuple[int | None, Any]:
        """(source index, result) of :meth:`first_result`.

        With ``on_error="skip"`` it tries up to ``_PROBE_ITEMS`` items, and the
        ones it skips are not recorded (the pass that follows meets them again).
        """
        skip = self._options.on_error == "skip"
        count = _PROBE_ITEMS if skip else (self.batch_size or 1)
        head = self._source.head(count)
        if not head:
            raise ValueError("the source is empty: there is no first item to infer "
                             "output_signature from; pass output_signature")
        options = dataclasses.replace(self._options, drop_remainder=False, prefetch=1)
        probe = self._batched(
            self._start_pass(((i, i, item) for i, item in enumerate(head)), epoch=0,
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

    def __len__(self) -> int:
        """Elements of a whole epoch (items, or batches) for this loader's shard;
        TypeError when the source has no length."""
        n = self._source.length
        if n is None:
            raise TypeError("the source has no length")
        return self._elements(n // self.shard[1])

    def _elements(self, steps: int, samples_out: int = 0) -> int:
        """Elements (items, samples, or batches of them) of ``steps`` items, less
        ``samples_out`` samples already handed out."""
        if self._options.samples:
            if self.samples_per_item is None:
                raise TypeError("fn yields samples and samples_per_item is not given, "
                                "so the number of elements per epoch is unknown")
            steps = steps * self.samples_per_item - samples_out
        if self.batch_size is None:
            return steps
        return steps // self.batch_size if self.drop_remainder else -(-steps // self.batch_size)

    def _pending_elements(self) -> int | None:
        """Elements of the next pass when it is the rest of a restored epoch, else None."""
        if self._epochs.resume is None:
            return None
        plan = self._next_plan()
        remaining = plan.remaining()
        try:
            return None if remaining is None else self._elements(
                remaining, sum(count for _, count in plan.partial))
        except TypeError:
            return None

    # -- epochs and resume ---------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        return fingerprint(self._source.length, self.shuffle, self.batch_size,
                           self.drop_remainder, self.samples_per_item)

    def state_dict(self) -> dict[str, Any]:
        """Where this loader stands: small, JSON-serialisable, nothing about workers.

        ``load_state_dict`` of it, on a loader of the same source (any
        ``num_workers``, ``prefetch``, ``ordered``; any shard count when the
        shards stopped at the same step), makes the next pass continue right
        after the last element handed out.  See epochs.py.
        """
        with self._lock:
            return self._epochs.state(self._fingerprint(), self._new_progress,
                                      self._source.length, self.shuffle, self.shard)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch`` from its start (its order, its
        ``item_rng``), unless a restored state already starts inside it.

        A pass under way goes on as the epoch it is, and ``state_dict()``
        keeps describing it (and says which epoch follows).  Called while a
        pass of ``epoch`` itself is under way, it changes nothing: that pass
        is epoch ``epoch``, and the next is ``epoch + 1`` (to run an epoch
        again, call it once that pass has ended).
        """
        check(isinstance(epoch, numbers.Integral) and epoch >= 0,
               f"epoch must be an int >= 0, not {epoch!r}")
        with self._lock:
            self._epochs.set_epoch(int(epoch))

    def follow_epoch(self, epoch: int) -> None:
        """Keras's epoch ``epoch`` begins (keras_callback): the next pass runs at
        least epoch ``epoch``, never an order this loader already ran or is
        running (with ``steps_per_epoch`` over ``.repeat()`` passes and Keras's
        epochs do not line up)."""
        with self._lock:
            self._epochs.follow(int(epoch))

    def checkpointable(self) -> Any:
        """This loader's position as a ``tf.train.Checkpoint`` dependency:
        ``tf.train.Checkpoint(model=model, data=loader.checkpointable())``."""
        from .tf.adapter import checkpointable
        return checkpointable(self)

    def keras_callback(self, verbose: bool = True, name: str = "mploader") -> Any:
        """A Keras callback that keeps the loader's epoch equal to Keras's
        (``model.fit(..., callbacks=[loader.keras_callback(), BackupAndRestore(...)])``)
        and says at each epoch's end where the input time went (printed with
        ``verbose``; always in Keras's logs, under ``name``: give each loader
        its own, e.g. "train" and "val")."""
        from .tf.adapter import keras_callback
        return keras_callback(self, verbose, name)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next pass continue where the loader that saved ``state`` stopped.

        A state of another source length, shuffle setting or batching is an
        error naming the field, as is another seed when this loader was given
        one; with ``seed=None`` the saved seed is taken.
        """
        resume = parse_state(state, self._fingerprint())
        if (self.config.seed is not None) and resume.seed != self._epochs.seed and self.shuffle:
            raise ValueError(f"the state does not fit this loader: seed was {resume.seed} "
                             f"when it was saved, and is {self._epochs.seed} now")
        resume.plan(self._source.length, self.shuffle, self.shard)  # fits this shard?
        with self._lock:
            if self._current_pass is not None:
                self._keep_report(self._current_pass)
                self._current_pass.abandon()
                self._current_pass = None
            self._epochs.load(resume)

    def dataset(self) -> Any:
        """A ``tf.data.Dataset`` over this loader; every iteration is a new pass.

        Imports TensorFlow (only here).  Without ``output_signature`` it runs
        fn once on source index 0 to infer it.
        """
        from .tf.adapter import make_dataset
        return make_dataset(self)

    # -- state -------------------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        """The pids of the live workers (empty when closed)."""
        pool = self._box[0]
        return pool.pids() if pool is not None else []

    def stats(self) -> dict[str, Any]:
        """Throughput and where time goes: are the workers or the consumer the bottleneck?"""
        pool = self._box[0]
        if pool is None:
            return self._stats_of([])
        with pool.lock:
            return self._stats_of(pool.live())

    def cache_info(self) -> dict[str, Any] | None:
        """Why a directory cache's entries hit or miss: this loader's key
        (``key``, hex) and ``recipe`` (what went into it: prepare's name, the
        digest of each function and class it reaches, library versions,
        ``cache_version``), ``entries`` (files in the directory, every key's),
        and ``others``: the other recipes found beside the entries, most
        recently used first, each with its ``differences`` from this one
        ("prepare's code changed in mymod:helper", "numpy 1.26.4 -> 2.1.0").
        For ``cache="memory"``: no key or recipe (see cache/index.py); None without
        a cache."""
        return self._cache.info() if self._cache is not None else None

    def _stats_of(self, workers: list[Any]) -> dict[str, Any]:
        elapsed = time.perf_counter() - self._stats.started_at
        return {
            "items": self._stats.items,
            "elapsed_s": elapsed,
            "items_per_s": self._stats.items / elapsed if elapsed > 0 else 0.0,
            "consumer_wait_s": self._stats.waited_s,
            "items_per_task": self._stats.items / self._stats.tasks if self._stats.tasks else 0.0,
            "worker_busy_fraction": [h.busy_s / elapsed for h in workers],
            "slots_leased": sum(h.ring.leased for h in workers),
            "shared_memory_bytes": sum(h.ring.reserved_bytes() for h in workers),
            "skipped": len(self.skipped),
            "worker_restarts": self._stats.restarts,
            "elements_per_tensorflow_call": (self._stats.handoff_elements /
                                             self._stats.handoff_calls
                                             if self._stats.handoff_calls else 0.0),
            "cache": self._cache.stats() if self._cache is not None else None,
            "epochs": self._reports + [r for r in [self._current_report()] if r is not None],
        }

    def _current_report(self) -> dict[str, Any] | None:
        """The newest pass's report, if it handed out an element (not a probe)."""
        one_pass = self._current_pass
        clock = one_pass.clock if one_pass is not None else None
        return clock.report() if clock and clock.elements else None

    # -- lifecycle ------------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Stop every worker within ``timeout`` seconds (default ``close_timeout``).

        Idempotent and safe from any thread; in a forked child it leaves the
        parent's workers alone.
        """
        with self._lock:  # no pass can start a pool while this one closes
            self._closed = True
            _close_pool(self._box, self.config.close_timeout if timeout is None else timeout,
                        self._cache)

    def __enter__(self) -> "MPLoader":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
