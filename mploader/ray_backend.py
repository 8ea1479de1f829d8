"""The Ray backend: each worker a Ray actor, its results through Ray's object store.

``MPLoader(fn, items, backend=RayBackend(...))`` (or ``backend="ray"``) runs
the same pipeline as the local pool (passes.py: order, batching, padding,
errors, resume) through the seam of backend.py; only where ``fn`` runs
changes.  Ray is imported here, and only when a RayBackend is used, so
``import mploader`` never imports it.

Data flow (one loader)::

    consumer (passes.py) --Task--> actor.run.remote(task) ----> actor 0..N-1 (any node)
         ^                                                        | worker.start's runner:
         |                                                        v seeding, errors, skip
         +-- Delivered, Died <-- wait(): ray.wait <-- (Result, uint8 array) in the object store
                                               ^---- actor.lifeline(): fails when it dies

Each actor (:class:`_RayWorker`) runs ``worker.start`` and its runner, the
code of a local worker process: it lays a task's results out in its own
memory (:class:`_HeapSlots`, the actor's twin of a shared-memory slot) and
returns them as one uint8 array beside the ``Result``; the parent rebuilds
the values over that array (layout.unpack), zero-copy where Ray's object
store allows (the values are then read-only).  Tasks run in the order they
were sent: the actor's default concurrency group has one thread; a second
group answers ``status()`` (which item runs since when, for timeouts) and
holds ``lifeline()``, a call that never returns, so an actor's death is an
event even when it owes nothing.

What differs from the local pool, and why:
- A worker takes tasks once it is READY (its ``start()`` answered), not
  while STARTING: an actor that the cluster cannot place yet must not hold
  the pass's items.  Actors that wait to be placed are named in a warning,
  and a request that no node can ever meet is an error at once.
- Timeouts: the parent sees no status page.  It asks an actor's ``status()``
  once the actor's current task has run over the limit by the parent's
  clock, and kills it (``ray.kill``) if the item itself has.
- Blame: an actor that dies unasked leaves no status.  The item blamed is
  the first task it owed when that task holds one item (the actor runs its
  tasks in order, so that is the one it was running); for a chunk, none;
  and none when its node died (no item's fault: with "restart", items
  that were running on two nodes that died are not struck out).
- Deaths: an actor dies with its process, or its node; both end its calls
  with a Ray error, which is one ``Died`` event.  Actors are never detached:
  Ray kills them with the driver, even after SIGKILL.
- ``close()`` kills every actor (``ray.kill``) and waits, within its bound,
  until each one's lifeline says it is gone; if this process started the
  local Ray instance (``address=None``, none running), the last pool closed
  shuts it down.
"""
from __future__ import annotations

import atexit
import logging
import math
import os
import pickle
import signal
import socket
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .backend import Delivered, Died, Outstanding, Overdue
from .errors import MPLoaderError, WorkerDied, WorkerError
from .layout import Write, copy_writes, unpack
from .messages import PROTOCOL, Bootstrap, Ready, Result, StartFailed, Task
from .pool import State
from .random_state import report_notes
from .slots import HEADER_BYTES, IDLE, Status

log = logging.getLogger("mploader")

INSTALL_HINT = "pip install mploader[ray]"
_CONNECT_CHECK_S = 5.0  # a TCP connect to the cluster's address, before ray.init
_PLACEMENT_WARNING_S = 10.0  # an actor not placed after this long is named in a warning
_ASK_AGAIN_S = 0.05  # an actor between items when asked: ask again after this
_NO_BYTES = np.empty(0, np.uint8)
_NODE_DIED = "its node has died"  # Ray's words for an actor lost with its node


