"""The TensorFlow side keeps the promise: values never silently changed, Ctrl-C
the user can catch, no hang at exit with a prefetched iterator alive.

Every scenario is a child script with real TensorFlow and real workers, run
under a hard bound (tests/bounded.py).  Hazards of timing are repeated: the
Ctrl-C scenario 6 times inside one script for `fit`, 3 for the others (each
round a fresh pass and pool; 20 each under ``make soak``),
the exit scenarios in separate interpreters: EXIT_RUNS times for the README's
own pattern and twice for each of the others in the suite, 20 times each
under ``make soak`` (MPLOADER_SOAK=1).  The exit hook is one mechanism for
every pattern: the suite's 20 exits together let a hazard that shows 1 run in
5 escape with probability 0.8**20 = 1.2%; ``make soak`` gives each pattern
that bound on its own.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import Script
from .bounded import assert_no_worker_left, assert_quiet, joined, report, run_bounded

pytestmark = pytest.mark.tf
SOAK = os.environ.get("MPLOADER_SOAK") == "1"

PRELUDE = """
    import json, os, signal, threading, time
    import numpy as np
    import tensorflow as tf
    from mploader import MPLoader
"""


def test_dtype_drift_is_an_error_naming_the_item_not_a_silent_cast(script):
    s = script(joined(PRELUDE, """
        def fn(i):
            return (np.zeros(2, np.int64) if i == 0 else np.full(2, 0.5)), (1 if i % 3 == 0 else 0.5)
        got = {}
        with MPLoader(fn, 4, num_workers=2) as loader:
            report_pids(loader)
            try:
                got["values"] = [(a.numpy().tolist(), float(b)) for a, b in loader.dataset()]
            except Exception as e:
                got["error"] = str(e)
        def varying(i):
            return np.zeros((20, 31) if i < 2 else (31, 27), np.float32)
        with MPLoader(varying, 4, num_workers=2) as loader:
            try:
                list(loader.dataset())
            except Exception as e:
                got["shape_error"] = str(e)
            sig = tf.TensorSpec((None, None), tf.float32)
            got["with_none_dims"] = [tuple(x.shape) for x in
                                     MPLoader(varying, 4, num_workers=1, output_signature=sig).dataset()]
        print(json.dumps(got))
    """))
    got = report(run_bounded(s, within=120))
    assert "values" not in got, f"values were silently cast: {got['values']}"
    first_line = got["error"].split("\n")[0]
    assert "source index 1: result[0] is float64 of shape (2,)" in first_line
    assert "int64" in first_line and "inferred from fn's result on source index 0" in first_line
    assert "output_signature" in first_line
    shape_line = got["shape_error"].split("\n")[0]
    assert "source index 2" in shape_line and "(31, 27)" in shape_line and "None" in shape_line
    assert got["with_none_dims"] == [[20, 31], [20, 31], [31, 27], [31, 27]]
    assert_no_worker_left(s.wait_for_pids())


ROUNDS = 20 if SOAK else 6  # per script; `make soak` runs 20 for every consumer


@pytest.mark.parametrize("consumer", ["fit", "custom_loop", "predict", "evaluate"])
def test_ctrl_c_in_keras_and_loops_is_a_keyboard_interrupt_the_script_catches(script, consumer):
    """The pattern the README recommends, `.batch(8).prefetch(2)` after dataset()."""
    rounds = ROUNDS if consumer == "fit" or SOAK else 3
    s = script(joined(PRELUDE, f"""
        signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal
        def sample(i):
            time.sleep(0.02)
            return np.full(4, i % 7, np.float32), np.float32(i % 2)
        model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(1)])
        model.compile("sgd", "mse")
        loader = MPLoader(sample, range(10_000), num_workers=2)
        report_pids(loader)
        caught, other, leftover = 0, [], []
        for round in range({rounds}):
            ds = loader.dataset().batch(8).prefetch(2)
            pids = loader.worker_pids()
            timer = threading.Timer(0.3 + 0.05 * (round % 5), os.kill, (os.getpid(), signal.SIGINT))
            timer.start()
            try:
                if {consumer!r} == "fit":
                    model.fit(ds, epochs=5, verbose=0)
                elif {consumer!r} == "predict":
                    model.predict(ds, verbose=0)
                elif {consumer!r} == "evaluate":
                    model.evaluate(ds, verbose=0)
                else:
                    for x, y in ds:
                        model.train_on_batch(x, y)
                other.append("finished without an interrupt")
            except KeyboardInterrupt:
                caught += 1
            except BaseException as e:
                other.append(f"{{type(e).__name__}}: {{str(e)[:200]}}")
            timer.join()
            time.sleep(0.2)
            # The interrupted pass's pool is stopped, unless the main thread took
            # the Ctrl-C itself (between elements): then the pool goes on serving
            # this loader.  Any other live worker is a leak.
            current = set(loader.worker_pids())
            leftover += [p for p in pids if p not in current and os.path.exists(f"/proc/{{p}}")
                         and b"mploader" in open(f"/proc/{{p}}/cmdline", "rb").read()
                         and open(f"/proc/{{p}}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
        loader.close()
        print(json.dumps({{"caught": caught, "other": other, "leftover": leftover}}))
    """))
    got = report(run_bounded(s, within=240))
    assert got["other"] == [] and got["caught"] == rounds, got
    assert got["leftover"] == [], "workers outside the loader's pool kept running"
    assert_no_worker_left(s.wait_for_pids())


def test_a_ctrl_c_inside_tensorflows_callbacks_into_python_is_still_a_keyboard_interrupt(script):
    """`tf.nest` calls composites' Python methods from C++ and does not pass an
    exception raised there on: with Python's own handler about 2 in 3 of these
    Ctrl-Cs come out as `SystemError: ... returned a result with an exception
    set` (Keras prints that and trains on).  Once a dataset() exists, each is a
    KeyboardInterrupt, raised as the tf.nest call returns, and the trace
    function that waited for it is gone."""
    s = script(joined(PRELUDE, """
        import random, sys
        from tensorflow.python.util import nest
        signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal
        loader = MPLoader(lambda i: np.float32(i), range(4), num_workers=1)
        report_pids(loader)
        loader.dataset()
        structure = {"ragged": tf.RaggedTensor.from_row_splits([1, 2, 3], [0, 1, 3]),
                     "sparse": tf.sparse.from_dense([[1, 0]]), "plain": (tf.constant(1), 2)}
        got = {"caught": 0, "other": [], "trace_left": 0}
        for round in range(150):
            timer = threading.Timer(random.uniform(0, 0.01), os.kill, (os.getpid(), signal.SIGINT))
            try:
                timer.start()   # in the try: the signal may come before start() returns
                end = time.monotonic() + 5
                while time.monotonic() < end:
                    nest.flatten(structure, expand_composites=True)
                got["other"].append("no interrupt within 5 s")
            except KeyboardInterrupt:
                got["caught"] += 1
            except BaseException as e:
                got["other"].append(f"{type(e).__name__}: {str(e)[:120]}")
            timer.join()
            got["trace_left"] += sys.gettrace() is not None
        loader.close()
        print(json.dumps(got))
    """))
    got = report(run_bounded(s, within=180))
    assert got["other"] == [] and got["caught"] == 150, got
    assert got["trace_left"] == 0
    assert_no_worker_left(s.wait_for_pids())


def test_a_ctrl_c_in_tensorflows_waits_and_py_function_comes_at_the_first_press(script):
    """The handler waits only while TensorFlow's C++ has called back into
    Python: TensorFlow's Python waiting on a thread (Coordinator) still raises
    at once; an eager `py_function` body, which TensorFlow's C++ runs, gives a
    KeyboardInterrupt as the op returns, not the UnknownError Python's own
    handler gives there; and a trace function the user set (a debugger's,
    coverage's) is left in place."""
    s = script(joined(PRELUDE, """
        import random, sys
        from tensorflow.python.util import nest
        signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal
        loader = MPLoader(lambda i: np.float32(i), range(4), num_workers=1)
        report_pids(loader)
        loader.dataset()
        def body(v):
            for _ in range(50):
                v = v + tf.constant(1.0)
                time.sleep(0.002)
            return v
        def tracer(frame, event, arg):
            return None
        def first_press(work, rounds):
            out = []
            for _ in range(rounds):
                timer = threading.Timer(random.uniform(0.05, 0.3), os.kill, (os.getpid(), signal.SIGINT))
                try:
                    timer.start()
                    started = time.monotonic()
                    work()
                    out.append("no interrupt")
                except KeyboardInterrupt:
                    out.append(round(time.monotonic() - started, 3))
                except BaseException as e:
                    out.append(f"{type(e).__name__}: {str(e)[:120]}")
                timer.join()
            return out
        got = {}
        got["coordinator"] = first_press(lambda: tf.train.Coordinator().wait_for_stop(5), 3)
        got["py_function"] = first_press(
            lambda: [tf.py_function(body, [tf.constant(1.0)], tf.float32) for _ in range(100)], 5)
        sys.settrace(tracer)
        got["with_tracer"] = first_press(lambda: tf.train.Coordinator().wait_for_stop(5), 2)
        got["tracer_kept"] = sys.gettrace() is tracer
        sys.settrace(None)
        loader.close()
        print(json.dumps(got))
    """))
    got = report(run_bounded(s, within=180))
    for case in ("coordinator", "py_function", "with_tracer"):
        assert all(isinstance(t, float) and t < 0.5 for t in got[case]), (case, got[case])
    assert got["tracer_kept"]
    assert_no_worker_left(s.wait_for_pids())


def exits_cleanly(s, runs: int, within: float) -> None:
    """Run the script ``s`` ``runs`` times in fresh interpreters, two at a time
    (in copies of it): each exits 0, quietly, within ``within`` s, and leaves
    no worker."""
    (s.path.parent / "twin").mkdir(exist_ok=True)
    twin = Script(s.path.parent / "twin", s.path.read_text(), s.path.name)
    for first in range(0, runs, 2):
        pair = [s, twin][:min(2, runs - first)]
        with ThreadPoolExecutor(len(pair)) as pool:
            results = list(pool.map(lambda one: run_bounded(one, within=within), pair))
        for one, result in zip(pair, results):
            assert_quiet(result)
            assert_no_worker_left(one.wait_for_pids())
            one.pid_file.unlink()


# x 6 s a run here (15 s with Keras): the suite stays under 10 minutes.
EXIT_RUNS = 20 if SOAK else 10
OTHER_EXIT_RUNS = 20 if SOAK else 2


@pytest.mark.parametrize("tail", [
    "batch(4).prefetch(2)", "shuffle(16).prefetch(1)", "repeat().batch(2).prefetch(3)",
    "interleave(lambda x: tf.data.Dataset.from_tensors(x).repeat(2), cycle_length=2, "
    "num_parallel_calls=2).prefetch(2)"])
def test_exit_with_a_live_prefetched_iterator_never_hangs(script, tail):
    """TensorFlow destroys a live iterator during finalization and waits for its
    threads; mploader's exit hook makes sure none is inside Python then.  Each
    pattern runs in fresh interpreters: the README's own EXIT_RUNS times, the
    others OTHER_EXIT_RUNS."""
    runs = EXIT_RUNS if tail.startswith("batch") else OTHER_EXIT_RUNS
    s = script(joined(PRELUDE, f"""
        loader = MPLoader(lambda i: (time.sleep(0.01), np.full((8,), i, np.float32))[1],
                          range(1000), num_workers=2)
        report_pids(loader)
        it = iter(loader.dataset().{tail})
        next(it)
        print(json.dumps({{"end": time.time()}}))
    """))
    exits_cleanly(s, runs, within=30)


def test_a_second_pass_makes_the_first_raise_not_end_silently(script):
    s = script(joined(PRELUDE, """
        from mploader import PassAbandoned
        loader = MPLoader(lambda i: i, range(10), num_workers=2)
        report_pids(loader)
        train = iter(loader)
        head = [next(train) for _ in range(3)]
        whole = list(loader)
        try:
            rest = list(train)
            got = {"rest": rest}
        except PassAbandoned as e:
            got = {"abandoned": str(e)}
        got.update(head=head, whole=whole)
        loader.close()
        print(json.dumps(got))
    """))
    got = report(run_bounded(s, within=60))
    assert got["head"] == [0, 1, 2] and got["whole"] == list(range(10))
    assert "rest" not in got and "newer iteration" in got["abandoned"]


def test_keras_fit_then_predict_then_the_script_ends_with_iterators_alive(script):
    """Keras keeps its own iterators and threads; the script ends right after."""
    s = script(joined(PRELUDE, """
        def sample(i):
            time.sleep(0.005)
            return np.full(4, i % 7, np.float32), np.float32(i % 2)
        loader = MPLoader(sample, range(64), num_workers=2)
        report_pids(loader)
        ds = loader.dataset().batch(8).prefetch(2)
        model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(1)])
        model.compile("sgd", "mse")
        model.fit(ds, epochs=2, verbose=0)
        model.evaluate(ds, verbose=0)
        model.predict(ds.map(lambda x, y: x), verbose=0)
        it = iter(ds)
        next(it)
        print(json.dumps({"end": time.time()}))
    """))
    exits_cleanly(s, OTHER_EXIT_RUNS, within=60)


def test_zip_of_one_loaders_dataset_with_itself_fails_saying_why(script):
    s = script(joined(PRELUDE, """
        loader = MPLoader(lambda i: i, range(8), num_workers=2)
        report_pids(loader)
        ds = loader.dataset()
        try:
            got = {"pairs": [(int(a), int(b)) for a, b in tf.data.Dataset.zip((ds, ds))]}
        except Exception as e:
            got = {"error": str(e).split("\\n")[0][:400]}
        loader.close()
        print(json.dumps(got))
    """))
    got = report(run_bounded(s, within=60))
    # Either each side saw the whole source, or the error says one loader runs one pass.
    assert (got.get("pairs") == [[i, i] for i in range(8)]  # JSON: lists
            or "one pass at a time" in got.get("error", "")), got
