"""What a loader holds: descriptors, shared memory, its workers after `del`, and
whose workers they are after a fork.

Each scenario is a user script run
in a child interpreter under a hard bound (bounded.py).
"""
from __future__ import annotations

import re
import resource

import pytest

from mploader.slots import RUN_AHEAD_BYTES

from .bounded import (LIVE_WORKERS, NFDS, assert_no_worker_left, assert_quiet, joined, report,
                      run_bounded)


_HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
needs_a_hard_limit_of = lambda n: pytest.mark.skipif(  # noqa: E731
    _HARD != resource.RLIM_INFINITY and _HARD < n,
    reason=f"the hard RLIMIT_NOFILE ({_HARD}) is below {n}")


# -- about 14 descriptors per worker; EMFILE half-way through start-up, leaking


# The case as first met: 128 workers under the common soft limit of 1024 (about
# 20 s here: 128 interpreters start on two cores).
@pytest.mark.slow
@needs_a_hard_limit_of(1024)
def test_128_workers_fit_a_soft_limit_of_1024_descriptors_and_give_them_all_back(script):
    s = script(joined("""
        import gc, json, os, resource
        from mploader import MPLoader
    """, NFDS, LIVE_WORKERS, """
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        before = nfds()
        got = {}
        try:
            loader = MPLoader(lambda i: i, range(256), num_workers=128)
            report_pids(loader)
            got["workers"] = len(loader.worker_pids())
            got["passes"] = [list(loader) == list(range(256)) for _ in range(2)]
            loader.close()
            del loader
            got["outcome"] = "ok"
        except Exception as e:
            got["outcome"] = f"{type(e).__name__}: {e}"[:300]
        gc.collect()
        got.update(before=before, after=nfds(), left=live_workers())
        print(json.dumps(got))
    """))
    result = run_bounded(s, within=150)
    got = report(result)
    assert got["outcome"] == "ok", got
    assert got["workers"] == 128 and got["passes"] == [True, True], got
    assert got["after"] == got["before"], f"descriptors leaked: {got}"
    assert got["left"] == [], got
    assert_quiet(result)
    assert_no_worker_left(s.wait_for_pids())


@needs_a_hard_limit_of(64)
def test_too_many_workers_for_the_descriptor_limit_fail_at_once_with_a_clear_error(script):
    s = script(joined("""
        import gc, json, os, resource, time
        from mploader import MPLoader
    """, NFDS, LIVE_WORKERS, """
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        before = nfds()
        start = time.monotonic()
        try:
            MPLoader(lambda i: i, range(10), num_workers=40)
            got = {"outcome": "constructed"}
        except ValueError as e:
            got = {"outcome": "ValueError", "message": str(e)}
        except Exception as e:
            got = {"outcome": f"{type(e).__name__}: {e}"[:300]}
        got["took"] = time.monotonic() - start
        gc.collect()
        got.update(before=before, after=nfds(), left=live_workers())
        print(json.dumps(got))
    """))
    result = run_bounded(s, within=60)
    got = report(result)
    assert got["outcome"] == "ValueError", got
    message = got["message"]
    assert "RLIMIT_NOFILE" in message, message
    assert re.search(r"\b\d+ workers?\b[^.]*\bfit|\bfit\b[^.]*\b\d+ workers?\b", message), (
        f"the message does not say how many workers fit: {message}")
    assert got["after"] == got["before"], f"descriptors leaked by the failure: {got}"
    assert got["left"] == [], f"workers left after the failure: {got}"
    assert_quiet(result)


