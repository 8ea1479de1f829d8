"""Large fixed-shape elements through ``dataset()``, grouped by the workers.

Each worker lays several consecutive items out as one group (a column per
leaf), and one TensorFlow call takes rows of it without a copy
(tf/grouping.py).  The stream must be what one element per call gives:
values, dtypes, order, errors at their positions, skips, signature
mismatches named by their item, deaths, and a resume position exact to
the element.
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


def _record(element) -> tuple:
    """An element of helpers.large_record as plain values: (the image's one
    value, every value equal to it, label, flag)."""
    image = np.asarray(element["image"])
    label, flag = element["label"]
    return float(image.flat[0]), bool((image == image.flat[0]).all()), int(label), bool(flag)


def _per_call(loader) -> float:
    return loader.stats()["elements_per_tensorflow_call"]


@pytest.mark.parametrize("threads", [1, 3])
def test_large_elements_come_in_groups_and_the_stream_is_unchanged(threads):
    with MPLoader(helpers.large_record, 240, num_workers=2, on_error="skip",
                  threads_per_worker=threads) as loader:
        direct = [_record(e) for e in loader]
        ds = loader.dataset()
        assert ds.element_spec == {"image": tf.TensorSpec((128, 128, 4), tf.float32),
                                   "label": (tf.TensorSpec((), tf.int64),
                                             tf.TensorSpec((), tf.bool))}
        through_tf = [_record(e) for e in ds.as_numpy_iterator()]
        assert _per_call(loader) > 2
        assert [s.index for s in loader.skipped] == [7, 7]
    assert through_tf == direct
    assert direct == [(float(x), True, x % 3, x % 2 == 0) for x in range(240) if x != 7]


def test_a_group_raises_at_its_position_after_every_element_before():
    with MPLoader(helpers.large_record, 40, num_workers=2) as loader:
        seen = []
        with pytest.raises(tf.errors.OpError, match="bad item 7"):
            iterator = loader.dataset().as_numpy_iterator()
            time.sleep(0.5)  # the groups around item 7 are done
            for element in iterator:
                seen.append(_record(element)[0])
        assert _per_call(loader) > 1
        assert loader.state_dict()["position"] == 7
    assert seen == list(range(7))


def test_a_dtype_mismatch_inside_a_group_is_the_error_one_element_per_call_gives():
    """Item 11 is float64 where the signature says float32: the worker that
    grouped it reports the consumer's own SignatureMismatch, after the
    elements before it, with the words one element per call gives, and
    neither counts item 11 as taken (one per call did, so a resume skipped
    it); the loader's workers stay up for the next pass."""
    errors = []
    for grouped in (True, False):
        with MPLoader(helpers.large_float64_on_11, 30, num_workers=2) as loader:
            seen = []
            strategy = tf.distribute.OneDeviceStrategy("/cpu:0")  # one element per call
            with pytest.raises(tf.errors.OpError, match="source index 11") as caught:
                if grouped:
                    ds = loader.dataset()
                else:
                    with strategy.scope():
                        ds = loader.dataset()
                for element in ds.as_numpy_iterator():
                    seen.append(float(element[0, 0]))
            assert (_per_call(loader) > 1) == grouped
            assert seen == list(range(11))
            assert loader.state_dict()["position"] == 11  # a resume reads item 11 again
            errors.append(caught.value.message.split("\n")[0])
            pool = loader._pipeline.box[0]
            assert [float(e[0, 0]) for e in loader.dataset().take(5)] == [0, 1, 2, 3, 4]
            assert loader._pipeline.box[0] is pool  # an item's error, not a broken pool
    assert errors[0] == errors[1]
    assert "float64 of shape (64, 1024)" in errors[0] and "float32" in errors[0]


