"""The hand-off into TensorFlow, and where a pass's time goes.

Through ``dataset().batch(32)`` TensorFlow holds 32 elements until it builds
a batch; they are views of the workers' slots as long as the leases allow
(slots.py), and copies beyond.  Either way the values, their order, the
signature, the cardinality, errors at their positions and skips must be
what iterating the loader gives.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from mploader import MPLoader

from . import helpers  # fns live there: a worker importing this module would import TensorFlow

pytestmark = pytest.mark.tf
try:
    import tensorflow as tf
except ModuleNotFoundError:  # a venv without TensorFlow: `pytest -m "not tf"` deselects this module
    tf = None


def test_dataset_batch32_gives_exactly_the_loaders_values_with_views_and_copies():
    """100 images, 2 workers: more than the leases of a pool (64), so some
    elements TensorFlow holds are views and some copies."""
    with MPLoader(helpers.image, 100, num_workers=2) as loader:
        expected = np.stack(list(loader))
        ds = loader.dataset().batch(32)
        assert int(ds.cardinality()) == 4
        assert ds.element_spec == tf.TensorSpec((None, 224, 224, 3), tf.float32)
        got = np.concatenate([b for b in ds.as_numpy_iterator()])
        got_again = np.concatenate([b for b in ds.as_numpy_iterator()])
    assert got.shape == (100, 224, 224, 3)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got_again, expected)


def test_variable_shapes_keep_values_order_errors_and_skips():
    signature = tf.TensorSpec((None, 8), tf.int32)
    with MPLoader(helpers.ragged, 40, num_workers=2, output_signature=signature,
                  on_error="skip") as loader:
        direct = [x.tolist() for x in loader]
        through_tf = [x.tolist() for x in loader.dataset().as_numpy_iterator()]
    assert through_tf == direct and len(direct) == 39
    assert [row[0][0] for row in direct] == [i for i in range(40) if i != 13]
    with MPLoader(helpers.ragged, 40, num_workers=2, output_signature=signature) as loader:
        seen = []
        with pytest.raises(tf.errors.OpError, match="unreadable case 13"):
            for x in loader.dataset().as_numpy_iterator():
                seen.append(int(x[0][0]))
    assert seen == list(range(13))  # the error at its position, every element before it out


def test_epoch_report_tells_input_bound_from_consumer_bound():
    with MPLoader(helpers.slow_item, 40, num_workers=2) as loader:
        list(loader)  # the consumer takes each element at once: it waits on the workers
        first = loader.epoch_report()
        for _ in loader:  # the consumer is slower than the two workers together
            time.sleep(0.03)
        second = loader.epoch_report()
        epochs = loader.stats()["epochs"]
    assert first["bound"] == "input" and "more workers" in first["hint"]
    assert first["elements"] == 40 and first["consumer_wait_fraction"] > 0.5
    assert second["bound"] == "consumer" and second["worker_busy_fraction"] < 0.5
    assert [e["epoch"] for e in epochs] == [0, 1]


def test_dataset_without_batch_size_that_the_consumer_limits_suggests_batch_size():
    with MPLoader(lambda i: np.float32(i), 200, num_workers=1) as loader:
        for _ in loader.dataset():
            time.sleep(0.002)
        report = loader.epoch_report()
    assert report["bound"] == "consumer" and "pass batch_size to MPLoader" in report["hint"]


def test_padded_batches_through_dataset_have_open_dimensions_and_the_loaders_values():
    with MPLoader(helpers.ragged, 12, num_workers=2, batch_size=4, padding_values=-1) as loader:
        # padded to the largest of each batch: no size is known beyond the first batch
        assert loader.dataset().element_spec == tf.TensorSpec((None, None, None), tf.int32)
    with MPLoader(helpers.ragged, 12, num_workers=2, batch_size=4, padding_values=-1,
                  padded_shapes=(None, 8), on_error="skip") as loader:
        ds = loader.dataset()
        assert ds.element_spec == tf.TensorSpec((None, None, 8), tf.int32)
        direct = [b.tolist() for b in loader]
        through_tf = [b.tolist() for b in ds.as_numpy_iterator()]
    assert through_tf == direct
    assert [len(b) for b in direct] == [4, 4, 4]
    assert np.array(direct[0]).shape == (4, 4, 8) and direct[0][0][1] == [-1] * 8


def test_an_epoch_report_stays_within_its_pass():
    """The last item is slow and then skipped: the wait after the last element
    handed out is not the pass's (fractions never above 1)."""
    with MPLoader(helpers.slow_last, 10, num_workers=2, on_error="skip") as loader:
        assert len(list(loader)) == 9
        report = loader.epoch_report()
    assert report["elements"] == 9
    assert 0 <= report["consumer_wait_fraction"] <= 1 and 0 <= report["worker_busy_fraction"] <= 1
