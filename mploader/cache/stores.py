"""The cache of ``prepare``'s results, seen from a worker: where entries are read and written.

An entry is ``prepare``'s result pickled with protocol 5, its arrays' bytes
out of band: ``[pickle][array 0][array 1]...``, each part 64-byte aligned.
Any picklable result keeps its exact form (namedtuples, lists, None, a
masked array with its mask, a dataclass), and its arrays come back as views
of the stored bytes, never copied: ``pickle.loads(..., buffers=...)``.

Both stores hand ``fn`` read-only views over memory that no process changes
afterwards: a cached entry is shared by every worker (and, for a directory,
every process on the host through the page cache), so an ``fn`` that writes
into its input must get an error, not corrupt the cache for everyone.
Read-only *buffers* give that (numpy refuses to make such a view writeable).
A result that did not fit is handed over the same way, read-only, so the
error comes on every item, not only on cached ones.

- :class:`SharedMemoryStore` (``cache="memory"``): the loader's cache file
  (index.py), mapped read-only.  New entries are written with ``pwrite`` at
  an offset taken from the file's header page under an ``fcntl`` lock (held
  for two small reads and writes; the kernel drops it if its holder dies), so
  the budget is shared by all workers and no two entries overlap.  A hit
  comes with the entry's place in the task.
- :class:`DirectoryStore` (``cache=path``): one file per key.  Written to a
  temporary name in the same directory and renamed into place, so a crash
  or SIGKILL leaves at worst a temporary file, never a half entry under a
  key; two processes writing one key each write a whole file and the last
  rename wins.  Every file carries its length and a CRC-32 of everything
  after the checksum; a worker checks the length on every read and the CRC
  on its first read of each version of a file (its inode, size and
  modification time), and prepares again over a damaged entry.

A directory's entries are unpickled, and unpickling runs code: whoever can
write into the directory can run code as the user, so it is guarded like
code (:func:`open_directory`, :func:`untrusted`).  Trusted writers are the
user, root (who can do anything to the user's processes anyway) and, with
``cache_trust="group"``, the members of the directory's group.  The parent
checks the directory when the loader is made; each worker opens it once,
checks what it opened (``fstat`` of its descriptor) and then works relative to
that descriptor, so a directory renamed or replaced later is not followed;
and it checks every entry on the descriptor it opened, before reading a byte
of it.  An entry that fails is never read: it is counted (``untrusted``),
prepared again and replaced by the worker's own (the directory is the
user's: replacing a file in it is theirs to do), and the parent warns.  The
directory's parents are not checked: one that others can write lets them
rename the cache directory away and put their own in its place, but nothing
they write there is ever read, by the checks above.
"""
from __future__ import annotations

import errno
import fcntl
import grp
import mmap
import os
import pickle
import pwd
import re
import stat
import struct
import time
import zlib
from typing import Any

import cloudpickle

from ..errors import CacheError, ResultNotCacheable
from ..messages import Task

ALIGN = 64
HEADER_BYTES = mmap.PAGESIZE  # of the shared-memory cache file: the next free offset
_NEXT = struct.Struct("<Q")

