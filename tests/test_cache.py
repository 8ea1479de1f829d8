"""The cache of prepare's results: in shared memory, or in a directory.

Real workers, real shared memory, real files.  ``prepare`` counts its calls
by appending a line to a file (O_APPEND: safe from several processes), so
"runs once per item" is counted, not assumed.  Memory is read from
/proc/<pid>/smaps of the parent and of every worker.
"""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mploader import MPLoader, WorkerError

from .bounded import assert_quiet, report

MiB = 1 << 20


def counted_prepare(count_file, shape=(16, 16, 16)):
    """prepare: a 'volume' computed from the item, each call counted in ``count_file``."""
    def prepare(i):
        with open(count_file, "a") as f:
            f.write(f"{i}\n")
        return {"image": np.full(shape, i, np.float32), "case": f"case{i}", "id": i}
    return prepare


def crop(prepared):
    """fn: a small crop of the cached volume (a copy), and its name."""
    return prepared["image"][:2, :2, :2] + 1, prepared["case"]


def calls(count_file):
    return sorted(int(x) for x in open(count_file).read().split()) if os.path.exists(count_file) else []


def check(values, n):
    assert [name for _, name in values] == [f"case{i}" for i in range(n)]
    for i, (image, _) in enumerate(values):
        assert image.dtype == np.float32 and (image == i + 1).all()


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("where", ["memory", "directory"])
def test_prepare_runs_once_per_item_across_epochs(tmp_path, where, workers):
    count = tmp_path / "count"
    cache = "memory" if where == "memory" else str(tmp_path / "cache")
    with MPLoader(crop, 12, prepare=counted_prepare(count), cache=cache,
                  num_workers=workers, shuffle=True, seed=1) as loader:
        for epoch in range(3):
            check(sorted(loader, key=lambda v: int(v[1][4:])), 12)
        stats = loader.stats()["cache"]
    assert calls(count) == list(range(12)), "prepare ran more than once for some item"
    assert (stats["hits"], stats["misses"], stats["uncached"]) == (24, 12, 0)
    if where == "memory":
        assert stats["entries"] == 12 and stats["bytes"] >= 12 * 16 ** 3 * 4


def test_without_cache_prepare_runs_every_time_and_cache_needs_prepare(tmp_path):
    count = tmp_path / "count"
    with MPLoader(crop, 4, prepare=counted_prepare(count), cache=None, num_workers=2) as loader:
        check(list(loader), 4)
        check(list(loader), 4)
        assert loader.stats()["cache"] is None
    assert calls(count) == sorted(list(range(4)) * 2)
    with pytest.raises(ValueError, match="need prepare="):
        MPLoader(crop, 4, cache=str(tmp_path))
    with pytest.raises(ValueError, match="cache_bytes must be"):
        MPLoader(crop, 4, prepare=counted_prepare(count), cache_bytes=-1)
    for bad in (3, ""):
        with pytest.raises(ValueError, match="cache must be"):
            MPLoader(crop, 4, prepare=counted_prepare(count), cache=bad)
    with pytest.raises(ValueError, match="cache_bytes must be"):
        MPLoader(crop, 4, prepare=counted_prepare(count), cache_bytes=True)
    with pytest.raises(ValueError, match="budget of cache='memory'"):
        MPLoader(crop, 4, prepare=counted_prepare(count), cache=str(tmp_path), cache_bytes=9)


Case = collections.namedtuple("Case", "image meta")


def structured(i):
    """prepare: a namedtuple, a list with None, a masked array (its mask matters)."""
    return Case(np.ma.masked_array(np.full(4, 1.0), mask=[0, 1, 1, i % 2]), [None, i, f"c{i}"])


def masked_mean(prepared):
    assert isinstance(prepared, Case) and isinstance(prepared.meta, list), type(prepared)
    assert prepared.meta[0] is None
    return float(prepared.image.mean()), int(prepared.image.mask.sum()), prepared.meta[2]


