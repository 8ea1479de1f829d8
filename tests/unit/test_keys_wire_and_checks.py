"""Pure logic of the cache's key, the wire format, the resume check's digests
and the loader's argument checks (no worker starts before they pass)."""
from __future__ import annotations

import functools

import pytest

from mploader import CacheError, MPLoader, WorkerDied
from mploader.cache.keys import differences, recipe
from mploader.messages import FrameReader, ItemEncoder, Task, decode_item, frame


def scaled(x, scale=1):
    return x * scale


class Loader:
    def __init__(self, k):
        self.k = k

    def load(self, x):
        return x + self.k


def key(prepare, version=None):
    return recipe(prepare, version, "/tmp/unit-cache").salt()


def test_the_same_prepare_keys_the_same():
    assert key(scaled) == key(scaled)


@pytest.mark.parametrize("other", [functools.partial(scaled, scale=2), Loader(1).load,
                                   lambda x: x])
def test_what_changes_the_result_changes_the_key(other):
    assert key(other) != key(scaled)


def test_a_bound_self_with_other_state_keys_otherwise_and_says_so():
    mine, theirs = recipe(Loader(1).load, None, "/d"), recipe(Loader(2).load, None, "/d")
    assert mine.salt() != theirs.salt() and differences(mine, theirs)


def test_cache_version_keys_too():
    assert key(scaled, "v1") != key(scaled, "v2") != key(scaled)


def test_what_cannot_be_fingerprinted_is_refused_without_a_version():
    import threading
    lock = threading.Lock()

    def holds_a_lock(x):
        with lock:
            return x
    with pytest.raises(CacheError, match="cache_version"):
        key(holds_a_lock)
    assert key(holds_a_lock, "mine")


def test_frames_are_read_back_whole_from_any_split():
    data = frame({"a": 1}) + frame([2, 3])
    reader = FrameReader()
    got = [m for part in (data[:3], data[3:11], data[11:]) for m, _ in reader.feed(part)]
    assert got == [{"a": 1}, [2, 3]]


def test_items_decode_one_by_one():
    encoder = ItemEncoder()
    items = [1, "path", (2, 3.5), Loader(4)]
    assert encoder.add(items, max_bytes=1 << 20) == 4
    encoded, ends = encoder.finish()
    task = Task(key=(0, 0), slot=0, capacity=0, epoch=0, indices=(0, 1, 2, 3), items=encoded,
                ends=ends)
    assert [decode_item(task, i) for i in range(3)] == items[:3]
    assert decode_item(task, 3).k == 4


@pytest.mark.parametrize("kwargs, words", [
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"num_workers": 0}, "num_workers must be an int >= 1"),
    ({"prefetch": 0}, "prefetch must be an int >= 1"),
    ({"on_error": "ignore"}, "on_error must be 'raise' or 'skip'"),
    ({"on_worker_death": "retry"}, "on_worker_death must be"),
    ({"timeout": 0}, "timeout must be > 0"),
    ({"seed": "0"}, "seed must be an int or None"),
    ({"drop_remainder": True}, "drop_remainder=True needs batch_size"),
    ({"padding_values": 0}, "need batch_size"),
    ({"shuffle": True, "shard": (0, 2)}, "needs seed="),
    ({"cache": "memory", "cache_bytes": -1, "prepare": scaled}, "cache_bytes must be"),
    ({"cache_trust": "everyone", "prepare": scaled, "cache": "/tmp/x"}, "cache_trust must be"),
])
def test_bad_arguments_are_refused_naming_the_argument(kwargs, words):
    with pytest.raises((ValueError, TypeError), match=words):
        MPLoader(scaled, 10, **kwargs)


@pytest.mark.parametrize("source, words", [("a.nii", "single path"), (True, "not a bool"),
                                           (-1, "must be >= 0"), (object(), "not object")])
def test_bad_sources_are_named(source, words):
    with pytest.raises((ValueError, TypeError), match=words):
        MPLoader(scaled, source)


@pytest.mark.parametrize("pid, returncode, words", [
    (4242, 3, "worker 1 (pid 4242) exited with code 3 owing source indices [7, 8]"),
    (4242, -9, "worker 1 (pid 4242) killed by SIGKILL owing"),
    # a Ray actor: how it ended is unknown, and one that died starting has no pid
    (0, None, "worker 1 ended owing source indices [7, 8]"),
])
def test_a_death_says_which_worker_ended_how_owing_what(pid, returncode, words):
    assert str(WorkerDied(1, pid, returncode, (7, 8))).startswith(words)
