"""The local worker pool and its lifecycle: start, watch, stop.

The backend (backend.py) for worker processes on this host.

Data flow (one loader)::

    consumer (passes.py) --Task--> outbound buffer --> task pipe ----> worker 0..N-1
         ^                                                               | writes arrays into
         |                                                               v its arena (slots.py)
         +------ events (Delivered, Died) <-- wait() <-- result pipe ----+
                                                  ^---- pidfd (exit) ----+

Actors:
- the consumer thread (whoever calls ``next()``: the main thread, or a
  TensorFlow thread under ``from_generator``) queues tasks, and calls
  :meth:`WorkerPool.wait`, one ``poll`` over every result pipe, every pidfd
  and every task pipe with bytes still to send, so a worker's death wakes it
  like a result does;
- the spawner thread starts every worker process and lives as long as the pool
  (see NOTE [Shutdown], requirement 3);
- after a pass, a timer thread gives back the memory of slots left idle
  (slots.py), taking the lock only when it is free;
- each worker runs ``worker.main``.

Worker states (:class:`State`); every transition happens in this module::

    STARTING --Ready-->          READY
    STARTING, READY --timeout--> KILLED      (SIGKILL sent; exit not seen yet)
    any live --pidfd readable--> DEAD        (reaped; its last messages read)
    DEAD --replace() or close()--> RELEASED  (the parent's descriptors closed)

A worker that exits while STARTING (``worker_init`` raised, fn cannot be
unpickled, the interpreter crashed) makes the pool *failed*: every pass raises
that error (:meth:`WorkerPool.raise_if_failed`), since a replacement would
fail the same way.

NOTE [Shutdown]
===============
Requirements:
1. ``close()`` is bounded in time whatever the workers do (idle, busy in C,
   busy in Python, ignoring SIGTERM, holding a pipe through a child of their
   own), idempotent, safe from any thread, and a no-op in a process that is
   not the owner (a forked child must not touch its parent's workers).
2. Nothing outlives the owner: not if it ends normally without ``close()``,
   not on SIGTERM or SIGKILL, not on Ctrl-C, not if the loader is garbage
   collected.
3. No worker process is orphaned, and none holds shared memory by name.

The lock rule.  ``WorkerPool.lock`` is held only across bounded waits: every
descriptor the parent touches under it is non-blocking.  Tasks and the
Bootstrap go into a per-worker outbound buffer, written as far as the pipe
takes them and flushed when ``poll`` says the pipe is writable; results are
read as far as they have arrived; a dead worker's pipe is drained of what is
in it, never waited on for EOF (a child that fn started may hold it open);
reaping happens only once a pidfd says the process has exited.  So the lock
is held for at most one ``poll`` slice plus bookkeeping, and ``close()``,
timeouts and Ctrl-C get it within a slice, everywhere.  (The alternative a
reader would try, a blocking write under the lock, deadlocks as soon as a
task and its result are both larger than a pipe's buffer: the parent waits
for the worker to read while the worker waits for the parent to read.)

Why not multiprocessing: its workers import the user's ``__main__`` (spawn,
forkserver) or inherit TensorFlow's threads (fork, which can hang in the
child's first TF op).  Why not join workers one by one with a timeout each
(PyTorch): a stuck pool of 16 then costs 16 timeouts.  Why not rely on the
generator's ``finally`` under ``from_generator``: TensorFlow does not run it
for an iterator still alive at interpreter exit.

What each actor does:
- ``close(timeout)`` escalates across *all* workers at once, against one
  deadline: (a) the pill: close every task pipe, so an idle worker sees EOF
  and exits 0.  A worker that still owes results is inside fn and would only
  see the pill after its item, whose result nobody wants now, so it gets
  SIGTERM at once; wait up to ``_PILL_GRACE_S`` for the idle ones; (b) SIGTERM
  whoever is left; wait up to ``_TERM_GRACE_S``; (c) SIGKILL whoever is left
  (a worker whose fn handles SIGTERM); reap what has exited.  Then close every
  descriptor.  Signals go through pidfds, so a recycled pid is never hit.
  The loader calls it under its own lock, so no pass can start a new pool
  while one is being closed.
- The owner's normal exit: an ``atexit`` hook closes every pool still open.
  It is registered after ``multiprocessing``'s (we import it first), so it
  runs before multiprocessing's own exit handlers.  (``dataset()`` turns off
  TensorFlow's injected prefetch for the same reason: a TensorFlow thread
  inside the generator when the interpreter finalizes needs the GIL, Python
  ends it, and the iterator's destructor waits for it forever; see
  tf/adapter.py.)  A loader that is garbage collected closes its pool through
  ``weakref.finalize``; a pass holds its loader only weakly (the iterator
  ``iter(loader)`` holds it strongly), so ``del loader`` is enough once no
  iterator of it is left.  Both are backstops.
- The owner's death (SIGKILL, SIGTERM, a crash): each worker set
  ``PR_SET_PDEATHSIG`` = SIGKILL at start and checked that its parent was
  still the one that started it; the kernel kills it when the parent *thread*
  that spawned it ends.  That is why a dedicated spawner thread, which lives
  as long as the pool, starts every worker: ``from_generator`` calls the
  generator on TensorFlow threads that come and go.  (No thread in the
  worker waits on a pipe for the owner's end: a waiter on the task pipe is
  woken by every task, which cost a context switch per task; the package is
  Linux-only anyway, for memfd and pidfd.)
- Shared memory is anonymous (``memfd_create``, see slots.py): the kernel
  frees it with the last process that maps it, so no death leaves any.
"""
from __future__ import annotations

