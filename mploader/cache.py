"""The cache of ``prepare``'s results, seen from the parent: keys, budget, index, counts.

``MPLoader(fn, source, prepare=load_and_resample, cache=...)`` runs
``prepare(item)`` once per source item and ``fn(prepared)`` every epoch.
The entries live where every worker can read them without a copy of its own
(MONAI's ``CacheDataset`` gives every worker and every rank its own
copy-on-write copy, so its memory grows with ``num_workers``):

- ``cache="memory"``: ONE anonymous memory file per loader (``memfd``, so
  nothing in ``/dev/shm``; the kernel frees it with the loader), made here
  and inherited by every worker, which maps all of it read-only.  It is cut
  into one region per worker id, ``cache_bytes // num_workers`` each; a worker
  writes new entries only into its own region, after the last entry the
  parent knows of (so a replacement worker continues where the dead one's
  reported entries end, and nothing the parent hands out is overwritten).
  The parent keeps the index (key -> the entry's layout, offsets into the
  file) and sends an entry's layout with every task that reads it.  The file
  outlives every pool of the loader, so a pool restarted after a death or a
  Ctrl-C keeps the cache.  Items beyond a region's room are prepared again
  each time (``stats()["cache"]["uncached"]`` counts them).
- a directory: files written by the workers themselves (cache_stores.py),
  found by key; no index here, only the counts the workers report.

The key of an item is a hash of its pickle (the bytes that carry it to the
worker) and ``cache_version``: the same item gives the same key in any process
(paths, ints, tuples of them; an object's pickle must be stable for that),
and bumping the version invalidates every entry.
"""
from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import dataclass, field
from typing import Any

from .messages import Result

_MEMINFO = "/proc/meminfo"
_CGROUP_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
_CGROUP_USED = ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes")


def item_key(pickled: bytes | memoryview, version: str) -> bytes:
    """The cache key of an item, from its pickle and the cache version."""
    digest = hashlib.blake2b(pickled, digest_size=16, person=b"mploader-cache1")
    digest.update(version.encode())
    return digest.digest()


def keys_of(encoded: bytes, ends: tuple[int, ...], version: str) -> tuple[bytes, ...]:
    """The key of every item of a task's encoding (messages.ItemEncoder)."""
    view = memoryview(encoded)
    starts = (0,) + ends[:-1]
    return tuple(item_key(view[start:end], version) for start, end in zip(starts, ends))


def _first_int(paths: tuple[str, ...]) -> int | None:
    for path in paths:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


def default_cache_bytes() -> int:
    """Half of the memory available now (the machine's, or the cgroup's room
    when that is less): the cache is a speed-up, never a reason to be killed."""
    available = None
    try:
        with open(_MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    limit, used = _first_int(_CGROUP_FILES), _first_int(_CGROUP_USED)
    if limit is not None and used is not None and limit < 1 << 60:
        room = max(0, limit - used)
        available = room if available is None else min(available, room)
    return (available if available is not None else 4 << 30) // 2


@dataclass
class CacheCounts:
    """What the workers reported, summed over the loader's life."""
    hits: int = 0
    misses: int = 0           # prepare ran (the entry was absent, corrupt, or out of room)
    uncached: int = 0         # ... and its result did not fit in the cache
    corrupt: int = 0          # a directory entry that was truncated or damaged
    written_bytes: int = 0    # bytes of entries written

    def add(self, report: tuple[int, int, int, int, int]) -> None:
        hits, misses, uncached, corrupt, written = report
        self.hits += hits
        self.misses += misses
        self.uncached += uncached
        self.corrupt += corrupt
        self.written_bytes += written


@dataclass
class MemoryCache:
    """The loader's one shared-memory cache file and the index of its entries."""
    regions: int                 # one per worker id
    region_bytes: int
    fd: int = -1
    entries: dict[bytes, Any] = field(default_factory=dict)  # key -> layout (ArrayRefs)
    ends: list[int] = field(default_factory=list)  # per region: end of its last known entry
    held_bytes: int = 0

    def __post_init__(self) -> None:
        self.fd = os.memfd_create("mploader-cache", os.MFD_CLOEXEC)
        self.ends = [0] * self.regions
        try:
            os.ftruncate(self.fd, self.regions * self.region_bytes)  # sparse: no memory yet
        except BaseException:
            self.close()
            raise

    def lookup(self, keys: tuple[bytes, ...]) -> tuple[Any, ...]:
        """Each key's entry layout, or None where it is not cached."""
        entries = self.entries
        return tuple(entries.get(key) for key in keys)

    def learn(self, worker_id: int, keys_by_index: dict[int, bytes], result: Result) -> None:
        """Record the entries a worker wrote for a task (whoever's pass it was)."""
        for index, tree, start, end in result.cached:
            key = keys_by_index.get(index)
            if key is not None and key not in self.entries:
                self.entries[key] = tree
                self.held_bytes += end - start
            self.ends[worker_id] = max(self.ends[worker_id], end)

    def close(self) -> None:
        """Give up the parent's descriptor; the memory goes with the last worker's mapping."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.entries.clear()


def region_bytes(budget: int, regions: int) -> int:
    """A region's size: an equal, page-aligned share of the budget."""
    return max(0, budget // regions // mmap.PAGESIZE * mmap.PAGESIZE)


class Cache:
    """The loader's cache of prepare's results, as the parent keeps it."""

    def __init__(self, where: str, budget: int, regions: int, version: str) -> None:
        self.where = where  # "memory" or a directory
        self.budget = budget
        self._version = version
        self.memory = (MemoryCache(regions, region_bytes(budget, regions))
                       if where == "memory" else None)
        self.counts = CacheCounts()

    def keys(self, encoded: bytes, ends: tuple[int, ...]) -> tuple[bytes, ...]:
        return keys_of(encoded, ends, self._version)

    def lookup(self, keys: tuple[bytes, ...]) -> tuple[Any, ...]:
        """What a task tells its worker about each item: its entry's layout in
        shared memory, or None; nothing for a directory (the worker looks)."""
        return self.memory.lookup(keys) if self.memory is not None else ()

    def learn(self, worker_id: int, indices: tuple[int, ...], keys: tuple[bytes, ...],
              result: Result) -> None:
        """Take in what a worker's Result says about the cache."""
        if result.cache:
            self.counts.add(result.cache)
        if result.cached and self.memory is not None:
            self.memory.learn(worker_id, dict(zip(indices, keys)), result)

    def stats(self) -> dict[str, Any]:
        counts = self.counts
        held = (self.memory.held_bytes if self.memory is not None else counts.written_bytes)
        return {"where": self.where, "hits": counts.hits, "misses": counts.misses,
                "uncached": counts.uncached, "corrupt": counts.corrupt, "bytes": held,
                "budget_bytes": self.budget if self.memory is not None else None,
                "entries": len(self.memory.entries) if self.memory is not None else None}

    def close(self) -> None:
        if self.memory is not None:
            self.memory.close()
