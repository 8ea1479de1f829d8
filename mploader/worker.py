"""The worker process: a fresh interpreter that runs ``fn`` over tasks.

Started by ``pool.py`` as ``python -m mploader.worker CONFIG`` (never by fork,
never by multiprocessing), so it imports neither the user's ``__main__`` nor
TensorFlow: only this module, numpy, cloudpickle and whatever ``fn`` itself
needs.  Its life:

1. Tie its life to the parent's: ``PR_SET_PDEATHSIG`` = SIGKILL (then check that
   the parent did not die before that), and a thread that waits for EOF on the
   lifeline pipe, whose write end only the parent holds (see pool.py NOTE
   [Shutdown]).
2. Read the Bootstrap, unpickle ``fn``, run ``worker_init(worker_id)``; answer
   Ready, or StartFailed and exit.
3. Loop: read a Task, run ``fn`` on each item inside its item scope, lay the
   results out in the Task's slot, send a Result.  EOF on the task pipe means
   stop: exit 0.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, Callable

import cloudpickle

from . import messages
from .layout import pack_batch, pack_items
from .messages import Bootstrap, Failure, Ready, Result, StartFailed, Task
from .random_state import item_scope
from .slots import SlotWriter

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent(parent_pid: int, lifeline_fd: int) -> None:
    """Exit as soon as the parent is gone, even while fn is busy in C code."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.read(lifeline_fd, 1):  # blocks; b"" is EOF: the parent is gone
            pass
        os._exit(1)

    threading.Thread(target=watch, name="mploader-lifeline", daemon=True).start()


_ITEM_REPR_CHARS = 300  # enough for a dict of file paths, short enough for a log line


def _short_repr(item: Any) -> str:
    """repr(item), cut in the middle if long: paths keep their file names."""
    try:
        text = repr(item)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        text = f"<{type(item).__name__} with a failing __repr__>"
    half = _ITEM_REPR_CHARS // 2
    return text if len(text) <= _ITEM_REPR_CHARS else f"{text[:half]} ... {text[-half:]}"


def _failure(exc: BaseException, index: int | None, item: Any = None) -> Failure:
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return Failure(index=index, item="" if index is None else _short_repr(item),
                   exc_type=name, message=str(exc),
                   traceback="".join(traceback.format_exception(exc)))


class _TaskRunner:
    """Runs fn over a task's items and lays the results out in the slot."""

    def __init__(self, fn: Callable[[Any], Any], boot: Bootstrap, slots: SlotWriter) -> None:
        self._fn = fn
        self._seed = boot.seed
        self._stack = boot.stack_batches
        self._slots = slots

    def run(self, task: Task) -> Result:
        start = time.perf_counter()
        outputs: list[Any] = []
        done: list[int] = []
        failures: list[Failure] = []
        for index, item in zip(task.indices, task.items):
            try:
                with item_scope(self._seed, task.epoch, index):
                    outputs.append(self._fn(item))
                done.append(index)
            except Exception as exc:  # noqa: BLE001 - reported to the consumer
                failures.append(_failure(exc, index, item))
        tree, nbytes, capacity = None, 0, self._slots.capacity(task.slot)
        if outputs:
            try:
                tree, writes, nbytes = (pack_batch(outputs, tuple(done)) if self._stack
                                        else pack_items(outputs))
                capacity = self._slots.write(task.slot, writes, nbytes)
            except Exception as exc:  # noqa: BLE001 - a result that cannot be sent
                items = dict(zip(task.indices, task.items))
                failures.extend(_failure(exc, index, items[index]) for index in done)
                tree, done, nbytes = None, [], 0
        return Result(key=task.key, slot=task.slot, capacity=capacity, nbytes=nbytes, tree=tree,
                      indices=tuple(done), failures=tuple(failures),
                      busy_s=time.perf_counter() - start)


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    _die_with_parent(config["parent_pid"], config["lifeline_fd"])
    # Ctrl-C in a terminal reaches the whole process group; the parent decides
    # what happens (it stops us), so a worker must not die with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tasks = Connection(config["task_fd"], writable=False)
    results = Connection(config["result_fd"], readable=False)
    boot: Bootstrap = messages.decode(tasks.recv_bytes())
    sys.path[:] = boot.sys_path
    try:
        fn = cloudpickle.loads(boot.fn)
        if boot.worker_init is not None:
            cloudpickle.loads(boot.worker_init)(config["worker_id"])
    except BaseException as exc:  # noqa: BLE001 - reported, then exit
        results.send_bytes(messages.encode(StartFailed(_failure(exc, None))))
        return 1
    results.send_bytes(messages.encode(Ready(pid=os.getpid())))
    runner = _TaskRunner(fn, boot, SlotWriter(config["slot_fds"]))
    while True:
        try:
            data = tasks.recv_bytes()
        except EOFError:  # the parent closed the task pipe: the stop pill
            return 0
        results.send_bytes(messages.encode(runner.run(messages.decode(data))))

if __name__ == "__main__":
    sys.exit(main(sys.argv))
