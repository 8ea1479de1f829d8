"""Deaths, restarts, failed start-ups and timeouts: the right outcome, on the right item.

Each scenario is a user script run in a
child interpreter under a hard bound (bounded.py).
"""
from __future__ import annotations

import re

import pytest

from .bounded import assert_no_worker_left, assert_quiet, report, run_bounded


# -- a restart crashed when the dead worker had already sent results


def test_restart_after_a_death_with_results_already_sent_yields_every_item_in_order(script):
    s = script("""
        import json, os, time
        import numpy as np
        from mploader import MPLoader
        MARKER = os.environ["PID_FILE"] + ".died"

        def fn(i):
            if i == 0:
                time.sleep(0.5)          # worker 0 holds up the order
            if i == 5 and not os.path.exists(MARKER):
                open(MARKER, "w").close()
                time.sleep(0.05)
                os._exit(3)              # dies once, after having sent results for 1 and 3
            return np.full(1000, i, np.float32)

        with MPLoader(fn, range(12), num_workers=2, prefetch=2,
                      on_worker_death="restart") as loader:
            report_pids(loader)
            try:
                out = [[int(x[0]), bool((x == x[0]).all())] for x in loader]
                outcome = "finished"
            except BaseException as e:
                out, outcome = None, f"{type(e).__name__}: {e}"[:300]
        print(json.dumps({"outcome": outcome, "out": out, "died": os.path.exists(MARKER)}))
    """)
    result = run_bounded(s, within=40)
    got = report(result)
    assert got["died"], "the scenario did not kill a worker"
    assert got["outcome"] == "finished", got
    assert got["out"] == [[i, True] for i in range(12)], got
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert_no_worker_left(s.wait_for_pids())


# -- after worker_init failed, the second pass hung


def test_second_pass_after_worker_init_failed_raises_worker_error_again_not_a_hang(script):
    s = script("""
        import json, time
        from mploader import MPLoader, WorkerError

        def init(worker_id):
            raise RuntimeError("no GPU license")

        loader = MPLoader(lambda i: i, range(10), num_workers=2, worker_init=init)
        report_pids(loader)
        time.sleep(1.0)                  # both workers have failed and exited by now
        passes = []
        for attempt in (1, 2):
            start = time.monotonic()
            try:
                list(loader)
                outcome = {"outcome": "finished"}
            except WorkerError as e:
                outcome = {"outcome": "WorkerError", "index": e.index, "exc_type": e.exc_type}
            except Exception as e:
                outcome = {"outcome": f"{type(e).__name__}: {e}"[:300]}
            outcome["took"] = time.monotonic() - start
            passes.append(outcome)
            print(json.dumps({"pass": attempt, **outcome}), flush=True)
        start = time.monotonic()
        loader.close()
        print(json.dumps({"passes": passes, "close_s": time.monotonic() - start,
                          "pids_after_close": loader.worker_pids()}))
    """)
    result = run_bounded(s, within=40)
    got = report(result)
    assert_quiet(result)
    assert_no_worker_left(s.wait_for_pids())
    for attempt, outcome in enumerate(got["passes"], 1):
        assert outcome["outcome"] == "WorkerError", f"pass {attempt}: {outcome}"
        assert outcome["index"] is None and "RuntimeError" in outcome["exc_type"], outcome
        assert outcome["took"] < 5.0, f"pass {attempt}: {outcome}"
    assert got["close_s"] < 2.0 and got["pids_after_close"] == [], got


# -- the per-item timeout counted the worker's start-up (worker_init)


@pytest.mark.slow  # version-independent, over 2 s: the main Python only
@pytest.mark.parametrize("on_worker_death", ["raise", "restart"])
def test_slow_worker_init_does_not_count_against_the_item_timeout(script, on_worker_death):
    s = script(f"""
        import json, time
        from mploader import MPLoader

        def init(worker_id):
            time.sleep(3)                # loading a model: longer than the item timeout

        def fn(i):
            time.sleep(0.01)
            return i

        with MPLoader(fn, range(10), num_workers=2, timeout=2.0, worker_init=init,
                      on_worker_death={on_worker_death!r}) as loader:
            report_pids(loader)
            try:
                out, outcome = list(loader), "finished"
            except Exception as e:
                out, outcome = None, f"{{type(e).__name__}}: {{e}}"[:300]
        print(json.dumps({{"outcome": outcome, "out": out}}))
    """)
    result = run_bounded(s, within=40)
    got = report(result)
    assert got["outcome"] == "finished" and got["out"] == list(range(10)), got
    assert_quiet(result)
    assert_no_worker_left(s.wait_for_pids())


# -- with tiny items sent many per task, the timeout was multiplied by the task size


