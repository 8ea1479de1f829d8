"""Epochs as training needs them: per-epoch shuffle, shards, exact resume.

Real workers throughout; every resume happens in a NEW process (a child
script), with another ``num_workers`` than the run that saved the state.
"""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import psutil
import pytest

from mploader import MPLoader, item_rng

from . import helpers
from .bounded import assert_no_worker_left


def identity(i):
    return i


def seeded_noise(i):
    """A result that depends on the item's random state: the same for any worker count."""
    return i, float(item_rng().random())


def epochs(loader, count):
    return [list(loader) for _ in range(count)]


@pytest.mark.slow  # the order's logic, the same on every Python (3 s): main Python only
def test_every_epoch_is_a_new_permutation_identical_for_1_and_3_workers():
    with MPLoader(seeded_noise, 50, num_workers=1, shuffle=True, seed=7) as one, \
            MPLoader(seeded_noise, 50, num_workers=3, shuffle=True, seed=7, ordered=True,
                     prefetch=3) as three:
        a, b = epochs(one, 3), epochs(three, 3)
    assert a == b
    orders = [[i for i, _ in epoch] for epoch in a]
    assert all(sorted(order) == list(range(50)) for order in orders)
    assert len({tuple(order) for order in orders}) == 3, "an epoch repeated the order"
    assert orders[0] != list(range(50))
    with MPLoader(identity, 50, num_workers=2, shuffle=True, seed=8) as other:
        assert list(other) != orders[0], "another seed gave the same order"