@dataclass(frozen=True)
class RayBackend:
    """Run the loader's workers as actors of a Ray cluster.

    ``address``: the cluster (``"host:6379"``, ``"ray://host:10001"``); None
    uses the Ray connection this process already has, else ``RAY_ADDRESS``,
    else a cluster started on this machine with ``ray start``, else starts a
    local one (shut down again when the loader closes).  ``num_cpus`` and
    ``resources``: what each actor reserves, so Ray places at most that many
    actors per node (``resources={"preprocess": 1}`` keeps them on nodes
    started with ``--resources='{"preprocess": 8}'``).  ``runtime_env``: Ray's
    runtime environment of the actors (``{"py_modules": [...]}``, pip
    packages, environment variables).
    """
    address: str | None = None
    num_cpus: float = 1
    resources: dict[str, float] | None = field(default=None, hash=False)
    runtime_env: dict[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.address is not None and not (isinstance(self.address, str) and self.address):
            raise ValueError(f"RayBackend address must be a non-empty str or None, "
                             f"not {self.address!r}")
        if (not isinstance(self.num_cpus, (int, float)) or isinstance(self.num_cpus, bool)
                or not math.isfinite(self.num_cpus) or self.num_cpus < 0):
            raise ValueError(f"RayBackend num_cpus must be a number >= 0, not {self.num_cpus!r}")
        if self.resources is not None and not (
                isinstance(self.resources, dict)
                and all(isinstance(k, str) and isinstance(v, (int, float)) and v >= 0
                        for k, v in self.resources.items())):
            raise ValueError("RayBackend resources must be a dict of resource name -> "
                             f"amount >= 0, not {self.resources!r}")
        if self.runtime_env is not None and not isinstance(self.runtime_env, dict):
            raise ValueError(f"RayBackend runtime_env must be a dict or None, "
                             f"not {self.runtime_env!r}")

    def needs(self) -> dict[str, float]:
        """What one actor reserves, by Ray resource name."""
        return {"CPU": float(self.num_cpus), **{k: float(v) for k, v in
                                                 (self.resources or {}).items()}}

    def default_workers(self) -> int:
        """``num_workers=None``: as many actors as the cluster's nodes hold."""
        fit = _placeable(_connect(self.address).nodes(), self.needs())
        return max(1, min(sum(fit), 1024))

    def start(self, num_workers: int, bootstrap: Bootstrap, slots_per_worker: int) -> RayPool:
        """The running backend: ``num_workers`` actors (see the module docstring)."""
        return RayPool(self, num_workers, bootstrap, slots_per_worker)


# -- the connection ---------------------------------------------------------------------

_connection_lock = threading.Lock()
_started_here = False  # this process started the local Ray instance it uses
_hook_registered = False


def import_ray() -> Any:
    """The ray module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"the Ray backend needs Ray, which cannot be imported here "
                          f"({exc}); install it with: {INSTALL_HINT}") from exc
    return ray


def _check_reachable(address: str) -> None:
    """A clear error, naming ``address``, for a cluster nobody answers at,
    before Ray's own retries (which take long and say less)."""
    rest = address.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local", or a form Ray itself will judge
    try:
        socket.create_connection((host.strip("[]"), int(port)), _CONNECT_CHECK_S).close()
    except OSError as exc:
        raise ConnectionError(
            f"cannot reach the Ray cluster at {address!r}: {exc.strerror or exc}.  Is its "
            "head node running (`ray start --head` there), is the address and port "
            "right, and can this machine reach it?") from exc


def _connect(address: str | None) -> Any:
    """The ray module, connected: to the connection this process already has,
    else to ``address`` or RAY_ADDRESS, else to a local instance (started
    here if none runs)."""
    global _started_here, _hook_registered
    ray = import_ray()
    with _connection_lock:
        if not ray.is_initialized():
            target = address or os.environ.get("RAY_ADDRESS") or None
            if target is not None:
                _check_reachable(target)
            try:
                ray.init(address=target, logging_level=logging.WARNING,
                         configure_logging=False)
            except Exception as exc:
                where = f"the Ray cluster at {target!r}" if target else "a local Ray instance"
                raise ConnectionError(f"cannot connect to {where}: {type(exc).__name__}: "
                                      f"{exc}") from exc
            node = getattr(ray._private.worker.global_worker, "node", None)
            _started_here = bool(node is not None and node.head)
        if not _hook_registered:  # after ray.init's own: so it runs before Ray shuts down
            atexit.register(close_open_pools)
            _hook_registered = True
    return ray


def _disconnect(ray: Any) -> None:
    """Shut down the local Ray instance this process started, once no pool uses it."""
    global _started_here
    with _connection_lock:
        if _started_here and not _open_pools and ray.is_initialized():
            ray.shutdown()
            _started_here = False


def _placeable(nodes: list[dict[str, Any]], needs: dict[str, float]) -> list[int]:
    """How many actors needing ``needs`` each live node holds, at most."""
    wanted = {name: amount for name, amount in needs.items() if amount > 0}
    fit = []
    for node in nodes:
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        fit.append(min((int(have.get(name, 0.0) // amount) for name, amount in wanted.items()),
                       default=1 << 20))
    return fit


def _check_placeable(ray: Any, backend: RayBackend, num_workers: int) -> None:
    """An error when no node can ever hold one actor; a warning when the
    cluster holds fewer than ``num_workers`` (the others wait)."""
    needs = backend.needs()
    nodes = ray.nodes()
    fit = _placeable(nodes, needs)
    if not fit or max(fit) == 0:
        largest = [{k: v for k, v in n.get("Resources", {}).items() if not k.startswith("node:")}
                   for n in nodes if n.get("Alive")]
        raise ValueError(
            f"no node of the Ray cluster can hold one worker, which needs {needs} "
            f"(RayBackend num_cpus={backend.num_cpus}, resources={backend.resources}); its "
            f"nodes have {largest}.  Ask for less, or add a node that has it "
            "(`ray start --address=... --num-cpus=N --resources='{...}'`)")
    if sum(fit) < num_workers:
        log.warning("the Ray cluster holds at most %d workers needing %s each, and "
                    "num_workers=%d: %d of them wait for resources (the loader runs on "
                    "those placed)", sum(fit), needs, num_workers, num_workers - sum(fit))


# -- the actor's side --------------------------------------------------------------------

class _HeapSlots:
    """An actor's result memory: a growing buffer per slot, and a status page,
    in the actor's own memory (what worker.py's runner writes into; its
    SlotWriter does the same over a shared-memory arena)."""

    def __init__(self) -> None:
        self._header = bytearray(HEADER_BYTES)
        self._regions: dict[int, np.ndarray] = {}

    def status(self, row: int) -> Status:
        return Status(self._header, row)

    def write(self, slot: int, capacity: int, writes: list[Write], nbytes: int,
              appending: bool = False) -> int:
        """Copy ``writes`` into ``slot``, growing it (keeping what an earlier
        sample of the same task wrote: ``appending``); returns its size."""
        region = self._regions.get(slot)
        if region is None or region.size < nbytes:
            grown = np.empty(max(nbytes, 2 * region.size if region is not None else 0), np.uint8)
            if appending and region is not None:
                grown[:region.size] = region
            region = self._regions[slot] = grown
        copy_writes(region, writes)
        return region.size

    def region(self, slot: int, nbytes: int) -> np.ndarray:
        """The bytes of the result just laid out in ``slot`` (Ray copies them
        into its object store when the call returns, before the next task)."""
        return self._regions[slot][:nbytes] if nbytes else _NO_BYTES


class _RayWorker:
    """One worker, as a Ray actor: worker.start's runner over the tasks sent."""

    def __init__(self, worker_id: int, bootstrap: Bootstrap) -> None:
        self._worker_id = worker_id
        self._boot = bootstrap
        self._slots = _HeapSlots()
        self._runner: Any = None
        self._status = self._slots.status(0)
        self._status.set((0, 0), IDLE, 0)
        self._end = threading.Event()

    def start(self) -> tuple[Ready | StartFailed, int, str]:
        """Land fn and run worker_init: (Ready or StartFailed, pid, node id).

        The driver's import path is added where it exists on this node (a
        local cluster, a shared file system); elsewhere runtime_env provides."""
        import ray
        for path in self._boot.sys_path:
            if path not in sys.path and os.path.isdir(path):
                sys.path.append(path)
        from .worker import start
        started = start(self._boot, {"worker_id": self._worker_id}, self._slots)
        node = ray.get_runtime_context().get_node_id()
        if isinstance(started, StartFailed):
            return started, os.getpid(), node
        runners, ready = started
        self._runner = runners[0]
        return ready, os.getpid(), node

    def run(self, task: Task) -> tuple[Result, np.ndarray]:
        result = self._runner.run(task)
        self._runner.idle(task)
        return result, self._slots.region(task.slot, result.nbytes)

    def status(self) -> tuple[tuple[int, int], int, float]:
        """(task key, source index or IDLE/PACKING, seconds it has run)."""
        key, index, started = self._status.read()
        return key, index, (time.monotonic_ns() - started) / 1e9

    def lifeline(self) -> None:
        """Never returns: its call fails when the actor is gone."""
        self._end.wait()


_ACTOR_CLASSES: dict[int, Any] = {}


def _actor_class(ray: Any) -> Any:
    """The Ray actor class of _RayWorker (made once per ray module)."""
    made = _ACTOR_CLASSES.get(id(ray))
    if made is None:
        made = _ACTOR_CLASSES[id(ray)] = ray.remote(
            max_restarts=0, concurrency_groups={"status": 1, "life": 1})(_RayWorker)
    return made


# -- the parent's side -------------------------------------------------------------------

class _Results:
    """A worker's result memory, as the parent sees it (backend.ResultMemory):
    the arrays fetched from the object store, by slot.  A slot is taken from
    send() until the result is opened or released; views of a result keep
    its object-store buffer, not its slot."""

    def __init__(self, count: int) -> None:
        self._free = list(range(count - 1, -1, -1))
        self._arrays: dict[int, np.ndarray] = {}
        self.capacity = [0] * count
        self.leased = 0  # stats(): views never hold a slot here

    def has_free(self) -> bool:
        return bool(self._free)

    def acquire(self) -> int | None:
        return self._free.pop() if self._free else None

    def fetched(self, slot: int, array: np.ndarray, capacity: int) -> None:
        self._arrays[slot] = array
        self.capacity[slot] = capacity

    def open_result(self, slot: int, nbytes: int, tree: Any, copy: bool = False) -> Any:
        region = self._arrays.pop(slot, _NO_BYTES)
        self.release(slot)
        return unpack(tree, region if nbytes else _NO_BYTES, copy=copy or not nbytes)

    def release(self, slot: int) -> None:
        self._arrays.pop(slot, None)
        if slot not in self._free:
            self._free.append(slot)

    def reserved_bytes(self) -> int:
        return sum(array.nbytes for array in self._arrays.values())


@dataclass(eq=False)
class RayWorkerHandle:
    """The parent's end of one actor."""
    worker_id: int
    actor: Any
    ring: _Results
    started: Any                  # the ObjectRef of its start()
    lifeline: Any                 # the ObjectRef of its lifeline(): fails when it dies
    created_at: float
    state: State = State.STARTING
    pid: int = 0
    node: str = ""
    # Invariant: the tasks sent and not answered, in send order (the actor's order).
    outstanding: dict[tuple[int, int], Outstanding] = field(default_factory=dict)
    refs: dict[tuple[int, int], Any] = field(default_factory=dict)  # key -> run()'s ObjectRef
    killed_for: Overdue | None = None
    busy_s: float = 0.0
    cpu_s: float = 0.0
    busy_since: float = 0.0       # (parent's clock) its current task began, at the latest
    asked: Any = None             # a status() call in flight
    ask_after: float = 0.0
    warned: bool = False          # named in the placement warning


class RayPool:
    """The backend of one loader on Ray (backend.py's contract; see the module
    docstring).  Every method but close() runs under ``lock``."""

    def __init__(self, backend: RayBackend, num_workers: int, bootstrap: Bootstrap,
                 slots_per_worker: int) -> None:
        self.lock = threading.RLock()
        self.closing = False
        self.owner_pid = os.getpid()
        self.workers: list[RayWorkerHandle] = []
        self._backend = backend
        self._slots = slots_per_worker
        self._failure: Callable[[], MPLoaderError] | None = None
        self._noted: set[str] = set()
        self._closed = False
        self._limit = math.inf  # the item timeout kill_overdue was last given
        self._ray = ray = _connect(backend.address)
        _open_pools.add(self)
        try:
            _check_placeable(ray, backend, num_workers)
            self._class = _actor_class(ray).options(
                num_cpus=backend.num_cpus, resources=backend.resources or None,
                runtime_env=backend.runtime_env)
            self._boot = ray.put(bootstrap)
            for worker_id in range(num_workers):
                self.workers.append(self._start_worker(worker_id))
        except BaseException:
            self.close()
            raise

    def _start_worker(self, worker_id: int) -> RayWorkerHandle:
        actor = self._class.remote(worker_id, self._boot)
        return RayWorkerHandle(worker_id, actor, _Results(self._slots), actor.start.remote(),
                               actor.lifeline.options(concurrency_group="life").remote(),
                               time.monotonic())

    # -- used by the consumer (passes.py), under self.lock ------------------------------

    def live(self) -> list[RayWorkerHandle]:
        return [h for h in self.workers if h.state in (State.STARTING, State.READY)]

    def any_pending(self) -> bool:
        return any(h.state in (State.STARTING, State.READY, State.KILLED) for h in self.workers)

    def raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure()

    def has_room(self, handle: RayWorkerHandle, prefetch: int) -> bool:
        return (handle.state is State.READY and len(handle.outstanding) < prefetch
                and handle.ring.has_free())

    def send(self, handle: RayWorkerHandle, make_task: Callable[[int, int], Task],
             payload: Any) -> None:
        slot = handle.ring.acquire()
        assert slot is not None, "send() without has_room()"
        task = make_task(slot, handle.ring.capacity[slot])
        if not handle.outstanding:
            handle.busy_since = time.monotonic()
        handle.outstanding[task.key] = Outstanding(task, payload)
        handle.refs[task.key] = handle.actor.run.remote(task)

    def owes(self, pass_id: int) -> bool:
        return any(key[0] == pass_id for h in self.workers for key in h.outstanding)

    def shrink(self) -> None:
        """Nothing to give back: a result's memory goes when it is opened."""

    def pids(self) -> list[int]:
        return [h.pid for h in self.live() if h.pid]

    def wait(self, timeout: float) -> list[Delivered | Died]:
        """The events that arrive within ``timeout`` s: one ``ray.wait`` over
        every call the parent waits on (starts, results, status answers,
        lifelines)."""
        watched = [ref for h in self.workers for ref in self._watched(h)]
        if not watched:
            time.sleep(timeout)
            return []
        ray = self._ray
        found, _ = ray.wait(watched, num_returns=1, timeout=timeout)
        if found:
            found, _ = ray.wait(watched, num_returns=len(watched), timeout=0)
        _warn_unplaced(ray, self._backend, self.workers)
        ready = set(found)
        events: list[Delivered | Died] = []
        for handle in list(self.workers):
            if handle.state not in (State.STARTING, State.READY, State.KILLED):
                continue
            if handle.state is State.STARTING and handle.started in ready:
                self._on_started(handle)
            if handle.asked is not None and handle.asked in ready:
                self._on_answer(handle)
            events.extend(self._deliver(handle, ready))
        return events

    def _watched(self, handle: RayWorkerHandle) -> list[Any]:
        if handle.state not in (State.STARTING, State.READY, State.KILLED):
            return []
        refs = [handle.lifeline, *handle.refs.values()]
        if handle.state is State.STARTING and handle.started is not None:
            refs.append(handle.started)
        if handle.asked is not None:
            refs.append(handle.asked)
        return refs

    def _on_started(self, handle: RayWorkerHandle) -> None:
        try:
            answer, handle.pid, handle.node = self._ray.get(handle.started)
        except Exception as exc:  # noqa: BLE001 - the actor could not start: see _on_death
            handle.started = None
            self._fail_start(handle, exc)
            return
        if isinstance(answer, StartFailed):
            f, worker_id = answer.failure, handle.worker_id
            self._failure = lambda: WorkerError(f.exc_type, f.message, f.traceback, worker_id,
                                                None, stage=f.stage)
            self._ray.kill(handle.actor, no_restart=True)  # its lifeline then reports it
            return
        handle.state = State.READY
        report_notes(answer.notes, self._noted)

    def _fail_start(self, handle: RayWorkerHandle, exc: BaseException) -> None:
        if self._failure is None:
            worker_id, cause = handle.worker_id, _cause(exc)
            self._failure = lambda: WorkerDied(
                worker_id, 0, None, (),
                detail=f"its Ray actor died before it was ready ({cause}); is mploader "
                       "installed on every node, or in the actors' runtime_env?")

    def _on_answer(self, handle: RayWorkerHandle) -> None:
        """A status() answer: kill the actor if its item is over the limit."""
        asked, handle.asked = handle.asked, None
        try:
            key, index, elapsed = self._ray.get(asked)
        except Exception:  # noqa: BLE001 - it died: its lifeline reports it
            return
        limit = self._limit
        if index >= 0 and key in handle.outstanding and handle.state is State.READY:
            if elapsed > limit:
                self._kill(handle, Overdue(index, elapsed, limit))
            else:  # ask again when this item would be over
                handle.ask_after = time.monotonic() + (limit - elapsed)
        else:
            handle.ask_after = time.monotonic() + _ASK_AGAIN_S

    def _deliver(self, handle: RayWorkerHandle, ready: set[Any]) -> list[Delivered | Died]:
        """Results that arrived, in the actor's order, then its death if it died."""
        events: list[Delivered | Died] = []
        for key in list(handle.outstanding):
            ref = handle.refs[key]
            if ref not in ready:
                break
            try:
                result, region = self._ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - its actor died (or run() broke)
                events.append(self._on_death(handle, exc))
                return events
            sent = handle.outstanding.pop(key)
            del handle.refs[key]
            handle.busy_s += result.busy_s
            handle.cpu_s = max(handle.cpu_s, result.cpu_s)
            handle.ring.fetched(result.slot, region, result.capacity)
            handle.busy_since = time.monotonic()
            events.append(Delivered(handle, result, sent.payload,
                                    len(pickle.dumps(result, PROTOCOL))))
        if not handle.outstanding and handle.lifeline in ready:
            try:
                self._ray.get(handle.lifeline)
            except Exception as exc:  # noqa: BLE001 - the only way it ends
                events.append(self._on_death(handle, exc))
        return events

    def _on_death(self, handle: RayWorkerHandle, exc: BaseException) -> Died:
        was = handle.state
        lost = tuple(handle.outstanding.values())
        blamed = _blame(self._ray, handle, lost, exc)
        for sent in lost:
            handle.ring.release(sent.task.slot)
        handle.outstanding.clear()
        handle.refs.clear()
        handle.asked = None
        handle.state = State.DEAD
        _kill_quietly(self._ray, handle.actor)  # run() broke, the actor still alive: end it
        if was is State.STARTING:
            self._fail_start(handle, exc)
        # Ray does not say how the process ended (its text lists possible
        # causes): no returncode unless we killed it; the detail is Ray's words.
        returncode = -signal.SIGKILL if handle.killed_for else None
        detail = "" if handle.killed_for else f"its Ray actor on node {handle.node[:12]} " \
                                              f"ended: {_cause(exc)}"
        return Died(handle, returncode, lost, blamed, handle.killed_for, detail)

    def kill_overdue(self, limit: float) -> None:
        """Ask each actor whose current task has run over ``limit`` s which
        item runs since when; the answer (in wait()) kills it if that item has."""
        self._limit = limit
        now = time.monotonic()
        for handle in self.workers:
            if (handle.state is State.READY and handle.outstanding and handle.asked is None
                    and now - handle.busy_since > limit and now >= handle.ask_after):
                handle.asked = handle.actor.status.options(concurrency_group="status").remote()

    def _kill(self, handle: RayWorkerHandle, overdue: Overdue) -> None:
        handle.killed_for = overdue
        handle.state = State.KILLED
        _kill_quietly(self._ray, handle.actor)

    def replace(self, handle: RayWorkerHandle) -> RayWorkerHandle:
        """A new actor with the same id in place of a DEAD one."""
        assert handle.state is State.DEAD, handle.state
        handle.state = State.RELEASED
        fresh = self._start_worker(handle.worker_id)
        self.workers[self.workers.index(handle)] = fresh
        return fresh

    # -- shutdown ----------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Kill every actor and wait, within ``timeout`` s, until each is gone;
        idempotent, any thread."""
        if os.getpid() != self.owner_pid:
            return
        self.closing = True
        with self.lock:
            if self._closed:
                return
            self._closed = True
            deadline = time.monotonic() + timeout
            ray = self._ray
            try:
                if ray.is_initialized():
                    running = [h for h in self.workers if h.state is not State.RELEASED]
                    for handle in running:
                        _kill_quietly(ray, handle.actor)
                    lifelines = [h.lifeline for h in running]
                    if lifelines:
                        ray.wait(lifelines, num_returns=len(lifelines),
                                 timeout=max(0.0, deadline - time.monotonic()))
            finally:
                for handle in self.workers:
                    handle.state = State.RELEASED
                    handle.outstanding.clear()
                    handle.refs.clear()
                _open_pools.discard(self)
                _disconnect(ray)


def _warn_unplaced(ray: Any, backend: RayBackend, workers: list[RayWorkerHandle]) -> None:
    """Log, once per worker, the actors Ray has not placed for a while and
    what the cluster has free: a wait for resources never passes silently."""
    now = time.monotonic()
    waiting = [h for h in workers if h.state is State.STARTING and not h.warned
               and now - h.created_at > _PLACEMENT_WARNING_S]
    if waiting:
        for handle in waiting:
            handle.warned = True
        needs = backend.needs()
        free, total = ray.available_resources(), ray.cluster_resources()
        running = sum(h.state is State.READY for h in workers)
        then = (f"the loader runs on the {running} that started" if running else
                "no worker of this loader runs, so the pass waits until one is placed")
        nodes = ray.nodes()
        if max(_placeable(nodes, needs), default=0) == 0:  # their node died, say
            have = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
            lacking = [k for k, v in needs.items() if v > 0 and
                       not any(r.get(k, 0.0) >= v for r in have)] or sorted(needs)
            then += (f"; no live node has {', '.join(map(repr, lacking))} enough for one: "
                     "they start once a node that has it joins the cluster")
        log.warning("workers %s: their Ray actors have waited over %.0f s to start; each "
                    "needs %s, and the cluster has %s free of %s (%s)",
                    [h.worker_id for h in waiting], _PLACEMENT_WARNING_S, needs,
                    {k: free.get(k, 0.0) for k in needs}, {k: total.get(k, 0.0) for k in needs},
                    then)


def _lost_with_node(ray: Any, handle: RayWorkerHandle, exc: BaseException) -> bool:
    """The actor died because its node did: Ray says so, or the node is gone."""
    if _NODE_DIED in str(exc):
        return True
    try:
        alive = {node["NodeID"] for node in ray.nodes() if node.get("Alive")}
    except Exception:  # noqa: BLE001 - unknown: blame as for any death
        return False
    return bool(handle.node) and handle.node not in alive


def _kill_quietly(ray: Any, actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone, or Ray shut down
        pass


def _blame(ray: Any, handle: RayWorkerHandle, lost: tuple[Outstanding, ...],
           exc: BaseException) -> tuple[tuple[tuple[int, int], int], ...]:
    """(task key, source index) of the item the actor was running when it
    died: the one it was killed for; none when it died with its node (no
    item's fault); else the first task's item when that task holds one (the
    actor runs its tasks in order); else unknown."""
    if not lost:
        return ()
    if handle.killed_for is not None:
        return ((lost[0].task.key, handle.killed_for.index),)
    if _lost_with_node(ray, handle, exc):
        return ()
    if len(lost[0].task.indices) == 1:
        return ((lost[0].task.key, lost[0].task.indices[0]),)
    return ()


def _cause(exc: BaseException) -> str:
    """Ray's reason for an actor's end, on one line."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:300] + " ..."


_open_pools: "weakref.WeakSet[RayPool]" = weakref.WeakSet()


def close_open_pools() -> None:
    """At interpreter exit, before Ray's own shutdown: close every pool still open."""
    for pool in list(_open_pools):
        pool.close()
