"""Every way a user's program can end leaves no worker and no shared memory behind.

Each scenario is a real user script run in a child interpreter; the test does
the rude thing to it (signals via os.kill) and then checks by pid and /proc
that none of its workers remains.  /dev/shm is checked by the autouse
``no_leaks`` fixture.  Bounds are generous; real figures come from
``benchmarks/lifecycle.py``.
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from .procs import wait_gone

BOUND_S = 2.0  # what the issue promises a user for deaths and signals


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def assert_clean_exit(result, pids):
    assert result.returncode == 0, result.stderr
    for marker in ("Traceback", "leaked", "Exception ignored"):
        assert marker not in result.stderr, result.stderr
    assert not wait_gone(pids, BOUND_S), "workers outlived the script"


@pytest.mark.tf
@pytest.mark.parametrize("run", range(3))  # the hazard below is a race: try it more than once
def test_normal_end_without_close_and_a_live_tf_iterator(script, run):
    """TensorFlow destroys a live iterator during interpreter finalization; if a
    TensorFlow prefetch thread is inside the generator then, it hangs the exit
    (see tf/adapter.py).  dataset() has no such thread."""
    s = script("""
        import time
        import numpy as np
        import tensorflow as tf
        from mploader import MPLoader
        loader = MPLoader(lambda i: np.full((8,), i, np.float32), range(100), num_workers=2)
        report_pids(loader)
        ds = loader.dataset()
        assert sum(1 for _ in ds) == 100
        it = iter(ds)            # still alive when the script ends
        next(it)
        print(json.dumps({"end": time.time()}))
    """.replace("import time", "import time, json"))
    result = s.run()
    exited = time.time()
    assert_clean_exit(result, s.wait_for_pids())
    assert exited - last_json(result.stdout)["end"] < 10  # TF's own teardown included


def test_normal_end_in_the_middle_of_a_numpy_pass(script):
    s = script("""
        import json, time
        from mploader import MPLoader
        loader = MPLoader(lambda i: i, range(1000), num_workers=2)
        report_pids(loader)
        it = iter(loader)
        [next(it) for _ in range(10)]
        print(json.dumps({"end": time.time()}))
    """)
    result = s.run()
    exited = time.time()
    assert_clean_exit(result, s.wait_for_pids())
    assert exited - last_json(result.stdout)["end"] < 3


@pytest.mark.parametrize("busy", ["c_sleep", "python_loop", "ignores_sigterm"])
def test_close_while_every_worker_is_busy_is_bounded_and_parallel(script, busy):
    s = script(f"""
        import json, signal, threading, time
        from mploader import MPLoader, PassAbandoned

        def work(i):
            if {busy!r} == "ignores_sigterm":   # only SIGKILL stops it
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if {busy!r} == "python_loop":
                while True:
                    pass
            time.sleep(60)

        loader = MPLoader(work, range(100), num_workers=4, close_timeout=3.0)
        report_pids(loader)
        it = iter(loader)
        outcome = []
        def consume():
            try:
                next(it)
            except PassAbandoned:
                outcome.append("abandoned")
        t = threading.Thread(target=consume, daemon=True)
        t.start()
        time.sleep(1.5)                    # every worker is now inside work()
        start = time.monotonic()
        loader.close()
        took = time.monotonic() - start
        start = time.monotonic()
        loader.close()                     # idempotent
        again = time.monotonic() - start
        t.join(5)
        print(json.dumps({{"close_s": took, "again_s": again, "consumer": outcome}}))
    """)
    result = s.run()
    report = last_json(result.stdout)
    assert_clean_exit(result, s.wait_for_pids())
    # Four stuck workers stopped together: well under one grace period each.
    assert report["close_s"] < 3.0 and report["again_s"] < 0.1
    assert report["consumer"] == ["abandoned"]


def test_close_from_another_thread_and_the_with_block(script):
    s = script("""
        import json, threading, time
        from mploader import MPLoader, PassAbandoned
        with MPLoader(time.sleep, [30] * 10, num_workers=2, close_timeout=1.0) as loader:
            report_pids(loader)
            closer = threading.Timer(1.0, loader.close)
            closer.start()
            start = time.monotonic()
            try:
                list(loader)
                outcome = "finished"
            except PassAbandoned:
                outcome = "abandoned"
            took = time.monotonic() - start
        print(json.dumps({"outcome": outcome, "took": took}))
    """)
    result = s.run()
    report = last_json(result.stdout)
    assert_clean_exit(result, s.wait_for_pids())
    assert report["outcome"] == "abandoned" and report["took"] < 1.0 + BOUND_S


def test_close_in_a_forked_child_leaves_the_parents_workers_alone(script):
    s = script("""
        import json, os, sys
        from mploader import MPLoader
        loader = MPLoader(lambda i: i * 3, range(20), num_workers=2)
        report_pids(loader)
        before = loader.worker_pids()
        assert list(loader) == [i * 3 for i in range(20)]
        child = os.fork()
        if child == 0:
            loader.close()
            sys.exit(0)                     # runs the child's atexit hooks too
        os.waitpid(child, 0)
        print(json.dumps({"same_workers": loader.worker_pids() == before,
                          "works": list(loader) == [i * 3 for i in range(20)]}))
    """)
    result = s.run()
    report = last_json(result.stdout)
    assert_clean_exit(result, s.wait_for_pids())
    assert report == {"same_workers": True, "works": True}


@pytest.mark.tf
def test_take_and_break_reuse_the_pool_and_never_leak_stale_items(script):
    s = script("""
        import json
        import psutil
        import tensorflow as tf
        from mploader import MPLoader
        loader = MPLoader(lambda i: i, range(1000), num_workers=2)
        report_pids(loader)
        ds = loader.dataset()
        me = psutil.Process()
        counts, bad = set(), 0
        for _ in range(30):
            if [int(x) for x in ds.take(5)] != [0, 1, 2, 3, 4]:
                bad += 1
            counts.add(len(me.children(recursive=True)))
        for x in loader:
            if x == 10:
                break
        first_after_break = next(iter(loader))
        print(json.dumps({"bad": bad, "counts": sorted(counts), "after_break": first_after_break,
                          "pids": loader.worker_pids()}))
    """)
    result = s.run(timeout=240)
    report = last_json(result.stdout)
    pids = s.wait_for_pids()
    assert_clean_exit(result, pids)
    assert report["bad"] == 0 and report["counts"] == [2] and report["after_break"] == 0
    assert report["pids"] == pids


@pytest.mark.tf
def test_model_fit_for_three_epochs_then_the_script_ends(script):
    s = script("""
        import json, time
        import numpy as np
        import tensorflow as tf
        from mploader import MPLoader
        def sample(i):
            x = np.random.default_rng(i).normal(size=4).astype(np.float32)
            return x, np.float32(x[0] > 0)
        loader = MPLoader(sample, range(128), num_workers=2, batch_size=16)
        report_pids(loader)
        model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(1)])
        model.compile("sgd", "mse")
        model.fit(loader.dataset(), epochs=3, verbose=0)
        print(json.dumps({"end": time.time()}))
    """)
    result = s.run(timeout=240)
    exited = time.time()
    assert_clean_exit(result, s.wait_for_pids())
    assert exited - last_json(result.stdout)["end"] < 10


@pytest.mark.parametrize("path", ["numpy", pytest.param("tf_eager", marks=pytest.mark.tf)])
def test_ctrl_c_while_waiting_for_slow_workers(script, path):
    """A plain KeyboardInterrupt on both paths.  TF path: TensorFlow's C++
    GetNext holds the main thread, so the pass notices Ctrl-C on its own thread,
    stops the workers and ends the stream; the main thread then raises."""
    s = script(f"""
        import signal, sys, time
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
        signature = None
        if {path!r} == "tf_eager":
            import tensorflow as tf
            signature = tf.TensorSpec((), tf.int64)
        from mploader import MPLoader
        loader = MPLoader(lambda i: time.sleep(60) or i, range(10), num_workers=2,
                          output_signature=signature)
        report_pids(loader)
        source = loader.dataset() if signature is not None else loader
        print("waiting", flush=True)
        try:
            for _ in source:
                pass
        except BaseException as exc:
            print("interrupted at", time.time(), type(exc).__name__, flush=True)
            raise
    """)
    proc = s.start()
    pids = s.wait_for_pids()
    assert proc.stdout.readline() == "waiting\n"
    time.sleep(1.0)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    when, kind = out.split("interrupted at ")[1].split()
    assert float(when) - sent < BOUND_S
    assert kind == "KeyboardInterrupt"
    assert not wait_gone(pids, BOUND_S)


@pytest.mark.parametrize("rude, busy", [("SIGTERM", "c_sleep"), ("SIGKILL", "c_sleep"),
                                        ("SIGKILL", "python_loop")])
def test_workers_end_with_their_parent(script, rude, busy):
    s = script(f"""
        import time
        from mploader import MPLoader
        def work(i):
            if {busy!r} == "c_sleep":
                time.sleep(600)
            while True:
                pass
        loader = MPLoader(work, range(10), num_workers=2)
        report_pids(loader)
        list(loader)
    """)
    proc = s.start()
    pids = s.wait_for_pids()
    time.sleep(1.0)  # the workers are inside work()
    os.kill(proc.pid, getattr(signal, rude))
    proc.wait(30)
    start = time.monotonic()
    left = wait_gone(pids, 10)
    assert not left
    assert time.monotonic() - start < BOUND_S


@pytest.mark.slow  # version-independent, over 2 s: the main Python only
def test_a_loader_collected_without_close_stops_its_workers(script):
    s = script("""
        import gc, json, time
        from mploader import MPLoader
        loader = MPLoader(lambda i: i, range(10), num_workers=2)
        report_pids(loader)
        assert list(loader) == list(range(10))
        del loader
        gc.collect()
        print(json.dumps({"collected_at": time.time()}))
        time.sleep(3)   # the script is still running: only the finalizer can have stopped them
    """)
    proc = s.start()
    pids = s.wait_for_pids()
    line = proc.stdout.readline()
    assert "collected_at" in line
    assert not wait_gone(pids, BOUND_S), "workers outlived their collected loader"
    assert proc.poll() is None, "the check must happen while the script still runs"
    proc.communicate(timeout=30)


@pytest.mark.slow  # 10-20 s on the 2-core CI machine: run on the main Python only
def test_thirty_loaders_in_a_loop_leave_no_process_and_no_descriptor(script):
    """A descriptor or a process kept per loader shows as 30 of them."""
    s = script("""
        import json, os
        import psutil
        from mploader import MPLoader
        me = psutil.Process()
        list(MPLoader(lambda i: i, range(4), num_workers=2))  # warm-up: imports, caches
        fds_before = me.num_fds()
        for n in range(30):
            loader = MPLoader(lambda i: i + n, range(20), num_workers=2)
            assert list(loader) == [i + n for i in range(20)]
            loader.close()
        print(json.dumps({"children": len(me.children(recursive=True)),
                          "fd_growth": me.num_fds() - fds_before}))
    """)
    result = s.run(timeout=240)
    report = last_json(result.stdout)
    assert result.returncode == 0, result.stderr
    assert report["children"] == 0 and report["fd_growth"] <= 3
