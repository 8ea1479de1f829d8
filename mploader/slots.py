"""The shared-memory slot ring: where results live between a worker and the consumer.

Each worker owns one anonymous memory file (``os.memfd_create``), its *arena*,
created by the parent and inherited by the worker at start, so it has no name
in ``/dev/shm``: nothing can be left there, even after SIGKILL of every
process, and Docker's 64 MB ``/dev/shm`` does not cap it.  The kernel frees
it with the last descriptor and mapping.  Layout::

    [ status page | slot 0 ... | slot 1 ... | ... ]      slot i at HEADER_BYTES + i * stride

The file is sparse: its size only reserves address space; memory is used by
the bytes a worker reserves (``posix_fallocate``) for results.  The parent maps
the whole arena once, so a worker costs the parent one descriptor for all its
slots (the mapping's own), whatever ``prefetch`` is (see resources.py).

The status page holds what the worker is doing now (:class:`Status`), so the
parent can time each item and blame the right one when a worker dies, without
a message per item.

Ownership contract (who may touch a slot, and when):

    FREE   --parent assigns it to a Task-->            BUSY (worker writes it)
    BUSY   --Result dropped, or yielded as a copy-->   FREE
    BUSY   --Result yielded as views (a lease)-->      LEASED
    LEASED --last view of the result is collected-->   FREE

Invariant: a slot is BUSY or LEASED while anything can still observe its bytes,
so a worker never overwrites data the user (or a TensorFlow buffer) holds.  A
lease ends through a weakref callback on the array that every view of the
result has as its ``base``; the callback only puts the slot number on a
``SimpleQueue``, which is safe from any thread and from inside a garbage
collection.  At most ``max_leases`` slots, holding at most
``LEASE_BUDGET_BYTES`` (or two results, however large: copying a volume
out into fresh memory costs more than the whole hand-off, and TensorFlow
still holds the one before the element it takes), are leased at once;
further results are copied out,
so a consumer that hoards results can never starve a worker of slots nor pin
much memory.

Results keep their memory valid: a Result waiting to be handed out holds its
worker's handle, and so this ring and its mapping.  Closing the ring (its
worker died or was replaced) only stops reuse; the mapping goes when the last
result or view of it does.

Memory: free slots are reused last-in first-out, so only as many slots hold
memory as are in use at once.  Beyond ``keep_free`` reserved free slots, the
least recently used ones give their memory back (``MADV_REMOVE``) once idle for
``IDLE_SHRINK_S``, during a pass (looked at on each release) or after it (a
timer of the pool's), so a burst (the consumer held many results at once, or
one slow item let the others run ahead) does not stay reserved; the delay
keeps a steady stream, and the next pass right after this one, from
refaulting fresh pages, which costs far more than the copy into them.  A worker grows a slot when a result does not fit, reserving it with
``posix_fallocate`` so a shortage is an ``OSError`` naming the size (never a
SIGBUS on first write).
"""
from __future__ import annotations

import mmap
import os
import queue
import time
import weakref
from typing import Any

import numpy as np

from .errors import UnsupportedResult
from .layout import Write, copy_writes, unpack

PAGE_BYTES = mmap.PAGESIZE
HEADER_BYTES = PAGE_BYTES
_NO_BYTES = np.empty(0, np.uint8)  # the region of a result that has no arrays
LEASE_BUDGET_BYTES = 128 << 20  # per worker: results handed out as views, at most
RUN_AHEAD_BYTES = 64 << 20  # per worker: results done but not handed out, beyond prefetch
# Results leased whatever their size: the one the consumer holds, and the one
# before it, which TensorFlow lets go of only when it converts the next
# element (its numpy-backed tensors release their array later, from a queue
# emptied by a later conversion), so with one, every other volume was copied.
_LEASES_ANY_SIZE = 2
IDLE_SHRINK_S = 2.0  # a spare slot unused this long gives its memory back (refaulting is slow)

