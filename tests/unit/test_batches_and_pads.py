"""Pure logic of how results are laid out and batched (mploader/layout.py): the
rules of worker batches, pad values, and what is refused, without a worker."""
from __future__ import annotations

import numpy as np
import pytest

from mploader.errors import PaddingDoesNotFit, UnsupportedResult
from mploader.layout import Padding, pack_batch, pack_items, unpack
from mploader.nest import map_nest, path_text


def batch(results, padding=None):
    tree, writes, nbytes, rejected = pack_batch(results, tuple(range(len(results))), padding)
    region = np.zeros(max(nbytes, 1), np.uint8)
    from mploader.layout import copy_writes
    copy_writes(region, writes)
    return (unpack(tree, region, copy=True) if tree is not None else None), rejected


def test_scalars_stack_in_their_own_dtype():
    out, rejected = batch([np.float16(1), np.float16(2)])
    assert out.dtype == np.float16 and out.tolist() == [1, 2] and not rejected


@pytest.mark.parametrize("values, odd", [
    ([np.float16(1), np.float16(2), np.float32(3)], 2),
    ([np.int8(1), 300, np.int8(3)], 1),
    ([1, 2, 0.5], 2),
    (["a", b"b", "c"], 1),
])
def test_a_scalar_of_another_dtype_is_rejected_alone(values, odd):
    out, rejected = batch(values)
    assert list(rejected) == [odd] and len(out) == 2


def test_dict_leaves_are_matched_by_key():
    out, _ = batch([{"a": 1, "b": 2.5}, {"b": 3.5, "a": 4}])
    assert out["a"].tolist() == [1, 4] and out["b"].tolist() == [2.5, 3.5]


def test_the_layout_most_items_share_wins():
    arrays = [np.zeros((1, 1))] + [np.zeros(2)] * 3
    out, rejected = batch(arrays)
    assert list(rejected) == [0] and out.shape == (3, 2)
    assert "gave a 2-d array" not in str(rejected[0])
    assert "source index 0 gave a shape (1, 1) array of float64" in str(rejected[0])


def test_padding_pads_to_the_largest_and_fills():
    out, _ = batch([np.ones(1, np.int16), np.ones(3, np.int16)], Padding(None, -1))
    assert out.tolist() == [[1, -1, -1], [1, 1, 1]]


def test_an_item_over_a_fixed_size_is_rejected_alone():
    out, rejected = batch([np.ones(2), np.ones(5), np.ones(1)], Padding((3,), 0.0))
    assert list(rejected) == [1] and out.shape == (2, 3)


@pytest.mark.parametrize("value, dtype", [
    ("xyzw", "U2"), ("7", "float32"), (True, "float32"), (1e-50, "float32"),
    (70000.5, "int32"), (-1, "uint8"), (16777217, "float32"), (b"x", "U2"), (1, "bool"),
])
def test_a_pad_value_that_does_not_fit_is_the_settings_error(value, dtype):
    item = np.zeros(1, dtype)
    with pytest.raises(PaddingDoesNotFit, match="does not fit its dtype"):
        batch([item, np.repeat(item, 2)], Padding(None, value))


@pytest.mark.parametrize("value, dtype", [(np.nan, "float32"), (-1024, "int16"), (0.1, "float16"),
                                          ("ab", "U2"), (2**64 - 1, "uint64")])
def test_a_pad_value_that_fits_is_taken(value, dtype):
    item = np.zeros(1, dtype)
    out, _ = batch([item, np.repeat(item, 2)], Padding(None, value))
    assert out.shape == (2, 2)


def test_a_pad_value_that_is_not_one_scalar_is_refused_at_once():
    with pytest.raises(PaddingDoesNotFit, match="a pad value is one number"):
        Padding(None, {"image": [0, 1, 2j, object()]})


@pytest.mark.parametrize("value", [object(), np.zeros(2, object), np.ma.masked_array([1])])
def test_results_that_cannot_be_laid_out_are_named(value):
    with pytest.raises(UnsupportedResult, match=r"at result\['x'\]"):
        pack_items([{"x": value}])


def test_paths_and_map_nest():
    assert path_text((0, "image")) == "result[0]['image']"
    assert map_nest(lambda v, p: (v, p), [1, {"a": 2}]) == ((1, (0,)), {"a": (2, (1, "a"))})
