"""Bad inputs give clear errors that name what was wrong and where."""
from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from mploader import MPLoader, WorkerError

from . import helpers


def test_worker_exception_carries_traceback_worker_and_index_at_its_position():
    seen = []
    with MPLoader(helpers.fail_on_7, range(20), num_workers=3) as loader:
        with pytest.raises(WorkerError) as info:
            for x in loader:
                seen.append(x)
    err = info.value
    assert seen == list(range(7))  # ordered: raised exactly at the failing item
    assert err.index == 7 and err.exc_type == "ValueError" and err.message == "bad item 7"
    assert err.worker_id in (0, 1, 2)
    assert "in fail_on_7" in err.remote_traceback and 'raise ValueError(f"bad item {x}")' in err.remote_traceback
    assert "source index 7, item 7" in str(err) and f"worker {err.worker_id}" in str(err)


def test_loader_is_usable_after_a_worker_exception():
    with MPLoader(helpers.fail_on_7, range(5), num_workers=2) as loader:
        pids = loader.worker_pids()
        assert list(loader) == list(range(5))
        assert loader.worker_pids() == pids


def test_on_error_skip_logs_counts_and_goes_on(caplog):
    with caplog.at_level(logging.WARNING, logger="mploader"):
        with MPLoader(helpers.fail_on_7, range(12), num_workers=2, on_error="skip") as loader:
            out = list(loader)
            stats = loader.stats()
    assert out == [x for x in range(12) if x != 7]
    assert [(s.index, s.exc_type, s.message) for s in loader.skipped] == [(7, "ValueError", "bad item 7")]
    assert stats["skipped"] == 1
    assert "skipped source index 7 (item 7): ValueError: bad item 7 (worker" in caplog.text


def test_on_error_skip_in_a_batch_keeps_the_other_items():
    with MPLoader(helpers.fail_on_7, range(10), num_workers=2, batch_size=4,
                  on_error="skip") as loader:
        batches = [list(b) for b in loader]
    assert batches == [[0, 1, 2, 3], [4, 5, 6], [8, 9]]  # batches are chunks of the source


def test_the_error_names_the_failing_item_even_when_fn_does_not():
    paths = [f"/data/case_{i:03d}.nii.gz" for i in range(6)]
    def load(path):
        if path.endswith("004.nii.gz"):
            raise EOFError("Compressed file ended before the end-of-stream marker was reached")
        return len(path)
    with MPLoader(load, paths, num_workers=2) as loader:
        with pytest.raises(WorkerError) as info:
            list(loader)
    assert "source index 4, item '/data/case_004.nii.gz'" in str(info.value)
    assert info.value.item == "'/data/case_004.nii.gz'"


def test_a_function_cloudpickle_cannot_send_fails_at_construction():
    lock = threading.Lock()
    with pytest.raises(TypeError, match="fn .* cannot be sent to the worker processes"):
        MPLoader(lambda x: lock, range(3))


def test_an_object_array_result_names_the_item_and_the_path():
    with MPLoader(lambda x: {"a": np.array([x, "s"], dtype=object)}, range(3),
                  num_workers=1) as loader:
        with pytest.raises(WorkerError) as info:
            list(loader)
    assert info.value.index == 0
    assert "dtype object at result['a']" in str(info.value)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_an_array_subclass_result_is_refused_not_stripped_of_its_meaning(batch_size):
    """A masked array's raw data would reach the consumer without its mask."""
    def masked_on_1(x):
        if x == 1:
            return {"a": np.ma.masked_array([x, 99], mask=[0, 1])}
        return {"a": np.array([x, 0])}
    with MPLoader(masked_on_1, range(4), num_workers=1, batch_size=batch_size) as loader:
        with pytest.raises(WorkerError, match=r"MaskedArray at result\['a'\].*filled"):
            list(loader)


def test_an_unsupported_leaf_names_its_type_and_path():
    with MPLoader(lambda x: (x, None), range(3), num_workers=1) as loader:
        with pytest.raises(WorkerError, match=r"NoneType at result\[1\]"):
            list(loader)


def test_worker_init_failure_is_raised_at_the_first_next():
    def init(worker_id):
        raise RuntimeError(f"no GPU for worker {worker_id}")
    with MPLoader(lambda x: x, range(3), num_workers=2, worker_init=init) as loader:
        with pytest.raises(WorkerError) as info:
            next(iter(loader))
    assert info.value.index is None and "in worker_init" in str(info.value)
    assert "no GPU for worker" in str(info.value)


def test_worker_init_runs_once_per_worker_with_its_id():
    def init(worker_id):
        import builtins
        builtins.MPLOADER_TEST_WORKER = worker_id
    def who(_x):
        import builtins
        return builtins.MPLOADER_TEST_WORKER
    with MPLoader(who, range(40), num_workers=2, worker_init=init) as loader:
        assert set(loader) <= {0, 1}


def test_an_unpicklable_item_names_its_index():
    with MPLoader(lambda x: 1, [1, 2, threading.Lock()], num_workers=1, prefetch=1) as loader:
        with pytest.raises(TypeError, match=r"source index 2 cannot be pickled"):
            list(loader)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_workers": 0}, "num_workers must be an int >= 1"),
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"prefetch": 0}, "prefetch must be an int >= 1"),
    ({"on_error": "ignore"}, "on_error must be 'raise' or 'skip'"),
    ({"on_worker_death": "retry"}, "on_worker_death must be 'raise' or 'restart'"),
    ({"timeout": 0}, "timeout must be > 0"),
    ({"timeout": "5"}, "timeout must be > 0"),
    ({"close_timeout": "1"}, "close_timeout must be > 0"),
    ({"seed": 1.5}, "seed must be an int"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MPLoader(lambda x: x, range(3), **kwargs)


def test_bad_sources_are_named():
    with pytest.raises(TypeError, match="source must be a sequence, an int, an iterable"):
        MPLoader(lambda x: x, 3.5)
    with pytest.raises(ValueError, match="an int source must be >= 0"):
        MPLoader(lambda x: x, -1)


def test_a_single_path_as_source_is_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"single path.*pass \['/data/case_000.nii.gz'\]"):
        MPLoader(lambda x: x, "/data/case_000.nii.gz")


def test_numpy_integers_are_accepted_where_ints_are():
    import numpy as np
    with MPLoader(lambda x: x, range(4), num_workers=np.int64(1), seed=np.int64(3)) as loader:
        assert list(loader) == [0, 1, 2, 3] and loader.num_workers == 1


def test_a_source_that_raises_mid_way_raises_after_the_items_before_it():
    def source():
        for i in range(100):
            if i == 37:
                raise ValueError("bad source at 37")
            yield i
    got = []
    with MPLoader(lambda i: i, source(), num_workers=2) as loader:
        with pytest.raises(ValueError, match="bad source at 37"):
            for x in loader:
                got.append(x)
        assert got == list(range(37))
        assert loader.worker_pids(), "a source error is not the pool's fault: it stays"