@pytest.mark.parametrize("cache", ["memory", "directory", None])
def test_prepared_results_keep_their_form_cached_or_not(tmp_path, cache):
    where = str(tmp_path / "cache") if cache == "directory" else cache
    expected = [(1.0, 2 + i % 2, f"c{i}") for i in range(4)]
    with MPLoader(masked_mean, 4, prepare=structured, cache=where, num_workers=2) as loader:
        assert list(loader) == expected
        assert list(loader) == expected  # from the cache


def writes_into_input(prepared):
    prepared["image"][0, 0, 0] = -1
    return prepared["image"]


@pytest.mark.parametrize("where", ["memory", "directory"])
def test_a_write_into_a_cached_input_is_an_error_on_every_epoch(tmp_path, where):
    cache = "memory" if where == "memory" else str(tmp_path / "cache")
    with MPLoader(writes_into_input, 3, prepare=counted_prepare(tmp_path / "count"),
                  cache=cache, num_workers=1) as loader:
        for epoch in range(2):  # epoch 0 gets a fresh (miss) result, epoch 1 a cached one
            with pytest.raises(WorkerError, match=r"read-only \(fn wrote into its input, "
                                                  r"prepare's result.*x.copy\(\)\).*source index 0"):
                list(loader)
    # and nothing changed: the cached volumes are intact
    with MPLoader(crop, 3, prepare=counted_prepare(tmp_path / "count"), cache=cache,
                  num_workers=1) as loader:
        check(list(loader), 3)


def test_an_error_in_prepare_names_it_and_the_item_is_prepared_again_next_epoch(tmp_path):
    count = tmp_path / "count"
    prepare = counted_prepare(count)

    def flaky(i):
        if i == 2 and 2 not in calls(count):  # the first time only
            with open(count, "a") as f:
                f.write("2\n")
            raise OSError("cannot read case2.nii.gz")
        return prepare(i)

    with MPLoader(crop, 4, prepare=flaky, num_workers=1, on_error="skip") as loader:
        first = list(loader)
        assert [name for _, name in first] == ["case0", "case1", "case3"]
        assert "(raised in prepare)" in loader.skipped[0].message
        check(list(loader), 4)  # its prepare runs again, and succeeds
    assert calls(count) == [0, 1, 2, 2, 3]


def test_the_budget_bounds_the_memory_cache_and_the_rest_is_prepared_each_time(tmp_path):
    """One budget for all workers: 10 volumes (and their small pickles) fit,
    whichever worker prepared them."""
    count = tmp_path / "count"
    volume = 16 ** 3 * 4  # 16 KiB
    with MPLoader(crop, 20, prepare=counted_prepare(count), num_workers=3,
                  cache_bytes=10 * volume + 8192) as loader:
        check(list(loader), 20)
        check(list(loader), 20)
        stats = loader.stats()["cache"]
    assert stats["entries"] == 10 and stats["bytes"] <= stats["budget_bytes"]
    assert stats["uncached"] == 40 - stats["entries"] - stats["hits"]
    assert stats["hits"] == 10 and len(calls(count)) == 30
    with pytest.raises(ValueError, match="more than this machine's memory"):
        MPLoader(crop, 4, prepare=counted_prepare(count), cache_bytes=1 << 50)


def test_a_replacement_worker_keeps_the_entries_of_the_dead_one(tmp_path):
    """A worker dies (SIGKILL) in epoch 1; its replacement appends after every
    entry (the free offset is shared), so epoch 2 reads every volume intact."""
    count, marker = tmp_path / "count", tmp_path / "died"
    prepare = counted_prepare(count)

    def die_once(prepared):
        if prepared["id"] == 7 and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return crop(prepared)

    with MPLoader(die_once, 12, prepare=prepare, num_workers=2,
                  on_worker_death="restart") as loader:
        check(list(loader), 12)
        check(list(loader), 12)
        stats = loader.stats()
    assert stats["worker_restarts"] == 1
    assert stats["cache"]["hits"] >= 12 and stats["cache"]["entries"] == 12
    assert len(calls(count)) <= 13  # item 7 at most twice: its entry died with the worker


