"""The worker process: a fresh interpreter that runs ``fn`` over tasks.

Started by ``pool.py`` as ``python -c ...`` running :func:`main` (never by
fork, never by multiprocessing), so it imports neither the user's ``__main__``
nor TensorFlow: only this module, numpy, cloudpickle and whatever ``fn``
itself needs.  Its life:

1. Tie its life to the parent's: ``PR_SET_PDEATHSIG`` = SIGKILL, then check that
   the parent did not die before that (see pool.py NOTE [Shutdown]).
2. Read the Bootstrap, unpickle ``fn``, run ``worker_init(worker_id)``; answer
   Ready, or StartFailed and exit.
3. Loop: read a Task; for each item, say on the status page which item runs
   since when (the parent times items and blames deaths from it), decode the
   item, run ``fn`` inside its item scope; lay the results out in the Task's
   slot, send a Result.  EOF on the task pipe means stop: exit 0.  A parent
   that is gone (a broken pipe) means exit quietly.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import inspect
import json
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from types import TracebackType
from typing import Any, Callable

from .cache.stores import DirectoryStore, SharedMemoryStore
from .errors import ResultNotCacheable, SignatureMismatch, UnsupportedResult, short_repr
from .layout import BatchRows, GroupLayout, pack_items
from .messages import (Bootstrap, Failure, Ready, Result, StartFailed, Task, decode_item,
                       item_bytes, read_frame, write_frame)
from .random_state import WorkerRandomness
from .shipping import land
from .slots import IDLE, PACKING, SlotWriter
from .tf.signature import SignatureCheck

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent(parent_pid: int) -> None:
    """Exit as soon as the parent is gone, even while fn is busy in C code.

    The kernel does it (the package is Linux-only: memfd, pidfd).  No thread
    watches a pipe for the parent's end: a waiter on the task pipe would be
    woken by every task written to it, one more context switch per task.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


_UNKNOWN_ITEM = object()  # an item that could not be decoded: the parent names it


