"""The worker pool and its lifecycle: start, watch, stop.

Data flow (one loader)::

    consumer (passes.py) --Task--> task pipe ----> worker 0..N-1 (worker.py)
         ^                                              | writes arrays into
         |                                              v its slot ring (slots.py)
         +----------- Result (small) <-- result pipe ---+

Actors:
- the consumer thread (whoever calls ``next()``: the main thread, or a
  TensorFlow thread under ``from_generator``) sends tasks, and waits in short
  slices on every result pipe *and* every worker's pidfd at once, so a worker's
  death wakes it like a result does;
- the spawner thread starts every worker process and lives as long as the pool
  (see NOTE [Shutdown], requirement 3);
- each worker runs ``worker.main``.

NOTE [Shutdown]
===============
Requirements:
1. ``close()`` is bounded in time whatever the workers do (idle, busy in C,
   busy in Python, ignoring SIGTERM), idempotent, safe from any thread, and a
   no-op in a process that is not the owner (a forked child must not touch its
   parent's workers).
2. Nothing outlives the owner: not if it ends normally without ``close()``,
   not on SIGTERM or SIGKILL, not on Ctrl-C, not if the loader is garbage
   collected.
3. No worker process is orphaned, and none holds shared memory by name.

Why not multiprocessing: its workers import the user's ``__main__`` (spawn,
forkserver) or inherit TensorFlow's threads (fork, which can hang in the
child's first TF op).  Why not join workers one by one with a timeout each
(PyTorch): a stuck pool of 16 then costs 16 timeouts.  Why not rely on the
generator's ``finally`` under ``from_generator``: TensorFlow does not run it
for an iterator still alive at interpreter exit.

What each actor does:
- ``close(timeout)`` escalates across *all* workers at once, against one
  deadline: (a) the pill: close every task pipe, so an idle worker reads EOF
  and exits 0.  A worker that still owes results is inside fn and would only
  read the pill after its item, whose result nobody wants now, so it gets
  SIGTERM at once; wait up to ``_PILL_GRACE_S`` for the idle ones; (b) SIGTERM
  whoever is left; wait up to ``_TERM_GRACE_S``; (c) SIGKILL whoever is left
  (a worker whose fn handles SIGTERM); reap.  Then close every descriptor.
  Signals go through pidfds, so a recycled pid is never hit.
- The owner's normal exit: an ``atexit`` hook closes every pool still open.
  It is registered after ``multiprocessing``'s (we import it first), so it
  runs before multiprocessing's own exit handlers.  (``dataset()`` turns off
  TensorFlow's injected prefetch for the same reason: a TensorFlow thread
  inside the generator when the interpreter finalizes needs the GIL, Python
  ends it, and the iterator's destructor waits for it forever; see
  tf_adapter.py.)  A loader that is garbage
  collected closes its pool through ``weakref.finalize``.  Both are backstops.
- The owner's death (SIGKILL, SIGTERM, a crash): each worker set
  ``PR_SET_PDEATHSIG`` = SIGKILL at start and checked that its parent was
  still the one that started it; the kernel kills it when the parent *thread*
  that spawned it ends.  That is why a dedicated spawner thread, which lives
  as long as the pool, starts every worker: ``from_generator`` calls the
  generator on TensorFlow threads that come and go.  As a portable fallback
  every worker watches a lifeline pipe whose only write end the owner holds:
  EOF means the owner is gone.
- Shared memory is anonymous (``memfd_create``, see slots.py): the kernel
  frees it with the last process that maps it, so no death leaves any.
"""
from __future__ import annotations

import atexit
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
from dataclasses import dataclass, field
from multiprocessing import connection
from multiprocessing.connection import Connection
from typing import Any, Callable

from . import messages
from .messages import Task
from .slots import SlotRing

_PILL_GRACE_S = 0.25  # an idle worker exits on EOF within milliseconds
_TERM_GRACE_S = 0.5   # SIGTERM's default action is immediate; this covers handlers
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                     "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS")
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Exited:
    """Event: a worker process ended (``returncode`` as subprocess reports it)."""
    returncode: int


@dataclass(frozen=True)
class Outstanding:
    """A task sent to a worker whose Result has not been read yet."""
    task: Task
    sent_at: float


