"""Padded batches made in the workers: items whose shapes vary, in one batch.

Each item's array is written into the corner of its padded place in the
slot and the rest filled with the pad value; checked value by value here.
"""
from __future__ import annotations

import numpy as np
import pytest

from mploader import MPLoader, WorkerError


def volume(i):
    """A 'volume' of depth i % 4 + 1 whose voxels name the item, and a label."""
    if i == 9:
        raise ValueError("case 9 is unreadable")
    return {"image": np.full((i % 4 + 1, 3), i, np.int16), "label": np.int64(i % 2)}


def padded(items, shape, pad):
    """The expected padded batch of ``items``' images, built here from scratch."""
    out = np.full((len(items),) + shape, pad, np.int16)
    for row, i in enumerate(items):
        out[row, :i % 4 + 1] = i
    return out


def test_items_are_padded_to_the_largest_in_their_batch_with_the_given_value():
    with MPLoader(volume, 9, num_workers=2, batch_size=4,
                  padding_values={"image": -7}) as loader:
        batches = list(loader)
    assert [b["image"].shape for b in batches] == [(4, 4, 3), (4, 4, 3), (1, 1, 3)]
    for batch, items in zip(batches, ([0, 1, 2, 3], [4, 5, 6, 7], [8])):
        assert batch["image"].dtype == np.int16  # never cast
        np.testing.assert_array_equal(batch["image"], padded(items, batch["image"].shape[1:], -7))
        assert batch["label"].tolist() == [i % 2 for i in items]


def test_padded_shapes_fix_some_dimensions_and_an_item_too_large_is_named():
    with MPLoader(volume, 8, num_workers=2, batch_size=3, padded_shapes={"image": (5, None)}) as loader:
        batches = list(loader)
    assert [b["image"].shape for b in batches] == [(3, 5, 3), (3, 5, 3), (2, 5, 3)]
    np.testing.assert_array_equal(batches[1]["image"], padded([3, 4, 5], (5, 3), 0))
    with MPLoader(volume, 8, num_workers=2, batch_size=4, padded_shapes={"image": (2, 3)}) as loader:
        with pytest.raises(WorkerError, match=r"cannot pad result\['image'\]: source index 2 has "
                                              r"3 along axis 0, more than padded_shapes allows \(2\)"):
            list(loader)


def test_a_skipped_item_leaves_its_batch_padded_to_the_others():
    with MPLoader(volume, 12, num_workers=2, batch_size=4, padding_values=-1,
                  on_error="skip") as loader:
        batches = list(loader)
    assert [i for i, _ in enumerate(loader.skipped)] == [0] and loader.skipped[0].index == 9
    assert [b["label"].size for b in batches] == [4, 4, 3]
    np.testing.assert_array_equal(batches[2]["image"], padded([8, 10, 11], (4, 3), -1))


def test_padding_refuses_other_dtypes_and_ranks_and_bad_arguments():
    def mixed(i):
        return np.zeros((i + 1,), np.float32 if i < 2 else np.float64)
    with MPLoader(mixed, 4, num_workers=1, batch_size=4, padding_values=0) as loader:
        with pytest.raises(WorkerError, match=r"source index 2 gave a 1-d array of float64, the "
                           r"batch's other items a 1-d array of float32 \(source index 0\); "
                           "padding changes sizes, never structures, dtypes or ranks"):
            list(loader)
    with MPLoader(lambda i: np.zeros(i + 1, np.uint8), 4, num_workers=1, batch_size=4,
                  padding_values=-1) as loader:
        with pytest.raises(WorkerError, match="padding value -1 .* does not fit its dtype uint8"):
            list(loader)
    with pytest.raises(ValueError, match="need batch_size"):
        MPLoader(volume, 4, padding_values=0)

    def samples(i):
        yield np.zeros(i + 1)
    with pytest.raises(ValueError, match="without padding"):
        MPLoader(samples, 4, batch_size=2, padding_values=0)


def scalars_and_strings(i):
    return {"img": np.full(i % 3 + 1, i, np.float32), "d": np.array(i),
            "tag": np.array(["ab"] * (i % 2 + 1))}


def test_0d_leaves_strings_and_nan_pads():
    with MPLoader(scalars_and_strings, 4, num_workers=1, batch_size=4,
                  padding_values={"img": np.nan}) as loader:
        batch = next(iter(loader))
    assert batch["d"].tolist() == [0, 1, 2, 3]
    assert batch["tag"].tolist() == [["ab", ""], ["ab", "ab"], ["ab", ""], ["ab", "ab"]]
    np.testing.assert_array_equal(batch["img"], [[0, np.nan, np.nan], [1, 1, np.nan],
                                                 [2, 2, 2], [3, np.nan, np.nan]])


@pytest.mark.parametrize("value, dtype, fits", [
    (1e40, np.float32, False), (1.5, np.int32, False), (-1, np.uint8, False),
    (0.1, np.float32, True), (np.float64(0.1), np.float32, True), (-1024, np.int16, True)])
