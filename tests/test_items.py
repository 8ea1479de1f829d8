"""Items reach fn as the user made them; bad items, Ctrl-C and odd surroundings
affect only what they should.

Each scenario is a user script run
in a child interpreter under a hard bound (bounded.py).
"""
from __future__ import annotations

import signal
import subprocess
import time

import pytest

from .bounded import (assert_no_worker_left, assert_quiet, joined, kill_all, report,
                      run_bounded, start_bounded)


# -- items of the script's own classes could not be decoded in the worker


def test_items_of_dataclasses_and_namedtuples_defined_in_the_script_reach_fn(script):
    s = script("""
        import json
        from dataclasses import dataclass
        from typing import NamedTuple
        from mploader import MPLoader, MPLoaderError

        @dataclass
        class Case:
            path: str
            label: int

        class Sample(NamedTuple):
            path: str
            size: int

        def describe(x):
            return f"{type(x).__name__}|{x.path}|{x.label if isinstance(x, Case) else x.size}"

        got = {}
        for name, source in (("dataclass", [Case(f"/data/{i}.nii", i % 3) for i in range(6)]),
                             ("namedtuple", [Sample(f"/x/{i}", 2 * i) for i in range(6)])):
            with MPLoader(describe, source, num_workers=2) as loader:
                if name == "dataclass":
                    report_pids(loader)
                try:
                    got[name] = list(loader)
                except MPLoaderError as e:
                    got[name] = f"{type(e).__name__}: {e}"[:300]
        print(json.dumps(got))
    """)
    result = run_bounded(s, within=40)
    got = report(result)
    assert got["dataclass"] == [f"Case|/data/{i}.nii|{i % 3}" for i in range(6)], got
    assert got["namedtuple"] == [f"Sample|/x/{i}|{2 * i}" for i in range(6)], got
    assert_quiet(result)
    assert_no_worker_left(s.wait_for_pids())


BOMB = """
def explode(message):
    raise ValueError(message)

class Bomb:
    '''An item that pickles, and raises when it is unpickled.'''
    def __reduce__(self):
        return (explode, ("this item cannot be decoded",))

ITEMS = [0, 1, 2, Bomb(), 4, 5, 6, 7]
"""


def test_item_that_cannot_be_decoded_in_the_worker_is_a_worker_error_on_that_index(script):
    s = script(joined("""
        import json
        from mploader import MPLoader, MPLoaderError, WorkerError
    """, BOMB, """
        with MPLoader(lambda x: x, ITEMS, num_workers=2) as loader:
            report_pids(loader)
            got = []
            try:
                for x in loader:
                    got.append(x)
                outcome = {"outcome": "finished"}
            except WorkerError as e:
                outcome = {"outcome": "WorkerError", "index": e.index, "exc_type": e.exc_type}
            except MPLoaderError as e:
                outcome = {"outcome": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps({"got": got, **outcome}))
    """))
    result = run_bounded(s, within=40)
    got = report(result)
    assert got["outcome"] == "WorkerError", got
    assert got["index"] == 3 and "ValueError" in got["exc_type"], got
    assert got["got"] == [0, 1, 2], got  # ordered: raised at the item's position
    assert_quiet(result)
    assert_no_worker_left(s.wait_for_pids())


def test_item_that_cannot_be_decoded_in_the_worker_is_skipped_alone(script):
    s = script(joined("""
        import json
        from mploader import MPLoader, MPLoaderError
    """, BOMB, """
        with MPLoader(lambda x: x, ITEMS, num_workers=2, on_error="skip") as loader:
            report_pids(loader)
            try:
                got = {"outcome": "finished", "out": list(loader)}
            except MPLoaderError as e:
                got = {"outcome": f"{type(e).__name__}: {e}"[:300]}
            got["skipped"] = [[s.index, s.exc_type] for s in loader.skipped]
        print(json.dumps(got))
    """))
    result = run_bounded(s, within=40)
    got = report(result)
    assert got["outcome"] == "finished", got
    assert got["out"] == [0, 1, 2, 4, 5, 6, 7], got
    assert [index for index, _ in got["skipped"]] == [3], got
    assert "ValueError" in got["skipped"][0][1], got
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert_no_worker_left(s.wait_for_pids())