@pytest.mark.slow  # version-independent, over 2 s: the main Python only
def test_shards_are_disjoint_cover_the_epoch_less_its_tail_and_have_equal_lengths():
    n, k = 20, 3
    with MPLoader(identity, n, num_workers=2, shuffle=True, seed=3) as whole:
        order = [list(whole) for _ in range(2)]
    for epoch in range(2):
        shards = []
        for index in range(k):
            with MPLoader(identity, n, num_workers=2, shuffle=True, seed=3,
                          shard=(index, k)) as loader:
                assert len(loader) == n // k
                for _ in range(epoch):
                    list(loader)
                shards.append(list(loader))
        assert [len(s) for s in shards] == [n // k] * k
        seen = [i for s in shards for i in s]
        assert len(set(seen)) == len(seen), "two shards read the same item"
        # Shard k takes positions k, k+K, ...; the tail is the epoch's last n % K.
        assert sorted(seen) == sorted(order[epoch][:n - n % k])
        assert shards[1] == order[epoch][1:n - n % k:k]


def test_a_billion_item_source_shuffles_without_a_list_per_epoch():
    me = psutil.Process()
    before = me.memory_info().rss
    start = time.monotonic()
    with MPLoader(identity, 10**9, num_workers=2, shuffle=True, seed=1) as loader:
        it = iter(loader)
        first = next(it)
        first_s = time.monotonic() - start
        head = [first] + [next(it) for _ in range(2000)]
        grown = me.memory_info().rss - before
    assert len(loader) == 10**9
    assert first_s < 5.0, f"the first item took {first_s:.1f} s"
    assert len(set(head)) == len(head) and max(head) > 10**6
    assert grown < 64 << 20, f"the parent grew by {grown >> 20} MiB"


def test_shuffle_or_shard_on_an_iterable_says_what_to_do():
    with pytest.raises(TypeError, match=r"needs a source with len\(\) and \[\].*Pass a list"):
        MPLoader(identity, iter(range(10)), num_workers=1, shuffle=True)
    with pytest.raises(ValueError, match="shard"):
        MPLoader(identity, 10, num_workers=1, shard=(3, 3))


RESUME = """
    import json, sys
    from mploader import MPLoader
    def fn(i):
        return i
    options = json.loads(sys.argv[1])
    loader = MPLoader(fn, 23, **options)
    report_pids(loader)
    with open("state.json") as f:
        loader.load_state_dict(json.load(f))
    got = {"rest": [x.tolist() if hasattr(x, "tolist") else x for x in loader],
           "next_epoch": [x.tolist() if hasattr(x, "tolist") else x for x in loader]}
    loader.close()
    print(json.dumps(got))
"""


def resumed_in_a_new_process(script, state, options):
    s = script(RESUME, name="resume.py")
    (s.path.parent / "state.json").write_text(json.dumps(state))
    proc = s.start(json.dumps(options))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert_no_worker_left(s.wait_for_pids())
    s.pid_file.unlink()
    return json.loads(out.strip().splitlines()[-1])


def as_list(x):
    return x.tolist() if hasattr(x, "tolist") else x


@pytest.mark.slow  # version-independent, over 2 s: the main Python only
@pytest.mark.parametrize("saved, restored", [
    (dict(num_workers=3), dict(num_workers=1)),
    (dict(num_workers=1, batch_size=4), dict(num_workers=3, batch_size=4, prefetch=1)),
    (dict(num_workers=2, ordered=False), dict(num_workers=3, ordered=False)),
])
def test_resume_in_a_new_process_with_other_workers_continues_element_for_element(
        script, saved, restored):
    common = dict(shuffle=True, seed=11)
    with MPLoader(identity, 23, **common, **saved) as loader:
        whole = [[as_list(x) for x in loader] for _ in range(2)]
        it = iter(loader)          # epoch 2: stop after 3 elements
        head = [as_list(next(it)) for _ in range(3)]
        state = loader.state_dict()
    json.dumps(state)  # JSON-serialisable
    assert state["epoch"] == 2 and "num_workers" not in json.dumps(state)
    got = resumed_in_a_new_process(script, state, {**common, **restored})
    if saved.get("ordered", True):
        with MPLoader(identity, 23, **common, **saved) as loader:
            reference = [[as_list(x) for x in loader] for _ in range(4)]
        assert whole == reference[:2]
        assert head + got["rest"] == reference[2]
        assert got["next_epoch"] == reference[3]
    else:  # no element lost or repeated across the resume
        assert sorted(head + got["rest"]) == list(range(23))
        assert sorted(got["next_epoch"]) == list(range(23))


@pytest.mark.slow  # version-independent, over 2 s: the main Python only
def test_a_state_from_two_shards_restores_on_three_losing_and_repeating_nothing():
    n, steps = 31, 5
    common = dict(shuffle=True, seed=5, num_workers=2)
    taken, states = [], []
    for k in range(2):
        with MPLoader(identity, n, shard=(k, 2), **common) as loader:
            it = iter(loader)
            taken += [next(it) for _ in range(steps)]
            states.append(loader.state_dict())
    assert states[0]["position"] == states[1]["position"] == 2 * steps
    rest = []
    for k in range(3):
        with MPLoader(identity, n, shard=(k, 3), **common) as loader:
            loader.load_state_dict(states[k % 2])
            rest.append(list(loader))
    assert len({len(r) for r in rest}) == 1, "the new shards have unequal lengths"
    seen = taken + [i for r in rest for i in r]
    assert len(set(seen)) == len(seen), "an element was repeated"
    with MPLoader(identity, n, **common) as whole:
        order = list(whole)
    left_out = (n - 2 * steps) % 3
    assert sorted(seen) == sorted(order[:n - left_out])
    assert left_out < 3


def test_skipped_items_count_as_handed_out(script):
    def fails_on_odd(i):
        if i % 2:
            raise ValueError(f"odd {i}")
        return i
    with MPLoader(fails_on_odd, 12, num_workers=2, on_error="skip") as loader:
        it = iter(loader)
        assert [next(it), next(it)] == [0, 2]   # 1 was skipped on the way to 2
        state = loader.state_dict()
        assert state["position"] == 3
    with MPLoader(fails_on_odd, 12, num_workers=1, on_error="skip") as loader:
        loader.load_state_dict(state)
        assert list(loader) == [4, 6, 8, 10]
        assert [s.index for s in loader.skipped] == [3, 5, 7, 9, 11]


def test_an_unordered_state_with_elements_ahead_restores_only_on_its_shard():
    def slow_first(i):
        if i == 0:
            time.sleep(0.5)
        return i
    with MPLoader(slow_first, 12, num_workers=2, ordered=False) as loader:
        it = iter(loader)
        head = [next(it) for _ in range(3)]
        state = loader.state_dict()
    assert 0 not in head and state["position"] == 0 and state["ahead"] == sorted(head)
    with pytest.raises(ValueError, match="restores only on that shard"):
        MPLoader(identity, 12, num_workers=1, shard=(0, 2)).load_state_dict(state)
    with MPLoader(identity, 12, num_workers=1) as loader:
        loader.load_state_dict(state)
        assert sorted(head + list(loader)) == list(range(12))


@pytest.mark.parametrize("change, field", [
    (dict(source=24), "source_len"), (dict(shuffle=False), "shuffle"),
    (dict(batch_size=3), "batch_size"), (dict(seed=12), "seed"),
])
def test_a_state_of_another_setting_is_an_error_naming_the_field(change, field):
    settings = dict(source=23, shuffle=True, seed=11)
    with MPLoader(identity, settings["source"], num_workers=1, shuffle=True, seed=11) as loader:
        next(iter(loader))
        state = loader.state_dict()
    settings.update(change)
    other = MPLoader(identity, settings.pop("source"), num_workers=1, **settings)
    with other, pytest.raises(ValueError, match=f"{field} was"):
        other.load_state_dict(state)
    with other, pytest.raises(ValueError, match="not a state"):
        other.load_state_dict({"epoch": 1})


def test_the_state_after_a_whole_epoch_is_the_next_epochs_start():
    with MPLoader(identity, 5, num_workers=2, shuffle=True, seed=2) as loader:
        assert loader.state_dict()["epoch"] == 0
        first = list(loader)
        state = loader.state_dict()
        second = list(loader)
    assert (state["epoch"], state["position"]) == (1, 0)
    with MPLoader(identity, 5, num_workers=1, shuffle=True, seed=2) as loader:
        loader.load_state_dict(state)
        assert list(loader) == second != first
        loader.set_epoch(0)
        assert list(loader) == first


def test_the_permutation_is_a_bijection_for_awkward_lengths():
    from mploader.epochs import Permutation
    for n in (1, 2, 3, 7, 64, 65, 1000, 4097):
        got = Permutation(n, 123, 4)(np.arange(n))
        assert sorted(got.tolist()) == list(range(n)), n


@pytest.mark.parametrize("bad, what", [
    (dict(epoch=1.7), "epoch is 1.7"), (dict(epoch="0"), "epoch is '0'"),
    (dict(position=-1), "position is -1"), (dict(ahead=[1]), "ahead"),
    (dict(fingerprint=None), "with a fingerprint"),
])
def test_a_malformed_state_is_refused_saying_what(bad, what):
    with MPLoader(identity, 10, num_workers=1) as loader:
        it = iter(loader)
        next(it), next(it)
        state = {**loader.state_dict(), **bad}
        with pytest.raises(ValueError, match=what):
            loader.load_state_dict(state)


@pytest.mark.parametrize("source, options", [(0, {}), (3, dict(batch_size=4, drop_remainder=True))])
def test_saving_and_loading_an_empty_epoch_does_not_move_the_epoch(source, options):
    with MPLoader(identity, source, num_workers=1, **options) as loader:
        epochs = []
        for _ in range(3):
            state = loader.state_dict()
            epochs.append(state["epoch"])
            loader.load_state_dict(state)
        assert epochs == [0, 0, 0]
        assert list(loader) == [] and loader.state_dict()["epoch"] == 1


def test_drop_remainder_without_batch_size_is_refused():
    with pytest.raises(ValueError, match="drop_remainder=True needs batch_size"):
        MPLoader(identity, 10, num_workers=1, drop_remainder=True)


def test_state_dict_from_another_thread_while_a_pass_runs_is_consistent():
    """A checkpoint is saved on the main thread while TensorFlow's drives the pass."""
    errors, states = [], []
    with MPLoader(identity, 3000, num_workers=2, ordered=False) as loader:
        def consume():
            try:
                for _ in loader:
                    pass
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        thread = threading.Thread(target=consume)
        thread.start()
        while thread.is_alive():
            try:
                states.append(loader.state_dict())
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                break
        thread.join()
    assert errors == [] and len(states) > 10
    for state in states:  # every position ahead is past the prefix, none repeated
        assert all(p >= state["position"] for p in state["ahead"]), state
        assert len(set(state["ahead"])) == len(state["ahead"])


def test_shuffled_shards_without_a_seed_are_refused_hosts_cannot_agree_on_a_drawn_one():
    with pytest.raises(ValueError, match=r"shuffle=True with shard=\(1, 2\) needs seed=.*overlap"):
        MPLoader(identity, 100, shuffle=True, shard=(1, 2))
    # Unshuffled shards, or one shard, need no seed; a seed makes the shards disjoint.
    MPLoader(identity, 10, shard=(1, 2), num_workers=1).close()
    MPLoader(identity, 10, shuffle=True, shard=(0, 1), num_workers=1).close()
    shards = []
    for k in range(2):
        with MPLoader(identity, 100, shuffle=True, shard=(k, 2), seed=3, num_workers=1) as loader:
            shards.append(set(loader))
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 100


def test_set_epoch_during_a_pass_applies_to_the_next_and_the_state_keeps_the_running_one():
    loader = MPLoader(identity, 20, num_workers=1, shuffle=True, seed=0)
    it = iter(loader)
    head = [next(it) for _ in range(5)]
    loader.set_epoch(1)                     # a Keras epoch begins; this pass (epoch 0) goes on
    head += [next(it) for _ in range(5)]
    state = json.loads(json.dumps(loader.state_dict()))
    assert (state["epoch"], state["position"]) == (0, 10) and "next_epoch" not in state
    rest = list(it)
    following = list(loader)
    loader.close()
    with MPLoader(identity, 20, num_workers=2, shuffle=True, seed=0) as resumed:
        resumed.load_state_dict(state)
        assert list(resumed) == rest and sorted(head + rest) == list(range(20))
        assert list(resumed) == following   # then epoch 1, as the original went on


def test_set_epoch_to_a_later_epoch_during_a_pass_is_in_the_state_and_survives_a_resume():
    loader = MPLoader(identity, 12, num_workers=1, shuffle=True, seed=4)
    it = iter(loader)
    [next(it) for _ in range(3)]
    loader.set_epoch(7)
    state = loader.state_dict()
    assert (state["epoch"], state["position"], state["next_epoch"]) == (0, 3, 7)
    rest, after = list(it), list(loader)
    assert loader.state_dict()["epoch"] == 8
    loader.close()
    with MPLoader(identity, 12, num_workers=2, shuffle=True, seed=4) as resumed:
        resumed.load_state_dict(state)
        assert list(resumed) == rest and list(resumed) == after


def test_set_epoch_of_the_pass_under_way_does_not_make_the_next_pass_repeat_its_order():
    loader = MPLoader(identity, 10, num_workers=1, shuffle=True, seed=5)
    passes = [list(loader)]
    it = iter(loader)
    second = [next(it) for _ in range(4)]
    loader.set_epoch(1)                      # epoch 1 is the pass under way
    passes.append(second + list(it))
    passes.append(list(loader))
    assert [r["epoch"] for r in loader.stats()["epochs"]] == [0, 1, 2]
    assert passes[2] != passes[1]
    loader.set_epoch(1)                      # no pass under way: asked for, epoch 1 again
    assert list(loader) == passes[1]
    loader.close()


def test_a_malformed_next_epoch_in_a_state_is_named():
    with MPLoader(identity, 10, num_workers=1) as loader:
        state = loader.state_dict()
        state["next_epoch"] = -1
        with pytest.raises(ValueError, match="next_epoch is -1"):
            loader.load_state_dict(state)


def test_resume_is_exact_after_any_element_of_shuffled_shards_with_skips():
    """The resume check users run (mploader.testing), on a shard of a shuffled,
    batched source with a skipped item, restored on another worker count."""
    from mploader.testing import assert_resume_exact

    def make(workers):
        return MPLoader(helpers.fail_on_7, 30, num_workers=workers, shuffle=True, seed=2,
                        shard=(1, 2), batch_size=2, on_error="skip")
    assert assert_resume_exact(make, epochs=2, every=2, workers=(2, 3)) > 8


def test_after_a_peek_or_a_break_set_epoch_runs_that_epoch_from_its_start():
    loader = MPLoader(identity, 10, num_workers=1, shuffle=True, seed=5)
    next(iter(loader))                     # a peek, e.g. to build a model
    orders = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        orders.append(list(loader))
    for _ in loader:
        break
    loader.set_epoch(1)
    again = list(loader)
    assert [r["epoch"] for r in loader.stats()["epochs"]][1:] == [0, 1, 2, 3, 1]
    assert again == orders[1] and len({tuple(o) for o in orders}) == 3
    loader.close()


def test_a_closed_generator_over_the_loader_leaves_its_epoch_to_run_again_whole():
    # `yield from loader` in a generator that is closed part-way (islice, a
    # dropped generator) closes the pass, as a `break` leaves it: set_epoch
    # with the same epoch runs it again from its start, and the state says so
    with MPLoader(identity, 10, num_workers=1) as loader:
        def steps():
            yield from loader
        first = steps()
        assert [next(first) for _ in range(3)] == [0, 1, 2]
        first.close()
        loader.set_epoch(0)
        state = loader.state_dict()
        assert (state["epoch"], state["position"]) == (0, 0)
        assert list(loader) == list(range(10))
    with MPLoader(identity, 10, num_workers=2) as resumed:
        resumed.load_state_dict(state)
        assert list(resumed) == list(range(10))