def _failure(exc: BaseException, index: int | None, item: Any = _UNKNOWN_ITEM,
             sample: int | None = None, hint: str = "") -> Failure:
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return Failure(index=index, item="" if item is _UNKNOWN_ITEM else short_repr(item),
                   exc_type=name, message=str(exc) + hint,
                   traceback="".join(traceback.format_exception(exc.with_traceback(_user_frames(exc)))),
                   sample=sample)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _user_frames(exc: BaseException) -> TracebackType | None:
    """The traceback from the first frame outside mploader: the worker's own
    frames (the loop that called fn) tell the user nothing.  An error raised
    in mploader's frames only keeps them all: it is mploader's to explain."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        tb = tb.tb_next
    return tb if tb is not None else exc.__traceback__


_IN_PREPARE = " (raised in prepare)"
_WROTE_CACHED_INPUT = (
    " (fn wrote into its input, prepare's result: it is cached and shared read-only "
    "by every worker, so copy what fn changes first, e.g. np.array(x) or x.copy())")


class _TaskRunner:
    """Runs fn over a task's items and lays the results out in the slot."""

    def __init__(self, fn: Callable[[Any], Any], boot: Bootstrap, slots: SlotWriter,
                 randomness: WorkerRandomness, prepare: Callable[[Any], Any] | None = None,
                 store: Any = None, row: int = 0, cpu_origin: float = 0.0) -> None:
        self._fn = fn
        self._prepare = prepare
        self._store = store  # cache/stores.py: where prepare's results are kept
        self._random = randomness  # random_state.py: the scopes fn and prepare run in
        self._stack = boot.stack_batches
        self._samples = boot.samples
        self._samples_per_item = boot.samples_per_item
        self._padding = boot.padding
        self._slots = slots
        self._status = slots.status(row)  # this thread's row of the status page
        self._cpu_origin = cpu_origin  # the process's CPU time when it was ready
        self._checks: dict[bytes, SignatureCheck] = {}  # Task.group -> its check

    def run(self, task: Task) -> Result:
        if task.group:
            result = self._run_grouped(task)
        else:
            result = self._run_batched(task) if self._stack else self._run_items(task)
        cpu_s = time.process_time() - self._cpu_origin  # stats(): computing, or waiting?
        if self._store is not None:
            return dataclasses.replace(result, cache=self._store.report(), cpu_s=cpu_s,
                                       cached=self._store.take_entries())
        return dataclasses.replace(result, cpu_s=cpu_s)

    def idle(self, task: Task) -> None:
        """The task's result is sent: nothing of it runs (for the parent's timeouts)."""
        self._status.set(task.key, IDLE, 0)

    def _input(self, task: Task, position: int, index: int, item: Any) -> Any:
        """What fn gets: the item, or prepare's result for it, from the cache
        when it is there (prepare runs outside the item's random scope: it is
        the deterministic stage, seeded from the item itself, not its index or epoch)."""
        if self._prepare is None:
            return item
        found = None if self._store is None else self._store.fetch(task, position)
        if found is not None:
            return found
        try:
            with self._random.prepare(item_bytes(task, position)):
                prepared = self._prepare(item)
        except Exception as exc:
            raise _PrepareFailed from exc
        if self._store is None:  # cache=None: prepare runs every time
            return prepared
        try:
            return self._store.keep(index, task.keys[position], prepared)
        except ResultNotCacheable as exc:
            raise _PrepareFailed from exc

    def _failed(self, exc: Exception, index: int, item: Any, sample: int | None = None
                ) -> Failure:
        """The Failure of an item, saying when prepare raised, or fn wrote into
        a cached input."""
        if isinstance(exc, _PrepareFailed):
            return _failure(exc.__cause__, index, item, sample, _IN_PREPARE)
        hint = (_WROTE_CACHED_INPUT if self._prepare is not None and isinstance(exc, ValueError)
                and "read-only" in str(exc) else "")
        return _failure(exc, index, item, sample, hint)

    def _run_items(self, task: Task) -> Result:
        """Unbatched results, laid out one after another in the slot, each as
        soon as fn gives it: a result is read before fn runs again, so a fn
        that fills and returns one buffer every time (tiny items come many to
        a task) gives each item its own values, a result that cannot be sent
        fails its own item alone, and a worker never holds a generator fn's
        samples in its own memory (the samples before an error are kept)."""
        start = time.perf_counter()
        trees: list[Any] = []
        done: list[int] = []
        counts: list[int] = []
        failures: list[Failure] = []
        end, capacity = 0, task.capacity
        want = self._samples_per_item
        for position, index in enumerate(task.indices):
            self._status.set(task.key, index, time.monotonic_ns())
            item, count, failed = _UNKNOWN_ITEM, 0, False
            try:
                item = decode_item(task, position)
                given = self._input(task, position, index, item)
                with self._random.item(task.epoch, index):
                    value = self._fn(given)
                    if not self._samples and inspect.isgenerator(value):
                        raise UnsupportedResult(_NOT_A_GENERATOR_FN)
                    for sample in value if inspect.isgenerator(value) else (value,):
                        if count == want:
                            raise ValueError(f"fn yields more than samples_per_item={want} "
                                             "samples for this item")
                        (tree,), writes, new_end = pack_items([sample], end)
                        capacity = self._slots.write(task.slot, capacity, writes, new_end,
                                                     appending=self._samples or bool(trees))
                        trees.append(tree)
                        end, count = new_end, count + 1
                if want is not None and count != want:
                    raise ValueError(f"fn yielded {count} samples for this item, and "
                                     f"samples_per_item={want}")
            except Exception as exc:  # noqa: BLE001 - reported to the consumer
                failed = True
                failures.append(self._failed(exc, index, item, count if self._samples else None))
            if count or (self._samples and not failed):  # an item may yield no sample
                done.append(index)
                counts.append(count)
        return Result(key=task.key, slot=task.slot, capacity=capacity, nbytes=end,
                      tree=tuple(trees) if trees else None, indices=tuple(done),
                      failures=tuple(failures), busy_s=time.perf_counter() - start,
                      samples=tuple(counts) if any(c != 1 for c in counts) else ())

    def _run_grouped(self, task: Task) -> Result:
        """The items of a group (tf/grouping.py): each result checked against
        the dataset's signature here, as the consumer checks one element,
        and written into its row at once (layout.GroupLayout).  A failed item
        takes no row; a result that does not fit the signature ends the
        group, since the pass ends there (SignatureMismatch)."""
        start = time.perf_counter()
        check = self._checks.get(task.group)
        if check is None:
            spec = pickle.loads(task.group)
            check = self._checks[task.group] = SignatureCheck(spec.leaves, spec.origin)
        layout = GroupLayout(check.spec, len(task.indices))
        capacity = self._slots.write(task.slot, task.capacity, [], layout.nbytes)
        done: list[int] = []
        failures: list[Failure] = []
        for position, index in enumerate(task.indices):
            self._status.set(task.key, index, time.monotonic_ns())
            item = _UNKNOWN_ITEM
            try:
                item = decode_item(task, position)
                given = self._input(task, position, index, item)
                with self._random.item(task.epoch, index):
                    value = self._fn(given)
                if inspect.isgenerator(value):
                    raise UnsupportedResult(_NOT_A_GENERATOR_FN)
                writes = layout.row(value, len(done), functools.partial(check.check, index=index))
            except SignatureMismatch as exc:
                failures.append(_failure(exc, index, item))
                break
            except Exception as exc:  # noqa: BLE001 - reported to the consumer
                failures.append(self._failed(exc, index, item))
                continue
            self._slots.write(task.slot, capacity, writes, layout.nbytes)
            done.append(index)
        return Result(key=task.key, slot=task.slot, capacity=capacity, nbytes=layout.nbytes,
                      tree=layout.tree(len(done)) if done else None, indices=tuple(done),
                      failures=tuple(failures), busy_s=time.perf_counter() - start)

    def _run_batched(self, task: Task) -> Result:
        """A worker batch: each result goes into its row as fn gives it
        (layout.BatchRows); an item the batch cannot take fails alone, and
        the others are batched."""
        start = time.perf_counter()
        rows = BatchRows(self._slots, task.slot, task.capacity, len(task.indices), self._padding)
        done: list[int] = []
        items: dict[int, Any] = {}
        failures: list[Failure] = []
        for position, index in enumerate(task.indices):
            self._status.set(task.key, index, time.monotonic_ns())
            item = _UNKNOWN_ITEM
            try:
                item = items[index] = decode_item(task, position)
                given = self._input(task, position, index, item)
                with self._random.item(task.epoch, index):
                    value = self._fn(given)
                if inspect.isgenerator(value):
                    raise UnsupportedResult(
                        "fn returned a generator but is not a generator function, so its "
                        "batches were to be stacked in the workers: pass samples_per_item "
                        "to MPLoader for a fn that gives several samples per item")
                rows.add(value)
                done.append(index)
            except Exception as exc:  # noqa: BLE001 - reported to the consumer
                failures.append(self._failed(exc, index, item))
        self._status.set(task.key, PACKING, time.monotonic_ns())
        tree, nbytes = None, 0
        if done:
            try:
                tree, nbytes, rejected = rows.finish(tuple(done))
                failures.extend(_failure(exc, done[position], items[done[position]])
                                for position, exc in rejected.items())
                done = [index for position, index in enumerate(done) if position not in rejected]
            except Exception as exc:  # noqa: BLE001 - a result that cannot be sent
                failures.extend(_failure(exc, index, items[index]) for index in done)
                tree, done, nbytes = None, [], 0
        order = {index: position for position, index in enumerate(task.indices)}
        failures.sort(key=lambda failure: order[failure.index])  # raised in the epoch's order
        return Result(key=task.key, slot=task.slot, capacity=rows.capacity, nbytes=nbytes,
                      tree=tree, indices=tuple(done), failures=tuple(failures),
                      busy_s=time.perf_counter() - start)