# Where an entry's parts are: (pickle start, pickle length, ((start, length), ...) of buffers)
Place = tuple[int, int, tuple[tuple[int, int], ...]]


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def serialize(prepared: Any) -> tuple[bytes, list[memoryview]]:
    """(pickle, the raw bytes of its out-of-band buffers)."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        payload = pickle.dumps(prepared, protocol=5, buffer_callback=buffers.append)
    except Exception:  # noqa: BLE001 - e.g. a class of the user's __main__: by value
        buffers.clear()
        payload = None
    try:
        if payload is None:
            payload = cloudpickle.dumps(prepared, protocol=5, buffer_callback=buffers.append)
    except Exception as exc:
        raise ResultNotCacheable(
            f"prepare returned a result that cannot be cached: pickling it failed with "
            f"{type(exc).__name__}: {exc}") from None
    return payload, [buffer.raw() for buffer in buffers]


def plan(payload: bytes, raws: list[memoryview], start: int) -> tuple[Place, int]:
    """Where each part of an entry goes from ``start``; and where the entry ends."""
    end = start + len(payload)
    buffers = []
    for raw in raws:
        offset = _aligned(end)
        buffers.append((offset, raw.nbytes))
        end = offset + raw.nbytes
    return (start, len(payload), tuple(buffers)), _aligned(end)


def load(region: memoryview, place: Place) -> Any:
    """The entry at ``place`` in ``region`` (read-only), rebuilt over its bytes."""
    start, length, buffers = place
    return pickle.loads(region[start:start + length],
                        buffers=[region[offset:offset + size] for offset, size in buffers])


def uncached(payload: bytes, raws: list[memoryview]) -> Any:
    """What fn gets for a result that was not cached: the same form as a
    cached one (the pickle's round trip), over the result's own bytes, read-only."""
    return pickle.loads(payload, buffers=[raw.toreadonly() for raw in raws])


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class _Counts:
    """What a store did since the worker last reported (with a task's Result)."""

    def __init__(self) -> None:
        self.hits = self.misses = self.uncached = self.corrupt = self.written = 0
        self.untrusted = 0

    def report(self) -> tuple[int, int, int, int, int, int]:
        """The counts since the last report, and start again from zero."""
        counts = (self.hits, self.misses, self.uncached, self.corrupt, self.written,
                  self.untrusted)
        self.hits = self.misses = self.uncached = self.corrupt = self.written = 0
        self.untrusted = 0
        return counts

    def take_entries(self) -> tuple[tuple[int, Place, int], ...]:
        """Entries written since the last call, for the parent's index (none here)."""
        return ()


class SharedMemoryStore(_Counts):
    """This worker's view of the loader's shared-memory cache (index.py)."""

    def __init__(self, fd: int, size: int) -> None:
        super().__init__()
        self._fd = fd
        self._size = size
        try:
            self._region = memoryview(mmap.mmap(fd, size, prot=mmap.PROT_READ))
        except OSError as exc:
            raise MemoryError(f"cannot map the loader's cache of {size} bytes "
                              f"({exc.strerror}): lower cache_bytes") from None
        self._full = False
        self._written: list[tuple[int, Place, int]] = []

    def fetch(self, task: Task, position: int) -> Any:
        """The entry the task named for the item, as read-only views; None on a miss."""
        place = task.cached[position] if task.cached else None
        if place is None:
            return None
        self.hits += 1
        return load(self._region, place)

    def keep(self, index: int, _key: bytes, prepared: Any) -> Any:
        """Write ``prepared`` into the cache if it fits; what fn gets (read-only)."""
        self.misses += 1
        payload, raws = serialize(prepared)
        size = plan(payload, raws, 0)[1]
        start = None if self._full else self._allocate(size)
        if start is None:
            self.uncached += 1
            return uncached(payload, raws)
        place, _ = plan(payload, raws, start)
        try:
            _pwrite_all(self._fd, payload, start)
            for (offset, _size), raw in zip(place[2], raws):
                _pwrite_all(self._fd, raw, offset)
        except OSError:  # out of memory for the cache: its bytes stay unused
            self.uncached += 1
            return uncached(payload, raws)
        self.written += size
        self._written.append((index, place, size))
        return load(self._region, place)

    def _allocate(self, size: int) -> int | None:
        """Take ``size`` bytes from the shared free offset; None when full."""
        fcntl.lockf(self._fd, fcntl.LOCK_EX, _NEXT.size, 0)
        try:
            start = _NEXT.unpack(os.pread(self._fd, _NEXT.size, 0))[0] or HEADER_BYTES
            if start + size > self._size:
                self._full = start + 4 * ALIGN > self._size  # nothing more will fit
                return None
            os.pwrite(self._fd, _NEXT.pack(start + size), 0)
            return start
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, _NEXT.size, 0)

    def take_entries(self) -> tuple[tuple[int, Place, int], ...]:
        entries, self._written = tuple(self._written), []
        return entries


# A directory entry: magic, CRC-32 of the rest, layout of the parts, total
# length; then the pickle and its buffers (aligned).
_MAGIC = b"MPLCACH2"
_HEADER = struct.Struct("<8sIIQ")  # magic, crc, length of the pickled place, total
_TEMP = re.compile(r"[0-9a-f]{32}\.entry\.\d+\.\d+\.tmp")  # only ours are ever removed
_STALE_TEMP_S = 3600.0  # a temporary file this old is from a writer that died

TRUSTS = ("user", "group")
# cache_trust -> (mode of a directory made here, mode of an entry): with
# "group", entries the group can read, in a directory whose files take its
# group (setgid) and which the group can write; never an entry anyone else
# can write (entries are replaced by rename, never changed in place).
MODES = {"user": (0o700, 0o600), "group": (0o2770, 0o640)}
_ROOT = 0


def _user(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} (gid {gid})"
    except KeyError:
        return f"gid {gid}"


def _member(uid: int, gid: int) -> bool:
    """Whether the user ``uid`` is in the group ``gid`` (as its primary group, or listed)."""
    try:
        user = pwd.getpwuid(uid)
        return user.pw_gid == gid or user.pw_name in grp.getgrgid(gid).gr_mem
    except KeyError:
        return False


def untrusted(status: os.stat_result, trust: str, group: int) -> str | None:
    """Why a file or directory with this status may hold what someone the
    cache does not trust wrote, or None.  Trusted: you, root, and with
    ``trust="group"`` the members of ``group`` (the cache directory's)."""
    owner, mode = status.st_uid, stat.S_IMODE(status.st_mode)
    if owner not in (os.geteuid(), _ROOT) and not (trust == "group" and _member(owner, group)):
        return f"owned by {_user(owner)}" + (
            f", who is not a member of its group {_group(group)}" if trust == "group" else "")
    if mode & stat.S_IWOTH:
        return f"writable by others (mode {mode:04o})"
    if mode & stat.S_IWGRP and not (trust == "group" and status.st_gid == group):
        return f"writable by its group {_group(status.st_gid)} (mode {mode:04o})"
    return None


def _untrusted_directory(status: os.stat_result, trust: str) -> str | None:
    if trust == "group" and status.st_gid not in (os.getegid(), *os.getgroups()):
        return (f"in group {_group(status.st_gid)}, which you are not a member of "
                "(cache_trust='group' trusts the members of the directory's group, yours)")
    return untrusted(status, trust, status.st_gid)


_HINTS = {
    "user": ("Use a directory of your own that nobody else can write into (mploader makes a "
             "missing one with mode 0700; `chmod go-w` takes others' write permission away), "
             "or, to share it with the members of its group, pass cache_trust='group'"),
    "group": ("With cache_trust='group' it must be in one of your groups, belong to you, root "
              "or a member of that group, and not be writable by others (mploader makes a "
              "missing one with mode 2770: `chmod 2770` does the same)"),
}


def open_directory(path: str, trust: str) -> int:
    """A descriptor of the cache directory, made if missing, after checking
    that nobody the cache does not trust can write into it (CacheError).

    A missing directory is made with ``MODES[trust]``, exactly (whatever the
    umask); its missing parents with the usual mode (they hold no entries).
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    made = False
    try:
        os.mkdir(path, 0o700)
        made = True
    except FileExistsError:
        pass
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if made:
            os.fchmod(fd, MODES[trust][0])
        reason = _untrusted_directory(os.fstat(fd), trust)
        if reason is not None:
            raise CacheError(
                f"the cache directory {path} is {reason}: every worker unpickles the entries "
                "in it, and unpickling runs code, so whoever can write into it can run code "
                f"as you.  {_HINTS[trust]}")
    except BaseException:
        os.close(fd)
        raise
    return fd


class DirectoryStore(_Counts):
    """Entries as files in a directory, shared by every process that names it."""

    def __init__(self, path: str, trust: str = "user") -> None:
        super().__init__()
        self._trust = trust
        self._dir = open_directory(path, trust)  # for this worker's life: see the top
        self._group = os.fstat(self._dir).st_gid
        self._checked: dict[bytes, tuple[int, int, int]] = {}  # key -> file checked by CRC
        self._unreadable: bytes | None = None  # a key whose file could not be opened
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        now = time.time()
        with os.scandir(self._dir) as entries:
            for entry in entries:
                if _TEMP.fullmatch(entry.name):
                    try:
                        if now - entry.stat().st_mtime > _STALE_TEMP_S:
                            os.unlink(entry.name, dir_fd=self._dir)
                    except OSError:
                        pass  # another process removed it first

    @staticmethod
    def _name(key: bytes) -> str:
        return key.hex() + ".entry"

    def fetch(self, task: Task, position: int) -> Any:
        """The item's entry as read-only views of its file, or None (absent,
        damaged, or untrusted)."""
        return self._read(task.keys[position])

    def _read(self, key: bytes) -> Any:
        try:
            fd = os.open(self._name(key), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=self._dir)  # (a FIFO planted under a key must not block)
        except FileNotFoundError:
            return None
        except OSError:  # out of descriptors, or not ours to read: not damage; keep it
            self._unreadable = key
            return None
        try:
            status = os.fstat(fd)  # of what was opened: no swap in between
            if untrusted(status, self._trust, self._group) is not None:
                self.untrusted += 1  # never read; prepared again, and replaced
                return None
            if not stat.S_ISREG(status.st_mode) or status.st_size < _HEADER.size:
                self.corrupt += 1
                return None
            region = mmap.mmap(fd, status.st_size, prot=mmap.PROT_READ)
        except OSError:  # out of memory: not damage; do not rewrite it
            self._unreadable = key
            return None
        finally:
            os.close(fd)
        try:
            magic, crc, place_bytes, total = _HEADER.unpack_from(region)
            if magic != _MAGIC or total != status.st_size:
                raise ValueError("not a whole entry")
            identity = (status.st_ino, status.st_size, status.st_mtime_ns)
            if self._checked.get(key) != identity:
                if zlib.crc32(memoryview(region)[12:]) != crc:
                    raise ValueError("checksum mismatch")
                self._checked[key] = identity
            place = pickle.loads(region[_HEADER.size:_HEADER.size + place_bytes])
            value = load(memoryview(region), place)
        except Exception:  # noqa: BLE001 - any damage means: prepare again
            self.corrupt += 1
            return None
        self.hits += 1
        return value

    def keep(self, _index: int, key: bytes, prepared: Any) -> Any:
        """Write ``prepared`` under ``key`` (atomically); what fn gets (read-only)."""
        self.misses += 1
        payload, raws = serialize(prepared)
        if self._unreadable == key:
            self._unreadable = None
            self.uncached += 1
            return uncached(payload, raws)
        final = self._name(key)
        temp = f"{final}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        try:
            total = self._write(temp, payload, raws)
            os.replace(temp, final, src_dir_fd=self._dir, dst_dir_fd=self._dir)
        except OSError:  # a full disk, a read-only directory: go on without the entry
            try:
                os.unlink(temp, dir_fd=self._dir)
            except OSError:
                pass
            self.uncached += 1
            return uncached(payload, raws)
        self.written += total
        found = self._read(key)
        if found is None:  # replaced by a damaged file in between: use our own result
            return uncached(payload, raws)
        self.hits -= 1  # that read was this miss's own
        return found

    def _write(self, temp: str, payload: bytes, raws: list[memoryview]) -> int:
        """Stream the entry into ``temp`` (no copy of it in memory), then put
        the CRC of everything after it into the header; returns its length."""
        # The place's length depends on its offsets, which depend on it: fix
        # the pickle's start generously, then lay the parts out from there.
        start = _aligned(_HEADER.size + 64 + 16 * len(raws))
        place, total = plan(payload, raws, start)
        place_pickle = pickle.dumps(place, protocol=pickle.HIGHEST_PROTOCOL)
        if _HEADER.size + len(place_pickle) > start:
            raise OSError(errno.EOVERFLOW, "entry header too long")
        header = _HEADER.pack(_MAGIC, 0, len(place_pickle), total)
        pieces = [(_HEADER.size, memoryview(place_pickle)), (start, memoryview(payload))]
        pieces += [(offset, raw) for (offset, _size), raw in zip(place[2], raws)]
        mode = MODES[self._trust][1]
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode,
                     dir_fd=self._dir)
        with open(fd, "wb") as f:
            os.fchmod(fd, mode)  # exactly: the umask may take the group's read away
            f.write(header)
            crc = zlib.crc32(header[12:])
            position = _HEADER.size
            for offset, piece in pieces:
                gap = bytes(offset - position)  # alignment padding: zeros
                crc = zlib.crc32(piece, zlib.crc32(gap, crc))
                f.write(gap)
                f.write(piece)
                position = offset + piece.nbytes
            gap = bytes(total - position)
            f.write(gap)
            crc = zlib.crc32(gap, crc)
            f.flush()
            os.pwrite(fd, struct.pack("<I", crc), 8)
        return total