@needs_a_hard_limit_of(64)
def test_default_num_workers_under_a_soft_limit_of_64_descriptors_constructs_and_runs(script):
    # On a machine with few CPUs every worker fits anyway; with many, the
    # default must be capped to what the limit allows rather than fail.
    s = script("""
        import json, os, resource
        from mploader import MPLoader
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        try:
            with MPLoader(lambda i: i * 2, range(50)) as loader:
                report_pids(loader)
                got = {"outcome": "ok", "workers": len(loader.worker_pids()),
                       "equal": list(loader) == [i * 2 for i in range(50)]}
        except Exception as e:
            got = {"outcome": f"{type(e).__name__}: {e}"[:300]}
        got["cpus"] = len(os.sched_getaffinity(0))
        print(json.dumps(got))
    """)
    result = run_bounded(s, within=60)
    got = report(result)
    assert got["outcome"] == "ok", got
    assert 1 <= got["workers"] <= got["cpus"] and got["equal"], got
    assert_quiet(result)
    assert_no_worker_left(s.wait_for_pids())


# -- slots grown for a burst of large results stayed reserved for good


MiB = 1 << 20


@pytest.mark.slow  # version-independent, over 2 s: the main Python only
def test_shared_memory_shrinks_back_after_a_burst_of_32MiB_results(script):
    s = script("""
        import gc, json, time
        import numpy as np
        from mploader import MPLoader

        def fn(i):
            if i == 0:
                time.sleep(2)            # holds up the order: the other worker runs ahead
            return np.full(8 << 20, i, np.float32)   # 32 MiB

        with MPLoader(fn, range(24), num_workers=2, prefetch=2, ordered=True) as loader:
            report_pids(loader)
            right = []
            for i, x in enumerate(loader):
                right.append(x.shape == (8 << 20,) and x.dtype == np.float32
                             and float(x[0]) == i and float(x[-1]) == i
                             and bool((x[:: 4097] == i).all()))
                del x                    # nothing is held
            gc.collect()
            stats = loader.stats()
        print(json.dumps({"right": right, "shared_memory_bytes": stats["shared_memory_bytes"]}))
    """)
    result = run_bounded(s, within=90)
    got = report(result)
    assert got["right"] == [True] * 24, got
    assert got["shared_memory_bytes"] <= 6 * 36 * MiB, (
        f"{got['shared_memory_bytes'] / MiB:.0f} MiB of shared memory still reserved "
        f"after the pass, with nothing held (at most {6 * 36} MiB expected)")
    assert_quiet(result)
    assert_no_worker_left(s.wait_for_pids())