def test_a_pad_value_must_fit_its_dtype(value, dtype, fits):
    with MPLoader(lambda i: np.zeros(i + 1, dtype), 2, num_workers=1, batch_size=2,
                  padding_values=value) as loader:
        if fits:
            assert next(iter(loader))[0, 1] == np.array(value, dtype)
        else:
            with pytest.raises(WorkerError, match="does not fit its dtype"):
                list(loader)


def test_padding_that_names_what_the_result_lacks_is_an_error():
    with MPLoader(volume, 4, num_workers=1, batch_size=2,
                  padding_values={"imgae": 3}) as loader:
        with pytest.raises(WorkerError, match=r"names result\['imgae'\], which the result "
                                              r"does not have \(its keys there: 'image', 'label'\)"):
            list(loader)


def odd_rank_and_dtype(i):
    """Item 3 is 2-d and item 6 float64 among 1-d float32 items (each named by its value)."""
    if i == 3:
        return np.ones((2, 2), np.float32)
    if i == 6:
        return np.ones(3, np.float64)
    return np.full(1 + i % 3, i, np.float32)


def test_an_odd_item_under_skip_is_skipped_alone_and_its_batch_padded_to_the_others():
    with MPLoader(odd_rank_and_dtype, 8, batch_size=4, num_workers=2, padding_values=-1.0,
                  on_error="skip") as loader:
        batches = list(loader)
    assert [s.index for s in loader.skipped] == [3, 6]
    assert "source index 3 gave a 2-d array of float32" in loader.skipped[0].message
    assert "source index 6 gave a 1-d array of float64" in loader.skipped[1].message
    expected = [[[0, -1, -1], [1, 1, -1], [2, 2, 2]], [[4, 4, -1], [5, 5, 5], [7, 7, -1]]]
    assert [b.tolist() for b in batches] == expected
    assert all(b.dtype == np.float32 for b in batches)


def test_the_layout_most_items_share_is_kept_even_when_the_first_item_is_the_odd_one():
    def first_is_odd(i):
        return np.zeros((1, 1), np.float32) if i == 0 else np.full(i, i, np.float32)
    with MPLoader(first_is_odd, 4, batch_size=4, num_workers=1, padding_values=0.0,
                  on_error="skip") as loader:
        (batch,) = list(loader)
    assert [s.index for s in loader.skipped] == [0]
    assert batch.tolist() == [[1, 0, 0], [2, 2, 0], [3, 3, 3]]


@pytest.mark.parametrize("value, leaf, problem", [
    ("xyzw", np.array(["ab"]), "longer than the leaf's width"),
    ("7", np.zeros(1, np.float32), "it is a str, not a number"),
    (True, np.zeros(1, np.float32), "it is a bool, not a number"),
    (1e-50, np.zeros(1, np.float32), "too small for it, and would become 0"),
    (70000.5, np.zeros(1, np.int32), "it is not an integer"),
    (-1, np.zeros(1, np.uint8), r"it is out of its range \[0, 255\]"),
    (16777217, np.zeros(1, np.float32), "an integer it cannot hold exactly .*16777216"),
    (2049, np.zeros(1, np.float16), "an integer it cannot hold exactly"),
    (complex(1e-50, 1), np.zeros(1, np.complex64), "too small for it, and would become 0"),
    (b"x", np.array(["ab"]), "it is a bytes, not a str"),
    (1, np.zeros(1, bool), "it is a int, not a bool"),
])
def test_a_pad_value_that_does_not_fit_its_leaf_is_an_error_even_under_skip(value, leaf, problem):
    """Never truncated, parsed or flushed to zero."""
    assert_raised_under_skip(lambda i, leaf=leaf: np.repeat(leaf, i % 2 + 1),
                             f"PaddingDoesNotFit: the padding value .* of result does not fit "
                             f"its dtype .*{problem}", padding_values=value)


def assert_raised_under_skip(fn, match, **padding):
    """A padding that does not fit is the settings' error: raised, never a
    reason to skip every item."""
    with MPLoader(fn, 4, batch_size=2, num_workers=1, on_error="skip", **padding) as loader:
        with pytest.raises(WorkerError, match=match):
            list(loader)
    assert loader.skipped == []


def test_a_pad_value_that_is_not_one_scalar_is_refused_at_construction():
    from mploader import PaddingDoesNotFit
    with pytest.raises(PaddingDoesNotFit, match=r"padding_values gives result\['img'\] "
                                                r"array\(\[0, 1\]\), a ndarray: a pad value is one"):
        MPLoader(volume, 4, batch_size=2, padding_values={"img": np.array([0, 1])})


