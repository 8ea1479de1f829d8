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
from mploader.tf.grouping import MAX_CHUNK_ELEMENTS, SURELY_TAKEN_AFTER_CALLS, stack
from mploader.tf.signature import Leaf

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


def test_results_copied_out_of_the_slots_start_aligned_as_views_do():
    """A consumer holding more results than the leases allow gets copies
    beyond them; like the views, they start at a 64-byte aligned address,
    which TensorFlow converts without one more copy (numpy aligns its own
    arrays to 16 or 32 bytes)."""
    with MPLoader(helpers.image, 100, num_workers=2) as loader:
        held = list(loader)
    assert [i for i, x in enumerate(held) if x.ctypes.data % 64] == []
    for i, x in enumerate(held):
        np.testing.assert_array_equal(x, helpers.image(i))


def test_large_elements_stacked_into_one_call_are_used_by_tensorflow_in_place():
    """Rows of several short groups go to TensorFlow stacked in one call;
    the stack is 64-byte aligned, so TensorFlow's conversion takes that
    memory as the tensor's own instead of copying it into fresh memory."""
    elements = [np.full(65536, i, np.float32) for i in range(3)]
    stacked = stack(elements, Leaf(np.dtype(np.float32), (65536,)))
    np.testing.assert_array_equal(stacked, np.stack(elements))
    ds = tf.data.Dataset.from_generator(
        lambda: iter([stacked]), output_signature=tf.TensorSpec(stacked.shape, tf.float32))
    tensor = next(iter(ds))
    stacked[...] = -1
    assert float(tf.reduce_max(tensor)) == -1.0, "TensorFlow converted a copy"
    numbers = stack([1.5, 2], Leaf(np.dtype(np.float32), ()))  # as one element converts
    assert numbers.dtype == np.float32 and numbers.tolist() == [1.5, 2.0]


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


def _slowly(iterator, delay_s=0.002):
    """Consume slower than two workers produce, so results wait ready and
    TensorFlow's generator takes several per call."""
    for x in iterator:
        time.sleep(delay_s)
        yield x


def _leaves(element):
    return (element["x"].tolist(), int(element["label"][0]), bool(element["label"][1]))


def test_small_elements_go_several_per_call_and_the_stream_is_unchanged():
    with MPLoader(helpers.small_record, 300, num_workers=2, on_error="skip") as loader:
        direct = [_leaves(e) for e in loader]
        ds = loader.dataset()
        assert ds.element_spec == {"x": tf.TensorSpec((4,), tf.float32),
                                   "label": (tf.TensorSpec((), tf.int64),
                                             tf.TensorSpec((), tf.bool))}
        through_tf = [_leaves(e) for e in _slowly(ds.as_numpy_iterator())]
        assert loader.stats()["elements_per_tensorflow_call"] > 2
        assert len(loader.skipped) == 2 and [s.index for s in loader.skipped] == [7, 7]
    assert through_tf == direct and len(direct) == 299
    assert [row[1] for row in direct[:8]] == [0, 1, 2, 0, 1, 2, 0, 2]  # item 7 skipped


def test_small_elements_raise_at_their_position_after_every_element_before():
    with MPLoader(helpers.fail_on_7, 100, num_workers=2) as loader:
        seen = []
        with pytest.raises(tf.errors.OpError, match="bad item 7"):
            iterator = loader.dataset().as_numpy_iterator()
            time.sleep(0.5)  # every result before item 7 is ready: they go as one chunk
            for x in iterator:
                seen.append(int(x))
        assert loader.stats()["elements_per_tensorflow_call"] > 1
    assert seen == list(range(7))


def test_a_killed_worker_s_finished_items_reach_tensorflow_before_its_error():
    """Tiny items in chunks, through grouped calls: the finished part of the
    chunk whose worker hung goes out before the WorkerTimeout."""
    with MPLoader(helpers.hang_on_2500, 4000, num_workers=2, timeout=1.0) as loader:
        seen = []
        with pytest.raises(tf.errors.OpError, match="source index 2500 ran"):
            for x in loader.dataset().as_numpy_iterator():
                seen.append(int(x))
        assert loader.stats()["elements_per_tensorflow_call"] > 1
        assert loader.state_dict()["position"] == 2500
    assert seen == list(range(2500))