_NOT_A_GENERATOR_FN = ("fn returned a generator but is not a generator function; pass "
                       "samples_per_item to MPLoader for a fn that gives several samples "
                       "per item")


class _PrepareFailed(Exception):
    """prepare raised (its exception is the cause)."""


def _cache_store(boot: Bootstrap, config: dict[str, Any]) -> Any:
    if boot.cache is None:
        return None
    if boot.cache != "memory":
        return DirectoryStore(boot.cache, boot.cache_trust)
    return SharedMemoryStore(config["cache"]["fd"], config["cache"]["size"])


def start(boot: Bootstrap, config: dict[str, Any], slots: Any
          ) -> tuple[list[_TaskRunner], Ready] | StartFailed:
    """Land fn, prepare and worker_init, and make the runner of each thread
    (``slots``: where results are laid out, a SlotWriter or any object with
    its ``status`` and ``write``); the Ready to answer, or the StartFailed
    that says which stage raised.  Shared by the worker process and any
    other backend's worker (ray_backend.py), so every worker seeds, wraps
    errors and skips the same way."""
    stage = "unpickling fn"
    try:
        fn = land(boot.fn, boot.code_files)
        prepare = None if boot.prepare is None else land(boot.prepare, boot.code_files)
        stage = "setting up the cache"
        store = _cache_store(boot, config)
        stage = "worker_init"
        init = None if boot.worker_init is None else land(boot.worker_init, boot.code_files)
        if boot.cache_recipe is not None:  # before worker_init: what it sets is its own key
            stage = "checking the cache directory's key"
            from .cache.keys import check_in_worker  # (only a directory cache's workers pay)
            check_in_worker(prepare, init, boot.cache_recipe, boot.cache)
            stage = "worker_init"
        if init is not None:
            init(config["worker_id"])
        stage = "finding the random objects of fn and prepare"
        randomness = WorkerRandomness(boot.seed, fn, prepare, boot.seed_given)  # after worker_init: what it built
    except BaseException as exc:  # noqa: BLE001 - reported, then exit
        return StartFailed(dataclasses.replace(_failure(exc, None), stage=stage))
    ready_at = time.process_time()
    if boot.threads == 1:
        return ([_TaskRunner(fn, boot, slots, randomness, prepare, store, 0, ready_at)],
                Ready(notes=randomness.notes))
    try:
        runners = _thread_runners(boot, slots, fn, prepare, randomness, store, ready_at)
    except BaseException as exc:  # noqa: BLE001 - reported, then exit
        return StartFailed(dataclasses.replace(
            _failure(exc, None), stage="copying fn and prepare for each thread"))
    return runners, Ready(notes=randomness.notes)


