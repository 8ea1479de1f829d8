"""The cache of ``prepare``'s results, seen from a worker: where entries are read and written.

Both stores hand ``fn`` read-only arrays over memory that no process can
change afterwards: a cached entry is shared by every worker (and, for a
directory, every process on the host through the page cache), so an ``fn``
that writes into its input must get an error, not corrupt the cache for
everyone.  Read-only *mappings* give that (numpy then refuses to make a
view writeable); a result that did not fit is handed over read-only too, so
the error comes on the first epoch, not only from the second.

- :class:`SharedMemoryStore` (``cache="memory"``): the loader's cache file
  (cache.py), mapped read-only whole, and this worker's region mapped
  writable once.  A hit comes with the entry's layout in the task.
- :class:`DirectoryStore` (``cache=path``): one file per key.  Written to a
  temporary name in the same directory and renamed into place, so a crash
  or SIGKILL leaves at worst a temporary file, never a half entry under a
  key; two processes writing one key each write a whole file and the last
  rename wins.  Every file carries its length and a CRC-32 of everything
  after the checksum; a worker checks the length on every read and the CRC on
  its first read of a key, and prepares again over a damaged entry.
  The files are unpickled: a cache directory is trusted like code.
"""
from __future__ import annotations

import mmap
import os
import pickle
import struct
import time
import zlib
from typing import Any

import numpy as np

from .layout import ALIGN_BYTES, copy_writes, map_nest, pack_items, unpack
from .messages import Task

Report = tuple[int, int, int, int, int]  # hits, misses, uncached, corrupt, written bytes


def read_only(prepared: Any) -> Any:
    """``prepared`` with every array a read-only view (a result that was not cached)."""
    def leaf(value: Any, _path: tuple) -> Any:
        if isinstance(value, np.ndarray):
            value = value.view()
            value.flags.writeable = False
        return value
    return map_nest(leaf, prepared)


class _Counts:
    """What a store did since the worker last reported (with a task's Result)."""

    def __init__(self) -> None:
        self.hits = self.misses = self.uncached = self.corrupt = self.written = 0

    def report(self) -> Report:
        """The counts since the last report, and start again from zero."""
        counts = (self.hits, self.misses, self.uncached, self.corrupt, self.written)
        self.hits = self.misses = self.uncached = self.corrupt = self.written = 0
        return counts

    def take_entries(self) -> tuple[tuple[int, Any, int, int], ...]:
        """Entries written since the last call, for the parent's index (none here)."""
        return ()


