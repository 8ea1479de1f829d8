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
        with pytest.raises(WorkerError, match="never dtypes or ranks"):
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
