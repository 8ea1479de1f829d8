"""The cache of ``prepare``'s results, seen from the parent: keys, budget, index, counts.

``MPLoader(fn, source, prepare=load_and_resample, cache=...)`` runs
``prepare(item)`` once per source item and ``fn(prepared)`` every epoch.
The entries live where every worker can read them without a copy of its own
(MONAI's ``CacheDataset`` gives every worker and every rank its own
copy-on-write copy, so its memory grows with ``num_workers``):

- ``cache="memory"``: ONE anonymous memory file per loader (``memfd``, so
  nothing in ``/dev/shm``; the kernel frees it with the loader and its
  workers), made here and inherited by every worker, which maps it
  read-only and appends new entries to it (stores.py: a shared free
  offset under an ``fcntl`` lock, so the whole budget serves any worker).
  The parent keeps the index, key -> where the entry's parts are, and sends
  an entry's place with every task that reads it; it never maps the file.
  The file outlives every pool of the loader, so a worker replaced after a
  death, or a pool restarted after Ctrl-C, reads the entries already there.
  An entry whose writer died before reporting it is never indexed: its
  bytes stay unused (bounded by deaths times one entry).
- a directory: files written by the workers themselves (stores.py),
  found by key; no index here, only the counts the workers report.

The key of an item is a hash of the item's plain pickle (the same bytes in
every process; an item that only cloudpickle can pickle keys by that
pickle, which for a class defined in ``__main__`` differs between processes:
such items miss in a directory across runs, never hit wrongly) and of a salt;
for a directory, also of the fingerprints of the code that the item's pickle
names (keys.ItemCode: its class, a function it holds: the pickle names them
without their code, so an edit of them must change the key too).

For ``cache="memory"`` the salt is a constant: the file belongs to one
loader, whose prepare cannot change, and dies with it; fingerprinting prepare
(pickling every value it reads) would cost time and could not make a key
more right.

For a directory, which later runs and other jobs share, the salt is the
digest of a recipe of everything that determines prepare's results
(keys.py), so that a change of any of it misses, never serves old
results:

- the code of prepare (bytecode, names, constants, nested code; not its file
  name or line numbers: a script moved elsewhere still hits), and of every
  function and class of the user's own that it reaches, through globals,
  ``module.attr``, imports inside functions, closures, defaults
  (``__defaults__``, ``__kwdefaults__``), ``functools.partial`` arguments,
  bound objects, attributes; a class by its bases, metaclass and attributes
  (each method in turn).  "The user's own" is every module not under a
  directory named site-packages or dist-packages (where pip, conda and
  Debian install) and not Python's own library: ``__main__``, the user's
  scripts and packages, packages installed in editable mode;
- the values that code reads: each default, closure value, global and
  module attribute it names, and prepare's own state (a bound ``self``, a
  callable object, a partial's arguments), by their pickle, with sets
  sorted (their order follows string hashes, which differ between
  processes), arrays and torch tensors hashed by value, and random
  generators (numpy's, ``random.Random``, ``torch.Generator``) by their type
  alone (their state comes from the operating system, and the workers
  reseed them per item from the item: random_state.py);
- for each library reached (a function, class, module or object of it):
  its top-level package's installed version, with a digest of the
  distribution's RECORD (a reinstall of other files under one version
  misses), else (no metadata) its ``__version__`` and a digest of its
  files; Python's implementation and version;
- per item (see above): the code of the classes and functions of the
  user's own that the item's pickle names, as prepare's (a library's: its
  version), each fingerprinted once per loader;
- ``worker_init``'s, as prepare's (what it sets up, prepare may use);
- ``cache_version``, when given.

What cannot be fingerprinted (a value that does not pickle, compiled code
of the user's own with no bytecode and no version, a value nested too deeply)
is a CacheError unless ``cache_version`` is given: then the recipe names what
it left out, the version keys it, and the rest is keyed as above.  Not keyed,
ever: files prepare reads, environment variables, the time, names looked up
at run time (``getattr(m, name)``, ``importlib.import_module(name)``), a
library's own dependencies that prepare's code does not reach, the state of
random generators.

The recipe is written beside the entries (``<directory>/recipes/<salt
hex>.json``), so that cache_info() can say why a run missed: how this
loader's recipe differs from the others found there.  Each worker of a
directory cache takes the recipe again, of the prepare it unpickled and the
modules it imported, before its worker_init: a difference (a module edited
after the parent imported it, a module global changed at run time) is a
CacheError, since the entries would hold what the key does not say.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import resource
from dataclasses import dataclass, field
from typing import Any, Callable

from .keys import ItemCode, Recipe, differences, recipe
from .stores import HEADER_BYTES, MODES, Place, open_directory
from ..messages import PLAIN_TYPES, Result

log = logging.getLogger("mploader")

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
    untrusted: int = 0        # a directory entry that others could have written: not read

    def add(self, report: tuple[int, ...]) -> None:
        hits, misses, uncached, corrupt, written, untrusted = report
        self.hits += hits
        self.misses += misses
        self.uncached += uncached
        self.corrupt += corrupt
        self.written_bytes += written
        self.untrusted += untrusted


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


_MEMORY_SALT = b"memory"  # one loader's, one prepare's: see the top
_RECIPES = "recipes"       # <directory>/recipes/<salt hex>.json: each key's recipe
_RECIPE_BYTES = 1 << 20    # a recipe file larger than this is not one of ours
_RECIPES_SHOWN = 20        # by cache_info(): the most recently used


class Cache:
    """The loader's cache of prepare's results, as the parent keeps it."""

    def __init__(self, where: str, budget: int | None, prepare: Callable[[Any], Any],
                 cache_version: str | int | None, trust: str,
                 worker_init: Callable[[int], Any] | None = None) -> None:
        self.where = where  # "memory" or a directory
        self.trust = trust
        self.recipe: Recipe | None = None
        self._salt = _MEMORY_SALT
        self._item_code: ItemCode | None = None  # a directory's: the code items refer to
        if where != "memory":
            os.close(open_directory(where, trust))  # made, or refused, first
            versions: dict[str, str] = {}  # of the libraries, for this loader's recipes
            self.recipe = recipe(prepare, cache_version, where, worker_init, versions=versions)
            self._salt = self.recipe.salt()
            self._keep_recipe(self.recipe)
            self._item_code = ItemCode(cache_version, where, versions)
        self.memory = MemoryCache(budget) if budget is not None else None
        self.counts = CacheCounts()

    def _keep_recipe(self, mine: Recipe) -> None:
        """Write this key's recipe beside the entries (or mark it used now),
        for cache_info(); a directory that cannot take it (read-only) goes without."""
        folder = os.path.join(self.where, _RECIPES)
        path = os.path.join(folder, self._salt.hex() + ".json")
        directory_mode, file_mode = MODES[self.trust]
        try:
            try:
                os.mkdir(folder, 0o700)
                os.chmod(folder, directory_mode)
            except FileExistsError:
                pass
            if os.path.exists(path):
                os.utime(path)
                return
            temp = f"{path}.{os.getpid()}.tmp"
            with open(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, file_mode), "w") as f:
                os.fchmod(f.fileno(), file_mode)
                json.dump(mine.to_json(), f, indent=1, sort_keys=True)
            os.replace(temp, path)
        except OSError:
            pass

    def keys(self, items: tuple[Any, ...], encoded: bytes,
             ends: tuple[int, ...]) -> tuple[bytes, ...]:
        """Each item's key, from its plain pickle (its encoding, for plain
        types, or where only cloudpickle can pickle it) and the salt; for a
        directory, with the fingerprints of the code the item's pickle names
        (keys.ItemCode: a class's, a function's; CacheError where that cannot
        be fingerprinted and no cache_version was given)."""
        view, start, keys = memoryview(encoded), 0, []
        item_code, salt = self._item_code, self._salt
        for item, end in zip(items, ends):
            data: Any = view[start:end]
            code: list[bytes] = []
            if type(item) not in PLAIN_TYPES:
                if item_code is not None:
                    pickled, code = item_code.pickle(item)
                    if pickled is not None:
                        data = pickled
                else:
                    try:
                        data = pickle.dumps(item, protocol=4)
                    except Exception:  # noqa: BLE001 - only cloudpickle can: key by that
                        pass
            digest = hashlib.blake2b(data, digest_size=16, person=b"mploader-cache2")
            digest.update(salt)
            for fingerprint in code:
                digest.update(fingerprint)
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
            untrusted = self.counts.untrusted
            self.counts.add(result.cache)
            if self.counts.untrusted and not untrusted:
                log.warning(
                    "cache %s: an entry owned by someone you do not trust, or that others "
                    "can write, was not read (unpickling it could run their code); its item "
                    "was prepared again and the entry replaced by yours.  Someone could write "
                    "into this directory: look for files in it that are not yours "
                    "(stats()['cache']['untrusted'] counts them)", self.where)
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
                "untrusted": counts.untrusted,
                "bytes": memory.held_bytes if memory is not None else None,
                "written_bytes": counts.written_bytes,
                "budget_bytes": memory.budget if memory is not None else None,
                "entries": len(memory.entries) if memory is not None else None}

    def info(self) -> dict[str, Any]:
        """This cache's key and its recipe, and, for a directory, how the
        recipes of the other keys found there differ from it (MPLoader.cache_info);
        ``item_code``: the classes and functions that items' pickles named so
        far (their code keys those items; a library's, its version), each
        with its fingerprint (hex)."""
        if self.recipe is None:  # cache="memory"
            entries = len(self.memory.entries) if self.memory is not None else 0
            return {"where": self.where, "key": None, "recipe": None, "entries": entries,
                    "others": []}
        with os.scandir(self.where) as found:
            entries = sum(1 for entry in found if entry.name.endswith(".entry"))
        item_code = dict(self._item_code.names) if self._item_code is not None else {}
        return {"where": self.where, "key": self._salt.hex(), "recipe": self.recipe.to_json(),
                "item_code": item_code, "entries": entries,
                "others": self._other_recipes(self.recipe)}

    def _other_recipes(self, mine: Recipe) -> list[dict[str, Any]]:
        """The most recently used other recipes of the directory, newest
        first, and why an entry of each is not one of this key's."""
        try:
            with os.scandir(os.path.join(self.where, _RECIPES)) as found:
                files = [(entry.stat().st_mtime, entry.path, entry.name[:-len(".json")])
                         for entry in found if entry.name.endswith(".json")
                         and entry.name != self._salt.hex() + ".json"]
        except FileNotFoundError:
            return []
        others = []
        for used, path, key in sorted(files, reverse=True)[:_RECIPES_SHOWN]:
            try:
                with open(path, "rb") as f:
                    other = Recipe.from_json(json.loads(f.read(_RECIPE_BYTES)))
                why = differences(mine, other)
                prepare = other.prepare
            except (OSError, ValueError, RecursionError):
                why, prepare = ["not a recipe this version of mploader can read"], None
            others.append({"key": key, "used": used, "prepare": prepare, "differences": why})
        return others

    def close(self) -> None:
        if self.memory is not None:
            self.memory.close()
