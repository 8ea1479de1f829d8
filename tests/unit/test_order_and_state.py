"""Pure logic of an epoch's order and its state (mploader/epochs.py): no
worker, no process; these run in milliseconds on every supported Python."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mploader.epochs import (Epochs, Permutation, Plan, Progress, fingerprint, parse_state,
                             shard_of)
from mploader.sources import Source


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_a_permutation_is_a_bijection_of_range_n(n):
    order = Permutation(n, seed=5, epoch=0)(np.arange(n))
    assert sorted(order.tolist()) == list(range(n))


def test_a_permutation_depends_on_seed_and_epoch_only():
    positions = np.arange(100)
    first = Permutation(100, 1, 0)(positions).tolist()
    assert Permutation(100, 1, 0)(positions).tolist() == first
    assert Permutation(100, 1, 1)(positions).tolist() != first
    assert Permutation(100, 2, 0)(positions).tolist() != first


def read(plan, n):
    return [index for _, index, _ in plan.read(Source(n))]


@pytest.mark.parametrize("shards", [1, 2, 3, 5])
def test_shards_are_disjoint_equal_and_leave_out_only_the_tail(shards):
    n = 23
    parts = [read(Plan(n, 0, True, 9, k, shards), n) for k in range(shards)]
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == n // shards
    seen = [i for p in parts for i in p]
    assert len(set(seen)) == len(seen) == n - n % shards


def test_unshuffled_plan_reads_the_source_in_order_from_its_start():
    assert read(Plan(10, 0, False, 0, 0, 1, base=0, start=4), 10) == [4, 5, 6, 7, 8, 9]


def progress(n=10, **plan):
    return Progress(Plan(n, plan.pop("epoch", 0), plan.pop("shuffle", True), 3, **plan))


FP = fingerprint(10, True, None, False, None)


def test_progress_counts_in_order_and_out_of_order():
    p = progress()
    p.handed((0,))
    p.handed((2,))
    state = p.state(FP, then=None)
    assert (state["position"], state["ahead"]) == (1, [2])
    p.handed((1,))
    assert p.state(FP, then=None)["position"] == 3


def test_a_finished_epoch_rolls_over_to_the_epoch_given():
    p = progress()
    p.handed(tuple(range(10)))
    assert (p.state(FP, then=7)["epoch"], p.state(FP, then=7)["position"]) == (7, 0)
    assert p.state(FP, then=None)["position"] == 10


def test_a_state_survives_json_and_parses_back():
    p = progress()
    p.handed((0, 1, 4))
    state = json.loads(json.dumps(p.state(FP, then=5)))
    resume = parse_state(state, FP)
    assert (resume.epoch, resume.position, resume.ahead, resume.then) == (0, 2, (4,), 5)


@pytest.mark.parametrize("field, value, words", [
    ("epoch", -1, "epoch is -1"),
    ("position", "3", "position is '3'"),
    ("seed", 1.5, "seed is 1.5"),
    ("next_epoch", -2, "next_epoch is -2"),
    ("position", 11, "position 11"),
    ("format", "other", "not a state"),
])
def test_a_malformed_state_names_its_field(field, value, words):
    state = progress().state(FP, then=None)
    state[field] = value
    with pytest.raises(ValueError, match=words):
        parse_state(state, FP)


@pytest.mark.parametrize("name, value", [("source_len", 11), ("shuffle", False),
                                         ("batch_size", 4), ("drop_remainder", True)])
def test_a_state_of_another_loader_names_what_differs(name, value):
    state = progress().state(FP, then=None)
    with pytest.raises(ValueError, match=f"{name} was .* and is {value!r} now"):
        parse_state(state, {**FP, name: value})


@pytest.mark.parametrize("shard, expected", [(None, (0, 1)), ((1, 3), (1, 3)), ([0, 2], (0, 2))])
def test_shard_of_takes_pairs(shard, expected):
    assert shard_of(shard) == expected


@pytest.mark.parametrize("shard", [(3, 3), (0, 0), "ab", 5])
def test_shard_of_refuses_what_is_not_a_shard(shard):
    with pytest.raises(ValueError, match="shard"):
        shard_of(shard)


class Running:
    def __init__(self):
        self.on = True

    def __call__(self):
        return self.on


def begin(epochs, n=10):
    plan = epochs.plan(n, True, (0, 1))
    running = Running()
    running.progress = Progress(plan)
    epochs.begin(plan, running.progress, running)
    return plan.epoch, running


def test_set_epoch_during_a_pass_names_the_next_pass_and_keeps_the_state():
    epochs = Epochs(seed=1)
    epoch, running = begin(epochs)
    epochs.set_epoch(4)
    state = epochs.state(FP, Progress, 10, True, (0, 1))
    assert (epoch, state["epoch"], state["next_epoch"]) == (0, 0, 4)
    running.on = False
    assert begin(epochs)[0] == 4


def test_set_epoch_of_the_running_pass_changes_nothing_once_it_runs_to_its_end():
    epochs = Epochs(seed=1)
    begin(epochs)
    epoch, running = begin(epochs)        # epoch 1 under way
    epochs.set_epoch(1)                   # a callback announcing the epoch it is in
    running.progress.handed(tuple(range(10)))
    running.on = False
    assert (epoch, begin(epochs)[0]) == (1, 2)


def test_set_epoch_between_passes_can_run_an_epoch_again():
    epochs = Epochs(seed=1)
    _, running = begin(epochs)
    running.on = False
    epochs.set_epoch(0)
    assert begin(epochs)[0] == 0


def test_following_keras_never_goes_back_to_an_epoch_a_pass_ran_during_training():
    epochs = Epochs(seed=1)
    epochs.follow(0)
    assert begin(epochs)[0] == 0
    begin(epochs)                         # .repeat(): epoch 1 starts before Keras's epoch 1
    epochs.follow(1)
    assert begin(epochs)[0] == 2


def test_a_pass_read_before_training_does_not_count_for_keras():
    epochs = Epochs(seed=1)
    _, running = begin(epochs)            # the model is built from the dataset
    running.on = False
    epochs.follow(0)
    assert begin(epochs)[0] == 0


def test_a_restored_state_inside_the_announced_epoch_stays():
    epochs = Epochs(seed=1)
    epochs.load(parse_state({**progress(epoch=3).state(FP, then=None), "position": 4}, FP))
    epochs.follow(3)
    plan = epochs.plan(10, True, (0, 1))
    assert (plan.epoch, plan.base) == (3, 4)


def test_set_epoch_of_a_pass_left_unfinished_runs_that_epoch_from_its_start():
    """A peek (next(iter(loader))) or a break, then the usual loop of set_epoch."""
    epochs = Epochs(seed=1)
    _, peek = begin(epochs)               # epoch 0: one element taken, then left
    epochs.set_epoch(0)
    assert begin(epochs)[0] == 0


def test_keras_after_a_peek_still_trains_epoch_0_from_its_start():
    epochs = Epochs(seed=1)
    begin(epochs)                         # next(iter(loader.dataset())) before fit
    epochs.follow(0)
    assert begin(epochs)[0] == 0


def _group_sizes(n: int, workers: int, threads: int = 1) -> list[int]:
    from mploader.passes import Feed, Options, Stats
    options = Options(ordered=True, prefetch=2 * threads, timeout=None, on_error="raise",
                      on_worker_death="raise", batch_size=None, drop_remainder=False,
                      group_items=8, threads=threads)
    feed = Feed(((i, i, i) for i in range(n)), options, None, 1, 0, Stats(0.0, item_s=0.02),
                count=n, workers=workers)
    sizes = []
    while (chunk := feed.next_chunk()) is not None:
        sizes.append(len(chunk.indices))
    assert sum(sizes) == n
    assert sizes[0] == 8 and sizes == sorted(sizes, reverse=True)
    return sizes


@pytest.mark.parametrize("workers, threads", [(64, 1), (1, 64), (4, 16)])
def test_groups_of_many_workers_shrink_at_a_passs_end_but_not_below_the_rows_that_go_alone(
        workers, threads):
    """A pass's groups shrink towards its end, so the workers finish
    together, but with 64 items running at once (processes or threads) to
    no fewer than MIN_GROUP_ITEMS items (but the last): shorter groups
    would ask the consumer for more calls than it answers (Feed._min_group)."""
    from mploader.passes import MIN_GROUP_ITEMS
    sizes = _group_sizes(3200, workers, threads)
    assert any(MIN_GROUP_ITEMS < size < 8 for size in sizes)  # they do shrink
    assert min(sizes[:-1]) == MIN_GROUP_ITEMS, sizes


def test_groups_of_few_workers_shrink_to_single_items():
    """With 4 workers the consumer keeps up with single items, and the
    workers finish together: a floor of 4 items there cost 0.02 of the rate."""
    sizes = _group_sizes(200, 4)
    assert sizes[-4:] == [1, 1, 1, 1], sizes