class SharedMemoryStore(_Counts):
    """This worker's view of the loader's shared-memory cache (cache.py)."""

    def __init__(self, fd: int, worker_id: int, region_bytes: int, start: int,
                 regions: int) -> None:
        super().__init__()
        self._fd = fd
        self._base = worker_id * region_bytes
        self._room = region_bytes
        self._end = start  # in this region: after the last entry the parent knows of
        self._all = np.frombuffer(mmap.mmap(fd, regions * region_bytes, prot=mmap.PROT_READ),
                                  dtype=np.uint8) if regions * region_bytes else None
        self._mine: np.ndarray | None = None  # writable, mapped on the first write
        self.written_entries: list[tuple[int, Any, int, int]] = []

    def fetch(self, task: Task, position: int) -> Any:
        """The entry the task named for the item (its layout), as read-only
        views; None on a miss."""
        layout = task.cached[position] if task.cached else None
        if layout is None:
            return None
        self.hits += 1
        return unpack(layout, self._all, copy=False)

    def keep(self, index: int, key: bytes, prepared: Any) -> Any:
        """Write ``prepared`` into this worker's region; what fn gets (read-only)."""
        self.misses += 1
        start = self._end
        (layout,), writes, end = pack_items([prepared], self._base + start)
        end -= self._base
        if end > self._room or self._all is None:
            self.uncached += 1
            return read_only(prepared)
        if end > start:
            try:  # reserve, so a shortage is an error here, not a SIGBUS on a write
                os.posix_fallocate(self._fd, self._base + start, end - start)
            except OSError:
                self.uncached += 1
                return read_only(prepared)
            if self._mine is None:
                self._mine = np.frombuffer(mmap.mmap(self._fd, self._room, offset=self._base),
                                           dtype=np.uint8)
            copy_writes(self._mine, [(offset - self._base, array) for offset, array in writes])
        self._end = -(-end // ALIGN_BYTES) * ALIGN_BYTES
        self.written += end - start
        self.written_entries.append((index, layout, start, end))
        return unpack(layout, self._all, copy=False)

    def take_entries(self) -> tuple[tuple[int, Any, int, int], ...]:
        entries, self.written_entries = tuple(self.written_entries), []
        return entries


# A directory entry: magic, CRC-32 of the rest, layout length, data offset,
# total length; then the pickled layout; then the arrays at ``data`` (aligned).
_MAGIC = b"MPLCACH1"
_HEADER = struct.Struct("<8sIIQQ")
_STALE_TEMP_S = 3600.0  # a temporary file this old is from a writer that died


class DirectoryStore(_Counts):
    """Entries as files in a directory, shared by every process that names it."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path
        os.makedirs(path, exist_ok=True)
        self._checked: set[bytes] = set()  # keys whose CRC this worker has checked
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        now = time.time()
        with os.scandir(self._path) as entries:
            for entry in entries:
                if entry.name.endswith(".tmp"):
                    try:
                        if now - entry.stat().st_mtime > _STALE_TEMP_S:
                            os.unlink(entry.path)
                    except OSError:
                        pass  # another process removed it first

    def _file(self, key: bytes) -> str:
        return os.path.join(self._path, key.hex() + ".entry")

    def fetch(self, task: Task, position: int) -> Any:
        """The item's entry as read-only views of its file, or None (absent or damaged)."""
        return self._read(task.keys[position])

    def _read(self, key: bytes) -> Any:
        try:
            with open(self._file(key), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < _HEADER.size:
                    raise ValueError("shorter than its header")
                region = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            self.corrupt += 1
            return None
        try:
            magic, crc, layout_bytes, data, total = _HEADER.unpack_from(region)
            if magic != _MAGIC or total != size or data > size:
                raise ValueError("not a whole entry")
            if key not in self._checked:
                if zlib.crc32(memoryview(region)[12:]) != crc:
                    raise ValueError("checksum mismatch")
                self._checked.add(key)
            layout = pickle.loads(region[_HEADER.size:_HEADER.size + layout_bytes])
        except Exception:  # noqa: BLE001 - any damage means: prepare again
            region.close()
            self.corrupt += 1
            return None
        self.hits += 1
        return unpack(layout, np.frombuffer(region, dtype=np.uint8, offset=data), copy=False)

    def keep(self, index: int, key: bytes, prepared: Any) -> Any:
        """Write ``prepared`` under ``key`` (atomically); what fn gets (read-only)."""
        self.misses += 1
        (layout,), writes, end = pack_items([prepared])
        layout_pickle = pickle.dumps(layout, protocol=pickle.HIGHEST_PROTOCOL)
        data = -(-(_HEADER.size + len(layout_pickle)) // ALIGN_BYTES) * ALIGN_BYTES
        total = data + end
        final = self._file(key)
        temp = f"{final}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        try:
            self._write(temp, layout_pickle, data, total, writes)
            os.replace(temp, final)
        except OSError:  # a full disk, a read-only directory: go on without the entry
            _unlink_quietly(temp)
            self.uncached += 1
            return read_only(prepared)
        self.written += total
        self._checked.add(key)
        found = self._read(key)
        if found is None:  # replaced by a damaged file in between: use our own result
            return read_only(prepared)
        self.hits -= 1  # that read was this miss's own
        return found

    @staticmethod
    def _write(temp: str, layout_pickle: bytes, data: int, total: int,
               writes: list[tuple[int, np.ndarray]]) -> None:
        """Stream the entry into ``temp`` (no copy of it in memory), then put
        the CRC of everything after it into the header."""
        header = _HEADER.pack(_MAGIC, 0, len(layout_pickle), data, total)
        with open(temp, "xb") as f:
            f.write(header)
            crc = zlib.crc32(header[12:])
            position = _HEADER.size
            pieces = [(_HEADER.size, memoryview(layout_pickle))]
            pieces += [(data + offset, memoryview(np.ascontiguousarray(array).reshape(-1)
                                                  .view(np.uint8)))
                       for offset, array in writes]
            for offset, piece in pieces:
                gap = bytes(offset - position)  # alignment padding: zeros
                crc = zlib.crc32(piece, zlib.crc32(gap, crc))
                f.write(gap)
                f.write(piece)
                position = offset + len(piece)
            gap = bytes(total - position)
            f.write(gap)
            crc = zlib.crc32(gap, crc)
            f.flush()
            os.pwrite(f.fileno(), struct.pack("<I", crc), 8)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