import atexit
import contextlib
import enum
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import connection
from typing import Any, Callable

from . import messages, resources
from .backend import Delivered, Died, Outstanding, Overdue
from .cache.index import MemoryCache
from .errors import MPLoaderError, WorkerDied, WorkerError
from .memory_deaths import SAMPLE_EVERY_S, MemoryWatch
from .messages import FrameReader, Ready, Result, StartFailed, Task
from .random_state import report_notes
from .slots import IDLE_SHRINK_S, PACKING, SlotRing

_PILL_GRACE_S = 0.25  # an idle worker exits on EOF within milliseconds
_TERM_GRACE_S = 0.5   # SIGTERM's default action is immediate; this covers handlers
_READ_BYTES = 64 << 10  # a pipe's default capacity; small enough to come from the heap, not fresh pages
_READS_PER_WAKE = 16  # bounds one wake's reading while a worker keeps writing
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                     "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS")
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ``python -m`` and ``-c`` put the working directory first on sys.path, where a
# stray module could shadow one the worker imports; the worker drops it first.
_WORKER_MAIN = ("import sys\nif sys.path[:1] == ['']: del sys.path[0]\n"
                "from mploader.worker import main\nsys.exit(main(sys.argv))")


class State(enum.Enum):
    """Where one worker is in its life; see the module docstring."""
    STARTING = "starting"
    READY = "ready"
    KILLED = "killed"
    DEAD = "dead"
    RELEASED = "released"


_LIVE = (State.STARTING, State.READY)


@dataclass(eq=False)
class WorkerHandle:
    """The parent's end of one worker: its process, pipes, arena and state."""
    worker_id: int
    process: subprocess.Popen
    pidfd: int
    task_fd: int                   # -1 once the pill was given
    result_fd: int                 # -1 once its EOF was read
    ring: SlotRing
    memory: MemoryWatch            # its RSS and memory cgroup, for a SIGKILL death
    state: State = State.STARTING
    # Invariant: holds exactly the tasks queued or sent and not yet answered,
    # in send order; the worker runs them in that order.
    outstanding: dict[tuple[int, int], Outstanding] = field(default_factory=dict)
    outbound: bytearray = field(default_factory=bytearray)  # framed, not yet written
    inbound: FrameReader = field(default_factory=FrameReader)
    killed_for: Overdue | None = None
    busy_s: float = 0.0            # its threads' time on tasks, summed
    cpu_s: float = 0.0             # its CPU time, as its last result said

    @property
    def pid(self) -> int:
        return self.process.pid


