"""The errors a user of mploader can catch.

Every error names where it happened: the worker id, and the source index (or
indices) it concerns.  Errors raised by ``fn`` in a worker carry the remote
traceback as text, because the exception object itself may not be picklable and
its type may not even be importable in the parent.
"""
from __future__ import annotations

import signal
from typing import Any

_ITEM_REPR_CHARS = 300  # enough for a dict of file paths, short enough for a log line


def short_repr(item: Any) -> str:
    """repr(item), cut in the middle if long: paths keep their file names."""
    try:
        text = repr(item)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        text = f"<{type(item).__name__} with a failing __repr__>"
    half = _ITEM_REPR_CHARS // 2
    return text if len(text) <= _ITEM_REPR_CHARS else f"{text[:half]} ... {text[-half:]}"


class MPLoaderError(Exception):
    """Base class of every error mploader raises."""


class UnsupportedResult(MPLoaderError, TypeError):
    """fn returned something that cannot be laid out in shared memory.

    An object array, an array subclass other than ``np.memmap``, a type that
    is not an array, a scalar, ``str``, ``bytes`` or a tuple/list/dict of
    these, a torch tensor on a device, or a batch whose items disagree.  The
    message names the item and the path in the result (``result['a']``).
    Found in a worker, it reaches the consumer as a :class:`WorkerError` whose
    ``exc_type`` names it.
    """


class PaddingDoesNotFit(UnsupportedResult):
    """The loader's padding (a pad value, a padded shape) does not fit fn's
    result: a mistake of the settings, not of an item, so it is raised
    whatever ``on_error`` says (skipping would skip every item).

    Raised at construction when ``output_signature`` gives the leaf's dtype
    or the pad value is not one scalar; found by a worker at the first batch,
    it reaches the consumer as a :class:`WorkerError` whose ``exc_type`` is
    ``mploader.errors.PaddingDoesNotFit``.
    """


class ResultNotCacheable(MPLoaderError, TypeError):
    """prepare returned something that cannot be pickled (so cannot be cached)."""


class ItemNotPicklable(MPLoaderError, TypeError):
    """Item ``position`` of a chunk cannot be pickled (the message says why)."""

    def __init__(self, position: int, cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.position = position


class SignatureMismatch(MPLoaderError, TypeError):
    """Through ``dataset()``, an element's dtype or shape differs from the
    dataset's signature (``output_signature``, or the one inferred from the
    first result), where TensorFlow would cast it silently.  The message names
    the source index, the leaf, what was expected and where that came from
    (mploader/tf/signature.py)."""


class PassAbandoned(MPLoaderError, RuntimeError):
    """The loader started a newer pass, or was closed, while this one was in use.

    A loader runs one pass at a time, and an abandoned pass raises rather than
    end as a silently short epoch.  ``iter(loader)`` keeps its loader alive,
    but an iterator kept past ``loader.close()`` raises this at its next
    element.
    """


class WorkerError(MPLoaderError):
    """``fn`` (or ``worker_init``) raised inside a worker.

    Attributes: ``exc_type`` (the remote exception's qualified type name),
    ``message``, ``remote_traceback`` (formatted text), ``worker_id``, ``index``
    (the source index, ``None`` for ``worker_init``), ``item`` (the source
    item's repr, shortened, so a failing file is named even when fn's own
    error does not name it) and ``sample`` (for a generator fn, how many
    samples it yielded before the error; else ``None``).
    """

    def __init__(self, exc_type: str, message: str, remote_traceback: str,
                 worker_id: int, index: int | None, item: str = "",
                 sample: int | None = None, stage: str = "worker_init") -> None:
        self.exc_type = exc_type
        self.message = message
        self.remote_traceback = remote_traceback
        self.worker_id = worker_id
        self.index = index
        self.item = item
        self.sample = sample  # a generator fn: the samples it yielded before the error
        where = (f"in {stage}" if index is None
                 else f"on source index {index}, item {item}")
        if sample is not None:
            where += f", after its sample {sample - 1}" if sample else ", before its first sample"
        super().__init__(
            f"{exc_type}: {message}  [{where}, worker {worker_id}]\n\n"
            f"Traceback in worker {worker_id}:\n{remote_traceback.rstrip()}")


def _signal_name(returncode: int | None) -> str | None:
    """'SIGKILL' for a Popen returncode of -9; None for an exit code."""
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def describe_exit(returncode: int | None) -> str:
    """'killed by SIGKILL' or 'exited with code 3' from a Popen returncode;
    'ended' when how is not known (a Ray actor: Ray does not say)."""
    if returncode is None:
        return "ended"
    name = _signal_name(returncode)
    return f"killed by {name}" if name else f"exited with code {returncode}"


class CacheError(MPLoaderError):
    """A cache of prepare's results that mploader will not use as asked: a
    ``prepare`` whose results a directory cache cannot key (pass
    ``cache_version``), or a cache directory that others could write into
    (``cache_trust``).  The message says why, and what to do."""


class WorkerDied(MPLoaderError):
    """A worker process ended while it owed results.

    Attributes: ``worker_id``, ``pid``, ``returncode`` (negative: the signal
    number, as ``subprocess`` reports it), ``signal_name`` (``"SIGKILL"`` or
    ``None``), ``exitcode`` (``None`` when killed by a signal), ``indices`` (the
    source indices it owed that are not handed out: the items of its task
    that it had finished go out before the error, run again elsewhere).
    """

    def __init__(self, worker_id: int, pid: int, returncode: int | None,
                 indices: tuple[int, ...], detail: str = "") -> None:
        self.worker_id = worker_id
        self.pid = pid
        self.returncode = returncode
        self.signal_name = _signal_name(returncode)
        self.exitcode = returncode if returncode is not None and returncode >= 0 else None
        self.indices = tuple(indices)
        where = f" (pid {pid})" if pid else ""  # no pid: it died before it said
        text = (f"worker {worker_id}{where} {describe_exit(returncode)} "
                f"owing source indices {list(self.indices)}")
        if detail:
            text += f"; {detail}"
        super().__init__(text)


class WorkerTimeout(WorkerDied):
    """An item took longer than ``timeout``; its worker was killed.

    Attributes as :class:`WorkerDied`, plus ``index`` and ``elapsed`` (seconds).
    """

    def __init__(self, worker_id: int, pid: int, index: int, elapsed: float,
                 limit: float, indices: tuple[int, ...]) -> None:
        self.index = index
        self.elapsed = elapsed
        self.limit = limit
        WorkerDied.__init__(
            self, worker_id, pid, -signal.SIGKILL, indices,
            detail=(f"source index {index} ran {elapsed:.2f} s, over the "
                    f"timeout of {limit:g} s, so the worker was killed"))


def not_the_owner(owner_pid: int) -> RuntimeError:
    """The error for a forked child that tries to use its parent's loader."""
    return RuntimeError(
        f"this MPLoader's workers belong to process {owner_pid}; a forked child "
        "cannot use them.  Create a new MPLoader in the child")
