"""The parent never blocks on a pipe, and close() wins every race.

Each scenario is a user script run in a child
interpreter under a hard bound (bounded.py): a deadlock fails the test with
the script's stacks instead of hanging the suite.
"""
from __future__ import annotations

import pytest

from .bounded import (LIVE_WORKERS, joined, assert_no_worker_left, assert_quiet, kill_pid_if_alive, report,
                      run_bounded)


# -- the parent blocked writing a task while the worker blocked writing its result


def round_trip(script, items: str, loader: str, expected: str, within: float) -> dict:
    """Run ``list(loader)`` over ``items`` (Python expressions) in a bounded child
    script; its report says whether the output equals ``expected``, the count and
    the time taken.  The script must exit quietly and leave no worker."""
    s = script(f"""
        import json, time
        from mploader import MPLoader
        items = {items}
        loader = {loader}
        report_pids(loader)
        start = time.monotonic()
        out = list(loader)
        took = time.monotonic() - start
        loader.close()
        print(json.dumps({{"equal": out == {expected}, "count": len(out), "took": took}}))
    """)
    result = run_bounded(s, within=within)
    got = report(result)
    assert_quiet(result)
    assert_no_worker_left(s.wait_for_pids())
    return got


@pytest.mark.slow  # version-independent, over 2 s: the main Python only
def test_30k_str_items_of_2kB_in_and_out_do_not_deadlock(script):
    got = round_trip(script, items='[f"{i:08d}" + "x" * 1992 for i in range(30_000)]',  # 2 kB each way
                     loader="MPLoader(lambda s: s, items, num_workers=2)",
                     expected="items", within=90)
    assert got["equal"] and got["count"] == 30_000, got
    assert got["took"] < 60, got


def test_20k_dict_items_of_1500B_in_and_str_out_do_not_deadlock(script):
    # a metadata record in, a serialized record out
    got = round_trip(script,
                     items='[{"id": i, "meta": f"{i:08d}" + "x" * 1500} for i in range(20_000)]',
                     loader='MPLoader(lambda d: d["meta"], items, num_workers=2)',
                     expected='[d["meta"] for d in items]', within=90)
    assert got["equal"] and got["count"] == 20_000, got
    assert got["took"] < 60, got


def test_200kB_bytes_items_in_and_out_do_not_deadlock_one_worker(script):
    # each item larger than a pipe's buffer
    got = round_trip(script, items="[bytes([i]) * 200_000 for i in range(20)]",
                     loader="MPLoader(lambda b: b, items, num_workers=1, prefetch=2)",
                     expected="items", within=30)
    assert got["equal"] and got["count"] == 20, got


def test_close_from_another_thread_is_bounded_while_200kB_items_wait_for_a_busy_worker(script):
    s = script("""
        import json, os, threading, time
        from mploader import MPLoader, PassAbandoned

        def fn(b):
            time.sleep(30)
            return b

        items = [bytes([i]) * 200_000 for i in range(20)]
        loader = MPLoader(fn, items, num_workers=1, prefetch=2)
        report_pids(loader)
        outcome = []
        def consume():
            try:
                for _ in loader:
                    pass
                outcome.append("finished")
            except PassAbandoned:
                outcome.append("abandoned")
            except BaseException as e:
                outcome.append(f"{type(e).__name__}: {e}"[:200])
        consumer = threading.Thread(target=consume, daemon=True)
        consumer.start()
        time.sleep(1.5)                  # the worker sleeps in fn; the consumer waits
        closer = threading.Thread(target=loader.close, daemon=True)
        start = time.monotonic()
        closer.start()
        closer.join(10)
        close_s = None if closer.is_alive() else time.monotonic() - start
        consumer.join(5)
        print(json.dumps({"close_s": close_s, "consumer": outcome,
                          "consumer_alive": consumer.is_alive(),
                          "pids_after_close": loader.worker_pids()}))
        if close_s is None:
            os._exit(1)                  # close() is stuck: do not wait on it again at exit
    """)
    result = run_bounded(s, within=40)
    got = report(result)
    assert got["close_s"] is not None, f"close() had not returned after 10 s: {got}"
    assert got["close_s"] < 3.0, got
    assert_quiet(result)
    assert_no_worker_left(s.wait_for_pids())
    assert got["pids_after_close"] == []
    assert not got["consumer_alive"] and got["consumer"] == ["abandoned"], got


def test_timeout_is_enforced_while_200kB_array_items_wait_for_a_stuck_worker(script):
    s = script("""
        import json, time
        import numpy as np
        from mploader import MPLoader, WorkerTimeout

        def fn(a):
            if a[0] == 3:
                time.sleep(600)
            return a.sum()

        items = [np.full(50_000, i, np.float32) for i in range(10)]   # 200 kB each
        loader = MPLoader(fn, items, num_workers=1, prefetch=2, timeout=1.0)
        report_pids(loader)
        got, outcome, index = [], "finished", None
        start = time.monotonic()
        try:
            for x in loader:
                got.append(float(x))
        except WorkerTimeout as e:
            outcome, index = "WorkerTimeout", e.index
        except Exception as e:
            outcome = f"{type(e).__name__}: {e}"[:300]
        took = time.monotonic() - start
        loader.close()
        print(json.dumps({"outcome": outcome, "index": index, "took": took, "got": got}))
    """)
    result = run_bounded(s, within=30)
    got = report(result)
    assert_quiet(result)
    assert_no_worker_left(s.wait_for_pids())
    assert got["outcome"] == "WorkerTimeout" and got["index"] == 3, got
    assert got["took"] < 10, got
    assert got["got"] == [0.0, 50_000.0, 100_000.0], got


