"""The shared-memory slot ring: where results live between a worker and the consumer.

Each worker owns a fixed ring of slots.  A slot is an anonymous memory file
(``os.memfd_create``) created by the parent and inherited by the worker at
start, so it has no name in ``/dev/shm``: nothing can be left there, even after
SIGKILL of every process, and Docker's 64 MB ``/dev/shm`` does not cap it.  The
memory is freed by the kernel when the last descriptor and mapping are gone.

Ownership contract (who may touch a slot, and when):

    FREE   --parent assigns it to a Task-->            BUSY (worker writes it)
    BUSY   --Result read, pass abandoned-->            FREE
    BUSY   --Result yielded as a copy-->               FREE
    BUSY   --Result yielded as views (a lease)-->      LEASED
    LEASED --last view of the result is collected-->   FREE

Invariant: a slot is BUSY or LEASED while anything can still observe its bytes,
so a worker never overwrites data the user (or a TensorFlow buffer) holds.  A
lease ends through a weakref callback on the array that every view of the
result has as its ``base``; the callback only puts the slot number on a
``SimpleQueue``, which is safe from any thread and from inside a garbage
collection.  At most ``max_leases`` slots, holding at most
``LEASE_BUDGET_BYTES``, are leased at once; further results are copied out,
so a consumer that hoards results (a shuffle buffer, a list) can never starve
a worker of slots (``slots = prefetch + max_leases``) nor pin much memory.
TensorFlow drops its references to the arrays it was given some time after
the tensors die, so a few leases are needed for results to flow without copies.

Slots cost nothing until they grow.  Free slots are reused last-in first-out,
so only as many slots grow as are in use at once, not the whole ring.

A slot grows when a result does not fit: the worker grows the file with
``ftruncate`` and reserves it with ``posix_fallocate``, so a memory shortage
is an ``OSError`` naming the size (never a SIGBUS on first write), and reports
the new capacity in its Result; the parent maps the larger file then.
"""
from __future__ import annotations

import mmap
import os
import queue
import weakref
from typing import Any

import numpy as np

from .layout import Write, unpack

PAGE_BYTES = mmap.PAGESIZE
_NO_BYTES = np.empty(0, np.uint8)  # the region of a result that has no arrays
LEASE_BUDGET_BYTES = 128 << 20  # per worker: results handed out as views, at most


def _map(fd: int, size: int) -> np.ndarray:
    """A writable uint8 array over the first ``size`` bytes of ``fd``."""
    return np.frombuffer(mmap.mmap(fd, size), dtype=np.uint8)


class SlotRing:
    """The parent's side of one worker's slots (see the module docstring)."""

    def __init__(self, count: int, max_leases: int, label: str) -> None:
        self.fds = [os.memfd_create(f"mploader-{label}-slot{i}", os.MFD_CLOEXEC)
                    for i in range(count)]
        self.max_leases = max_leases
        self._maps: list[mmap.mmap | None] = [None] * count
        self._free = list(range(count - 1, -1, -1))  # a stack: see the docstring
        self._leases: dict[int, tuple[weakref.ref, int]] = {}  # slot -> (ref, bytes)
        self._leased_bytes = 0
        self._returned: queue.SimpleQueue[int] = queue.SimpleQueue()

    def _collect_returned(self) -> None:
        if self._returned.empty():  # the common case, without raising queue.Empty
            return
        while True:
            try:
                slot = self._returned.get_nowait()
            except queue.Empty:
                return
            self._leased_bytes -= self._leases.pop(slot)[1]
            self._free.append(slot)

    def acquire(self) -> int | None:
        """A FREE slot made BUSY, or None when every slot is BUSY or LEASED."""
        self._collect_returned()
        return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        """BUSY -> FREE, for a result that was dropped or copied out."""
        self._free.append(slot)

    def open_result(self, slot: int, capacity: int, tree: Any, copy: bool = False) -> Any:
        """Materialise a BUSY slot's result: as views under a lease, else (or
        with ``copy``) as a copy, and the slot is FREE again at once."""
        if capacity == 0:  # nothing was ever written: the result has no arrays
            self.release(slot)
            return unpack(tree, _NO_BYTES, copy=True)
        mapping = self._maps[slot]
        if mapping is None or len(mapping) < capacity:
            # The worker grew the slot.  The old mapping is dropped, not closed:
            # it is unmapped when nothing refers to it any more.
            mapping = self._maps[slot] = mmap.mmap(self.fds[slot], capacity)
        # A fresh array straight over the mapping: numpy makes it the ``base``
        # of every view below, so its death means the result is unreachable.
        anchor = np.frombuffer(mapping, dtype=np.uint8, count=capacity)
        self._collect_returned()
        if (copy or len(self._leases) >= self.max_leases
                or self._leased_bytes + capacity > LEASE_BUDGET_BYTES):
            value = unpack(tree, anchor, copy=True)
            self.release(slot)
            return value
        returned = self._returned
        self._leases[slot] = (weakref.ref(anchor, lambda _ref: returned.put(slot)), capacity)
        self._leased_bytes += capacity
        return unpack(tree, anchor, copy=False)

    @property
    def leased(self) -> int:
        self._collect_returned()
        return len(self._leases)

    def mapped_bytes(self) -> int:
        return sum(len(m) for m in self._maps if m is not None)

    def close(self) -> None:
        """Close the descriptors; mappings still leased stay valid until collected."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self._maps = []


class SlotWriter:
    """The worker's side: write a laid-out result into a slot, growing it if needed."""

    def __init__(self, fds: list[int]) -> None:
        self._fds = fds
        self._maps: list[np.ndarray | None] = [None] * len(fds)

    def capacity(self, slot: int) -> int:
        region = self._maps[slot]
        return 0 if region is None else region.size

    def write(self, slot: int, writes: list[Write], nbytes: int) -> int:
        """Copy ``writes`` into ``slot``; returns the slot's capacity afterwards."""
        if nbytes > self.capacity(slot):
            self._grow(slot, nbytes)
        region = self._maps[slot]
        for offset, array in writes:
            np.copyto(np.ndarray(array.shape, array.dtype, buffer=region, offset=offset),
                      array, casting="no")
        return self.capacity(slot)

    def _grow(self, slot: int, nbytes: int) -> None:
        # An eighth of headroom, so results that vary a little in size do not
        # regrow the slot every time.
        size = -(-(nbytes + nbytes // 8) // PAGE_BYTES) * PAGE_BYTES
        fd = self._fds[slot]
        os.ftruncate(fd, size)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            raise MemoryError(
                f"cannot reserve {size} bytes of shared memory for a result "
                f"({exc.strerror}); results need {nbytes} bytes each") from None
        self._maps[slot] = None  # drop the old mapping before making the new one
        self._maps[slot] = _map(fd, size)
