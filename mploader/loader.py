"""The public loader: ``MPLoader(fn, source).dataset()`` or ``for x in loader``.

The loader checks its arguments (config.py), ships ``fn`` (cloudpickled, so
lambdas, closures and functions of ``__main__`` work), and keeps the public
API; its Pipeline (pipeline.py) owns one worker pool for the loader's whole
life and starts one pass (passes.py) per iteration on that same pool.
"""
from __future__ import annotations

import logging
import numbers
import os
import secrets
import sys
import warnings
import weakref
from collections.abc import Iterator
from typing import Any, Callable

from . import resources
from .cache.index import Cache, check_cache_bytes, default_cache_bytes
from .cache.stores import TRUSTS
from .config import Config, backend_of, check
from .epochs import Epochs, fingerprint, parse_state
from .messages import Bootstrap
from .passes import Options, Skipped
from .pipeline import Pipeline, close_pool
from .shipping import ship
from .sources import Source

log = logging.getLogger("mploader")

DEFAULT_CLOSE_TIMEOUT_S = 5.0
_THREADS_AND_GLOBAL_GENERATORS = (
    "threads_per_worker > 1 with a seed: each item's own generator (mploader.item_rng()) "
    "and the random objects of fn (MONAI, albumentations transforms: each thread has its "
    "own copy of fn) are seeded per item, but the process-wide generators (Python's "
    "random, numpy's legacy np.random.*, torch's, so TorchIO's) are shared by the "
    "threads, so what an item draws from them depends on timing.  Draw from item_rng() "
    "or from objects with their own generators for results that a seed reproduces")


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _default_workers(backend: Any) -> int:
    """One worker per core, as many as the descriptor limit allows (with
    Ray: as many actors as the cluster holds)."""
    if backend != "process":
        return backend.default_workers()
    cores, fit = _cpu_count(), resources.workers_that_fit()
    if fit < cores:
        log.warning("num_workers=None: using %d workers, not one per core (%d), because the "
                    "file descriptor limit (RLIMIT_NOFILE) allows no more; raise it with "
                    "`ulimit -n` to use every core", max(1, fit), cores)
    return max(1, min(cores, fit))


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


def _option(name: str, doc: str) -> property:
    """A read-only view of the loader's frozen config option ``name``."""
    return property(lambda self: getattr(self.config, name), doc=doc)