def _cache_memory(pid: int) -> tuple[int, int]:
    """(Pss of the cache file's mappings, private bytes outside them) of one
    process, from smaps."""
    pss = private = 0
    in_cache = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if not line[0].isupper() or not fields[0].endswith(":"):  # a mapping's header
                in_cache = "memfd:mploader-cache" in line
            elif fields[0] == "Pss:" and in_cache:
                pss += int(fields[1]) * 1024
            elif fields[0] in ("Private_Clean:", "Private_Dirty:") and not in_cache:
                private += int(fields[1]) * 1024  # (a cache page one process maps is "private")
    return pss, private


@pytest.mark.slow  # over 1.5 s, the same on every Python
def test_the_memory_cache_is_one_copy_whatever_num_workers(tmp_path):
    """24 volumes of 8 MiB: the cache file's pages, summed over the parent and
    every worker (Pss splits a shared page among its mappers), are the cache's
    bytes once, with 1 worker and with 4; each worker's private memory stays
    far below the cache (MONAI's CacheDataset: a copy per worker)."""
    n, shape = 24, (128, 128, 128)
    found = {}
    for workers in (1, 4):
        with MPLoader(lambda p: float(p["image"].max()), n, num_workers=workers,
                      prepare=counted_prepare(tmp_path / f"count{workers}", shape)) as loader:
            for _ in range(3):  # every worker reads entries written by the others
                assert sorted(loader) == [float(i) for i in range(n)]
            cache_bytes = loader.stats()["cache"]["bytes"]
            pids = [os.getpid()] + loader.worker_pids()
            memory = [_cache_memory(pid) for pid in pids]
        found[workers] = (cache_bytes, sum(pss for pss, _ in memory),
                          max(private for _, private in memory[1:]))
    for workers, (cache_bytes, pss, private) in found.items():
        assert n * 8 * MiB <= cache_bytes <= n * (8 * MiB + 4096)  # volumes, small pickles
        # pages never read by anyone are not resident: at most the cache, at least most of it
        assert 0.5 * cache_bytes <= pss <= cache_bytes + MiB, (workers, pss / MiB)
        assert private < cache_bytes / 4, f"a worker holds {private / MiB:.0f} MiB of its own"
    assert abs(found[4][1] - found[1][1]) < 0.1 * found[1][0], {
        w: round(v[1] / MiB) for w, v in found.items()}


def test_the_cache_file_goes_with_the_loader(tmp_path):
    def cache_fds():
        found = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                if "mploader-cache" in os.readlink(f"/proc/self/fd/{fd}"):
                    found.append(fd)
            except FileNotFoundError:  # the descriptor listdir itself used
                pass
        return found
    loader = MPLoader(crop, 3, prepare=counted_prepare(tmp_path / "count"), num_workers=1)
    check(list(loader), 3)
    assert len(cache_fds()) == 1
    loader.close()
    assert cache_fds() == []
    loader = MPLoader(crop, 3, prepare=counted_prepare(tmp_path / "count"), num_workers=1)
    list(loader)
    del loader
    assert cache_fds() == []


# -- the directory cache, across processes ---------------------------------------

FILL = """
import json, os, sys
import numpy as np
from mploader import MPLoader

cache, n, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
version = sys.argv[4] if len(sys.argv) > 4 else "1"

def prepare(i):
    # the count file from the environment: a global would be keyed (cache/keys.py),
    # and runs counting into different files would not share entries
    with open(os.environ["COUNT_FILE"], "a") as f:
        f.write(f"{i}\\n")
    return np.full(mib * 262144, i, np.float32), f"case{i}"

def fn(p):
    image, name = p
    assert (image == image[0]).all()
    return float(image[0]), name, image.size

with MPLoader(fn, n, prepare=prepare, cache=cache, cache_version=version, num_workers=2,
              on_worker_death="restart") as loader:
    values = list(loader)
    stats = loader.stats()["cache"]
print(json.dumps({"values": values, "cache": stats}))
"""


