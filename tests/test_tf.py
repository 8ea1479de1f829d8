"""The TensorFlow adapter, with real TensorFlow: signatures, epochs, buffers, fit."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from mploader import MPLoader

from . import helpers
from .procs import wait_gone

pytestmark = pytest.mark.tf
try:
    import tensorflow as tf
except ModuleNotFoundError:  # a venv without TensorFlow: `pytest -m "not tf"` deselects this module
    tf = None


def test_signature_is_inferred_for_dicts_tuples_and_batches():
    with MPLoader(helpers.nest, range(10), num_workers=2) as loader:
        spec = loader.dataset().element_spec
        assert spec["image"] == tf.TensorSpec((2, 3), tf.float32)
        assert spec["meta"] == (tf.TensorSpec((), tf.int64), tf.TensorSpec((), tf.string),
                                tf.TensorSpec((), tf.string))
    with MPLoader(helpers.nest, range(10), num_workers=2, batch_size=4,
                  drop_remainder=True) as loader:
        ds = loader.dataset()
        assert ds.element_spec["image"] == tf.TensorSpec((4, 2, 3), tf.float32)
        batches = list(ds.as_numpy_iterator())
    assert len(batches) == 2
    np.testing.assert_array_equal(batches[1]["label"], [4 % 3, 5 % 3, 6 % 3, 7 % 3])
    assert list(batches[1]["meta"][1]) == [b"id4", b"id5", b"id6", b"id7"]


def test_cardinality_is_known_when_the_source_has_a_length():
    with MPLoader(lambda x: x, range(10), num_workers=1, batch_size=3) as loader:
        assert int(loader.dataset().cardinality()) == 4


def test_variable_size_outputs_with_a_none_dimension():
    sig = tf.TensorSpec((None,), tf.int32)
    with MPLoader(helpers.variable, range(20), num_workers=2, output_signature=sig) as loader:
        out = list(loader.dataset().as_numpy_iterator())
    for x, got in zip(range(20), out, strict=True):
        np.testing.assert_array_equal(got, helpers.variable(x))


def test_a_tf_data_source_replaces_dataset_map():
    source = tf.data.Dataset.range(30).map(lambda x: x * 10)
    with MPLoader(lambda x: np.int64(x) + 1, source, num_workers=2) as loader:
        assert len(loader) == 30
        out = [int(v) for v in loader.dataset().as_numpy_iterator()]
    assert out == [x * 10 + 1 for x in range(30)]


def test_shuffle_and_prefetch_buffers_hold_unchanged_data():
    """300 elements of 256 KiB held by TF buffers while slots are reused."""
    def make(i):
        return np.full((256 * 1024 // 8,), i, np.int64), np.int64(i)
    with MPLoader(make, range(300), num_workers=2) as loader:
        ds = loader.dataset().shuffle(1000).prefetch(8)
        seen = []
        for block, index in ds.as_numpy_iterator():
            assert (block == index).all(), f"element {index} was overwritten"
            seen.append(int(index))
    assert sorted(seen) == list(range(300))


def _volume(i):
    return np.full((64, 64, 16), i, np.float32)  # 256 KiB


def test_an_iterator_ends_at_once_after_its_last_element():
    """TensorFlow's autotuning thread held the end of about a third of the
    passes (the iterator's destructor: the end of a loop, of a Keras epoch)
    for about two thirds of the pass's own time; dataset() turns it off.
    5 passes of about a second each: the old code stalled at least one in
    about 9 runs of 10."""
    stalls = []
    with MPLoader(_volume, range(2500), num_workers=2) as loader:
        ds = loader.dataset().batch(32)
        for _ in range(5):
            count = 0
            for batch in ds:
                count += len(batch)
                last = time.perf_counter()
            stalls.append(time.perf_counter() - last)
            assert count == 2500
    assert max(stalls) < 0.3, [round(s, 3) for s in stalls]


def test_autotune_after_dataset_still_runs_and_the_user_s_options_win():
    with MPLoader(_volume, range(64), num_workers=2) as loader:
        assert loader.dataset().options().autotune.enabled is False
        ds = loader.dataset().map(lambda x: x[0, 0, 0] + 1, num_parallel_calls=tf.data.AUTOTUNE)
        assert [float(v) for v in ds.prefetch(tf.data.AUTOTUNE)] == [i + 1.0 for i in range(64)]
        mine = tf.data.Options()
        mine.autotune.enabled = True
        assert loader.dataset().batch(8).with_options(mine).options().autotune.enabled is True


def test_epochs_and_take_reuse_the_same_workers():
    with MPLoader(lambda x: x * 2, range(50), num_workers=2) as loader:
        ds = loader.dataset()
        pids = loader.worker_pids()
        for _ in range(2):
            assert [int(v) for v in ds] == [x * 2 for x in range(50)]
        assert [int(v) for v in ds.take(2)] == [0, 2]
        assert [int(v) for v in ds.take(3)] == [0, 2, 4]  # nothing stale from the last pass
        assert loader.worker_pids() == pids


def test_a_worker_error_surfaces_through_tensorflow_with_its_traceback():
    with MPLoader(helpers.fail_on_7, range(20), num_workers=2) as loader:
        with pytest.raises(Exception) as info:
            list(loader.dataset().as_numpy_iterator())
    text = str(info.value)
    # mploader's line first; the worker's traceback once, from fn's own frame.
    first = text.split("\n")[0]
    assert "WorkerError: ValueError: bad item 7  [on source index 7, item 7, worker" in first, first
    assert text.count("in fail_on_7") == 1 and text.count("Traceback in worker") == 1, text
    assert "mploader/worker.py" not in text and "mploader/passes.py" not in text, text


def test_model_fit_trains_for_two_epochs():
    def sample(i):
        x = np.random.default_rng(i).normal(size=8).astype(np.float32)
        return x, np.float32(x.sum() > 0)
    with MPLoader(sample, range(256), num_workers=2, batch_size=32) as loader:
        model = tf.keras.Sequential([tf.keras.Input((8,)), tf.keras.layers.Dense(1, activation="sigmoid")])
        model.compile("adam", "binary_crossentropy")
        history = model.fit(loader.dataset(), epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2
    assert all(np.isfinite(history.history["loss"]))


def test_a_script_without_main_guard_importing_tensorflow_passes_a_lambda(script):
    s = script("""
        import tensorflow as tf   # at top level, as users write it
        import numpy as np
        from mploader import MPLoader

        print("top level ran", flush=True)   # must run once: workers never import __main__
        loader = MPLoader(lambda i: np.full((64, 64), i, np.float32), range(40), num_workers=2)
        report_pids(loader)
        total = sum(float(x[0, 0]) for x in loader.dataset())
        maps = {}
        for pid in loader.worker_pids():
            with open(f"/proc/{pid}/status") as f:
                rss_kb = int(next(l for l in f if l.startswith("VmRSS")).split()[1])
            with open(f"/proc/{pid}/maps") as f:
                tf_mapped = "tensorflow" in f.read()
            maps[pid] = (rss_kb, tf_mapped)
        print(json.dumps({"total": total, "workers": maps}))
    """.replace("import numpy as np", "import numpy as np, json"))
    result = s.run()
    assert result.returncode == 0, result.stderr
    assert not wait_gone(s.wait_for_pids()), "workers outlived the script"
    assert result.stdout.count("top level ran") == 1
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["total"] == sum(range(40))
    for rss_kb, tf_mapped in report["workers"].values():
        assert not tf_mapped
        assert rss_kb < 100 * 1024, f"worker RSS {rss_kb} kB"


def test_a_fn_moved_from_tf_numpy_function_does_not_bring_tensorflow_into_the_workers(script):
    # tf.numpy_function (and py_function) attach their TensorFlow wrapper to
    # the very function they are given; shipped with it, every worker would
    # import TensorFlow to unpickle it
    s = script("""
        import functools, json
        import numpy as np
        import tensorflow as tf
        from mploader import MPLoader

        def load(i):
            return np.full(3, i, np.float32)

        def outer(i):   # reaches the marked function through a function of its own
            def inner(j):
                return load(j)
            return inner(i)

        before = tf.data.Dataset.range(4).map(lambda i: tf.numpy_function(load, [i], tf.float32))
        assert len(list(before)) == 4 and hasattr(load, "ag_dnc_wrapper__")
        values, mapped = [], []
        for fn in (load, functools.partial(load), outer):   # marked, or reached from fn
            loader = MPLoader(fn, range(6), num_workers=2)
            report_pids(loader)
            values.append([int(x[0]) for x in loader])
            for pid in loader.worker_pids():
                with open(f"/proc/{pid}/maps") as f:
                    mapped.append("libtensorflow" in f.read())
            loader.close()
        print(json.dumps({"values": values, "tf_in_workers": mapped,
                          "still_marked": hasattr(load, "ag_dnc_wrapper__"),
                          "tf_pipeline_works": len(list(before)) == 4}))
    """)
    result = s.run()
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["values"] == [list(range(6))] * 3
    assert report["tf_in_workers"] == [False] * 6
    assert report["still_marked"] and report["tf_pipeline_works"]


def test_a_prepare_used_in_tf_numpy_function_keys_a_directory_cache_as_an_unmarked_one(script,
                                                                                       tmp_path):
    # the workers never see TensorFlow's mark, so the key must not include it
    def job(marked: bool) -> dict:
        s = script(f"""
            import json
            import numpy as np
            import tensorflow as tf
            from mploader import MPLoader

            def prepare(i):
                return np.full(3, i, np.float32)

            if {marked!r}:
                list(tf.data.Dataset.range(2).map(
                    lambda i: tf.numpy_function(prepare, [i], tf.float32)))
                assert hasattr(prepare, "ag_dnc_wrapper__")
            with MPLoader(lambda x: x * 2, range(4), prepare=prepare, num_workers=2,
                          cache={str(tmp_path / "cache")!r}) as loader:
                values = [float(x[0]) for x in loader]
                key, stats = loader.cache_info()["key"], loader.stats()["cache"]
            print(json.dumps({{"values": values, "key": key, "hits": stats["hits"]}}))
        """, name=f"job_{marked}.py")
        result = s.run()
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])
    first, plain, second = job(True), job(False), job(True)
    assert first["values"] == plain["values"] == second["values"] == [0.0, 2.0, 4.0, 6.0]
    assert first["key"] == plain["key"] == second["key"]
    assert (first["hits"], plain["hits"], second["hits"]) == (0, 4, 4)
