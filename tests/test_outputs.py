"""What comes out: values, order, structure, batches, sources and seeds (numpy path)."""
from __future__ import annotations

import collections
import re

import numpy as np
import pytest

from mploader import MPLoader, item_scope

from . import helpers


def assert_nest_equal(a, b):
    assert type(a) is type(b) or (isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer))), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_nest_equal(a[k], b[k])
    elif isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_nest_equal(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("num_workers", [1, 2, 3, 4])
def test_ordered_output_equals_serial_with_random_delays(num_workers):
    source = list(range(60))
    with MPLoader(helpers.slow_square, source, num_workers=num_workers) as loader:
        assert list(loader) == [helpers.slow_square(x) for x in source]


def test_unordered_output_is_the_same_multiset():
    source = list(range(80))
    with MPLoader(helpers.slow_square, source, num_workers=3, ordered=False) as loader:
        out = list(loader)
    assert collections.Counter(out) == collections.Counter(helpers.slow_square(x) for x in source)


def test_dict_and_tuple_outputs_keep_structure_types_and_values():
    with MPLoader(helpers.nest, range(12), num_workers=2) as loader:
        out = list(loader)
    for x, got in zip(range(12), out, strict=True):
        expected = helpers.nest(x)
        assert_nest_equal(got, expected)


def test_lists_come_back_as_tuples():
    with MPLoader(lambda x: [x, np.array([x])], range(3), num_workers=1) as loader:
        first = next(iter(loader))
    assert isinstance(first, tuple) and first[0] == 0


def test_variable_size_outputs():
    with MPLoader(helpers.variable, range(40), num_workers=2) as loader:
        out = list(loader)
    for x, got in zip(range(40), out, strict=True):
        np.testing.assert_array_equal(got, helpers.variable(x))


def test_results_larger_than_their_slot_grow_it():
    sizes = [10, 100_000, 3_000_000, 50, 5_000_000, 7]
    fn = lambda n: np.full(n, n % 251, np.uint8)  # noqa: E731
    with MPLoader(fn, sizes, num_workers=2) as loader:
        for _ in range(2):
            for n, got in zip(sizes, loader, strict=True):
                assert got.shape == (n,) and (got == n % 251).all()


def test_results_held_by_the_user_never_change():
    """Zero-copy views stay valid while the slots keep being reused."""
    fn = lambda x: np.full((1000,), x, np.int64)  # noqa: E731
    with MPLoader(fn, range(200), num_workers=2, prefetch=2) as loader:
        kept = list(loader)
        again = list(loader)  # a second pass reuses every slot many times
    for x, a, b in zip(range(200), kept, again, strict=True):
        assert (a == x).all() and (b == x).all()


def _owns_memory(array: np.ndarray) -> bool:
    """A copy (64-byte aligned: a view of a buffer numpy allocated), not a
    view of a slot (whose buffer is the slot's mapping)."""
    return array.base is not None and array.base.flags.owndata


def test_a_workers_two_latest_volumes_are_views_whatever_their_size():
    """TensorFlow holds the element before the one it converts: with one
    lease for results over the budget, every other volume was copied out."""
    with MPLoader(helpers.volume_80mib, 3, num_workers=1) as loader:
        it = iter(loader)
        first, second = next(it), next(it)
        assert not _owns_memory(first) and not _owns_memory(second)  # views of the slots
        assert loader.stats()["slots_leased"] == 2
        third = next(it)  # a third, while both are held: copied out
        assert _owns_memory(third) and third.ctypes.data % 64 == 0
        assert [int(v[0]) for v in (first, second, third)] == [0, 1, 2]


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_batches_stack_consecutive_items(drop_remainder):
    with MPLoader(helpers.nest, range(23), num_workers=2, batch_size=5,
                  drop_remainder=drop_remainder) as loader:
        batches = list(loader)
        assert len(loader) == len(batches)
    sizes = [len(b["label"]) for b in batches]
    assert sizes == ([5, 5, 5, 5] if drop_remainder else [5, 5, 5, 5, 3])
    first = 0
    for batch in batches:
        n = len(batch["label"])
        idx = range(first, first + n)
        np.testing.assert_array_equal(batch["image"], np.stack([helpers.nest(i)["image"] for i in idx]))
        np.testing.assert_array_equal(batch["label"], [i % 3 for i in idx])
        assert list(batch["meta"][1]) == [f"id{i}" for i in idx]
        first += n


def test_batching_items_of_different_shapes_names_both_items():
    from mploader import WorkerError
    with MPLoader(helpers.variable, range(10), num_workers=1, batch_size=4) as loader:
        with pytest.raises(WorkerError) as info:
            list(loader)
    assert ("source index 1 gave a shape (2,) array of int32, the batch's other items a "
            "shape (1,) array of int32 (source index 0)") in str(info.value)


def test_int_source_and_generator_source():
    with MPLoader(lambda x: x + 1, 5, num_workers=2) as loader:
        assert list(loader) == [1, 2, 3, 4, 5]
    gen = (f"item-{i}" for i in range(7))
    with MPLoader(str.upper, gen, num_workers=2) as loader:
        assert list(loader) == [f"ITEM-{i}" for i in range(7)]
        with pytest.raises(RuntimeError, match="can be read only once"):
            list(loader)


def test_seeded_output_is_identical_for_1_and_3_workers_and_replayable():
    def run(workers):
        with MPLoader(helpers.augmented, range(30), num_workers=workers, seed=1234) as loader:
            return [list(loader) for _epoch in range(2)]
    one, three = run(1), run(3)
    for a, b in zip(one[0] + one[1], three[0] + three[1], strict=True):
        np.testing.assert_array_equal(a, b)
    # Each epoch draws new numbers, and any item can be replayed in the parent.
    assert not np.array_equal(one[0][5], one[1][5])
    with item_scope(seed=1234, epoch=1, index=5):
        np.testing.assert_array_equal(helpers.augmented(5), one[1][5])


def test_workers_import_functions_from_the_users_modules():
    with MPLoader(helpers.pid_of_worker, range(20), num_workers=2) as loader:
        pids = set(loader)
        assert pids <= set(loader.worker_pids()) and len(pids) >= 1


def test_tiny_items_travel_several_per_task_and_slow_ones_alone():
    with MPLoader(lambda x: x * 3, range(3000), num_workers=2) as loader:
        assert list(loader) == [x * 3 for x in range(3000)]
        assert loader.stats()["items_per_task"] > 4
    with MPLoader(helpers.slow_square, range(40), num_workers=2) as loader:
        list(loader)
        assert loader.stats()["items_per_task"] == 1


def test_big_results_are_never_chunked_even_when_fast():
    with MPLoader(lambda x: np.full(200_000, x, np.int64), range(30), num_workers=2) as loader:
        kept = list(loader)
        assert loader.stats()["items_per_task"] == 1
    for x, block in enumerate(kept):
        assert (block == x).all()


@pytest.mark.parametrize("fn, odd, got, batch", [
    (lambda i: np.float32(i) if i == 5 else np.float16(i), 5, "a scalar of float32",
     "a scalar of float16"),
    (lambda i: 300 if i == 6 else np.int8(i), 6, "a scalar of int64", "a scalar of int8"),
    (lambda i: 0.5 if i == 1 else i, 1, "a scalar of float64", "a scalar of int64"),
    (lambda i: np.zeros(2, np.float32 if i == 5 else np.float16), 5,
     "a shape (2,) array of float32", "a shape (2,) array of float16"),
])
def test_worker_batches_keep_the_rule_of_items_scalars_as_arrays_no_promotion(fn, odd, got, batch):
    with MPLoader(fn, 8, batch_size=4, num_workers=1) as loader:
        with pytest.raises(Exception, match=rf"cannot batch result: source index {odd} gave "
                                            rf"{re.escape(got)}, the batch's other items "
                                            rf"{re.escape(batch)}"):
            list(loader)
    with MPLoader(fn, 8, batch_size=4, num_workers=1, on_error="skip") as loader:
        batches = list(loader)
    assert [s.index for s in loader.skipped] == [odd]
    assert [len(b) for b in batches] == [4 - (odd < 4), 4 - (odd >= 4)]
    assert len({b.dtype for b in batches}) == 1
    rows = np.concatenate(batches).tolist()
    assert rows == [np.asarray(fn(i)).tolist() for i in range(8) if i != odd]


def test_python_scalars_stack_as_numpy_would_take_them_one_by_one():
    def plain(i):
        return {"n": i, "x": i / 2, "flag": i % 2 == 0}
    with MPLoader(plain, 4, batch_size=4, num_workers=1) as loader:
        (batch,) = list(loader)
    assert [batch[k].dtype for k in ("n", "x", "flag")] == [np.int64, np.float64, np.bool_]


def test_dict_leaves_are_batched_by_key_whatever_order_each_item_built_its_dict_in():
    def reordered(i):
        return {"a": np.int64(i), "b": np.float64(i + 0.5)} if i % 2 else \
            {"b": np.float64(i + 0.5), "a": np.int64(i)}
    with MPLoader(reordered, 4, batch_size=4, num_workers=1) as loader:
        (batch,) = list(loader)
    assert batch["a"].tolist() == [0, 1, 2, 3] and batch["b"].tolist() == [0.5, 1.5, 2.5, 3.5]


@pytest.mark.parametrize("fn, odd, got, batch", [
    (lambda i: {"a": {0: np.full(2, i)}} if i == 1 else {"a": [np.full(2, i)]}, 1,
     "a dict", "a sequence (a tuple or list)"),
    (lambda i: {"x": 1, "extra": ()} if i == 0 else {"x": 1}, 0, "a sequence (a tuple or list)",
     "nothing"),
    (lambda i: b"b" if i == 2 else f"a{i}", 2, "a bytes", "a str"),
    (lambda i: {"id": i} if i == 3 else {"id": i, "meta": {"site": "a"}}, 3, "nothing",
     "a dict"),
])
def test_an_item_of_another_structure_is_named_with_the_first_path_that_differs(fn, odd, got,
                                                                                batch):
    with MPLoader(fn, 4, batch_size=4, num_workers=1, on_error="skip") as loader:
        (out,) = list(loader)
    assert [s.index for s in loader.skipped] == [odd]
    assert f"source index {odd} gave {got}, the batch's other items {batch}" in \
        loader.skipped[0].message


BUFFER = np.zeros(3)


def refill(i):
    """Fills one buffer and returns it, every call (a fn that reuses its memory)."""
    BUFFER[:] = i
    return BUFFER


def test_a_fn_that_returns_one_buffer_it_refills_gives_every_item_its_own_values():
    """Tiny items go many to a task: each result is read before fn runs again."""
    with MPLoader(refill, 2000, num_workers=2) as loader:
        out = [x.tolist() for x in loader]
        assert loader.stats()["items_per_task"] > 1
    assert out == [[i] * 3 for i in range(2000)]


def test_an_unbatched_result_that_cannot_be_sent_fails_its_own_item_alone():
    def odd(i):
        return object() if i == 1500 else np.int64(i)  # late: tasks carry many items by then
    with MPLoader(odd, 2000, num_workers=2, on_error="skip") as loader:
        out = [int(x) for x in loader]
        assert loader.stats()["items_per_task"] > 1
    assert [s.index for s in loader.skipped] == [1500]
    assert out == [i for i in range(2000) if i != 1500]


def refill_nest(i):
    """A nest around one refilled buffer, a scalar and a string; item 5 has a
    longer buffer (another layout: the batch then stacks from snapshots)."""
    BUFFER[:] = i
    return {"x": BUFFER if i != 5 else np.full(4, float(i)), "n": i, "name": f"case{i}"}


@pytest.mark.parametrize("padded", [False, True])
def test_worker_batches_of_a_fn_that_refills_one_buffer_give_every_item_its_own_values(padded):
    """Each result goes into its row before fn runs again: stacking the
    results at the end gave every row the last item's values."""
    pad = [0.0] if padded else []
    with MPLoader(refill, 12, batch_size=4, num_workers=2,
                  **{"padded_shapes": [4]} if padded else {}) as loader:
        out = [b.tolist() for b in loader]
    assert out == [[[float(i)] * 3 + pad for i in range(s, s + 4)] for s in (0, 4, 8)]
    padding = {"padded_shapes": {"x": [4]}} if padded else {}
    with MPLoader(refill_nest, 8, batch_size=4, num_workers=1, on_error="skip",
                  **padding) as loader:
        first, second = list(loader)
    assert [row.tolist() for row in first["x"]] == [[float(i)] * 3 + pad for i in range(4)]
    assert first["n"].tolist() == [0, 1, 2, 3]
    if padded:  # item 5's longer buffer is padded to, not odd
        assert loader.skipped == []
        assert [row.tolist() for row in second["x"]] == \
            [[4.0] * 3 + pad, [5.0] * 4, [6.0] * 3 + pad, [7.0] * 3 + pad]
        assert second["name"].tolist() == ["case4", "case5", "case6", "case7"]
    else:  # item 5 fails alone; the rows written before it keep their values
        assert [s.index for s in loader.skipped] == [5]
        assert [row.tolist() for row in second["x"]] == [[4.0] * 3, [6.0] * 3, [7.0] * 3]
        assert second["name"].tolist() == ["case4", "case6", "case7"]


def fails_on_threes(i):
    if i % 3 == 0:
        raise ValueError(f"bad {i}")
    return np.int64(i)


def test_failures_inside_a_shuffled_worker_batch_come_in_the_epochs_order():
    """Not sorted by source index: the epoch's order is the shuffle's."""
    def run(fn):
        with MPLoader(fn, 24, batch_size=8, num_workers=2, shuffle=True, seed=3,
                      on_error="skip") as loader:
            return [int(x) for b in loader for x in b], [s.index for s in loader.skipped]
    order, _ = run(np.int64)
    got, skipped = run(fails_on_threes)
    assert got == [i for i in order if i % 3]
    assert skipped == [i for i in order if i % 3 == 0]
    assert skipped != sorted(skipped)  # the seed shuffles them


class Reused:
    """fn refills and returns one dict; ``extra_at`` adds a key, ``fail_at`` clears it and raises."""

    def __init__(self, extra_at=None, fail_at=None):
        self.out, self.extra_at, self.fail_at = {}, extra_at, fail_at

    def __call__(self, i):
        self.out.clear()
        if i == self.fail_at:
            raise ValueError(f"{i} fails")
        self.out.update(x=np.full(3, float(i)), n=i)
        if i == self.extra_at:
            self.out["e"] = 1
        return self.out


@pytest.mark.parametrize("extra_at, fail_at, kept", [
    (5, None, [4, 6, 7]), (7, None, [4, 5, 6]), (None, 7, [4, 5, 6])])
def test_worker_batches_of_a_fn_that_reuses_its_result_dict_are_the_items(extra_at, fail_at,
                                                                          kept):
    """Each result's containers are read as fn returns them: a key that a
    later call adds or removes changes no other item's row."""
    with MPLoader(Reused(extra_at, fail_at), 8, batch_size=4, num_workers=1,
                  on_error="skip") as loader:
        first, second = list(loader)
    assert first["n"].tolist() == [0, 1, 2, 3]
    assert second["n"].tolist() == kept and set(second) == {"x", "n"}
    assert [row.tolist() for row in second["x"]] == [[float(i)] * 3 for i in kept]
    odd = extra_at if extra_at is not None else fail_at
    assert [s.index for s in loader.skipped] == [odd]
    assert ("cannot batch result['e']" if extra_at else "7 fails") in loader.skipped[0].message


_STRIDE_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, resource.RLIM_INFINITY))  # a small slot stride
from mploader import MPLoader, resources
from tests import helpers
stride = resources.slot_stride(1, 10)
size = int(sys.argv[1]) * stride // 7  # 3 rows of 2/7 fit a slot, 4 do not
with MPLoader(helpers.sized_rows(size, fail=2 if size > 0 else None), 4, batch_size=4,
              num_workers=1, on_error="skip") as loader:
    print([b[:, 0].tolist() for b in loader], [(s.index, s.message[:40]) for s in loader.skipped])
"""


@pytest.mark.parametrize("sevenths, expected", [
    (2, "[[0, 1, 3]] [(2, 'item 2 fails')]"),
    (-3, "[[1, 2, 3]] [(0, 'cannot batch result: source index 0 gave')]")])
def test_a_worker_batch_is_sized_by_the_rows_it_keeps_not_by_its_first_item(sevenths, expected):
    """A batch whose first item, times batch_size, is over a slot: the items
    kept still fit (a failed item takes no row; an odd first item is the
    odd one, not a size error)."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", _STRIDE_CHILD, str(sevenths)],
                          capture_output=True, text=True, timeout=120,
                          cwd=str(__import__("pathlib").Path(__file__).parent.parent))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == expected