def fill(tmp_path, cache, n=8, mib=1, version="1", count="count"):
    """Start the FILL program (a new process); returns its Popen."""
    script = tmp_path / "fill.py"
    script.write_text(FILL)
    return subprocess.Popen([sys.executable, str(script), str(cache), str(n), str(mib), version],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, COUNT_FILE=str(tmp_path / count)))


def finished(proc, n, mib=1, timeout=120):
    """The FILL program's report, once it has ended; its values checked."""
    out, err = proc.communicate(timeout=timeout)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert_quiet(result)
    got = report(result)
    assert got["values"] == [[float(i), f"case{i}", mib * 262144] for i in range(n)]
    return got


@pytest.mark.slow  # over 1.5 s, the same on every Python
def test_a_directory_cache_survives_a_new_process_and_a_version_bump(tmp_path):
    cache = tmp_path / "cache"
    first = finished(fill(tmp_path, cache), 8)
    assert first["cache"]["misses"] == 8 and len(calls(tmp_path / "count")) == 8
    second = finished(fill(tmp_path, cache), 8)
    assert (second["cache"]["hits"], second["cache"]["misses"]) == (8, 0)
    assert len(calls(tmp_path / "count")) == 8, "a new process prepared again"
    bumped = finished(fill(tmp_path, cache, version="2"), 8)
    assert bumped["cache"]["misses"] == 8 and len(calls(tmp_path / "count")) == 16