@dataclass(eq=False)
class WorkerHandle:
    """The parent's end of one worker: its process, pipes and slots."""
    worker_id: int
    process: subprocess.Popen
    pidfd: int
    tasks: Connection | None       # None once the pill was given
    results: Connection
    lifeline: int                  # write end; never written, see NOTE [Shutdown]
    ring: SlotRing
    # Invariant: holds exactly the tasks sent and not yet answered, in send
    # order; the worker runs them in that order.
    outstanding: dict[tuple[int, int], Outstanding] = field(default_factory=dict)
    results_eof: bool = False
    exited: bool = False
    last_result_at: float = 0.0
    busy_s: float = 0.0

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
    """Owns the worker processes of one loader; see NOTE [Shutdown] above."""

    def __init__(self, num_workers: int, bootstrap: messages.Bootstrap,
                 slots_per_worker: int, max_leases: int) -> None:
        self.lock = threading.RLock()
        self.closing = False  # set before taking the lock in close(): consumers yield it
        self._owner_pid = os.getpid()
        self._bootstrap = messages.encode(bootstrap)
        self._slots = slots_per_worker
        self._max_leases = max_leases
        self._env = _worker_env()
        self._spawner = _Spawner()
        self.workers: list[WorkerHandle] = []
        self._poller = select.poll()
        self._watched: dict[int, WorkerHandle] = {}  # fd -> its worker, for wait()
        _open_pools.add(self)
        try:
            for worker_id in range(num_workers):
                self.workers.append(self._start_worker(worker_id))
        except BaseException:
            self.close()
            raise

    def _start_worker(self, worker_id: int) -> WorkerHandle:
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        life_r, life_w = os.pipe()
        ring = SlotRing(self._slots, self._max_leases, f"w{worker_id}")
        config = {"worker_id": worker_id, "parent_pid": os.getpid(), "task_fd": task_r,
                  "result_fd": result_w, "lifeline_fd": life_r, "slot_fds": ring.fds}
        try:
            process = self._spawner.spawn(
                args=[sys.executable, "-m", "mploader.worker", json.dumps(config)],
                pass_fds=(task_r, result_w, life_r, *ring.fds), env=self._env,
                stdin=subprocess.DEVNULL)
        except BaseException:
            for fd in (task_r, task_w, result_r, result_w, life_r, life_w):
                os.close(fd)
            ring.close()
            raise
        for fd in (task_r, result_w, life_r):  # the worker's ends
            os.close(fd)
        handle = WorkerHandle(worker_id, process, os.pidfd_open(process.pid),
                              Connection(task_w, readable=False),
                              Connection(result_r, writable=False), life_w, ring,
                              last_result_at=time.monotonic())
        self._watch(handle)
        try:
            handle.tasks.send_bytes(self._bootstrap)
        except BrokenPipeError:
            pass  # it died at start; its pidfd reports that as an Exited event
        return handle

    # -- used by the consumer (passes.py), always under self.lock -----------------

    def live(self) -> list[WorkerHandle]:
        return [h for h in self.workers if not h.exited]

    def send(self, handle: WorkerHandle, task: Task) -> None:
        try:
            data = messages.encode(task)
        except Exception as exc:
            raise TypeError(f"source index {_unpicklable(task)} cannot be pickled to "
                            f"send to a worker: {exc}") from exc
        handle.outstanding[task.key] = Outstanding(task, time.monotonic())
        try:
            handle.tasks.send_bytes(data)
        except BrokenPipeError:
            pass  # the worker died; wait() reports it with this task in flight

    def wait(self, timeout: float) -> list[tuple[WorkerHandle, Any]]:
        """Block up to ``timeout`` s for results or deaths: [(worker, message or Exited)].

        One ``poll`` over every result pipe and pidfd, registered once per
        worker (building a selector per call cost more than the rest of an
        item's bookkeeping).  A readable pipe yields one message per call.
        """
        events: list[tuple[WorkerHandle, Any]] = []
        for fd, _mask in self._poller.poll(timeout * 1000):
            handle = self._watched.get(fd)
            if handle is None or handle.exited:
                continue  # its pidfd and pipe were both ready: already handled
            if fd == handle.pidfd:
                # Results sent before a death are reported first, then the death.
                events.extend((handle, message) for message in self._drain(handle))
                events.append((handle, self._exited(handle)))
                continue
            try:
                events.append((handle, messages.decode(handle.results.recv_bytes())))
            except (EOFError, OSError):
                # The worker is exiting; its pidfd reports the exit.
                handle.results_eof = True
                self._unwatch(handle.results.fileno())
        return events

    def _watch(self, handle: WorkerHandle) -> None:
        for fd in (handle.results.fileno(), handle.pidfd):
            self._poller.register(fd, select.POLLIN)
            self._watched[fd] = handle

    def _unwatch(self, fd: int) -> None:
        if self._watched.pop(fd, None) is not None:
            self._poller.unregister(fd)

    def _exited(self, handle: WorkerHandle) -> Exited:
        handle.exited = True
        self._unwatch(handle.results.fileno())
        self._unwatch(handle.pidfd)
        return Exited(handle.process.wait())

    @staticmethod
    def _drain(handle: WorkerHandle) -> list[Any]:
        """Every message left in the pipe of a worker that has exited (no blocking:
        its write end is closed, so reads end in EOF)."""
        found = []
        while not handle.results_eof:
            try:
                found.append(messages.decode(handle.results.recv_bytes()))
            except (EOFError, OSError):
                handle.results_eof = True
        return found

    def kill(self, handle: WorkerHandle) -> int:
        """SIGKILL one worker and reap it; returns its returncode."""
        if not handle.exited:
            _signal(handle, signal.SIGKILL)
            return self._exited(handle).returncode
        return handle.process.wait()

    def replace(self, handle: WorkerHandle) -> WorkerHandle:
        """Start a new worker with the same id in place of a dead one."""
        self.kill(handle)
        _release(handle)
        fresh = self._start_worker(handle.worker_id)
        self.workers[self.workers.index(handle)] = fresh
        return fresh

    def pids(self) -> list[int]:
        return [h.pid for h in self.live()]

    # -- shutdown: see NOTE [Shutdown] ---------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker within ``timeout`` seconds; idempotent, any thread."""
        if os.getpid() != self._owner_pid:
            return  # a forked child: the workers belong to the parent
        self.closing = True
        with self.lock:
            if self._spawner is None:
                return
            deadline = time.monotonic() + timeout
            for handle in self.workers:
                _give_pill(handle)
                if handle.outstanding:
                    _signal(handle, signal.SIGTERM)
            steps: list[tuple[float, Callable[[WorkerHandle], None]]] = [
                (min(_PILL_GRACE_S, timeout / 4), lambda h: _signal(h, signal.SIGTERM)),
                (min(_TERM_GRACE_S, timeout / 4), lambda h: _signal(h, signal.SIGKILL)),
            ]
            for grace, escalate in steps:
                for handle in _wait_exit(self.workers, time.monotonic() + grace):
                    escalate(handle)
            _wait_exit(self.workers, deadline)
            for fd in list(self._watched):
                self._unwatch(fd)
            for handle in self.workers:
                _release(handle)
            self._spawner.stop()
            self._spawner = None
            _open_pools.discard(self)


def _unpicklable(task: Task) -> int:
    """The first source index of ``task`` whose item pickle refuses."""
    for index, item in zip(task.indices, task.items):
        try:
            messages.encode(item)
        except Exception:  # noqa: BLE001 - the culprit
            return index
    return task.indices[0]


def _give_pill(handle: WorkerHandle) -> None:
    if handle.tasks is not None:
        handle.tasks.close()
        handle.tasks = None


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


def _release(handle: WorkerHandle) -> None:
    """Close the parent's descriptors of a worker that has exited (or is killed)."""
    _give_pill(handle)
    if handle.pidfd >= 0:
        handle.process.poll()
        handle.results.close()
        for fd in (handle.pidfd, handle.lifeline):
            os.close(fd)
        handle.pidfd = handle.lifeline = -1
        handle.ring.close()


_open_pools: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()


@atexit.register
def _close_open_pools() -> None:
    """Backstop for loaders still open at interpreter exit (NOTE [Shutdown])."""
    for pool in list(_open_pools):
        pool.close()
