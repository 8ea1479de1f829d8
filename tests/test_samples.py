"""Several samples per item: a generator fn, its samples flattened in order.

Real workers throughout; the patches of a "volume" are arrays computed from
the item and its item_rng(), so any reordering or repetition shows.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from mploader import MPLoader, WorkerError, item_rng


def patches(i):
    """Three patches of volume i, each with a draw of the item's generator."""
    for s in range(3):
        yield np.array([i, s, int(item_rng().integers(1 << 30))])


def rows(stream):
    return [x.tolist() for x in stream]


def test_samples_flatten_in_order_identically_for_1_and_3_workers():
    with MPLoader(patches, 7, num_workers=1, seed=5, samples_per_item=3) as one, \
            MPLoader(patches, 7, num_workers=3, seed=5, samples_per_item=3) as three:
        a, b = rows(one), rows(three)
        assert len(one) == 21
    assert a == b
    assert [(i, s) for i, s, _ in a] == [(i, s) for i in range(7) for s in range(3)]
    draws = [d for _, _, d in a]
    assert len(set(draws)) == len(draws), "item_rng() repeated a draw between samples"


def test_batches_span_items_and_count_samples():
    with MPLoader(patches, 5, num_workers=2, seed=5, batch_size=4) as loader:
        batches = rows(loader)
        with pytest.raises(TypeError, match="samples_per_item"):
            len(loader)
    with MPLoader(patches, 5, num_workers=2, seed=5) as loader:
        flat = rows(loader)
    assert [len(b) for b in batches] == [4, 4, 4, 3]
    assert [row for b in batches for row in b] == flat
    assert batches[1][1][:2] == [1, 2] and batches[1][2][:2] == [2, 0]  # volumes 1 and 2
    with MPLoader(patches, 5, num_workers=2, seed=5, batch_size=4, drop_remainder=True,
                  samples_per_item=3) as loader:
        assert len(loader) == 3 and len(rows(loader)) == 3


def test_an_item_that_yields_another_count_than_samples_per_item_is_named():
    def uneven(i):
        yield from (np.float32(i),) * (2 if i == 3 else 1)
    with pytest.raises(WorkerError, match=r"more than samples_per_item=1.*source index 3"), \
            MPLoader(uneven, 6, num_workers=2, samples_per_item=1) as loader:
        list(loader)


def cracked(i):
    for s in range(3):
        if i == 2 and s == 2:
            raise ValueError(f"patch {s} of volume {i} is cut off")
        yield np.array([i, s])


def test_an_error_after_some_samples_names_the_item_and_the_sample():
    got = []
    with pytest.raises(WorkerError) as info, MPLoader(cracked, 5, num_workers=2) as loader:
        for x in loader:
            got.append(x.tolist())
    assert got == [[i, s] for i in range(2) for s in range(3)] + [[2, 0], [2, 1]]
    err = info.value
    assert err.index == 2 and err.sample == 2
    assert "source index 2" in str(err) and "after its sample 1" in str(err)


def test_skip_drops_the_rest_of_the_item_and_reports_it_once():
    with MPLoader(cracked, 5, num_workers=2, on_error="skip") as loader:
        got = rows(loader)
        skipped = list(loader.skipped)
    assert got == ([[i, s] for i in range(2) for s in range(3)] + [[2, 0], [2, 1]]
                   + [[i, s] for i in range(3, 5) for s in range(3)])
    assert [s.index for s in skipped] == [2] and "after 2 samples" in skipped[0].message


# Logic of the epoch's state, the same on every Python (2-3 s each): main Python only.
@pytest.mark.slow
@pytest.mark.parametrize("taken, options", [
    (4, dict(samples_per_item=3)),                  # between two samples of volume 1
    (2, dict(batch_size=4, samples_per_item=3)),    # a batch boundary inside volume 2
    (5, dict(ordered=False, shuffle=True)),
])
def test_resume_between_two_samples_of_one_item_is_exact(taken, options):
    common = dict(seed=9, **options)
    with MPLoader(patches, 6, num_workers=3, **common) as loader:
        it = iter(loader)
        head = [next(it).tolist() for _ in range(taken)]
        state = json.loads(json.dumps(loader.state_dict()))
    with MPLoader(patches, 6, num_workers=1, **common) as loader:
        loader.load_state_dict(state)
        rest, following = rows(loader), rows(loader)
    with MPLoader(patches, 6, num_workers=2, **common) as loader:
        reference = [rows(loader) for _ in range(2)]
    if options.get("ordered", True):
        assert state["samples"], "the state should record a volume begun"
        assert head + rest == reference[0]
        assert following == reference[1]
    else:  # nothing lost or repeated; the order is as completed
        flat = lambda rows_: sorted(map(tuple, rows_))  # noqa: E731
        assert flat(head + rest) == flat(reference[0])
        assert flat(following) == flat(reference[1])


@pytest.mark.slow  # version-independent, over 2 s: the main Python only
def test_a_worker_holds_one_sample_at_a_time_not_the_whole_item():
    """20 samples of 16 MiB: the worker's own (anonymous) memory stays far below 320 MiB."""
    def big_patches(i):
        for s in range(20):
            patch = np.full(16 << 20, s, np.uint8)
            status = open("/proc/self/status").read()
            anon = int(next(line.split()[1] for line in status.splitlines()
                            if line.startswith("RssAnon:"))) << 10
            yield patch, np.int64(anon)
    with MPLoader(big_patches, 1, num_workers=1) as loader:
        got = list(loader)
    assert len(got) == 20 and [int(p[0]) for p, _ in got] == list(range(20))
    peak = max(int(anon) for _, anon in got)
    assert peak < 120 << 20, f"the worker held {peak >> 20} MiB of its own memory"