def test_python_numbers_take_the_dtype_of_a_given_signature():
    signature = {"image": tf.TensorSpec((128, 128, 4), tf.float32),
                 "label": (tf.TensorSpec((), tf.int32), tf.TensorSpec((), tf.bool))}
    with MPLoader(helpers.large_record, range(8, 40), num_workers=2,
                  output_signature=signature) as loader:
        elements = list(loader.dataset())
        assert _per_call(loader) > 1
    assert [e["label"][0].dtype for e in elements] == [tf.int32] * 32
    assert [_record(e) for e in elements] == [(float(x), True, x % 3, x % 2 == 0)
                                              for x in range(8, 40)]


def test_a_fn_that_returns_one_buffer_gives_each_element_its_own_values():
    with MPLoader(helpers.large_one_buffer, 48, num_workers=2) as loader:
        firsts = [(float(x[0, 0]), float(x[-1, -1])) for x in loader.dataset()]
        assert _per_call(loader) > 1
    assert firsts == [(float(i), float(i)) for i in range(48)]


def test_an_unsendable_leaf_fails_its_item_alone(caplog):
    with MPLoader(helpers.large_odd_leaf_on_5, 24, num_workers=2, on_error="skip") as loader:
        labels = [int(label) for _, label in loader.dataset()]
        assert _per_call(loader) > 1
        assert [s.index for s in loader.skipped] == [5]
        assert "object at result[1]" in loader.skipped[0].message
    assert labels == [x for x in range(24) if x != 5]


def test_a_worker_killed_inside_a_group_is_replaced_and_every_element_arrives(tmp_path):
    fn = helpers.large_kill_once(str(tmp_path / "killed"))
    with MPLoader(fn, 48, num_workers=2, on_worker_death="restart") as loader:
        firsts = [float(x[0, 0]) for x in loader.dataset()]
        assert _per_call(loader) > 1
        assert loader.stats()["worker_restarts"] == 1
    assert firsts == [float(i) for i in range(48)]
    assert (tmp_path / "killed").exists()


@pytest.mark.parametrize("shuffle,batch", [(False, 1), (True, 3)])
def test_resume_is_exact_inside_a_group_tensorflow_still_holds(shuffle, batch):
    """The state counts only the rows the consumer took, not the rest of a
    group waiting in TensorFlow; item 7's skip counts once the element after
    it is taken."""
    with MPLoader(helpers.large_record, 60, num_workers=2, on_error="skip", shuffle=shuffle,
                  seed=5) as loader:
        whole = [_record(e)[0] for e in loader]
        loader.set_epoch(0)
        iterator = loader.dataset().batch(batch).as_numpy_iterator()
        taken: list[float] = []
        while len(taken) < 13:
            batch_of = next(iterator)
            taken += [float(v) for v in batch_of["image"][:, 0, 0, 0]]
            time.sleep(0.05)  # a training step: the workers' groups are done meanwhile
        assert _per_call(loader) > 2
        state = loader.state_dict()
        next(iterator)  # more, after the state was saved
        del iterator
    assert taken == whole[:len(taken)] and 7.0 not in whole
    with MPLoader(helpers.large_record, 60, num_workers=3, on_error="skip", shuffle=shuffle,
                  seed=5) as resumed:
        resumed.load_state_dict(state)
        rest = [_record(e)[0] for e in resumed.dataset()]
    assert taken + rest == whole


def test_short_groups_share_a_call_stacked_and_the_stream_is_unchanged():
    """Slow items make groups of 2 (200 ms of work at most); rows of several
    such groups ready at once go in one call, stacked, in order."""
    with MPLoader(helpers.large_slow, 48, num_workers=2, threads_per_worker=2) as loader:
        assert [float(x[0, 0, 0]) for x in loader] == [float(i) for i in range(48)]  # learns
        iterator = loader.dataset().as_numpy_iterator()
        firsts = [float(next(iterator)[0, 0, 0])]
        time.sleep(0.8)  # the workers finish several groups meanwhile
        firsts += [float(x[0, 0, 0]) for x in iterator]
        assert loader.stats()["items_per_task"] <= 3  # short groups
        assert _per_call(loader) > 2  # rows of several groups per call
    assert firsts == [float(i) for i in range(48)]