def test_spare_slots_give_their_memory_back_after_2_s_idle_during_a_steady_stream(script):
    """One slow item lets the other worker run ahead into spare slots; the
    steady stream that follows needs fewer.  The spares' pages go back within
    a few seconds of it, not only at the pass's end."""
    s = script("""
        import json, time
        import numpy as np
        from mploader import MPLoader

        def fn(i):
            time.sleep(3 if i == 0 else 0.1)
            return np.full(1 << 19, i, np.float32)   # 2 MiB: small enough to run ahead

        with MPLoader(fn, 200, num_workers=2, prefetch=4) as loader:
            report_pids(loader)
            it = iter(loader)
            next(it)
            burst = loader.stats()["shared_memory_bytes"]
            start, reserved = time.monotonic(), []
            while time.monotonic() - start < 6:
                next(it)
                reserved.append(loader.stats()["shared_memory_bytes"])
        print(json.dumps({"burst": burst, "peak": max(reserved), "late": reserved[-1]}))
    """)
    result = run_bounded(s, within=60)
    got = report(result)
    assert got["late"] <= got["peak"] - 4 * 2 * MiB, {k: v // MiB for k, v in got.items()}
    assert_quiet(result)
    assert_no_worker_left(s.wait_for_pids())


def test_after_a_pass_its_slots_stay_for_the_next_one_then_go_back_unasked_after_2_s(script):
    """A pass's slots are what the next pass, often right after it, needs:
    giving them back at its end made every pass fault its workers' slots in
    afresh at its start.  So they go back only once idle 2 s, with no call
    of the user's (a timer: nothing else runs between passes), and closing
    the loader stops the timer."""
    s = script("""
        import gc, json, threading, time
        import numpy as np
        from mploader import MPLoader

        def fn(i):
            time.sleep(0.01)
            return np.full(2 << 20, i, np.float32)   # 8 MiB

        def reserved():
            return loader.stats()["shared_memory_bytes"]

        with MPLoader(fn, range(40), num_workers=2, prefetch=2) as loader:
            report_pids(loader)
            right = all(float(x[0]) == i for i, x in enumerate(loader))
            gc.collect()
            ended = time.monotonic()
            at_end = reserved()
            time.sleep(1.0)
            after_1_s = reserved()                   # the timer cannot have run yet
            while reserved() >= at_end and time.monotonic() - ended < 10:
                time.sleep(0.1)
            gone_after = time.monotonic() - ended
            later = reserved()
            again = all(float(x[0]) == i for i, x in enumerate(loader))
        for thread in threading.enumerate():
            if thread.name == "mploader-idle-slots":
                thread.join(2)
        timers = [t.name for t in threading.enumerate() if t.name == "mploader-idle-slots"]
        print(json.dumps({"right": right and again, "at_end": at_end, "after_1_s": after_1_s,
                          "later": later, "gone_after": gone_after, "timers": timers}))
    """)
    result = run_bounded(s, within=60)
    got = report(result)
    assert got["right"], got
    kept = 2 * 2 * 9 * MiB  # prefetch slots per worker, each 8 MiB (and an eighth more at most)
    assert got["at_end"] > kept and got["after_1_s"] == got["at_end"], got
    assert got["later"] <= kept and 1.0 <= got["gone_after"] <= 8, got
    assert got["timers"] == [], got
    assert_quiet(result)
    assert_no_worker_left(s.wait_for_pids())


def test_large_results_and_a_slow_consumer_hold_prefetch_plus_one_per_worker(script):
    """16 MiB results, the first slow, then read by a consumer slower than the
    workers: a worker's finished results wait (for the first item, then for
    the consumer), and it runs no further ahead than how-it-works.md says:
    per worker ``max(prefetch x S, RUN_AHEAD_BYTES) + S`` for results of S
    bytes, beside what the consumer holds (the element it holds and the one
    ``next()`` hands it, which may both be one worker's).  (It once held
    ``prefetch`` + 2 results per worker here only because no task went out
    while the consumer took results already in the parent, which left
    64 sleep-bound workers idle.)"""
    s = script("""
        import json, time
        import numpy as np
        from mploader import MPLoader

        def fn(i):
            time.sleep(1.0 if i == 0 else 0)         # the others finish meanwhile
            return np.full(4 << 20, i, np.float32)   # 16 MiB

        with MPLoader(fn, 40, num_workers=2, prefetch=2) as loader:
            report_pids(loader)
            held, values = [], []
            for x in loader:
                time.sleep(0.05)                      # a training step
                values.append(float(x[0]))
                held.append(loader.stats()["shared_memory_bytes"])
        print(json.dumps({"peak": max(held), "values": values}))
    """)
    got = report(run_bounded(s, within=90))
    assert got["values"] == list(range(40))
    slot = 16 * MiB   # a 16 MiB result's slot: no headroom for results of one size
    bound = 2 * (max(2 * slot, RUN_AHEAD_BYTES) + slot) + 2 * slot
    assert got["peak"] <= bound, f"{got['peak'] / MiB} MiB"
    assert_no_worker_left(s.wait_for_pids())


# -- a reference cycle between a loader and its pass kept the workers alive
# -- until the garbage collector ran (never, with gc disabled)


@pytest.mark.parametrize("passes", ["full", "full_then_partial"])
def test_del_loader_with_gc_disabled_stops_its_workers(script, passes):
    s = script(f"""
        import gc, json, os, time
        gc.disable()
        from mploader import MPLoader

        def alive(pid):
            try:
                with open(f"/proc/{{pid}}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                with open(f"/proc/{{pid}}/cmdline", "rb") as f:
                    return state != "Z" and b"mploader.worker" in f.read()
            except OSError:
                return False

        loader = MPLoader(lambda i: i, range(10), num_workers=2)
        report_pids(loader)
        pids = loader.worker_pids()
        assert list(loader) == list(range(10))
        if {passes!r} == "full_then_partial":
            it = iter(loader)
            assert next(it) == 0
            del it
        del loader
        start = time.monotonic()
        while any(alive(p) for p in pids) and time.monotonic() - start < 5:
            time.sleep(0.02)
        gone_s = None if any(alive(p) for p in pids) else time.monotonic() - start
        print(json.dumps({{"gone_s": gone_s, "pids": pids}}))
    """)
    result = run_bounded(s, within=40)
    got = report(result)
    assert got["gone_s"] is not None, "the workers were still alive 5 s after `del loader`"
    assert got["gone_s"] < 2.0, got
    assert_quiet(result)
    assert_no_worker_left(got["pids"])


# -- a loader that only its loop refers to: the loop runs to its end (the
# -- iterator holds the loader), and the workers stop when the loop is done


def test_a_loop_over_a_loader_nothing_else_holds_runs_to_its_end(script):
    s = script("""
        import gc, json, os, time
        from mploader import MPLoader

        def alive(pid):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    return f.read().rsplit(")", 1)[1].split()[0] != "Z"
            except OSError:
                return False

        got, pids = [], []
        for x in MPLoader(lambda i: i * 2, range(300), num_workers=2, prefetch=1):
            if not pids:   # the workers: children of any of this process's threads
                pids = [int(pid) for task in os.listdir("/proc/self/task")
                        for pid in open(f"/proc/self/task/{task}/children").read().split()]
            gc.collect()   # the loader, held by nothing but the loop, must survive this
            got.append(x)
        gc.collect()
        start = time.monotonic()
        while any(alive(p) for p in pids) and time.monotonic() - start < 5:
            time.sleep(0.02)
        print(json.dumps({"got": got, "pids": pids, "left": [p for p in pids if alive(p)]}))
    """)
    result = run_bounded(s, within=60)
    got = report(result)
    assert got["got"] == [2 * i for i in range(300)]
    assert len(got["pids"]) >= 2 and got["left"] == [], got["left"]
    assert_quiet(result)


# -- a forked child drove the parent's workers


FORK_CHILD = """
def in_forked_child(action):
    '''Run action() in a forked child (bounded); its outcome as a dict.'''
    path = os.environ["PID_FILE"] + f".child{os.getpid()}"
    pid = os.fork()
    if pid == 0:
        try:
            got = {"outcome": "iterated", "result": action()}
        except RuntimeError as e:
            got = {"outcome": "RuntimeError", "message": str(e)}
        except BaseException as e:
            got = {"outcome": f"{type(e).__name__}: {e}"[:300]}
        with open(path, "w") as f:
            json.dump(got, f)
        os._exit(0)
    deadline = time.monotonic() + 10
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"outcome": "the child hung for 10 s"}
        time.sleep(0.02)
    try:
        with open(path) as f:
            return json.load(f)
    except OSError:
        return {"outcome": "the child died without a word"}
"""


def test_forked_child_iterating_the_parents_loader_gets_runtime_error(script):
    s = script(joined("""
        import json, os, signal, time
        from mploader import MPLoader
    """, FORK_CHILD, """
        loader = MPLoader(lambda i: i * 10, range(6), num_workers=2)
        report_pids(loader)
        first = list(loader)
        child = in_forked_child(lambda: list(loader))
        again = list(loader)
        loader.close()
        print(json.dumps({"first": first, "child": child, "again": again}))
    """))
    result = run_bounded(s, within=40)
    got = report(result)
    expected = [i * 10 for i in range(6)]
    assert got["first"] == expected
    child = got["child"]
    assert child["outcome"] == "RuntimeError", f"in the forked child: {child}"
    assert re.search(r"fork|process", child["message"], re.I), child
    assert got["again"] == expected, got
    assert_quiet(result)
    assert_no_worker_left(s.wait_for_pids())


def test_forked_child_cannot_disturb_the_parents_pass_in_progress(script):
    s = script(joined("""
        import json, os, signal, threading, time
        from mploader import MPLoader
    """, FORK_CHILD, """
        def fn(i):
            time.sleep(0.05)
            return i

        loader = MPLoader(fn, range(40), num_workers=2)
        report_pids(loader)
        it = iter(loader)
        first = next(it)
        child = in_forked_child(lambda: list(loader))   # e.g. a helper that "reads a few items"
        rest = []
        t = threading.Thread(target=lambda: rest.extend(it), daemon=True)
        t.start()
        t.join(10)
        blocked = t.is_alive()
        print(json.dumps({"first": first, "child": child, "rest": rest, "blocked": blocked}))
        if blocked:
            os._exit(1)
        loader.close()
    """))
    result = run_bounded(s, within=40)
    got = report(result)
    assert got["child"]["outcome"] == "RuntimeError", f"in the forked child: {got['child']}"
    assert not got["blocked"], f"the parent's pass was still blocked 10 s after the fork: {got}"
    assert [got["first"]] + got["rest"] == list(range(40)), got
    assert_quiet(result)
    assert_no_worker_left(s.wait_for_pids())


@pytest.mark.slow  # version-independent, over 2 s: the main Python only
def test_loaders_closed_in_the_middle_of_a_pass_give_every_descriptor_back(script):
    s = script(joined("""
        import gc, json, os
        from mploader import MPLoader
    """, NFDS, """
        before = nfds()
        kept = []
        for _ in range(20):
            loader = MPLoader(lambda i: i, range(1000), num_workers=1)
            report_pids(loader)
            for x in loader:
                if x == 3:
                    break
            loader.close()
            kept.append(loader)          # still referenced: close() alone must free it
        print(json.dumps({"before": before, "after": nfds()}))
    """))
    got = report(run_bounded(s, within=90))
    assert got["after"] == got["before"], got


def test_a_slot_reserves_what_results_of_one_size_need_and_no_more():
    """A volume of fixed shape costs its bytes per slot: the eighth of
    headroom that lets varying results fit without regrowing is reserved
    only once a slot had to grow again (it was always reserved: 18 MiB per
    16 MiB volume)."""
    import numpy as np

    from mploader import MPLoader

    def volume(i):
        return np.full(4 << 20 if i < 6 else 5 << 20, i, np.float32)  # 16, then 20 MiB

    held, values = [], []
    with MPLoader(volume, range(10), num_workers=1, prefetch=1) as loader:
        for x in loader:
            values.append(float(x[0]))
            if len(values) <= 6:
                held.append(loader.stats()["shared_memory_bytes"])
            del x
    assert values == list(range(10))
    assert all(h > 0 and h % (16 * MiB) == 0 for h in held), [h / MiB for h in held]


def test_a_worker_runs_ahead_only_while_one_more_result_stays_within_64_MiB():
    """Volumes of 31 MiB: a worker ahead of a slow item holds ``prefetch`` of
    them (62 MiB), not a third because 62 MiB is under 64 (the rule counted
    what its results held, not what the next would add: 93 MiB)."""
    import time

    import numpy as np

    from mploader import MPLoader

    def volume(i):
        time.sleep(1.5 if i == 0 else 0)                 # worker 0 holds item 0
        return np.full((31 << 20) // 4, i, np.float32)   # 31 MiB

    with MPLoader(volume, range(12), num_workers=2, prefetch=2) as loader:
        it = iter(loader)
        first = next(it)
        held = loader.stats()["shared_memory_bytes"]
        assert float(first[0]) == 0
        del first
        assert [float(x[0]) for x in it] == list(range(1, 12))
    # worker 1: 2 results waiting, and item 0's slot (the old rule: 124 MiB)
    assert held <= 3 * 31 * MiB, f"{held / MiB} MiB"