@pytest.mark.tf
def test_dataset_of_samples_has_the_cardinality_samples_per_item_gives():
    with MPLoader(patches, 5, num_workers=1, seed=5, batch_size=4) as loader:
        epoch_0 = rows(loader)
    with MPLoader(patches, 5, num_workers=2, seed=5, samples_per_item=3, batch_size=4) as loader:
        ds = loader.dataset()
        assert int(ds.cardinality()) == 4
        assert [b.numpy().tolist() for b in ds] == epoch_0
    with MPLoader(patches, 5, num_workers=2, seed=5) as loader:
        ds = loader.dataset()
        assert int(ds.cardinality()) == -2  # unknown: say samples_per_item to know it
        assert len([x for x in ds]) == 15


def test_items_that_yield_no_sample_add_nothing_and_count_as_handed_out():
    def some(i):
        yield from (np.int64(10 * i + s) for s in range(i % 3))
    with MPLoader(some, 9, num_workers=2) as loader:
        it = iter(loader)
        head = [int(next(it)) for _ in range(4)]
        state = loader.state_dict()
        rest = [int(x) for x in it]
    assert head + rest == [10 * i + s for i in range(9) for s in range(i % 3)]
    assert state["ahead"] == [], "items without samples must not stay ahead"
    with MPLoader(some, 9, num_workers=1) as loader:
        loader.load_state_dict(state)
        assert [int(x) for x in loader] == rest


def test_without_samples_per_item_the_state_stays_in_the_epoch_until_its_end():
    def four(i):
        yield from (np.int64(10 * i + s) for s in range(4))
    with MPLoader(four, 3, num_workers=2) as loader:
        it = iter(loader)
        head = [int(next(it)) for _ in range(9)]
        state = loader.state_dict()
    assert (state["epoch"], state["position"], state["samples"]) == (0, 2, {"2": 1})
    with MPLoader(four, 3, num_workers=1) as loader:
        loader.load_state_dict(state)
        assert head + [int(x) for x in loader] == [10 * i + s for i in range(3) for s in range(4)]


def test_an_error_while_a_batch_is_gathered_comes_after_the_samples_before_it():
    batches = []
    with MPLoader(cracked, 5, num_workers=2, batch_size=4) as loader:
        with pytest.raises(WorkerError, match="source index 2"):
            for batch in loader:
                batches.append(batch.tolist())
        state = loader.state_dict()
    flat = [row for b in batches for row in b]
    assert flat == [[i, s] for i in range(2) for s in range(3)] + [[2, 0], [2, 1]]
    assert state["samples"] == {"2": 2}   # every sample the consumer got, and no other


def test_samples_of_different_types_are_not_batched_by_a_cast():
    def mixed(i):
        yield np.float32(1.5)
        yield 2.5                         # a Python float: float64 if stacked
    with pytest.raises(TypeError, match=r"result.*float32.*float.*does not cast"), \
            MPLoader(mixed, 2, num_workers=1, batch_size=2) as loader:
        list(loader)


def test_a_plain_fn_returning_a_generator_says_to_pass_samples_per_item():
    def returns_generator(i):
        return (np.int64(i) for _ in range(2))
    with pytest.raises(WorkerError, match="pass samples_per_item"), \
            MPLoader(returns_generator, 3, num_workers=1) as loader:
        list(loader)
    with MPLoader(returns_generator, 3, num_workers=1, samples_per_item=2) as loader:
        assert [int(x) for x in loader] == [0, 0, 1, 1, 2, 2] and len(loader) == 6
    with pytest.raises(WorkerError, match="yielded 1 samples.*samples_per_item=2"), \
            MPLoader(lambda i: np.int64(i), 3, num_workers=1, samples_per_item=2) as loader:
        list(loader)


def test_with_drop_remainder_an_error_comes_at_once_never_after_a_short_batch():
    batches = []
    with MPLoader(cracked, 5, samples_per_item=3, num_workers=2, batch_size=3, drop_remainder=True) as loader:
        with pytest.raises(WorkerError, match=r"patch 2 of volume 2 is cut off.*source index 2"):
            for batch in loader:
                batches.append(batch.tolist())
    assert batches == [[[0, 0], [0, 1], [0, 2]], [[1, 0], [1, 1], [1, 2]]]  # not [[2, 0], [2, 1]]


@pytest.mark.tf
def test_through_dataset_the_error_is_the_items_own_not_a_signature_mismatch():
    import tensorflow as tf
    with MPLoader(cracked, 6, num_workers=1, batch_size=3, drop_remainder=True) as loader:
        shapes = []
        with pytest.raises(tf.errors.OpError) as info:
            for batch in loader.dataset():
                shapes.append(tuple(batch.shape))
    assert shapes == [(3, 2), (3, 2)]
    assert "WorkerError: ValueError: patch 2 of volume 2 is cut off" in str(info.value)
    assert "SignatureMismatch" not in str(info.value)


@pytest.mark.tf
def test_through_dataset_sample_batches_are_the_loaders_and_a_state_counts_those_taken():
    """A generator fn with batch_size through dataset(): the parent batches
    the samples, and a state saved after two batches resumes at the third."""
    with MPLoader(patches, 5, num_workers=2, seed=5, batch_size=4) as loader:
        direct = rows(loader)
        loader.set_epoch(0)
        iterator = iter(loader.dataset())
        taken = [rows(next(iterator).numpy()) for _ in range(2)]
        state = loader.state_dict()
        del iterator
    assert taken == direct[:2]
    with MPLoader(patches, 5, num_workers=2, seed=5, batch_size=4) as resumed:
        resumed.load_state_dict(state)
        rest = [rows(batch) for batch in resumed.dataset().as_numpy_iterator()]
    assert rest == direct[2:]