@pytest.mark.parametrize("shuffle,batch", [(False, 1), (True, 1), (True, 4)])
def test_resume_is_exact_inside_a_chunk_tensorflow_still_holds(shuffle, batch):
    """The state counts only what the consumer took, not the rest of a chunk
    waiting in TensorFlow; skips count once the element after them is taken."""
    with MPLoader(helpers.fail_on_7, 100, num_workers=2, on_error="skip", shuffle=shuffle,
                  seed=3) as loader:
        whole = [int(x) for x in loader]
        loader.set_epoch(0)
        iterator = loader.dataset().batch(batch).as_numpy_iterator()
        taken = next(iterator).tolist()
        time.sleep(0.5)  # the rest of the epoch is ready: the next call takes it all
        while len(taken) < 12:
            taken += next(iterator).tolist()
            time.sleep(0.05)  # a training step
        assert loader.stats()["elements_per_tensorflow_call"] > 2
        state = loader.state_dict()
        taken += next(iterator).tolist()  # more, after the state was saved
        del iterator
    assert taken == whole[:12 + batch] and 7 not in whole
    with MPLoader(helpers.fail_on_7, 100, num_workers=3, on_error="skip", shuffle=shuffle,
                  seed=3) as resumed:
        resumed.load_state_dict(state)
        rest = [int(x) for x in resumed.dataset()]
    assert taken[:12] + rest == whole


def test_inside_a_distribution_strategy_elements_go_one_per_call():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with MPLoader(helpers.fail_on_7, 6, num_workers=2) as loader, strategy.scope():
        ds = loader.dataset()
        assert [int(x) for x in _slowly(ds)] == list(range(6))
        assert loader.stats()["elements_per_tensorflow_call"] == 1


@pytest.mark.parametrize("fn", [helpers.empty_leaf, helpers.float8_leaf])
def test_small_elements_that_unbatch_cannot_take_go_one_per_call(fn):
    with MPLoader(fn, 40, num_workers=2) as loader:
        direct = [repr(e) for e in loader]
        through_tf = [repr(e) for e in _slowly(loader.dataset().as_numpy_iterator())]
        assert loader.stats()["elements_per_tensorflow_call"] == 1
    assert through_tf == direct


def test_what_a_long_epoch_hands_out_is_applied_as_it_goes_not_kept():
    """Nobody saves mid-epoch: the records of calls surely taken are applied
    during the pass, so they do not pile up element by element."""
    with MPLoader(helpers.fail_on_7, 6000, num_workers=2, on_error="skip") as loader:
        iterator = loader.dataset().as_numpy_iterator()
        for _, _ in zip(range(5000), _slowly(iterator, 0.0002)):
            pass
        deferred = loader._epochs._progress.settle.__self__
        assert len(deferred._entries) <= (SURELY_TAKEN_AFTER_CALLS + 1) * MAX_CHUNK_ELEMENTS
        assert loader.stats()["elements_per_tensorflow_call"] > 1
        assert loader.state_dict()["position"] == 5001  # item 7 skipped


def test_a_consumer_taking_results_already_here_still_feeds_the_workers(tmp_path):
    """While the consumer works through results already in the parent, the
    workers' next tasks still go out.  They were sent only when the consumer
    had to wait, so a consumer behind the workers (TensorFlow through a
    backlog of groups) left them idle: here item 3 began only at the third
    ``next()``, 0.5 s late."""
    stamps = tmp_path / "stamps"
    with MPLoader(helpers.stamped_sleep, [(str(stamps), i) for i in range(8)],
                  num_workers=1, prefetch=2) as loader:
        iterator = iter(loader)
        assert next(iterator) == 0
        time.sleep(0.5)  # the worker finishes item 1 and has nothing else to do
        assert next(iterator) == 1  # already here: no wait, yet items 2 and 3 go out
        second = time.monotonic()
        time.sleep(0.5)
        assert list(iterator) == list(range(2, 8))
    began = dict(line.split() for line in stamps.read_text().splitlines())
    assert float(began["3"]) - second < 0.3, (float(began["3"]) - second, began)
