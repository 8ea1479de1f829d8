"""The cache of ``prepare``'s results, seen from the parent: keys, budget, index, counts.

``MPLoader(fn, source, prepare=load_and_resample, cache=...)`` runs
``prepare(item)`` once per source item and ``fn(prepared)`` every epoch.
The entries live where every worker can read them without a copy of its own
(MONAI's ``CacheDataset`` gives every worker and every rank its own
copy-on-write copy, so its memory grows with ``num_workers``):

- ``cache="memory"``: ONE anonymous memory file per loader (``memfd``, so
  nothing in ``/dev/shm``; the kernel frees it with the loader and its
  workers), made here and inherited by every worker, which maps it
  read-only and appends new entries to it (cache_stores.py: a shared free
  offset under an ``fcntl`` lock, so the whole budget serves any worker).
  The parent keeps the index, key -> where the entry's parts are, and sends
  an entry's place with every task that reads it; it never maps the file.
  The file outlives every pool of the loader, so a worker replaced after a
  death, or a pool restarted after Ctrl-C, reads the entries already there.
  An entry whose writer died before reporting it is never indexed: its
  bytes stay unused (bounded by deaths times one entry).
- a directory: files written by the workers themselves (cache_stores.py),
  found by key; no index here, only the counts the workers report.

The key of an item is a hash of the cache version, of ``prepare``'s code
(shipping.code_fingerprint: an edit of prepare misses, never serves old
results) and of the item's plain pickle (the same bytes in every process;
an item that only cloudpickle can pickle keys by that pickle, which for a
class defined in ``__main__`` differs between processes: such items miss in
a directory across runs, never hit wrongly).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import resource
from dataclasses import dataclass, field
from typing import Any

from .cache_stores import HEADER_BYTES, Place
from .messages import PLAIN_TYPES, Result

_MEMINFO = "/proc/meminfo"
_CGROUP_LIMIT = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
_CGROUP_USED = ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes")


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


def _meminfo(name: str) -> int | None:
    try:
        with open(_MEMINFO) as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _address_room() -> int | None:
    """A quarter of RLIMIT_AS, when set: every worker maps the whole cache."""
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return None if soft == resource.RLIM_INFINITY else soft // 4


def default_cache_bytes() -> int:
    """Half of the memory available now (the machine's, or the cgroup's room
    when that is less), within a quarter of RLIMIT_AS: the cache is a
    speed-up, never a reason to be killed."""
    available = _meminfo("MemAvailable")
    limit, used = _first_int(_CGROUP_LIMIT), _first_int(_CGROUP_USED)
    if limit is not None and used is not None and limit < 1 << 60:
        room = max(0, limit - used)
        available = room if available is None else min(available, room)
    budget = (available if available is not None else 4 << 30) // 2
    room = _address_room()
    return budget if room is None else min(budget, room)


def check_cache_bytes(budget: int) -> None:
    """ValueError for a budget no worker could map, or beyond the machine's memory."""
    total, room = _meminfo("MemTotal"), _address_room()
    if total is not None and budget > total:
        raise ValueError(f"cache_bytes={budget} is more than this machine's memory "
                         f"({total} bytes)")
    if room is not None and budget > room:
        raise ValueError(f"cache_bytes={budget} is more than a quarter of RLIMIT_AS "
                         f"({room} bytes): every worker maps the whole cache; lower "
                         "cache_bytes or raise the limit")


@dataclass
class CacheCounts:
    """What the workers reported, summed over the loader's life."""
    hits: int = 0
    misses: int = 0           # prepare ran (the entry was absent, damaged, or out of room)
    uncached: int = 0         # ... and its result was not cached (no room, unwritable)
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
    budget: int
    fd: int = -1
    entries: dict[bytes, Place] = field(default_factory=dict)
    held_bytes: int = 0

    def __post_init__(self) -> None:
        self.fd = os.memfd_create("mploader-cache", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.size)  # sparse: memory only for what is written
        except BaseException:
            self.close()
            raise

    @property
    def size(self) -> int:
        """The file's length: the header page and the budget."""
        return HEADER_BYTES + self.budget

    def close(self) -> None:
        """Give up the parent's descriptor; the memory goes with the last worker's mapping."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.entries.clear()


class Cache:
    """The loader's cache of prepare's results, as the parent keeps it."""

    def __init__(self, where: str, budget: int | None, salt: bytes) -> None:
        self.where = where  # "memory" or a directory
        self._salt = salt   # the version and prepare's code fingerprint
        self.memory = MemoryCache(budget) if budget is not None else None
        self.counts = CacheCounts()

    def keys(self, items: tuple[Any, ...], encoded: bytes,
             ends: tuple[int, ...]) -> tuple[bytes, ...]:
        """Each item's key, from its plain pickle (its encoding, for plain types)."""
        view, start, keys = memoryview(encoded), 0, []
        for item, end in zip(items, ends):
            data: Any = view[start:end]
            if type(item) not in PLAIN_TYPES:
                try:
                    data = pickle.dumps(item, protocol=4)
                except Exception:  # noqa: BLE001 - only cloudpickle can: key by that
                    pass
            digest = hashlib.blake2b(data, digest_size=16, person=b"mploader-cache2")
            digest.update(self._salt)
            keys.append(digest.digest())
            start = end
        return tuple(keys)

    def lookup(self, keys: tuple[bytes, ...]) -> tuple[Place | None, ...]:
        """What a task tells its worker about each item: its entry's place in
        shared memory, or None; nothing for a directory (the worker looks)."""
        if self.memory is None:
            return ()
        entries = self.memory.entries
        return tuple(entries.get(key) for key in keys)

    def learn(self, indices: tuple[int, ...], keys: tuple[bytes, ...], result: Result) -> None:
        """Take in what a worker's Result says about the cache (whoever's pass it was)."""
        if result.cache:
            self.counts.add(result.cache)
        memory = self.memory
        if result.cached and memory is not None:
            key_of = dict(zip(indices, keys))
            for index, place, size in result.cached:
                key = key_of.get(index)
                if key is not None and key not in memory.entries:
                    memory.entries[key] = place
                    memory.held_bytes += size

    def stats(self) -> dict[str, Any]:
        counts, memory = self.counts, self.memory
        return {"where": self.where, "hits": counts.hits, "misses": counts.misses,
                "uncached": counts.uncached, "corrupt": counts.corrupt,
                "bytes": memory.held_bytes if memory is not None else None,
                "written_bytes": counts.written_bytes,
                "budget_bytes": memory.budget if memory is not None else None,
                "entries": len(memory.entries) if memory is not None else None}

    def close(self) -> None:
        if self.memory is not None:
            self.memory.close()