class _Spawner:
    """Starts processes from one long-lived thread (see NOTE [Shutdown])."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="mploader-spawner",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (request := self._requests.get()) is not None:
            kwargs, reply = request
            try:
                reply.put(subprocess.Popen(**kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                reply.put(exc)

    def spawn(self, **kwargs: Any) -> subprocess.Popen:
        reply: queue.SimpleQueue = queue.SimpleQueue()
        self._requests.put((kwargs, reply))
        outcome = reply.get()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def stop(self) -> None:
        self._requests.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in _THREAD_VARIABLES:  # one thread per worker unless the user says otherwise
        env.setdefault(name, "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
    return env


class WorkerPool:
    """Owns the worker processes of one loader; see the module docstring."""

    def __init__(self, num_workers: int, bootstrap: messages.Bootstrap,
                 slots_per_worker: int, max_leases: int, keep_free: int,
                 cache: MemoryCache | None = None, threads: int = 1) -> None:
        resources.check_workers(num_workers)
        # The lock rule (NOTE [Shutdown]): held only across bounded waits; every
        # descriptor touched under it is non-blocking.
        self.lock = threading.RLock()
        self.closing = False  # set before taking the lock in close(): consumers yield it
        self.owner_pid = os.getpid()
        self._failure: Callable[[], MPLoaderError] | None = None
        self._noted: set[str] = set()  # the workers' notes logged (Ready.notes), once each
        self._bootstrap = messages.frame(bootstrap)
        self._slots = slots_per_worker
        self._stride = resources.slot_stride(num_workers, slots_per_worker)
        self._max_leases = max_leases
        self._keep_free = keep_free
        self._threads = threads  # per worker: one status row each (slots.py)
        self._env = _worker_env()
        self._cache = cache  # the loader's shared-memory cache: it outlives this pool
        self._spawner: _Spawner | None = _Spawner()
        self._idle_timer: threading.Timer | None = None  # gives back slots after a pass
        self.workers: list[WorkerHandle] = []
        self._poller = select.poll()
        self._watched: dict[int, WorkerHandle] = {}  # fd -> its worker, for wait()
        self._sampled_at = 0.0  # the workers' memory, last sampled (memory_deaths.py)
        _open_pools.add(self)
        try:
            for worker_id in range(num_workers):
                self.workers.append(self._start_worker(worker_id))
        except BaseException:
            self.close()
            raise

    def _start_worker(self, worker_id: int) -> WorkerHandle:
        """Spawn one worker and watch its result pipe and pidfd."""
        assert self._spawner is not None
        handle = _spawn_worker(self._spawner, worker_id, SlotRing(
            self._slots, self._stride, self._max_leases, self._keep_free, f"w{worker_id}",
            self._threads),
            self._cache, self._env)
        for fd in (handle.result_fd, handle.pidfd):
            self._poller.register(fd, select.POLLIN)
            self._watched[fd] = handle
        self._queue(handle, self._bootstrap)
        return handle

    # -- used by the consumer (passes.py), always under self.lock -----------------

    def live(self) -> list[WorkerHandle]:
        """Workers that take tasks (STARTING or READY)."""
        return [h for h in self.workers if h.state in _LIVE]

    def any_pending(self) -> bool:
        """True while some worker may still produce an event."""
        return any(h.state in (*_LIVE, State.KILLED) for h in self.workers)

    def raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure()

    def has_room(self, handle: WorkerHandle, prefetch: int) -> bool:
        return (len(handle.outstanding) < prefetch and handle.ring.has_free()
                and handle.ring.may_run_ahead(prefetch))

    def send(self, handle: WorkerHandle, make_task: Callable[[int, int], Task],
             payload: Any) -> None:
        slot = handle.ring.acquire()
        assert slot is not None, "send() without has_room()"
        task = make_task(slot, handle.ring.capacity[slot])
        handle.outstanding[task.key] = Outstanding(task, payload)
        self._queue(handle, messages.frame(task))

    def owes(self, pass_id: int) -> bool:
        # Every worker, KILLED ones too: a timed-out item's death is still to come.
        return any(key[0] == pass_id for h in self.workers for key in h.outstanding)

    def shrink(self) -> None:
        """A pass ended: slots idle for IDLE_SHRINK_S give their memory back now,
        the rest once they have been, by a timer that calls this again while
        anything is left to give back (nothing else runs between passes).
        Not at once: the next pass, often the next epoch right after, needs the
        same slots, and refaulting them cost each worker a fresh slot's faults
        at that pass's start: 0.03-0.09 of the rate of a 1 s pass at 64 groups
        in flight, measured on a host where fresh memory is quick to fault in.
        Never waits for the lock: a pass holding it gives back idle slots
        itself, on each release."""
        if not self.lock.acquire(blocking=False):
            return
        try:
            if self.closing or self._spawner is None:
                return
            left = [handle.ring.shrink(idle_for=IDLE_SHRINK_S) for handle in self.live()]
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            self._idle_timer = None
            if any(left):
                self._idle_timer = threading.Timer(IDLE_SHRINK_S, self.shrink)
                self._idle_timer.name = "mploader-idle-slots"
                self._idle_timer.daemon = True  # never holds up the interpreter's exit
                self._idle_timer.start()
        finally:
            self.lock.release()

    def _queue(self, handle: WorkerHandle, data: bytes) -> None:
        handle.outbound += data
        self._flush(handle)

    def _flush(self, handle: WorkerHandle) -> None:
        """Write what the task pipe takes now; poll for writability while bytes remain."""
        if handle.outbound and handle.task_fd >= 0:
            try:
                del handle.outbound[:os.write(handle.task_fd, handle.outbound)]
            except BlockingIOError:
                pass
            except OSError:  # the worker died: its pidfd reports it, with its tasks
                handle.outbound.clear()
        if handle.task_fd < 0:
            return
        if handle.outbound:
            self._poller.register(handle.task_fd, select.POLLOUT)
            self._watched[handle.task_fd] = handle
        else:
            self._unwatch(handle.task_fd)

    def wait(self, timeout: float) -> list[Delivered | Died]:
        """Wait up to ``timeout`` s; return the events that arrived, state already updated.

        One ``poll`` over every result pipe, pidfd and task pipe with bytes to
        send (building a selector per call cost more than the rest of an
        item's bookkeeping).
        """
        events: list[Delivered | Died] = []
        if time.monotonic() - self._sampled_at >= SAMPLE_EVERY_S:
            self._sampled_at = time.monotonic()
            for handle in self.live():
                handle.memory.sample()
        for fd, _mask in self._poller.poll(timeout * 1000):
            handle = self._watched.get(fd)
            if handle is None or handle.state not in (*_LIVE, State.KILLED):
                continue  # its pidfd and pipe were both ready: already handled
            if fd == handle.task_fd:
                self._flush(handle)
            elif fd == handle.pidfd:
                events.extend(self._read(handle))
                events.append(self._on_exit(handle))
            else:
                events.extend(self._read(handle))
        return events

    def _read(self, handle: WorkerHandle) -> list[Delivered]:
        """The results among the messages that arrived from ``handle``."""
        events = (self._on_message(handle, message, size)
                  for message, size in _received(handle, self._unwatch))
        return [event for event in events if event is not None]

    def _on_message(self, handle: WorkerHandle, message: Any, size: int) -> Delivered | None:
        if isinstance(message, Result):
            sent = handle.outstanding.pop(message.key, None)
            handle.busy_s += message.busy_s
            handle.cpu_s = max(handle.cpu_s, message.cpu_s)
            handle.ring.grown(message.slot, message.capacity)
            return Delivered(handle, message, sent.payload if sent else None, size)
        if isinstance(message, Ready):
            if handle.state is State.STARTING:
                handle.state = State.READY
            report_notes(message.notes, self._noted)
            return None
        assert isinstance(message, StartFailed), message
        f, worker_id = message.failure, handle.worker_id
        self._failure = lambda: WorkerError(f.exc_type, f.message, f.traceback, worker_id, None,
                                            stage=f.stage)
        return None

    def _on_exit(self, handle: WorkerHandle) -> Died:
        """A live or KILLED worker's process has exited (its pidfd is readable)."""
        was = handle.state
        handle.memory.sample(dying=True)  # its cgroup, before it is reaped
        returncode = handle.process.wait()  # the pidfd said it exited: no blocking
        memory = "" if handle.killed_for else handle.memory.explain(returncode)
        lost = tuple(handle.outstanding.values())
        blamed = _blame(handle, lost)
        for sent in lost:
            handle.ring.release(sent.task.slot)
        handle.outstanding.clear()
        handle.outbound.clear()
        handle.state = State.DEAD
        for fd in (handle.result_fd, handle.pidfd, handle.task_fd):
            self._unwatch(fd)
        if was is State.STARTING and self._failure is None:
            worker_id, pid = handle.worker_id, handle.pid
            self._failure = lambda: WorkerDied(
                worker_id, pid, returncode, (),
                detail="it died before it was ready (starting the interpreter, "
                       "unpickling fn or running worker_init); its stderr says why")
        return Died(handle, returncode, lost, blamed, handle.killed_for, memory)

    def kill_overdue(self, limit: float) -> None:
        """SIGKILL every worker whose current item has run over ``limit`` s.

        Ready starts nothing: the clock is the item's own start, which the
        worker writes to its status page, so start-up and ``worker_init`` never
        count, and a chunk of tiny items gets ``limit`` per item.  The exit
        arrives as a Died event carrying the reason.
        """
        now = time.monotonic_ns()
        for handle in self.workers:
            if handle.state is State.READY and handle.outstanding:
                handle.killed_for = _overdue(handle, limit, now)
                if handle.killed_for is not None:
                    handle.state = State.KILLED
                    _signal(handle, signal.SIGKILL)

    def replace(self, handle: WorkerHandle) -> WorkerHandle:
        """Start a new worker with the same id in place of a DEAD one."""
        assert handle.state is State.DEAD, handle.state
        _release(handle)
        fresh = self._start_worker(handle.worker_id)
        self.workers[self.workers.index(handle)] = fresh
        return fresh

    def _unwatch(self, fd: int) -> None:
        if self._watched.pop(fd, None) is not None:
            self._poller.unregister(fd)

    def pids(self) -> list[int]:
        return [h.pid for h in self.live()]

    # -- shutdown: see NOTE [Shutdown] ---------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker within ``timeout`` seconds; idempotent, any thread."""
        if os.getpid() != self.owner_pid:
            return  # a forked child: the workers belong to the parent
        self.closing = True
        with self.lock:
            if self._spawner is None:
                return
            running = [h for h in self.workers if h.state is not State.RELEASED]
            try:
                _escalate(running, timeout)
            finally:
                # Also when a second Ctrl-C lands in the waits above: nothing
                # here blocks, and a worker still running is killed outright.
                for handle in running:
                    if handle.process.poll() is None:
                        _signal(handle, signal.SIGKILL)
                for fd in list(self._watched):
                    self._unwatch(fd)
                for handle in running:
                    handle.state = State.DEAD
                    handle.outstanding.clear()
                    _release(handle, unmap=True)
                self._spawner.stop()
                self._spawner = None
                if self._idle_timer is not None:
                    self._idle_timer.cancel()
                    self._idle_timer = None
                _open_pools.discard(self)


def _received(handle: WorkerHandle, unwatch: Callable[[int], None]
              ) -> Iterator[tuple[Any, int]]:
    """(message, size) of every whole message that has arrived from
    ``handle``; never blocks.  At EOF (the worker is exiting; its pidfd
    reports the exit) its result pipe is closed."""
    for _ in range(_READS_PER_WAKE):
        if handle.result_fd < 0:
            return
        try:
            data = os.read(handle.result_fd, _READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            unwatch(handle.result_fd)
            os.close(handle.result_fd)
            handle.result_fd = -1
            return
        yield from handle.inbound.feed(data)


def _spawn_worker(spawner: _Spawner, worker_id: int, ring: SlotRing,
                  cache: MemoryCache | None, env: dict[str, str]) -> WorkerHandle:
    """Start one worker process on ``ring``; on any failure, everything made
    here (the ring too) is closed again."""
    with contextlib.ExitStack() as undo:
        undo.callback(ring.close)
        task_r, task_w = os.pipe2(os.O_CLOEXEC)
        undo.callback(os.close, task_r)
        undo.callback(os.close, task_w)
        result_r, result_w = os.pipe2(os.O_CLOEXEC)
        undo.callback(os.close, result_r)
        undo.callback(os.close, result_w)
        config = {"worker_id": worker_id, "parent_pid": os.getpid(), "task_fd": task_r,
                  "result_fd": result_w, "arena_fd": ring.fd, "slots": len(ring.capacity),
                  "stride": ring.stride}
        inherited = (task_r, result_w, ring.fd)
        if cache is not None:  # the loader's, inherited by every worker
            config["cache"] = {"fd": cache.fd, "size": cache.size}
            inherited += (cache.fd,)
        process = spawner.spawn(
            args=[sys.executable, "-c", _WORKER_MAIN, json.dumps(config)],
            pass_fds=inherited, env=env, stdin=subprocess.DEVNULL)
        undo.callback(process.wait)
        undo.callback(process.kill)
        pidfd = os.pidfd_open(process.pid)
        undo.pop_all()
    for fd in (task_r, result_w):  # the worker's ends
        os.close(fd)
    ring.close_fd()
    for fd in (task_w, result_r):
        os.set_blocking(fd, False)
    return WorkerHandle(worker_id, process, pidfd, task_w, result_r, ring,
                        memory=MemoryWatch(process.pid))


def _overdue(handle: WorkerHandle, limit: float, now: int) -> Overdue | None:
    """The first item running on one of the worker's threads (a status row
    each) for over ``limit`` s, if any."""
    for status in handle.ring.statuses:
        key, index, started = status.read()
        elapsed = (now - started) / 1e9
        if index >= 0 and key in handle.outstanding and elapsed > limit:
            return Overdue(index, elapsed, limit)
    return None


def _blame(handle: WorkerHandle, lost: tuple[Outstanding, ...]
           ) -> tuple[tuple[tuple[int, int], int], ...]:
    """(task key, source index) of every item the worker was running when it
    died, from its status rows (one per thread): a task's every item if it
    died laying out the results; the item it was killed for first."""
    owed = {sent.task.key: sent.task.indices for sent in lost}
    blamed: list[tuple[tuple[int, int], int]] = []
    for status in handle.ring.statuses:
        key, index, _started = status.read()
        if key in owed and index >= 0:
            blamed.append((key, index))
        elif key in owed and index == PACKING:
            blamed.extend((key, i) for i in owed[key])
    overdue = handle.killed_for
    if overdue is not None:
        blamed.sort(key=lambda entry: entry[1] != overdue.index)
    return tuple(blamed)


def _escalate(running: list[WorkerHandle], timeout: float) -> None:
    """The pill, SIGTERM, SIGKILL, against one deadline (NOTE [Shutdown])."""
    deadline = time.monotonic() + timeout
    for handle in running:
        _give_pill(handle)
        if handle.outstanding:
            _signal(handle, signal.SIGTERM)
    steps: list[tuple[float, Callable[[WorkerHandle], None]]] = [
        (min(_PILL_GRACE_S, timeout / 4), lambda h: _signal(h, signal.SIGTERM)),
        (min(_TERM_GRACE_S, timeout / 4), lambda h: _signal(h, signal.SIGKILL)),
    ]
    for grace, escalate in steps:
        for handle in _wait_exit(running, time.monotonic() + grace):
            escalate(handle)
    _wait_exit(running, deadline)


def _give_pill(handle: WorkerHandle) -> None:
    if handle.task_fd >= 0:
        os.close(handle.task_fd)
        handle.task_fd = -1
    handle.outbound.clear()


def _signal(handle: WorkerHandle, signum: int) -> None:
    try:
        signal.pidfd_send_signal(handle.pidfd, signum)
    except ProcessLookupError:
        pass  # already exited


def _wait_exit(handles: list[WorkerHandle], deadline: float) -> list[WorkerHandle]:
    """Wait for every process to end until ``deadline``; return those still running."""
    running = [h for h in handles if h.process.poll() is None]
    while running and (left := deadline - time.monotonic()) > 0:
        connection.wait([h.pidfd for h in running], left)
        running = [h for h in running if h.process.poll() is None]
    return running


def _release(handle: WorkerHandle, unmap: bool = False) -> None:
    """DEAD -> RELEASED: close the parent's descriptors of a worker that has exited
    (or could not be stopped within the deadline: the kernel reaps it with us).
    ``unmap`` (the pool is closing, so no result of it will be handed out): give
    its arena back now, whatever results were still waiting."""
    _give_pill(handle)
    handle.process.poll()
    for fd in (handle.result_fd, handle.pidfd):
        if fd >= 0:
            os.close(fd)
    handle.result_fd = handle.pidfd = -1
    handle.ring.close(unmap=unmap)
    handle.state = State.RELEASED


_open_pools: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()


@atexit.register
def close_open_pools() -> None:
    """Backstop for loaders still open at interpreter exit (NOTE [Shutdown])."""
    for pool in list(_open_pools):
        pool.close()