# -- on_error="skip" under dataset() when item 0 (the probe's) is bad


@pytest.mark.tf
def test_dataset_with_skip_and_a_bad_item_0_yields_the_rest_and_skips_it_once(script):
    s = script("""
        import json
        import numpy as np
        import tensorflow as tf
        from mploader import MPLoader

        def fn(i):
            if i == 0:
                raise EOFError("corrupt case_000.nii.gz")
            return np.full(3, i, np.float32)

        with MPLoader(fn, range(6), num_workers=2, on_error="skip") as loader:
            report_pids(loader)
            try:
                ds = loader.dataset()    # no output_signature: it must look past item 0
                got = {"outcome": "ok", "out": [int(x[0]) for x in ds.as_numpy_iterator()]}
            except BaseException as e:
                got = {"outcome": f"{type(e).__name__}: {e}"[:300]}
            got["skipped"] = [s.index for s in loader.skipped]
        print(json.dumps(got))
    """)
    result = run_bounded(s, within=120)
    got = report(result)
    assert got["outcome"] == "ok", got
    assert got["out"] == [1, 2, 3, 4, 5], got
    assert got["skipped"] == [0], f"loader.skipped should list index 0 once: {got}"
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert_no_worker_left(s.wait_for_pids())


# -- once dataset() had been called, Ctrl-C ended every loader's pass, in any thread


@pytest.mark.tf
def test_ctrl_c_handled_by_the_main_thread_does_not_end_a_pass_in_another_thread(script):
    s = script("""
        import json, os, signal, threading, time
        import numpy as np
        import tensorflow as tf
        from mploader import MPLoader

        loader_a = MPLoader(lambda i: np.float32(i), range(4), num_workers=1)
        first = [float(x) for x in loader_a.dataset()]   # installs mploader's Ctrl-C routing

        def fn(i):
            time.sleep(0.05)
            return i

        loader = MPLoader(fn, range(40), num_workers=2)
        report_pids(loader)
        got, errors = [], []
        def producer():
            try:
                for x in loader:
                    got.append(int(x))
            except BaseException as e:
                errors.append(f"{type(e).__name__}: {e}"[:200])
        t = threading.Thread(target=producer, daemon=True)
        t.start()
        deadline = time.monotonic() + 30
        while len(got) < 3 and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        at_signal = len(got)
        interrupted = False
        try:
            os.kill(os.getpid(), signal.SIGINT)      # Ctrl-C
            time.sleep(0.5)
        except KeyboardInterrupt:
            interrupted = True                       # "save a checkpoint and go on"
        t.join(20)
        print(json.dumps({"first": first, "got": got, "errors": errors, "at_signal": at_signal,
                          "producer_alive": t.is_alive(), "main_interrupted": interrupted}))
        loader.close()
        loader_a.close()
    """)
    result = run_bounded(s, within=120)
    got = report(result)
    assert got["first"] == [0.0, 1.0, 2.0, 3.0], got
    assert 3 <= got["at_signal"] < 40, f"the pass was not in progress at the signal: {got}"
    assert got["errors"] == [], f"the producer thread's pass ended: {got['errors']}"
    assert not got["producer_alive"] and got["got"] == list(range(40)), got
    assert got["main_interrupted"], "the main thread never saw its KeyboardInterrupt"
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert_no_worker_left(s.wait_for_pids())


# -- minor: stats() from another thread, a module of the cwd shadowing the standard
# -- library in workers, and the workers' exit when the program is SIGKILLed


