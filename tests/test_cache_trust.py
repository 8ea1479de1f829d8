"""A cache directory is guarded like code (cache/stores.py): its entries are unpickled.

The tests run as root, as CI's containers do: a directory or an entry owned by
uid 65534 (nobody) is another user's, even for root.  A planted entry makes a
marker file when unpickled, as an attacker's would run their code: the
marker must never appear.
"""
from __future__ import annotations

import logging
import os
import pickle
import stat
import struct
import zlib

import numpy as np
import pytest

from mploader import CacheError, MPLoader
from mploader.cache.stores import DirectoryStore, untrusted

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to chown to another user")


def prepare(i):
    return np.full(4, i, np.float32)


def total(x):
    return float(x.sum())


def run(cache, **options):
    with MPLoader(total, 3, prepare=prepare, cache=str(cache), num_workers=1,
                  **options) as loader:
        values = list(loader)
        return values, loader.stats()["cache"]


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def made(tmp_path, name, mode_bits, owner=None):
    path = tmp_path / name
    path.mkdir()
    os.chmod(path, mode_bits)
    if owner is not None:
        os.chown(path, owner, owner)
    return path


@pytest.mark.parametrize("name, bits, owner, why", [
    ("others", 0o755, NOBODY, r"owned by user nobody \(uid 65534\)"),
    ("world", 0o777, None, r"writable by others \(mode 0777\)"),
    ("sticky", 0o1777, None, r"writable by others \(mode 1777\)"),
    ("group", 0o770, None, r"writable by its group root \(gid 0\) \(mode 0770\)"),
])
def test_a_directory_others_can_write_into_is_refused(tmp_path, name, bits, owner, why):
    path = made(tmp_path, name, bits, owner)
    with pytest.raises(CacheError, match=f"the cache directory {path} is {why}: every worker "
                                         r"unpickles .* run code as you.*cache_trust='group'"):
        MPLoader(total, 3, prepare=prepare, cache=str(path), num_workers=1)
    assert os.listdir(path) == [], "nothing written into a refused directory"


def test_a_missing_directory_is_made_private_and_its_entries_too(tmp_path):
    cache = tmp_path / "parent" / "cache"
    assert run(cache)[0] == [0.0, 4.0, 8.0]
    assert mode(cache) == 0o700, "only the directory itself is made private"
    entries = list(cache.glob("*.entry"))
    assert len(entries) == 3 and {mode(e) for e in entries} == {0o600}
    assert run(cache)[1]["hits"] == 3


def test_group_trust_admits_a_group_directory_and_shares_its_entries(tmp_path):
    shared = made(tmp_path, "shared", 0o770)
    values, counts = run(shared, cache_trust="group")
    assert values == [0.0, 4.0, 8.0] and counts["misses"] == 3
    assert {mode(e) for e in shared.glob("*.entry")} == {0o640}, "readable by the group only"
    assert run(shared, cache_trust="group")[1]["hits"] == 3
    made_here = tmp_path / "made"
    run(made_here, cache_trust="group")
    assert mode(made_here) == 0o2770, "setgid: entries take the directory's group"
    world = made(tmp_path, "world", 0o777)
    with pytest.raises(CacheError, match="writable by others.*With cache_trust='group'"):
        run(world, cache_trust="group")
    with pytest.raises(ValueError, match="cache_trust must be one of 'user', 'group'"):
        run(shared, cache_trust="others")


def test_group_trust_trusts_members_of_the_directorys_group_only():
    def status(uid, gid, bits):
        return os.stat_result((stat.S_IFREG | bits, 1, 1, 1, uid, gid, 0, 0, 0, 0))

    assert untrusted(status(NOBODY, NOBODY, 0o640), "group", NOBODY) is None  # nogroup's member
    assert untrusted(status(NOBODY, NOBODY, 0o660), "group", NOBODY) is None
    assert "owned by user nobody" in untrusted(status(NOBODY, NOBODY, 0o640), "user", NOBODY)
    assert "not a member of its group root" in untrusted(status(NOBODY, 0, 0o640), "group", 0)
    assert "writable by its group" in untrusted(status(0, NOBODY, 0o660), "group", 0)
    assert "writable by others" in untrusted(status(0, 0, 0o602), "group", 0)
    assert untrusted(status(0, 0, 0o600), "user", 0) is None


# An entry in the cache's own format whose pickle makes a marker
_HEADER = struct.Struct("<8sIIQ")


class Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(entry, marker, owner=None, bits=0o600):
    body = pickle.dumps(Planted(marker)) + bytes(64)
    length, size = len(body) - 64, _HEADER.size + len(body)
    crc = zlib.crc32(body, zlib.crc32(_HEADER.pack(b"MPLCACH2", 0, length, size)[12:]))
    temp = entry.with_suffix(".planting")
    temp.write_bytes(_HEADER.pack(b"MPLCACH2", crc, length, size) + body)
    os.chmod(temp, bits)
    if owner is not None:
        os.chown(temp, owner, owner)
    os.replace(temp, entry)


@pytest.mark.parametrize("owner, bits", [(NOBODY, 0o644), (None, 0o666), (None, 0o620)])
def test_an_entry_others_could_write_is_never_unpickled(tmp_path, caplog, owner, bits):
    """Planted in a directory of ours (it was writable, or someone had a way in):
    never read; the item is prepared again and the entry replaced by ours."""
    cache, marker = tmp_path / "cache", tmp_path / "ran"
    run(cache)
    entries = sorted(cache.glob("*.entry"))
    for entry in entries:
        plant(entry, marker, owner, bits)
    with caplog.at_level(logging.WARNING, logger="mploader"):
        values, counts = run(cache)
    assert not marker.exists(), "a planted entry was unpickled: it ran code as us"
    assert values == [0.0, 4.0, 8.0]
    assert (counts["untrusted"], counts["hits"], counts["misses"]) == (3, 0, 3)
    assert "was not read (unpickling it could run their code)" in caplog.text
    assert {(os.stat(e).st_uid, mode(e)) for e in entries} == {(0, 0o600)}, "replaced by ours"
    assert run(cache)[1]["hits"] == 3


def test_an_entry_that_is_ours_and_private_is_trusted_even_if_planted(tmp_path):
    """The line the check draws: an entry the user could have written is read
    (a directory nobody else can write into holds only those)."""
    cache, marker = tmp_path / "cache", tmp_path / "ran"
    run(cache)
    plant(sorted(cache.glob("*.entry"))[0], marker)
    run(cache)
    assert marker.exists()


def test_the_worker_checks_the_directory_it_opens(tmp_path):
    """A directory that became writable by others after the loader was made
    (or was swapped for another) is refused by the worker that opens it."""
    world = made(tmp_path, "world", 0o777)
    with pytest.raises(CacheError, match="writable by others"):
        DirectoryStore(str(world), "user")
    store = DirectoryStore(str(made(tmp_path, "mine", 0o700)), "user")
    os.close(store._dir)  # (a worker's store keeps it for the worker's life)