@pytest.mark.slow  # over 1.5 s, the same on every Python
def test_a_truncated_or_damaged_entry_is_prepared_again(tmp_path):
    cache = tmp_path / "cache"
    finished(fill(tmp_path, cache, n=4), 4)
    entries = sorted(cache.glob("*.entry"))
    assert len(entries) == 4
    with open(entries[0], "r+b") as f:  # truncated in the middle of its data
        f.truncate(os.path.getsize(entries[0]) // 2)
    with open(entries[1], "r+b") as f:  # one byte of its data flipped, length intact
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    entries[2].write_bytes(b"")  # empty
    again = finished(fill(tmp_path, cache, n=4), 4)
    assert (again["cache"]["corrupt"], again["cache"]["misses"], again["cache"]["hits"]) == (3, 3, 1)
    healed = finished(fill(tmp_path, cache, n=4), 4)
    assert (healed["cache"]["corrupt"], healed["cache"]["hits"]) == (0, 4)


@pytest.mark.slow  # over 1.5 s, the same on every Python
def test_sigkill_in_the_middle_of_writing_an_entry_leaves_no_half_entry(tmp_path):
    """Entries of 64 MiB take long enough to write that the test sees the
    temporary file and SIGKILLs its writer (the worker, whose pid is in the
    name) before the write ends; the loader restarts the worker.  No entry is
    ever half there: a later process reads every one whole."""
    cache = tmp_path / "cache"
    killed_mid_write = 0
    for attempt in range(3):
        proc = fill(tmp_path, cache, n=3, mib=64, count=f"count{attempt}")
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and not killed_mid_write:
            for temp in cache.glob("*.tmp") if cache.exists() else ():
                pid = int(temp.name.split(".")[-3])
                size = temp.stat().st_size if temp.exists() else None
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                if size is not None and size < 64 * MiB:
                    killed_mid_write += 1
                break
            time.sleep(0.001)
        finished(proc, 3, 64)
        if killed_mid_write:
            break
    assert killed_mid_write, "never caught a worker in the middle of a write (3 tries)"
    assert list(cache.glob("*.tmp")), "the killed writer's temporary file should remain"
    after = finished(fill(tmp_path, cache, n=3, mib=64, count="count_after"), 3, 64)
    assert (after["cache"]["hits"], after["cache"]["corrupt"]) == (3, 0)
    assert calls(tmp_path / "count_after") == []


@pytest.mark.slow  # over 1.5 s, the same on every Python
def test_two_processes_filling_one_directory_at_once_agree(tmp_path):
    cache = tmp_path / "cache"
    a, b = fill(tmp_path, cache, n=16, count="a"), fill(tmp_path, cache, n=16, count="b")
    first, second = finished(a, 16), finished(b, 16)
    assert first["values"] == second["values"]
    assert len(calls(tmp_path / "a")) + len(calls(tmp_path / "b")) >= 16
    assert not list(cache.glob("*.tmp"))
    third = finished(fill(tmp_path, cache, n=16, count="c"), 16)
    assert (third["cache"]["hits"], third["cache"]["corrupt"]) == (16, 0)
    assert calls(tmp_path / "c") == []


def prepare_a(i):
    return np.full(3, i, np.int64)


def prepare_b(i):  # another prepare: its code keys its own entries
    return np.full(3, 10 * i, np.int64)


def test_a_directory_entry_is_keyed_by_prepare_and_checked_again_when_its_file_changes(tmp_path):
    cache = str(tmp_path / "cache")
    with MPLoader(lambda x: x, 3, prepare=prepare_a, cache=cache, num_workers=1) as loader:
        assert [x.tolist() for x in loader] == [[i] * 3 for i in range(3)]
        entry = sorted((tmp_path / "cache").glob("*.entry"))[0]
        with open(entry, "r+b") as f:  # damaged in place, between two epochs
            f.seek(-8, os.SEEK_END)
            f.write(b"\xff" * 8)
        assert [x.tolist() for x in loader] == [[i] * 3 for i in range(3)]
        assert loader.stats()["cache"]["corrupt"] == 1
    with MPLoader(lambda x: x, 3, prepare=prepare_b, cache=cache, num_workers=1) as loader:
        assert [x.tolist() for x in loader] == [[10 * i] * 3 for i in range(3)]
        assert loader.stats()["cache"]["hits"] == 0


def test_only_the_caches_own_stale_temporary_files_are_removed(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    mine = cache / "my_download.tmp"
    stale = cache / (("ab" * 16) + ".entry.123.456.tmp")
    fresh = cache / (("cd" * 16) + ".entry.123.789.tmp")
    for path in (mine, stale, fresh):
        path.write_bytes(b"partial")
    for path in (mine, stale):
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    with MPLoader(lambda x: x, 2, prepare=prepare_a, cache=str(cache), num_workers=1) as loader:
        list(loader)
    assert mine.exists() and fresh.exists() and not stale.exists()


def test_cache_info_says_why_a_directory_missed(tmp_path):
    cache = str(tmp_path / "cache")
    with MPLoader(lambda x: x, 3, prepare=prepare_a, cache=cache, num_workers=1) as loader:
        list(loader)
        first = loader.cache_info()
    assert first["entries"] == 3 and first["others"] == []
    assert first["recipe"]["prepare"] == f"{__name__}:prepare_a"
    assert (tmp_path / "cache" / "recipes" / (first["key"] + ".json")).exists()
    with MPLoader(lambda x: x, 2, prepare=prepare_b, cache=cache, num_workers=1) as loader:
        info = loader.cache_info()
    assert info["entries"] == 3 and [o["key"] for o in info["others"]] == [first["key"]]
    assert info["others"][0]["differences"] == [
        f"prepare is {__name__}:prepare_b, was {__name__}:prepare_a",
        f"{__name__}:prepare_a was used, is not now", f"{__name__}:prepare_b is used now, was not"]
    with MPLoader(lambda x: x, 2, prepare=prepare_a, num_workers=1) as loader:
        assert loader.cache_info() == {"where": "memory", "key": None, "recipe": None,
                                       "entries": 0, "others": []}
    with MPLoader(lambda x: x, 2, num_workers=1) as loader:
        assert loader.cache_info() is None
