"""torch tensors as fn's results (mploader/layout.py): a CPU tensor leaf arrives
as a numpy ndarray of the same dtype, shape and values; what numpy cannot hold
as it is (a tensor on another device, bfloat16) is an error naming the leaf,
never a silent move or cast.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mploader import MPLoader, WorkerError

DTYPES = (torch.float32, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8,
          torch.bool)


def _tensors(i: int) -> dict:
    return {"image": torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) + i,
            "label": torch.tensor(i),
            "by_dtype": [torch.full((2,), i % 2, dtype=dtype) for dtype in DTYPES]}


def _check(got: dict, i: int, batch: tuple = ()) -> None:
    expected = _tensors(i)
    assert type(got["image"]) is np.ndarray and got["image"].dtype == np.float32
    np.testing.assert_array_equal(got["image"], expected["image"].numpy())
    assert got["label"].dtype == np.int64 and got["label"] == i
    for value, tensor in zip(got["by_dtype"], expected["by_dtype"], strict=True):
        assert value.dtype == tensor.numpy().dtype and value.shape == tuple(tensor.shape)
        np.testing.assert_array_equal(value, tensor.numpy())


def test_cpu_tensors_arrive_as_ndarrays_of_the_same_dtype_shape_and_values():
    with MPLoader(_tensors, range(6), num_workers=2) as loader:
        for i, got in enumerate(loader):
            _check(got, i)


def test_cpu_tensors_in_worker_batches_arrive_stacked():
    with MPLoader(_tensors, range(8), num_workers=2, batch_size=4) as loader:
        batches = list(loader)
    assert len(batches) == 2
    for b, batch in enumerate(batches):
        assert batch["image"].shape == (4, 2, 3, 4) and batch["image"].dtype == np.float32
        for k in range(4):
            i = 4 * b + k
            _check({"image": batch["image"][k], "label": batch["label"][k],
                    "by_dtype": [leaf[k] for leaf in batch["by_dtype"]]}, i)


def _meta_tensor(i: int):
    from monai.data import MetaTensor
    return MetaTensor(torch.full((2, 3), float(i)), affine=torch.eye(4), meta={"id": i})


def _requires_grad(i: int):
    return torch.full((3,), float(i), requires_grad=True) * 2


def test_a_monai_metatensor_arrives_as_a_plain_ndarray_and_a_grad_tensor_as_its_values():
    with MPLoader(_meta_tensor, range(3), num_workers=1) as loader:
        got = list(loader)
    for i, value in enumerate(got):
        assert type(value) is np.ndarray and value.dtype == np.float32
        np.testing.assert_array_equal(value, np.full((2, 3), i, np.float32))
    with MPLoader(_requires_grad, range(3), num_workers=1) as loader:
        for i, value in enumerate(loader):
            np.testing.assert_array_equal(value, np.full(3, 2.0 * i, np.float32))


def _on_meta_device(i: int) -> dict:
    return {"image": torch.empty(3, device="meta"), "label": i}


def _bfloat16(i: int) -> dict:
    return {"image": torch.zeros(3, dtype=torch.bfloat16), "label": i}


@pytest.mark.parametrize("fn, words", [
    (_on_meta_device, ["result['image']", ".cpu()", "meta"]),
    (_bfloat16, ["result['image']", "bfloat16"]),
])
def test_what_numpy_cannot_hold_is_an_error_naming_the_leaf(fn, words):
    for batch_size in (None, 2):
        with MPLoader(fn, range(2), num_workers=1, batch_size=batch_size) as loader:
            with pytest.raises(WorkerError) as raised:
                list(loader)
        message = str(raised.value)
        assert all(word in message for word in words), (batch_size, message)


def _one_nested(i: int) -> torch.Tensor:
    if i == 1:
        return torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])
    return torch.full((2,), float(i))


def test_a_tensor_that_cannot_be_read_fails_its_own_item_and_the_batch_keeps_the_others():
    with MPLoader(_one_nested, 8, batch_size=4, num_workers=1, on_error="skip") as loader:
        batches = [b[:, 0].tolist() for b in loader]
    assert batches == [[0.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]
    assert [s.index for s in loader.skipped] == [1]
    assert "torch tensor at result with layout" in loader.skipped[0].message


BUFFER = torch.zeros(3)


def _refilled(i: int) -> torch.Tensor:
    BUFFER[:] = i
    return BUFFER


def test_a_tensor_buffer_refilled_for_every_item_gives_each_item_its_values():
    with MPLoader(_refilled, 1000, num_workers=2) as loader:
        assert [x.tolist() for x in loader] == [[float(i)] * 3 for i in range(1000)]