# Status words (int64) at the start of the arena, one row per thread of the
# worker (threads_per_worker).  Each row has one writer, its thread; the
# parent reads with a sequence check (a seqlock: odd while writing).
_SEQ, _PASS, _TASK, _INDEX, _STARTED_NS = range(5)
_ROW_WORDS = 8
MAX_ROWS = HEADER_BYTES // (8 * _ROW_WORDS)  # threads per worker, at most
IDLE = -1      # _INDEX: between tasks
PACKING = -2   # _INDEX: laying out a task's results
_READ_TRIES = 1000  # a write takes well under a microsecond; a dead writer never finishes


class Status:
    """One thread's row of the worker's status page, seen from either side."""

    def __init__(self, buffer: Any, row: int = 0) -> None:
        start = row * _ROW_WORDS * 8
        self._words = memoryview(buffer)[start:start + _ROW_WORDS * 8].cast("q")

    def set(self, key: tuple[int, int], index: int, started_ns: int) -> None:
        """(worker) Now running ``index`` of task ``key`` (or IDLE, PACKING)."""
        words = self._words
        seq = words[_SEQ] + 1
        words[_SEQ] = seq
        words[_PASS], words[_TASK] = key
        words[_INDEX] = index
        words[_STARTED_NS] = started_ns
        words[_SEQ] = seq + 1

    def read(self) -> tuple[tuple[int, int], int, int]:
        """(parent) (task key, index or IDLE/PACKING, started at, monotonic ns)."""
        words = self._words
        for _ in range(_READ_TRIES):
            seq = words[_SEQ]
            found = ((words[_PASS], words[_TASK]), words[_INDEX], words[_STARTED_NS])
            if seq % 2 == 0 and words[_SEQ] == seq:
                break
        return found  # after _READ_TRIES, a worker that died mid-write: best effort

    def release(self) -> None:
        self._words.release()


def _map(fd: int, size: int, offset: int = 0) -> mmap.mmap:
    return mmap.mmap(fd, size, offset=offset)


_MADV_POPULATE_WRITE = 23  # Linux 5.14 (mmap has no name for it before Python 3.13)


def _populate(mapping: mmap.mmap, size: int) -> None:
    """Map the first ``size`` bytes of a slot just reserved in one call,
    before the worker writes them: page by page, the faults of a fresh
    512 MiB slot cost 0.32 s here, against 0.12 s for this and 0.05 s for
    the copy itself.  An older kernel refuses it, and the faults happen."""
    try:
        mapping.madvise(_MADV_POPULATE_WRITE, 0, size)
    except OSError:
        pass