# -- after a death the parent read the dead worker's pipe until EOF, which a
# -- process the worker had started (and that inherited the pipe) could delay for ever


def test_worker_death_is_reported_at_once_though_its_child_holds_its_pipes(script, tmp_path):
    grandchild_file = tmp_path / "worker_pids.json.grandchild"
    s = script("""
        import json, os, signal, time
        from mploader import MPLoader, WorkerDied
        GRANDCHILD = os.environ["PID_FILE"] + ".grandchild"

        def fn(i):
            if i == 2:
                pid = os.fork()          # as multiprocessing's 'fork' context would
                if pid == 0:             # the helper: every descriptor of the worker, for 15 s
                    null = os.open(os.devnull, os.O_RDWR)
                    os.dup2(null, 1)
                    os.dup2(null, 2)
                    time.sleep(15)
                    os._exit(0)
                with open(GRANDCHILD, "w") as f:
                    f.write(str(pid))
                time.sleep(0.2)
                os._exit(1)
            time.sleep(0.05)
            return i

        loader = MPLoader(fn, range(10), num_workers=2)
        report_pids(loader)
        outcome, indices = "finished", None
        start = time.monotonic()
        try:
            list(loader)
        except WorkerDied as e:
            outcome, indices = type(e).__name__, list(e.indices)
        except Exception as e:
            outcome = f"{type(e).__name__}: {e}"[:300]
        died_s = time.monotonic() - start
        start = time.monotonic()
        loader.close()
        close_s = time.monotonic() - start
        try:
            with open(GRANDCHILD) as f:
                os.kill(int(f.read()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
        print(json.dumps({"outcome": outcome, "indices": indices, "died_s": died_s,
                          "close_s": close_s}))
    """)
    try:
        result = run_bounded(s, within=40)
    finally:
        if grandchild_file.exists():  # the script could not kill it: do not leave it
            try:
                kill_pid_if_alive(int(grandchild_file.read_text()), "mploader.worker")
            except ValueError:
                pass
    got = report(result)
    assert_quiet(result)
    assert_no_worker_left(s.wait_for_pids())
    assert got["outcome"] == "WorkerDied" and 2 in got["indices"], got
    assert got["died_s"] < 3.0, f"WorkerDied came {got['died_s']:.1f} s after the pass began: {got}"
    assert got["close_s"] < 2.0, got


# -- close() from one thread raced a pass that started a fresh pool in another


TRIALS = 16  # each trial starts two workers; the race was lost in about half of them


@pytest.mark.slow  # version-independent, over 2 s: the main Python only
def test_close_racing_a_pass_start_in_another_thread_never_leaves_a_worker(script):
    s = script(joined("""
        import json, os, sys, threading, time
        from mploader import MPLoader, PassAbandoned, WorkerDied
        sys.setswitchinterval(1e-6)      # switch threads as often as possible
        MARKERS = os.environ["PID_FILE"] + ".died"
        os.makedirs(MARKERS)
    """, LIVE_WORKERS, f"""
        leaks, after_close, unexpected = [], set(), []
        for trial in range({TRIALS}):
            marker = os.path.join(MARKERS, str(trial))
            def fn(i, marker=marker):
                if not os.path.exists(marker):   # the first pass's worker dies
                    open(marker, "w").close()
                    os._exit(3)
                return i
            loader = MPLoader(fn, range(3), num_workers=1)
            try:
                list(loader)
            except WorkerDied:
                pass                     # its pool is gone: the next pass starts a fresh one
            go = threading.Event()
            def starter():
                go.wait()
                try:
                    next(iter(loader))
                except (RuntimeError, PassAbandoned):   # closed first: fine
                    pass
                except BaseException as e:
                    unexpected.append(f"{{type(e).__name__}}: {{e}}"[:200])
            t = threading.Thread(target=starter)
            t.start()
            go.set()
            time.sleep(0.002 * (trial % 5))
            loader.close()
            t.join(10)
            time.sleep(0.05)             # a worker being started now would be visible
            left = live_workers()
            if left:
                leaks.append(trial)
                for pid in left:
                    os.kill(pid, 9)
            try:
                next(iter(loader))
                after_close.add("a pass ran after close()")
            except (RuntimeError, PassAbandoned) as e:
                after_close.add(type(e).__name__)
        print(json.dumps({{"leaks": leaks, "after_close": sorted(after_close),
                          "unexpected": unexpected, "left_at_end": live_workers()}}))
    """))
    result = run_bounded(s, within=120)
    got = report(result)
    assert_quiet(result)
    assert got["leaks"] == [], (f"in trials {got['leaks']} of {TRIALS}, close() returned and "
                                f"then a worker was started anyway: {got}")
    assert set(got["after_close"]) <= {"RuntimeError", "PassAbandoned"}, got
    assert got["unexpected"] == [] and got["left_at_end"] == [], got