def _serve(config: dict[str, Any]) -> int:
    task_fd, result_fd = config["task_fd"], config["result_fd"]
    boot: Bootstrap = read_frame(task_fd)
    sys.path[:] = boot.sys_path
    started = start(boot, config, SlotWriter(config["arena_fd"], config["slots"],
                                             config["stride"]))
    if isinstance(started, StartFailed):
        write_frame(result_fd, started)
        return 1
    runners, ready = started
    write_frame(result_fd, ready)
    if boot.threads == 1:
        return _run_tasks(runners[0], task_fd, result_fd)
    return _run_threads(runners, task_fd, result_fd)


def _thread_runners(boot: Bootstrap, slots: SlotWriter, fn: Any, prepare: Any,
                    randomness: WorkerRandomness, store: Any, ready_at: float
                    ) -> list[_TaskRunner]:
    """The runner of each thread: the first with ``fn`` itself, the others
    each with its own copy of fn and prepare (unpickled again: third-party
    random transforms are not thread-safe, and each copy's random objects
    are seeded per item on its own thread) unless ``copy_fn_per_thread=False``;
    one lock around the cache store."""
    store = _LockedStore(store) if store is not None else None
    runners = []
    for row in range(boot.threads):
        if boot.copy_fn_per_thread and row > 0:
            fn = land(boot.fn, boot.code_files)
            prepare = None if boot.prepare is None else land(boot.prepare, boot.code_files)
            randomness = WorkerRandomness(boot.seed, fn, prepare, boot.seed_given)
        runners.append(_TaskRunner(fn, boot, slots, randomness, prepare, store, row, ready_at))
    return runners


class _LockedStore:
    """A cache store shared by the worker's threads, one call at a time."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return method(*args, **kwargs)
        return locked


def _run_tasks(runner: _TaskRunner, task_fd: int, result_fd: int) -> int:
    """One thread: run each task as it comes, until the stop pill (EOF)."""
    while True:
        try:
            task = read_frame(task_fd)
        except EOFError:  # the parent closed the task pipe: the stop pill
            return 0
        write_frame(result_fd, runner.run(task))
        runner.idle(task)


def _run_threads(runners: list[_TaskRunner], task_fd: int, result_fd: int) -> int:
    """threads_per_worker > 1: this thread reads tasks, each runner thread
    takes the next one and sends its result (one frame at a time); the stop
    pill lets every thread finish its task, then the worker exits.  A runner
    that meets a closed pipe (the parent is gone), or a bug of mploader's,
    ends the whole process: the parent sees a death, never a worker that
    quietly runs fewer threads."""
    tasks: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
    sending = threading.Lock()

    def serve(runner: _TaskRunner) -> None:
        try:
            while (task := tasks.get()) is not None:
                result = runner.run(task)
                with sending:
                    write_frame(result_fd, result)
                runner.idle(task)
        except (BrokenPipeError, EOFError):
            os._exit(0)
        except BaseException:  # noqa: BLE001 - a thread cannot fail alone
            traceback.print_exc()
            os._exit(1)

    threads = [threading.Thread(target=serve, args=(runner,), name=f"mploader-fn-{row}",
                                daemon=True) for row, runner in enumerate(runners)]
    for thread in threads:
        thread.start()
    while True:
        try:
            tasks.put(read_frame(task_fd))
        except EOFError:
            break
    for _ in threads:
        tasks.put(None)
    for thread in threads:
        thread.join()
    return 0


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    _die_with_parent(config["parent_pid"])
    # Ctrl-C in a terminal reaches the whole process group; the parent decides
    # what happens (it stops us), so a worker must not die with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return _serve(config)
    except (BrokenPipeError, EOFError):
        return 0  # the parent is gone: nobody to tell, and nothing to say on stderr