@pytest.mark.tf
def test_with_output_signature_a_pad_value_of_the_wrong_kind_is_refused_at_construction():
    import tensorflow as tf
    from mploader import PaddingDoesNotFit
    signature = {"image": tf.TensorSpec((None, None, 3), tf.int16),
                 "label": tf.TensorSpec((None,), tf.int64)}
    with pytest.raises(PaddingDoesNotFit, match=r"padding value '0' of result\['image'\] does "
                                                "not fit its dtype int16"):
        MPLoader(volume, 4, batch_size=2, padding_values={"image": "0"},
                 output_signature=signature)
    with MPLoader(volume, 4, batch_size=2, padding_values={"image": -1}, num_workers=1,
                  output_signature=signature) as loader:
        assert [b["image"].shape for b in loader] == [(2, 2, 3), (2, 4, 3)]


def test_drop_remainder_never_hands_out_a_batch_made_short_by_skips():
    """Its good items are dropped with it, each recorded in loader.skipped."""
    with MPLoader(volume, 12, batch_size=4, num_workers=2, padding_values=-1,
                  on_error="skip", drop_remainder=True) as loader:
        batches = list(loader)
    assert [len(b["label"]) for b in batches] == [4, 4]
    assert [s.index for s in loader.skipped] == [9, 8, 10, 11]
    assert loader.skipped[0].exc_type == "ValueError"
    assert {s.exc_type for s in loader.skipped[1:]} == {"DroppedWithShortBatch"}


def test_a_padding_key_the_results_lack_is_raised_even_under_skip_not_skipping_every_item():
    assert_raised_under_skip(volume, r"PaddingDoesNotFit: padding_values names "
                                     r"result\['imgae'\], which the result does not have",
                             padding_values={"imgae": -1})


def test_the_layout_the_padding_fits_is_kept_when_odd_items_are_as_many_as_good_ones():
    """Two files load as uint8 among int16 ones: a pad of -1024 fits int16 only,
    so the int16 items are the batch, whatever the order or the count."""
    def loads(i):
        return np.full(3 + i % 2, i, np.uint8 if i in (4, 5) else np.int16)
    with MPLoader(loads, 12, batch_size=4, num_workers=1, padding_values=-1024,
                  on_error="skip") as loader:
        batches = list(loader)
    assert [s.index for s in loader.skipped] == [4, 5]
    assert [b[:, 0].tolist() for b in batches] == [[0, 1, 2, 3], [6, 7], [8, 9, 10, 11]]
    assert {b.dtype for b in batches} == {np.dtype(np.int16)}


def test_an_item_too_large_for_one_leaf_does_not_size_the_batchs_other_leaves():
    def two(i):
        return {"a": np.ones(10 if i == 0 else 2), "b": np.ones(5 if i == 0 else 2)}
    with MPLoader(two, 4, batch_size=4, num_workers=1, on_error="skip",
                  padded_shapes={"b": (3,)}) as loader:
        (batch,) = list(loader)
    assert [s.index for s in loader.skipped] == [0]
    assert batch["a"].shape == (3, 2) and batch["b"].shape == (3, 3)


def test_padding_that_names_a_scalar_or_string_leaf_is_an_error_not_ignored():
    def named(i):
        return {"image": np.ones(i + 1, np.float32), "n": i, "name": f"c{i}"}
    for settings in ({"padded_shapes": {"n": (5,)}}, {"padding_values": {"name": "oops"}}):
        assert_raised_under_skip(named, r"PaddingDoesNotFit: .* names result\['n(ame)?'\], where "
                                        r"the result has a (int|str): only array leaves are padded",
                                 **settings)


@pytest.mark.tf
def test_one_pad_value_for_every_leaf_is_checked_against_array_leaves_only():
    """Scalars and strings are never padded: a global -1.0 does not have to fit them."""
    import tensorflow as tf
    def case(i):
        return {"image": np.ones((2 + i % 3, 2), np.float32), "name": f"c{i}", "label": np.uint8(i)}
    signature = {"image": tf.TensorSpec((None, None, 2), tf.float32),
                 "name": tf.TensorSpec((None,), tf.string),
                 "label": tf.TensorSpec((None,), tf.uint8)}
    with MPLoader(case, 8, batch_size=4, padding_values=-1.0, num_workers=1,
                  output_signature=signature) as loader:
        batches = list(loader)
    assert batches[0]["image"][0, 2:].tolist() == [[-1.0, -1.0], [-1.0, -1.0]]


def test_drop_remainder_drops_a_batch_made_short_by_an_item_that_ended_two_workers():
    import os

    def ends_its_worker_on_5(i):
        if i == 5:
            os._exit(3)
        return np.full(2, i)
    with MPLoader(ends_its_worker_on_5, 16, batch_size=4, drop_remainder=True, num_workers=2,
                  on_error="skip", on_worker_death="restart") as loader:
        batches = [b[:, 0].tolist() for b in loader]
    assert batches == [[0, 1, 2, 3], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert sorted(s.index for s in loader.skipped) == [4, 5, 6, 7]