def test_stats_from_another_thread_while_the_main_thread_iterates_never_raises(script):
    s = script("""
        import json, os, threading, time
        import numpy as np
        from mploader import MPLoader
        MARKER = os.environ["PID_FILE"] + ".died"

        def fn(i):
            if i == 150 and not os.path.exists(MARKER):   # one restart on the way
                open(MARKER, "w").close()
                os._exit(3)
            if i % 3 == 0:
                return np.full(50_000 + 1000 * (i % 7), i, np.float32)   # slots grow
            return i

        loader = MPLoader(fn, range(600), num_workers=2, on_worker_death="restart")
        report_pids(loader)
        stop, errors, calls = threading.Event(), [], [0]
        def poll():
            while not stop.is_set():
                try:
                    loader.stats()
                    calls[0] += 1
                except BaseException as e:
                    errors.append(f"{type(e).__name__}: {e}"[:200])
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        counts = []
        for epoch in range(3):
            n = 0
            for x in loader:
                n += 1
            counts.append(n)
        it = iter(loader)               # a pass abandoned half-way, then closed
        for _ in range(100):
            next(it)
        loader.close()
        time.sleep(0.2)                 # stats() of a closed loader too
        stop.set()
        poller.join(10)
        print(json.dumps({"counts": counts, "errors": errors[:5], "n_errors": len(errors),
                          "calls": calls[0]}))
    """)
    result = run_bounded(s, within=60)
    got = report(result)
    assert got["counts"] == [600, 600, 600], got
    assert got["n_errors"] == 0, f"stats() raised {got['n_errors']} times: {got['errors']}"
    assert got["calls"] > 100, got
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert_no_worker_left(s.wait_for_pids())


def test_module_in_the_working_directory_does_not_shadow_the_standard_library_in_workers(
        script, tmp_path):
    # `python app/train.py` run from a folder holding a json.py: the script's
    # sys.path starts with app/, not with the working directory, so the script
    # gets the real json; its workers must too (a worker started as
    # `python -m ...` would put the working directory first on its sys.path).
    (tmp_path / "json.py").write_text('raise ImportError("shadowed: not the standard json")\n')
    (tmp_path / "app").mkdir()
    s = script("""
        import json, sys
        from mploader import MPLoader, MPLoaderError
        with MPLoader(lambda i: json.dumps({"i": i}), range(6), num_workers=2) as loader:
            report_pids(loader)
            try:
                got = {"outcome": "finished", "out": list(loader)}
            except MPLoaderError as e:
                got = {"outcome": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps(got))
    """, name="app/user_script.py")
    result = run_bounded(s, within=40, cwd=tmp_path)
    got = report(result)
    assert got["outcome"] == "finished", got
    assert got["out"] == [f'{{"i": {i}}}' for i in range(6)], got
    assert_quiet(result)
    assert_no_worker_left(s.wait_for_pids())


@pytest.mark.parametrize("workload", ["tiny_items", "large_results", "slow_items"])
def test_sigkill_of_the_program_while_workers_are_busy_leaves_no_worker_and_no_traceback(
        script, workload):
    s = script(f"""
        import time
        import numpy as np
        from mploader import MPLoader
        WORKLOAD = {workload!r}

        def fn(i):
            if WORKLOAD == "large_results":
                return np.full(100_000, i % 256, np.uint8)
            if WORKLOAD == "slow_items":
                time.sleep(0.02)
            return i

        loader = MPLoader(fn, range(10 ** 9), num_workers=2)
        report_pids(loader)
        while True:
            for x in loader:
                pass
    """)
    proc = start_bounded(s, within=60)
    try:
        pids = s.wait_for_pids()
        time.sleep(1.0)                  # results flowing, workers busy
        killed = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        # Every worker shares the program's stdout and stderr: EOF once all are gone.
        out, err = proc.communicate(timeout=20)
        eof_s = time.monotonic() - killed
    except subprocess.TimeoutExpired:
        kill_all(s)
        pytest.fail("the program's output stayed open 20 s after it was killed: "
                    "a worker outlived it", pytrace=False)
    assert_no_worker_left(pids, within=max(0.0, 2.0 - eof_s))
    assert eof_s < 2.0, f"the last worker exited {eof_s:.2f} s after the program was killed"
    assert "BrokenPipeError" not in err and "Traceback" not in err, err[-4000:]


def test_traceback_of_a_function_in_the_users_script_names_its_file_and_line(script):
    s = script("""
        import json
        from mploader import MPLoader, WorkerError
        def load_case(path):
            raise ValueError(f"cannot read {path}")   # the line users look for
        with MPLoader(load_case, ["case_007.nii.gz"], num_workers=1) as loader:
            report_pids(loader)
            try:
                list(loader)
            except WorkerError as e:
                print(json.dumps({"tb": e.remote_traceback}))
    """)
    got = report(run_bounded(s, within=60))
    assert 'user_script.py", line' in got["tb"] and ", in load_case" in got["tb"], got["tb"]
    assert "# the line users look for" in got["tb"], got["tb"]