def test_timeout_on_one_tiny_item_fires_within_seconds_and_names_that_item(script):
    s = script("""
        import json, time
        start = time.monotonic()
        from mploader import MPLoader, WorkerTimeout

        def fn(i):
            if i == 500:
                time.sleep(600)
            return i

        loader = MPLoader(fn, range(2000), num_workers=2, timeout=1.0)
        report_pids(loader)
        got, outcome, index = [], "finished", None
        try:
            for x in loader:
                got.append(x)
        except WorkerTimeout as e:
            outcome, index = "WorkerTimeout", e.index
        except Exception as e:
            outcome = f"{type(e).__name__}: {e}"[:300]
        took = time.monotonic() - start
        loader.close()
        print(json.dumps({"outcome": outcome, "index": index, "took": took,
                          "prefix": got == list(range(len(got))), "count": len(got)}))
    """)
    result = run_bounded(s, within=40)
    got = report(result)
    assert_quiet(result)
    assert_no_worker_left(s.wait_for_pids())
    assert got["outcome"] == "WorkerTimeout" and got["index"] == 500, got
    assert got["took"] < 8.0, f"WorkerTimeout {got['took']:.1f} s after the start: {got}"
    assert got["prefix"] and got["count"] <= 500, got


# -- with tiny items sent many per task, a restart blamed the wrong item


def test_item_that_kills_every_worker_is_named_alone_after_restarts(script):
    s = script("""
        import json, os
        from mploader import MPLoader, WorkerDied

        def fn(i):
            if i == 1000:
                os._exit(7)              # every time
            return i

        with MPLoader(fn, range(5000), num_workers=2, on_worker_death="restart") as loader:
            report_pids(loader)
            got = {"outcome": "finished"}
            try:
                list(loader)
            except WorkerDied as e:
                got = {"outcome": type(e).__name__, "indices": list(e.indices),
                       "exitcode": e.exitcode, "message": str(e)}
            except Exception as e:
                got = {"outcome": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps(got))
    """)
    result = run_bounded(s, within=40)
    got = report(result)
    assert got["outcome"] == "WorkerDied", got
    assert got["indices"] == [1000], f"e.indices is {got['indices'][:20]}..., not [1000]"
    assert got["exitcode"] == 7, got
    message = got["message"]
    assert "source index 1000" in message, message
    named = {int(n) for found in re.findall(r"source ind(?:ex|ices)\s*\[?([\d,\s]+)", message)
             for n in re.findall(r"\d+", found)}
    assert named == {1000}, f"the message names other source indices {sorted(named)}: {message}"
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert_no_worker_left(s.wait_for_pids())


@pytest.mark.parametrize("ordered", [True, False])
def test_skip_also_covers_an_item_that_kills_every_worker_after_its_retry(script, ordered):
    s = script(f"""
        import json, logging, os
        from mploader import MPLoader
        logging.disable(logging.WARNING)
        def fn(i):
            if i in (5, 300):
                os._exit(9)
            return i
        with MPLoader(fn, range(400), num_workers=2, ordered={ordered},
                      on_worker_death="restart", on_error="skip") as loader:
            report_pids(loader)
            out = list(loader)
            print(json.dumps({{"out": out, "skipped": [(k.index, k.exc_type, k.message)
                                                       for k in loader.skipped]}}))
    """)
    got = report(run_bounded(s, within=90))
    expected = [i for i in range(400) if i not in (5, 300)]
    assert (got["out"] if ordered else sorted(got["out"])) == expected
    assert [(i, kind) for i, kind, _ in sorted(got["skipped"])] == [(5, "WorkerDied"), (300, "WorkerDied")]
    assert all("exited with code 9" in message for _, _, message in got["skipped"])


@pytest.mark.parametrize("death", ["raise", "restart"])
def test_a_timeout_on_the_last_item_in_flight_is_reported_not_dropped(script, death):
    s = script(f"""
        import json, logging, time
        from mploader import MPLoader, WorkerDied
        logging.disable(logging.WARNING)
        def fn(i):
            if i == 5:
                time.sleep(60)
            return i
        got = {{}}
        with MPLoader(fn, 6, num_workers=1, timeout=3, on_worker_death={death!r}) as loader:  # 0.5 s once timed out item 1 (two suites on 2 cores)
            report_pids(loader)
            out = []
            try:
                for x in loader:
                    out.append(x)
            except WorkerDied as e:
                got = {{"error": type(e).__name__, "indices": list(e.indices)}}
            got["out"] = out
        print(json.dumps(got))
    """)
    got = report(run_bounded(s, within=60))
    assert got["out"] == [0, 1, 2, 3, 4] and got.get("indices") == [5], got