class MPLoader:
    """Run ``fn`` over ``source`` in a pool of worker processes that this loader owns.

    Workers are fresh interpreters (never forked, never importing your
    ``__main__`` or TensorFlow); results come back through shared memory; the
    pool is reused by every pass and stopped deterministically by
    :meth:`close`, by the ``with`` block, when the loader is garbage collected,
    or at interpreter exit.  ``backend=mploader.RayBackend(...)`` (or ``"ray"``)
    runs the workers as Ray actors instead.  The workers start here, at
    construction, so that their start-up overlaps the caller's own set-up.

    Every option is checked here, before any worker starts, with an error that
    names it and the value, and is frozen: the properties below read it, and
    none can be changed afterwards.  The documentation site (``docs/``, built by
    ``make docs``) shows each option in use: :doc:`/getting-started`, the guides
    (:doc:`/guides/shapes`, :doc:`/guides/epochs`, :doc:`/guides/cache`,
    :doc:`/guides/threads`, :doc:`/guides/medical`, :doc:`/guides/tensorflow`,
    :doc:`/guides/ray`), :doc:`/reference` and :doc:`/troubleshooting`.

    Args:
        fn (callable): ``fn(item)``, run in the workers on each source item (on
            ``prepare(item)``'s result when ``prepare`` is given).  It returns a
            numpy array, a scalar, ``str``, ``bytes``, a CPU torch tensor, or a
            tuple, list or dict nesting these; a generator function yields
            several samples per item, each one element (see
            ``samples_per_item``).  Sent by value (cloudpickle), so a lambda, a
            closure or a function of your script or notebook works.  An
            exception in ``fn``, or a result that cannot be laid out in shared
            memory (:class:`~mploader.UnsupportedResult`), is a
            :class:`~mploader.WorkerError` at that item's position (see
            ``on_error``).  Not callable, or not picklable: ``TypeError``.
        source: The items: a sequence (``len`` and ``[]``, e.g. a list of file
            paths), an int ``n`` (the items ``0`` to ``n - 1``), any other
            iterable, or a ``tf.data.Dataset`` (read as numpy in this
            process).  Items are read in this process and pickled to the
            workers, so keep them small (paths, ids).  A one-shot iterator (a
            generator) serves one pass only.  A single ``str``, ``bytes`` or
            path (pass ``[path]``), a bool, or an object that is none of these:
            ``TypeError``; a negative int: ``ValueError``.
        num_workers (int or None): Worker processes (with Ray: actors).
            ``None``: one per CPU this process may use, fewer (with a warning)
            where the file descriptor limit ``RLIMIT_NOFILE`` allows fewer; with
            Ray, as many actors as the cluster's nodes hold.  Not an int >= 1:
            ``ValueError``; more workers than ``RLIMIT_NOFILE`` allows:
            ``ValueError`` saying how to raise it (``ulimit -n``).
        threads_per_worker (int): Threads running ``fn`` in each worker
            process, 1 to 64: more than 1 for a ``fn`` that mostly waits
            (storage, the network) or releases the GIL.  Tasks in flight per
            worker are ``prefetch`` per thread.  Local workers only: more than
            1 with the Ray backend is a ``ValueError`` (ask for more actors).
            With a ``seed`` and more than one thread, a ``RuntimeWarning``:
            Python's, numpy's legacy and torch's process-wide generators are
            shared by the threads, so draws from them depend on timing.
        copy_fn_per_thread (bool): With ``threads_per_worker > 1``, each thread
            runs its own copy of ``fn`` (and of ``prepare``), so that the
            random objects of ``fn`` are seeded per item in each thread;
            ``False`` shares one copy, which must then be thread-safe.  Not a
            bool: ``ValueError``.
        ordered (bool): ``True``: elements come in the epoch's order (source
            order, or the shuffled order), the same for any ``num_workers``,
            and an error comes at its item's position; ``False``: as the
            workers finish them.
        batch_size (int or None): Stack this many consecutive results into one
            element, a batch, in the workers' shared memory (with a generator
            ``fn``: this many samples, stacked in this process, a batch may
            span items).  ``None``: one element per item.  Not an int >= 1:
            ``ValueError``.
        drop_remainder (bool): With ``batch_size``: leave out an epoch's last,
            short batch, so every batch is full.  ``True`` without
            ``batch_size``: ``ValueError``.
        padded_shapes: With ``batch_size``, for items whose array shapes vary:
            pad the items of each batch to these shapes, as
            ``tf.data.Dataset.padded_batch`` does: a nest like ``fn``'s result,
            one shape per array leaf, each dimension an int or ``None`` (the
            batch's largest), or ``None``: every leaf to the batch's largest.
            Giving it or ``padding_values`` turns padding on.  Without
            ``batch_size``, or with a ``fn`` that yields samples:
            ``ValueError``.  An item larger than its padded shape is a
            :class:`~mploader.PaddingDoesNotFit` (at the consumer, as the
            ``exc_type`` of a :class:`~mploader.WorkerError`), raised whatever
            ``on_error`` says.
        padding_values: The pad value: one scalar (a number, bool, ``str`` or
            ``bytes``) for every leaf, or a nest like the result; ``None`` pads
            with the dtype's zero.  Same requirements as ``padded_shapes``.  A
            value that is not one scalar, or (with ``output_signature``) does
            not fit its leaf's dtype: :class:`~mploader.PaddingDoesNotFit` here;
            otherwise found at the first batch.
        prefetch (int): Tasks in flight per worker, per thread (a task: one
            item, one batch, or a few tiny items sent together): results that
            wait, ready, in shared memory.  More smooths uneven item times, at
            the cost of memory.  Not an int >= 1: ``ValueError``.
        output_signature: For :meth:`dataset` only: a nest of
            ``tf.TensorSpec`` describing one element (with ``batch_size``, one
            batch), ``None`` for the dimensions that vary between elements.
            ``None``: inferred from the first result (``dataset()`` then runs
            ``fn`` once on the first item).  Every element is checked against
            it: a dtype or shape TensorFlow would cast silently is a
            :class:`~mploader.SignatureMismatch`.
        worker_init (callable or None): ``worker_init(worker_id)``, run once in
            each worker (``worker_id`` from 0 to ``num_workers - 1``, kept by a
            replacement worker) before its first item: open a handle, set a
            library's threads.  Its exception is a
            :class:`~mploader.WorkerError` whose ``index`` is ``None``.  Not
            callable, or not picklable: ``TypeError``.
        seed (int or None): The random state of every item, derived from
            ``(seed, epoch, index)``: :func:`~mploader.item_rng`, numpy's,
            Python's and torch's global generators and the random objects
            ``fn`` reaches (MONAI, albumentations transforms) are seeded per
            item, so the output is the same for any ``num_workers``; and the
            order of ``shuffle``.  ``None``: a seed drawn for this loader
            (kept by :meth:`state_dict`): each item still has its own random
            stream, different at each run.  Not an int: ``ValueError``.
        shuffle (bool): ``True``: each epoch reads the whole source in a new
            order, drawn from ``(seed, epoch)``.  Needs a source with ``len``
            and ``[]`` (a sequence or an int): ``TypeError`` otherwise.  Not a
            bool: ``ValueError``.
        shard: ``(index, count)``, or a ``tf.distribute.InputContext``: this
            loader reads only shard ``index`` of ``count`` of every epoch (one
            loader per host or per replica).  ``None``: the whole source.
            Needs a source with ``len`` and ``[]`` (``TypeError`` otherwise);
            with ``shuffle=True`` needs ``seed``, the same on every shard
            (``ValueError`` otherwise).  Not a pair with
            ``0 <= index < count``: ``ValueError``.
        samples_per_item (int or None): For a ``fn`` that yields samples: how
            many each item yields.  It makes ``len()`` and the dataset's
            cardinality known; an item that yields another count is a
            :class:`~mploader.WorkerError` naming it.  Needed by a ``fn`` that
            returns a generator without being a generator function (a callable
            object).  Not an int >= 1: ``ValueError``.
        prepare (callable or None): ``prepare(item)``, the deterministic stage
            (load, resample): run in the workers once per item and its result
            cached (see ``cache``); ``fn`` then gets ``prepare(item)``'s result,
            every epoch.  :func:`~mploader.item_rng` raises inside it.  Not
            callable, or not picklable: ``TypeError``.
        cache: Where ``prepare``'s results live: ``"memory"`` (shared memory of
            this machine, one copy for every worker, bounded by
            ``cache_bytes``; with the Ray backend: ``ValueError``), a
            directory path (one file per entry, kept across runs and shared by
            the processes that name it, keyed by ``prepare``'s code: see
            ``cache_version`` and ``cache_trust``), or ``None`` (``prepare``
            runs every time).  Given without ``prepare``, or not one of these:
            ``ValueError``.
        cache_bytes (int or None): The budget of ``cache="memory"``, in bytes;
            items beyond it are prepared again each time.  ``None``: half the
            memory available now (or the cgroup's room, when less), within a
            quarter of ``RLIMIT_AS``.  With another ``cache``, not an int >= 0,
            or more than the machine's memory or a quarter of ``RLIMIT_AS``:
            ``ValueError``.
        cache_version (str, int or None): Part of a directory cache's key: what
            the key cannot see (files ``prepare`` reads, compiled code, values
            that do not pickle).  A ``prepare`` whose code or values cannot be
            fingerprinted is a :class:`~mploader.CacheError` unless it is
            given; change it when that part changes.  Not a str, an int or
            ``None``: ``ValueError``.
        cache_trust (str): Who may have written a cache directory's entries
            (they are unpickled, and unpickling runs code): ``"user"``, only
            you (or root); ``"group"``, the members of the directory's group.
            A directory that others could write into is a
            :class:`~mploader.CacheError`.  Neither value: ``ValueError``.
        timeout (float or None): Seconds one item may run in a worker, from the
            moment the worker starts it (start-up and ``worker_init`` do not
            count): past it the worker is killed and the item is a
            :class:`~mploader.WorkerTimeout`, handled as ``on_worker_death``
            says.  ``None``: no limit.  Not > 0: ``ValueError``.
        on_error (str): ``"raise"``: an exception in ``fn`` or ``prepare`` is a
            :class:`~mploader.WorkerError`, raised where the item's element
            would come.  ``"skip"``: the item is
            logged, recorded in :attr:`skipped` and left out, and the pass
            goes on.  Neither value: ``ValueError``.
        on_worker_death (str): ``"raise"``: a worker that dies (a signal, an
            exit, the out-of-memory killer) is a :class:`~mploader.WorkerDied`
            naming the items it owed, and the other workers are stopped.
            ``"restart"``: the worker is replaced and its items run again; an
            item that has ended two workers is a ``WorkerDied`` (skipped with
            ``on_error="skip"``).  Neither value: ``ValueError``.
        close_timeout (float): Seconds :meth:`close` may take, also at the end
            of the ``with`` block, at garbage collection and at interpreter
            exit: the workers are asked to stop, then killed, within it.
            Not > 0: ``ValueError``.
        backend: What runs the workers: ``"process"``, local worker processes;
            a :class:`~mploader.RayBackend`, or ``"ray"`` (``RayBackend()``
            with its defaults), actors of a Ray cluster.  Anything else:
            ``ValueError``.  With Ray: ``ImportError`` when Ray is not
            installed, ``ConnectionError`` for a cluster nobody answers at,
            ``ValueError`` when no node can hold one worker.

    Attributes:
        config: The options, checked and frozen (a ``mploader.config.Config``):
            the properties below read it.

    Raises:
        ValueError: An option out of its range, or a combination the loader
            cannot keep (each argument above says which); the message names the
            option and the value.
        TypeError: ``fn``, ``prepare`` or ``worker_init`` not callable or not
            picklable; a ``source`` of no supported kind; ``shuffle`` or
            ``shard`` over a source without ``len`` and ``[]``.
        PaddingDoesNotFit: A pad value that is not one scalar, or does not fit
            the dtype ``output_signature`` gives its leaf.
        CacheError: A cache directory that others could write into (see
            ``cache_trust``), or a ``prepare`` that a directory cache cannot key
            (see ``cache_version``).
        ImportError: The Ray backend without Ray installed.
        ConnectionError: A Ray cluster that cannot be reached.

    Example:
        A loader of shuffled, seeded batches, fed to Keras::

            from mploader import MPLoader

            with MPLoader(load_and_augment, paths, batch_size=8,
                          shuffle=True, seed=0) as loader:
                model.fit(loader.dataset().prefetch(2), epochs=10)

        ``for batch in loader`` reads the same batches as numpy arrays,
        without TensorFlow.
    """

    def __init__(self, fn: Callable[[Any], Any], source: Any, *,
                 num_workers: int | None = None, threads_per_worker: int = 1,
                 copy_fn_per_thread: bool = True, ordered: bool = True,
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
                 close_timeout: float = DEFAULT_CLOSE_TIMEOUT_S, backend: Any = "process") -> None:
        self._source = Source(source)
        backend = backend_of(backend)
        self.config = config = Config.of(
            fn, self._source,
            num_workers=_default_workers(backend) if num_workers is None else num_workers,
            ordered=ordered, batch_size=batch_size, drop_remainder=drop_remainder,
            padded_shapes=padded_shapes, padding_values=padding_values, prefetch=prefetch,
            output_signature=output_signature, seed=seed, shuffle=shuffle, shard=shard,
            samples_per_item=samples_per_item, timeout=timeout, on_error=on_error,
            on_worker_death=on_worker_death, close_timeout=close_timeout,
            threads_per_worker=threads_per_worker, copy_fn_per_thread=copy_fn_per_thread,
            backend=backend)
        if config.threads_per_worker > 1 and config.seed is not None:
            warnings.warn(_THREADS_AND_GLOBAL_GENERATORS, RuntimeWarning, stacklevel=2)
        # The order's seed: given, or drawn once per loader (state_dict() keeps it);
        # the workers' too, so that with seed=None every item still has its own
        # random stream (random_state.py).
        self._epochs = Epochs(config.seed if config.seed is not None else secrets.randbits(63))
        # Tasks in flight per worker: prefetch for each of its threads.
        options = Options(ordered=ordered, prefetch=prefetch * config.threads_per_worker,
                          timeout=timeout, on_error=on_error, on_worker_death=on_worker_death,
                          batch_size=batch_size, drop_remainder=drop_remainder,
                          samples=config.samples, threads=config.threads_per_worker)
        fn_payload, fn_files = ship(fn, "fn")
        init_payload, init_files = ship(worker_init, "worker_init")
        prepare_payload, prepare_files = ship(prepare, "prepare")
        self._cache = _make_cache(prepare, cache, cache_bytes, cache_version, cache_trust,
                                  worker_init)
        bootstrap = Bootstrap(
            sys_path=tuple(os.path.abspath(p) if p == "" else p for p in sys.path),
            fn=fn_payload, worker_init=init_payload,
            code_files={**init_files, **prepare_files, **fn_files},
            seed=self._epochs.seed, seed_given=config.seed is not None,
            stack_batches=options.stacked, samples=config.samples,
            samples_per_item=config.samples_per_item, prepare=prepare_payload,
            padding=config.padding, threads=config.threads_per_worker,
            copy_fn_per_thread=config.copy_fn_per_thread,
            cache=self._cache.where if self._cache is not None else None,
            cache_trust=cache_trust,
            cache_recipe=(self._cache.recipe.to_json()
                          if self._cache is not None and self._cache.recipe is not None
                          else None))
        self._pipeline = Pipeline(config, options, self._source, self._epochs, bootstrap,
                                  self._cache)
        # The finalizer holds the pool's box and the cache, never the loader.
        self._finalizer = weakref.finalize(self, close_pool, self._pipeline.box,
                                           config.close_timeout, self._cache)
        self._pipeline.ensure_pool()  # start now: worker start-up overlaps the caller's set-up

    # Read-only views of the frozen config: an option cannot change under running workers.
    num_workers = _option("num_workers", "Worker processes (with Ray: actors); "
                          "``num_workers=None`` resolved to a number.")
    threads_per_worker = _option("threads_per_worker",
                                 "Threads running fn in each worker process.")
    batch_size = _option("batch_size", "Items (or samples) per batch, or None.")
    drop_remainder = _option("drop_remainder",
                             "Whether an epoch's last, short batch is left out.")
    padding = _option("padding", "``padded_shapes`` and ``padding_values`` as one "
                      "``mploader.layout.Padding``, or None without padding.")
    shuffle = _option("shuffle", "Whether each epoch reads the source in a new order, "
                      "drawn from (seed, epoch).")
    shard = _option("shard", "(index, count) of this loader's shard.")
    output_signature = _option("output_signature", "The ``output_signature`` given, or "
                               "None: ``dataset()`` then infers it from the first result.")
    samples_per_item = _option("samples_per_item", "The samples a generator ``fn`` yields "
                               "per item, or None when not given.")

    @property
    def pipeline(self) -> Pipeline:
        """The loader's pool and passes: the package's interface for its adapters."""
        return self._pipeline

    @property
    def skipped(self) -> list[Skipped]:
        """The items dropped by ``on_error="skip"`` (index, item, worker, exception)."""
        return self._pipeline.skipped

    def __iter__(self) -> Iterator[Any]:
        """Start a new pass over the source (a new epoch) on the same workers.

        The iterator keeps the loader alive while it is referenced, so
        ``for x in MPLoader(fn, items)`` runs to its end; the pass itself holds
        the loader only weakly (passes.py), so once the iterator and the loader
        are both dropped the workers stop at once."""
        return _Iteration(self, self._pipeline.iterate())

    def first_result(self) -> Any:
        """fn's result for the first source item that gives one (batched: the
        first batch); used to infer ``output_signature``."""
        return self._pipeline.first_result()[1]

    def __len__(self) -> int:
        """Elements of a whole epoch (items, or batches) for this loader's shard;
        TypeError when the source has no length."""
        n = self._source.length
        if n is None:
            raise TypeError("the source has no length")
        return self._pipeline.elements(n // self.shard[1])

    def epoch_report(self) -> dict[str, Any] | None:
        """Where the time of the newest pass (epoch) went so far: elements,
        seconds, the fraction the consumer waited on the workers, the workers'
        busy fraction, ``bound`` ("input", "consumer", "source" or "balanced")
        and a one-line hint, from its first element to its last.  None before
        any element."""
        return self._pipeline.epoch_report()

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
        with self._pipeline.lock:
            return self._epochs.state(self._fingerprint(), self._pipeline.new_progress,
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
        with self._pipeline.lock:
            self._epochs.set_epoch(int(epoch))

    def follow_epoch(self, epoch: int) -> None:
        """Keras's epoch ``epoch`` begins (keras_callback): the next pass runs at
        least epoch ``epoch``, never an order this loader already ran or is
        running (with ``steps_per_epoch`` over ``.repeat()`` passes and Keras's
        epochs do not line up)."""
        with self._pipeline.lock:
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
        with self._pipeline.lock:
            self._pipeline.abandon_current()
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
        pool = self._pipeline.box[0]
        return pool.pids() if pool is not None else []

    def stats(self) -> dict[str, Any]:
        """Throughput and where time goes: are the workers or the consumer the bottleneck?"""
        return self._pipeline.counters()

    def cache_info(self) -> dict[str, Any] | None:
        """Why a directory cache's entries hit or miss: this loader's key
        (``key``, hex) and ``recipe`` (what went into it: prepare's name, the
        digest of each function and class it reaches, library versions,
        ``cache_version``), ``entries`` (files in the directory, every key's),
        and ``others``: the other recipes found beside the entries, most
        recently used first, each with its ``differences`` from this one
        ("prepare's code changed in mymod:helper", "numpy 1.26.4 -> 2.1.0"), and
        ``item_code``: the classes and functions the items refer to, keyed too.
        For ``cache="memory"``: no key or recipe (see cache/index.py); None without
        a cache."""
        return self._cache.info() if self._cache is not None else None

    # -- lifecycle ------------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Stop every worker within ``timeout`` seconds (default ``close_timeout``).

        Idempotent and safe from any thread; in a forked child it leaves the
        parent's workers alone.
        """
        self._pipeline.close(self.config.close_timeout if timeout is None else timeout)

    def __enter__(self) -> "MPLoader":
        """The loader itself: ``with MPLoader(fn, source) as loader: ...``."""
        return self

    def __exit__(self, *exc_info: Any) -> None:
        """:meth:`close` the loader at the block's end, within ``close_timeout``;
        an exception of the block goes on."""
        self.close()


class _Iteration:
    """``iter(loader)``: the pass's values, holding the loader they come from.

    Why not the pass itself: a pass must not hold its loader (the loader holds
    its current pass, and that cycle would keep the workers running until the
    garbage collector runs), but an iterator nobody else's loader backs
    (``for x in MPLoader(...)``) must keep it, or the loader is collected, and
    closed, mid-loop."""

    __slots__ = ("_loader", "_values")

    def __init__(self, loader: MPLoader, values: Iterator[Any]) -> None:
        self._loader = loader
        self._values = values

    def __iter__(self) -> _Iteration:
        return self

    def __next__(self) -> Any:
        return next(self._values)

    def __getattr__(self, name: str) -> Any:
        """The pass's own: ``close()`` (``contextlib.closing``, a generator's
        close of its ``yield from``), ``last_index``, ``epoch``, ..."""
        return getattr(self._values, name)
