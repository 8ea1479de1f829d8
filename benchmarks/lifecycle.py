"""Lifecycle figures for the README's "Guarantees": how long each way of ending takes.

Each scenario runs ``--reps`` times (median and max reported), with real
worker processes; scenarios that end the owner run it as a child script.
Run by run.py, or alone: ``python benchmarks/lifecycle.py --reps 5``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mploader import MPLoader, PassAbandoned, WorkerDied  # noqa: E402
from tests.procs import wait_gone  # noqa: E402

_CHILD = """
import json, os, sys, time
from mploader import MPLoader
def work(i):
    if sys.argv[1] == "c":
        time.sleep(600)
    while True:
        pass
loader = MPLoader(work, range(10), num_workers=2)
print(json.dumps(loader.worker_pids()), flush=True)
list(loader)
"""


def _busy_child(kind: str) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_CHILD), kind],
                            stdout=subprocess.PIPE, text=True)
    pids = json.loads(proc.stdout.readline())
    time.sleep(0.5)  # the workers are inside work()
    return proc, pids


def parent_killed(signum: int) -> float:
    """Seconds from the signal to the owner until its last worker is gone."""
    proc, pids = _busy_child("c")
    start = time.perf_counter()
    os.kill(proc.pid, signum)
    proc.wait()
    assert not wait_gone(pids, 10)
    return time.perf_counter() - start


def close_time(busy: str | None) -> float:
    """close() with idle workers, or with every worker stuck in C or in Python."""
    def stuck_in_c(i):
        time.sleep(600)

    def stuck_in_python(i):
        while True:
            pass
    fn = {None: abs, "c": stuck_in_c, "python": stuck_in_python}[busy]
    loader = MPLoader(fn, range(10), num_workers=2)
    if busy is None:
        list(loader)
    else:
        def consume(it=iter(loader)):
            try:
                next(it)
            except PassAbandoned:  # what a consumer sees when close() ends its pass
                pass
        threading.Thread(target=consume, daemon=True).start()
        time.sleep(0.5)
    start = time.perf_counter()
    loader.close()
    return time.perf_counter() - start


def worker_death_detected() -> float:
    """Seconds from a worker's SIGKILL to WorkerDied in the consumer."""
    loader = MPLoader(time.sleep, [30] * 4, num_workers=2)
    killed = []

    def kill_soon():
        time.sleep(0.5)
        killed.append(time.perf_counter())
        os.kill(loader.worker_pids()[0], signal.SIGKILL)
    threading.Thread(target=kill_soon).start()
    try:
        list(loader)
    except WorkerDied:
        return time.perf_counter() - killed[0]
    finally:
        loader.close()
    raise AssertionError("no WorkerDied")


def ctrl_c() -> float:
    """Seconds from SIGINT to KeyboardInterrupt in a consumer waiting for busy workers."""
    code = textwrap.dedent("""
        import signal, time
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from mploader import MPLoader
        loader = MPLoader(time.sleep, [60] * 4, num_workers=2)
        print("ready", flush=True)
        try:
            list(loader)
        except KeyboardInterrupt:
            print(time.time(), flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    time.sleep(0.5)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(30)
    return float(out.split()[-1]) - sent


def normal_exit() -> float:
    """Seconds from a script's last line to its exit, loader never closed."""
    code = textwrap.dedent("""
        import time
        from mploader import MPLoader
        loader = MPLoader(abs, range(100), num_workers=2)
        it = iter(loader); next(it)
        print(time.time(), flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(30)
    return time.time() - float(out.split()[-1])


SCENARIOS = {
    "close(), idle workers": lambda: close_time(None),
    "close(), workers stuck in C (sleep)": lambda: close_time("c"),
    "close(), workers stuck in a Python loop": lambda: close_time("python"),
    "workers gone after SIGKILL of the owner": lambda: parent_killed(signal.SIGKILL),
    "workers gone after SIGTERM of the owner": lambda: parent_killed(signal.SIGTERM),
    "WorkerDied after a worker's SIGKILL": worker_death_detected,
    "KeyboardInterrupt after Ctrl-C": ctrl_c,
    "script exit without close()": normal_exit,
}


def measure(reps: int) -> dict[str, dict[str, float]]:
    results = {}
    for name, scenario in SCENARIOS.items():
        times = [scenario() for _ in range(reps)]
        results[name] = {"median_s": statistics.median(times), "max_s": max(times)}
        print(f"  {name:<45} median {results[name]['median_s']:.3f} s   "
              f"max {results[name]['max_s']:.3f} s", flush=True)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    figures = measure(args.reps)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