class SlotRing:
    """The parent's side of one worker's arena (see the module docstring)."""

    def __init__(self, count: int, stride: int, max_leases: int, keep_free: int,
                 label: str, threads: int = 1) -> None:
        self.stride = stride
        self.fd = os.memfd_create(f"mploader-{label}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, HEADER_BYTES + count * stride)
            self._arena: mmap.mmap | None = _map(self.fd, HEADER_BYTES + count * stride)
        except OSError as exc:
            os.close(self.fd)
            raise MemoryError(
                f"cannot map {count} result slots of {stride} bytes of address space "
                f"for a worker ({exc.strerror}): too many loaders or workers are alive "
                "at once, or RLIMIT_AS is low; close loaders you no longer use") from exc
        except BaseException:
            os.close(self.fd)
            raise
        self.statuses = [Status(self._arena, row) for row in range(threads)]
        for status in self.statuses:
            status.set((0, 0), IDLE, 0)
        self.max_leases = max_leases
        self._keep_free = keep_free
        self.capacity = [0] * count  # bytes reserved per slot, as the worker last reported
        self._freed_at = [0.0] * count  # when each slot last became FREE
        self._free = list(range(count - 1, -1, -1))  # a stack: see the docstring
        self._leases: dict[int, tuple[weakref.ref, int]] = {}  # slot -> (ref, bytes)
        self._leased_bytes = 0
        self._returned: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._busy: set[int] = set()  # Invariant: slots handed to a task and not yet FREE or LEASED
        self._closed = False

    def close_fd(self) -> None:
        """Close the parent's descriptor once the worker has its copy (the
        mapping keeps its own)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _collect_returned(self) -> None:
        """Leases that ended are FREE slots again; spare ones idle for
        IDLE_SHRINK_S give their memory back (as after a release)."""
        if self._returned.empty():  # the common case, without raising queue.Empty
            return
        while True:
            try:
                slot = self._returned.get_nowait()
            except queue.Empty:
                break
            self._leased_bytes -= self._leases.pop(slot)[1]
            self._make_free(slot)
        self.shrink(idle_for=IDLE_SHRINK_S)

    def acquire(self) -> int | None:
        """A FREE slot made BUSY, or None when every slot is BUSY or LEASED."""
        self._collect_returned()
        if not self._free or self._closed:
            return None
        slot = self._free.pop()
        self._busy.add(slot)
        return slot

    def may_run_ahead(self, prefetch: int) -> bool:
        """May this worker take another task?  Slots BUSY are its tasks in
        flight and its results not yet handed out (waiting for an earlier
        item of another worker, or for the consumer).  Up to ``prefetch`` of
        them always; more only while one more result keeps them within
        ``RUN_AHEAD_BYTES``, so small results let a worker run ahead of a
        slow item, and what waits per worker is at most
        ``max(prefetch x S, RUN_AHEAD_BYTES)`` for results of S bytes, plus
        the one fn is making (the bound how-it-works.md gives)."""
        if len(self._busy) < prefetch:
            return True
        largest = max(self.capacity)  # a slot not written yet: as large as any result so far
        held = sum(self.capacity[slot] or largest for slot in self._busy)
        return held + largest <= RUN_AHEAD_BYTES

    def has_free(self) -> bool:
        """A slot that ``acquire`` would give."""
        self._collect_returned()
        return bool(self._free) and not self._closed

    def release(self, slot: int) -> None:
        """BUSY -> FREE, for a result that was dropped or copied out."""
        self._make_free(slot)
        self.shrink(idle_for=IDLE_SHRINK_S)

    def _make_free(self, slot: int) -> None:
        self._busy.discard(slot)
        if self._closed:
            if not self._busy:
                self._unmap()
            return
        self._free.append(slot)
        self._freed_at[slot] = time.monotonic()

    def shrink(self, idle_for: float = 0.0) -> bool:
        """Give back the memory of reserved FREE slots beyond ``keep_free`` that
        have been idle for ``idle_for`` seconds, least recently used first.
        Returns whether memory is left that a later call may give back: such
        slots not idle long enough yet, or leases (they come back FREE)."""
        if self._closed:
            return False
        self._collect_returned()
        reserved = [s for s in self._free if self.capacity[s]]  # the stack's bottom first
        now = time.monotonic()
        left = False
        for idle in reserved[:len(reserved) - self._keep_free]:
            if now - self._freed_at[idle] >= idle_for:
                self._arena.madvise(mmap.MADV_REMOVE, self.offset(idle), self.capacity[idle])
                self.capacity[idle] = 0
            else:
                left = True
        return left or bool(self._leases)

    def offset(self, slot: int) -> int:
        return HEADER_BYTES + slot * self.stride

    def grown(self, slot: int, capacity: int) -> None:
        """The worker reports the slot's reservation after writing a result."""
        self.capacity[slot] = capacity

    def open_result(self, slot: int, nbytes: int, tree: Any, copy: bool = False) -> Any:
        """Materialise a BUSY slot's result: as views under a lease, else (or
        with ``copy``) as a copy, and the slot is FREE again at once."""
        if nbytes == 0:  # the result has no arrays
            self.release(slot)
            return unpack(tree, _NO_BYTES, copy=True)
        # A fresh array straight over the mapping: numpy makes it the ``base``
        # of every view below, so its death means the result is unreachable.
        anchor = np.frombuffer(self._arena, dtype=np.uint8, count=nbytes, offset=self.offset(slot))
        self._collect_returned()
        if (copy or self._closed or len(self._leases) >= self.max_leases
                or (len(self._leases) >= _LEASES_ANY_SIZE
                    and self._leased_bytes + nbytes > LEASE_BUDGET_BYTES)):
            value = unpack(tree, anchor, copy=True)
            self.release(slot)
            return value
        returned = self._returned
        self._busy.discard(slot)
        self._leases[slot] = (weakref.ref(anchor, lambda _ref: returned.put(slot)), nbytes)
        self._leased_bytes += nbytes
        return unpack(tree, anchor, copy=False)

    @property
    def leased(self) -> int:
        self._collect_returned()
        return len(self._leases)

    def reserved_bytes(self) -> int:
        return sum(self.capacity)

    def close(self, unmap: bool = False) -> None:
        """No more reuse.  The mapping stays valid while a result waiting to be
        handed out (a BUSY slot) or a leased view uses it, and goes, with its
        descriptor, when the last of them does; with ``unmap`` (its pool is
        closed: no waiting result will be handed out) only leased views keep it."""
        self.close_fd()
        self._closed = True
        if unmap:
            self._busy.clear()
        if not self._busy:
            self._unmap()

    def _unmap(self) -> None:
        if self._arena is None:
            return
        for status in self.statuses:
            status.release()
        try:
            self._arena.close()
        except BufferError:
            pass  # leased views still export it: unmapped when the last one dies
        self._arena = None


class SlotWriter:
    """The worker's side: write a laid-out result into a slot, growing it if needed."""

    def __init__(self, fd: int, count: int, stride: int) -> None:
        self._fd = fd
        self._stride = stride
        self._maps: list[np.ndarray | None] = [None] * count
        self._header = _map(fd, HEADER_BYTES)

    def status(self, row: int) -> Status:
        """The status row of the worker's thread ``row``."""
        return Status(self._header, row)

    def write(self, slot: int, capacity: int, writes: list[Write], nbytes: int,
              appending: bool = False) -> int:
        """Copy ``writes`` into ``slot`` (``capacity`` bytes reserved); returns
        the reservation afterwards.  ``appending``: a sample after others of
        the same task (the slot then at least doubles when it grows)."""
        reserved = nbytes > capacity
        if reserved:
            capacity = self._reserve(slot, nbytes, capacity, appending)
        if nbytes == 0:  # no array bytes (an mmap of length 0 maps the whole arena)
            return capacity
        region = self._maps[slot]
        if region is None or region.size < nbytes:
            self._maps[slot] = None  # drop the old mapping before making the new one
            region = self._maps[slot] = np.frombuffer(
                _map(self._fd, capacity, HEADER_BYTES + slot * self._stride), dtype=np.uint8)
        if reserved:
            _populate(region.base.obj, capacity)  # the array's memoryview's mmap
        copy_writes(region, writes)
        return capacity

    def region(self, slot: int, nbytes: int) -> np.ndarray:
        """The first ``nbytes`` of ``slot`` as written so far (a view)."""
        return self._maps[slot][:nbytes] if nbytes else _NO_BYTES

    def _reserve(self, slot: int, nbytes: int, capacity: int, appending: bool) -> int:
        if nbytes > self._stride:
            raise UnsupportedResult(
                f"the result needs {nbytes} bytes of shared memory, more than a slot "
                f"of this loader holds ({self._stride} bytes: the address space the "
                "loader may use, a quarter of RLIMIT_AS when that is set, shared by "
                "every slot of every worker); return less per task, or use fewer "
                "workers or a smaller prefetch")
        # A slot's first result reserves what it needs: results of one size
        # (a volume of fixed shape) then hold no spare pages, and the memory
        # per slot is the result's.  Growing again means sizes vary: an eighth
        # of headroom then, so results that vary a little do not regrow the
        # slot every time; when appending (the samples of a generator fn, one
        # after another) at least double, so it grows a few times, not once
        # per sample.
        needed = nbytes if capacity == 0 else nbytes + nbytes // 8
        size = min(self._stride, max(2 * capacity if appending else 0,
                                     -(-needed // PAGE_BYTES) * PAGE_BYTES))
        try:
            os.posix_fallocate(self._fd, HEADER_BYTES + slot * self._stride, size)
        except OSError as exc:
            raise MemoryError(
                f"cannot reserve {size} bytes of shared memory for a result "
                f"({exc.strerror}); results need {nbytes} bytes each") from None
        return size
