"""`make bench`: mploader against tf.data and the loaders people would pick instead.

Every measurement runs in a fresh interpreter (measure.py), one workload
through one peer, repeated; the figures are medians.  Sections (a)-(d) are
workloads through peers (SECTIONS); the others are scripts of their own:
(e) start-up, (f) lifecycle.py, (g) cache_bench.py, (h) consumer_bench.py,
(i) many_bench.py, (j) volume_bench.py, (k) ray_bench.py (in a network
namespace with loopback alone; skipped without Ray).  A script's failure is
an error in its section, with its exception, signal or timeout.

Prints a table per section, writes results.json, results.md and results.png to
benchmarks/results/ (or --out; ``--tiny`` to a temporary folder), and records
the machine and the seconds each section took. ``--tiny`` runs every section
on a few items once, so a test can keep this script working.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "examples" / "medical_3d"))

ONE_MIB = 1 << 20

# (h) and (i) run their dataset().batch(32) rows again with TensorFlow's BFC
# CPU allocator: its default allocator gives each batch fresh pages (TensorFlow
# sets malloc's trim threshold when it makes a generator dataset, so large
# buffers are mapped and unmapped each time), and where fresh memory is slow
# to fault in, TensorFlow's own .batch() is then what limits the consumer.
BFC_ENV = {"TF_CPU_ALLOCATOR_USE_BFC": "true"}

# section -> (workload, items, items in --tiny, peers, what it shows)
SECTIONS = {
    "a": ("gil_bound", 160, 6, ["serial", "ceiling", "tf_map", "keras_pydataset",
                                "torch_spawn", "torch_fork", "grain", "mploader",
                                "mploader_unordered", "mploader_tf"],
          "GIL-bound Python (pure-Python loop + 1 MiB array per item)"),
    "b": ("medical", 48, 3, ["serial", "tf_map", "torch_fork", "grain", "mploader",
                             "mploader_tf"],
          "medical-volume pipeline (NIfTI load, resample, crop, affine + elastic)"),
    "c": ("tiny", 6400, 128, ["serial", "bare_from_generator", "mploader", "mploader_tf",
                              "mploader_tf_batch64"],
          "tiny items: the cost per item"),
    "d": ("big", 200, 3, ["memcpy", "bare_from_generator", "mploader", "mploader_tf"],
          "32 MiB items: bandwidth"),
}
MPLOADER_PEERS = ("mploader",)
# The peer each section's ratios are taken against (else its first peer):
# tiny items are judged against from_generator, the consumer-side ceiling.
BASELINE = {"c": "bare_from_generator"}
REFERENCES = ("serial", "ceiling", "memcpy", "bare_from_generator")  # ceilings, floors
OPTIONAL = {"torch": "torch", "grain": "grain", "keras": "keras"}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    versions = {}
    for module in ("numpy", "tensorflow", "keras", "torch", "grain", "scipy", "cloudpickle",
                   "ray"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - a peer that is not installed
            versions[module] = None
    return {"cpu": cpu, "cores_usable": len(os.sched_getaffinity(0)),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "versions": versions, **speed()}


def speed() -> dict:
    """What tells two hosts of the same CPU name apart: hosts named alike
    have differed here by several times in how fast Python runs and in how
    fast fresh memory faults in, and the hand-off's ratios to bare follow
    the second.  Best of 3: seconds for 3 million rounds of a Python loop;
    GB/s filling 256 MiB of fresh memory as numpy gets it (in huge pages,
    where the kernel gives them), filling it again, and filling 256 MiB
    of fresh memory in 4 KiB pages (an anonymous mapping with no advice:
    what TensorFlow's allocations above malloc's mapping threshold, its
    batches of large elements, get): on a host where bare (h) and (j)
    ran 11-17 times slower than in the committed run, numpy's fresh memory
    filled at 5.0-5.9 GB/s and 4 KiB pages at 0.68-0.82 GB/s."""
    import mmap

    import numpy as np
    loop, fresh, again, small_pages = [], [], [], []
    for _ in range(3):
        start = time.perf_counter()
        total = 0
        for k in range(3_000_000):
            total += k
        loop.append(time.perf_counter() - start)
        start = time.perf_counter()
        volume = np.ones(64 << 20, np.float32)
        filled = time.perf_counter()
        volume[:] = 2
        fresh.append(filled - start)
        again.append(time.perf_counter() - filled)
        del volume
        with mmap.mmap(-1, 256 << 20) as mapping:
            start = time.perf_counter()
            np.frombuffer(mapping, np.uint8).fill(2)
            small_pages.append(time.perf_counter() - start)
    return {"python_loop_3m_s": round(min(loop), 3),
            "fresh_memory_gb_s": round((256 << 20) / min(fresh) / 1e9, 2),
            "touched_memory_gb_s": round((256 << 20) / min(again) / 1e9, 2),
            "fresh_4k_pages_gb_s": round((256 << 20) / min(small_pages) / 1e9, 2)}


def skip_reason(peer: str) -> str | None:
    for prefix, module in OPTIONAL.items():
        if peer.startswith(prefix) and importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[bench]')"
    return None


def run_measure(workload: str, peer: str, n: int, reps: int, workers: int, env: dict) -> dict:
    return run_script("measure.py", env, workload, peer, "--n", str(n), "--reps", str(reps),
                      "--workers", str(workers))


def medical_cases(tiny: bool) -> Path:
    import synth
    shape = (48, 48, 12) if tiny else (192, 192, 64)
    cases = synth.make_dataset(ROOT / "examples" / "medical_3d" / ".cache", 3 if tiny else 16,
                               shape=shape, corrupt=False)
    path = HERE / "results" / ".cases.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(cases))
    return path


def startup(reps: int, workers: int) -> dict:
    """(e) time to first element and worker RSS, in a script that imports TF at top level."""
    code = textwrap.dedent(f"""
        import tensorflow as tf
        import json, time
        import numpy as np
        from mploader import MPLoader
        start = time.perf_counter()
        loader = MPLoader(lambda i: np.zeros(16), range(100), num_workers={workers})
        next(iter(loader))
        first = time.perf_counter() - start
        rss = []
        for pid in loader.worker_pids():
            with open(f"/proc/{{pid}}/status") as f:
                rss.append(int(next(l for l in f if l.startswith("VmRSS")).split()[1]) / 1024)
        print(json.dumps({{"first_element_s": first, "worker_rss_mib": max(rss)}}))
    """)
    runs = []
    for _ in range(reps):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=300).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def run_script(script: str, env: dict, *args: str, timeout: int = 900,
               wrap: tuple[str, ...] = ()) -> dict:
    """The JSON line a section's own script (in a fresh interpreter) prints,
    or {"error": why}: its exception, the signal that killed it, or its
    timeout, never a warning that came after.  ``wrap``: a command that runs
    the script (a network namespace)."""
    process = subprocess.Popen([*wrap, sys.executable, str(HERE / script), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # one section's failure, not the run's
        os.killpg(process.pid, signal.SIGKILL)  # its workers too: they hold the pipes
        stdout, stderr = process.communicate()
        last = meaningful(stderr)
        return {"error": f"{script} timed out after {timeout} s"
                         + (f" (last: {last[-1]})" if last else ""),
                "stderr_tail": last[-20:]}
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        print(f"  {script} failed (exit status {process.returncode}); its stderr, "
              "warnings left out:\n    " + "\n    ".join(meaningful(stderr)[-20:]), flush=True)
        return {"error": failure(process.returncode, stderr),
                "stderr_tail": meaningful(stderr)[-20:]}
    return json.loads(lines[-1])


# Lines of a script's stderr that say nothing of why it failed: warnings (and the
# source line the warnings module prints under one), TensorFlow's and absl's
# logging, Ray's log lines.  A leaked-resources warning from multiprocessing's
# resource tracker, printed after a crash, once stood in for the crash itself.
NOISE = re.compile(r"\s|\S+:\d+: \w*Warning: |WARNING: All log messages|[IWE]\d{4} |"
                   r"WARNING:absl:|\[?\d{4}-\d\d-\d\d[ T]\d\d:\d\d|To enable the following")


def meaningful(stderr: str) -> list[str]:
    """stderr's lines but NOISE."""
    return [line for line in stderr.splitlines() if line.strip() and not NOISE.match(line)]


def failure(returncode: int, stderr: str) -> str:
    """Why a script failed, in a line: how it ended, and the exception of its
    last traceback (else its last line that is no warning or log)."""
    lines = stderr.splitlines()
    tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
    cause = None
    if tracebacks:  # the exception: the first unindented line after the last header
        cause = next((line for line in lines[tracebacks[-1] + 1:]
                      if line.strip() and not line[0].isspace()), None)
    if cause is None:
        rest = meaningful(stderr)
        cause = rest[-1] if rest else None
    if returncode < 0:
        how = f"killed by {signal.Signals(-returncode).name}"
        if returncode == -signal.SIGKILL:
            how += " (the kernel's out-of-memory killer? see dmesg)"
    elif returncode != 0:
        how = f"exit status {returncode}"
    else:  # it ended well, without its JSON line
        how = "no JSON line on stdout"
    return f"{how}: {cause[:400]}" if cause else how


def spread(row: dict, key: str, unit: str = "") -> str:
    """A ratio as the tables print it: median (min-max), run by run."""
    return f"{row[key]:.2f}{unit} ({row[key + '_min']:.2f}-{row[key + '_max']:.2f})"


def many_text(i: dict) -> str:
    if "error" in i:
        return f"(i) many workers for a fn that waits: failed: {i['error']}"
    width = max([58, *(len(row["how"]) + 2 for row in i["rows"])])
    lines = [f"(i) many workers for a fn that waits ({i['sleep_s'] * 1000:.0f} ms, "
             f"{i['result_bytes'] >> 10} KiB out){_allocator_note(i)}: steady rate / ideal (in flight / "
             f"{i['sleep_s']} s), medians of {i['reps']} interleaved runs (min-max)",
             f"  {'in flight':>9}  {'how (processes x threads, consumed as)':<{width}}"
             f"{'efficiency':>22}"]
    for row in i["rows"]:
        lines.append(f"  {row['in_flight']:>9}  {row['how']:<{width}}"
                     f"{row['efficiency']:>10.2f} ({row['min']:.2f}-{row['max']:.2f})")
    return "\n".join(lines)


VOLUME_NAMES = {"bare": "bare from_generator(...).batch(2)",
                "dataset_batch2": "loader.dataset().batch(2)",
                "batch_size2": "MPLoader(..., batch_size=2).dataset()"}


def volume_text(j: dict) -> str:
    if "error" in j:
        return f"(j) large volumes: failed: {j['error']}"
    lines = [f"(j) large volumes: elements/s, x bare serial from_generator (min-max), and peak "
             f"memory (anonymous + shared, parent and workers, above the parent's at the start) "
             f"in elements, median (max); over bare: the peak minus bare's, run by run, against "
             f"the loader's bound (per worker, max(prefetch x S, 64 MiB) + S for results of S "
             f"bytes); {j['workers']} "
             f"workers, medians of {j['reps']} interleaved runs",
             f"  {'element':<9}{'consumed as':<42}{'elements/s':>11}{'x bare':>20}"
             f"{'peak elements':>20}{'over bare':>18}{'bound':>7}"]
    for size, row in j["sizes"].items():
        for i, (peer, r) in enumerate(row["peers"].items()):
            name = VOLUME_NAMES.get(peer, peer)
            if peer == "slow_consumer":  # memory, not rate: it sleeps on purpose
                name = f"dataset().batch(2), consumer {row['slow_step_s']:.2f} s/batch"
                ratio = "-"
            else:
                ratio = spread(r, "x_bare")
            over = ("-" if peer == "bare" or "over_bare" not in r
                    else f"{r['over_bare']:.1f} ({r['over_bare_max']:.1f})")
            bound = "-" if peer == "bare" or "bound" not in r else f"{r['bound']:.1f}"
            lines.append(f"  {(size + ' MiB') if i == 0 else '':<9}{name:<42}"
                         f"{r['per_s']:>11.2f}{ratio:>20}"
                         f"{r['peak_elements']:>12.1f} ({r['peak_max']:.1f})"
                         f"{over:>18}{bound:>7}")
    return "\n".join(lines)


RAY_NAMES = {"bare": "bare Ray actors, 2 calls in flight each",
             "ray": "mploader on Ray, for x in loader",
             "ray_dataset_batch32": "mploader on Ray, dataset().batch(32)",
             "local": "mploader local backend, for x in loader"}


def ray_text(k: dict) -> str:
    title = "(k) the Ray backend"
    if "skipped" in k:
        return f"{title}: skipped: {k['skipped']}"
    if "error" in k:
        return f"{title}: failed: {k['error']}"
    lines = [f"{title} (fn sleeps {k['sleep_s'] * 1000:.0f} ms, {k['result_bytes'] >> 10} KiB "
             f"out; {k['items']} items a pass): items/s, x bare Ray actors and x the local "
             f"backend's for-loop (min-max); Ray {k['ray']}, medians of {k['reps']} "
             f"interleaved runs",
             f"  {'workers':>7}  {'peer':<42}{'items/s':>9}{'x bare':>20}{'x local':>20}"]
    for workers, rows in k["workers"].items():
        for i, (peer, r) in enumerate(rows.items()):
            bare = spread(r, "x_bare")
            local = spread(r, "x_local") if "x_local" in r else ""
            lines.append(f"  {workers if i == 0 else '':>7}  {RAY_NAMES.get(peer, peer):<42}"
                         f"{r['per_s']:>9.1f}{bare:>20}{local:>20}".rstrip())
    return "\n".join(lines)


RAY_MISSING = "ray is not installed here (pip install -e '.[ray]'; make bench installs it)"


def ray_section(env: dict, tiny: bool) -> dict:
    """(k) ray_bench.py in a network namespace of its own with only loopback up,
    as `make test-ray` runs the Ray tests: a local Ray instance binds the
    machine's address otherwise.  Skipped, saying why, without Ray or where no
    such namespace can be made (it needs root)."""
    if importlib.util.find_spec("ray") is None:
        return {"skipped": RAY_MISSING}
    wrap = ("unshare", "-n", "bash", "-c", 'ip link set lo up && exec "$0" "$@"')
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return {"skipped": "needs unshare and ip, for a network namespace with loopback alone"}
    probe = subprocess.run([*wrap, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return {"skipped": "cannot make a network namespace with loopback alone (unshare -n "
                           f"needs root): {(probe.stderr.strip().splitlines() or ['?'])[-1]}"}
    with tempfile.TemporaryDirectory(prefix="mploader-ray-") as tmp:
        # its own Ray instance: no cluster of this machine's joined
        ray_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
        ray_env["RAY_TMPDIR"] = tmp
        args = ["--workers", "2", "--items", "40", "--repeats", "1"] if tiny else \
            ["--repeats", "3"]
        return run_script("ray_bench.py", ray_env, *args, timeout=600, wrap=wrap)


def _allocator_note(section: dict) -> str:
    """How a section's TensorFlow allocated: its default, or BFC (see BFC_ENV)."""
    return (" (again, TensorFlow's CPU allocator BFC: TF_CPU_ALLOCATOR_USE_BFC=true)"
            if section.get("tf_cpu_allocator_use_bfc") else "")


def consumer_text(h: dict) -> str:
    if "error" in h:
        return f"(h) the consumer side: failed: {h['error']}"
    names = {"bare": "bare from_generator(...).batch(32)",
             "dataset_batch32": "loader.dataset().batch(32)",
             "batch_size32": "MPLoader(..., batch_size=32).dataset()",
             "loader": "for x in loader (no TensorFlow)"}
    elements = list(h["elements"])
    lines = [f"(h) the consumer side{_allocator_note(h)}: elements/s (parent CPU ms per "
             f"element), x bare (min-max); "
             f"{h['workers']} workers, medians of {h['reps']} interleaved runs",
             f"  {'consumed as':<40}" + "".join(f"{e:>40}" for e in elements)]
    for peer, name in names.items():
        if peer not in h["elements"][elements[0]]:
            continue
        cells = []
        for element in elements:
            r = h["elements"][element][peer]
            cells.append(f"{r['per_s']:.0f} ({r['cpu_ms']:.3f} ms) {spread(r, 'x_bare', 'x')}")
        lines.append(f"  {name:<40}" + "".join(f"{c:>40}" for c in cells))
    per_call = [h["elements"][e].get("dataset_batch32", {}).get("per_call") for e in elements]
    if None not in per_call:
        lines.append(f"  {'dataset(): elements per generator call':<40}" +
                     "".join(f"{p:>40.1f}" for p in per_call))
    return "\n".join(lines)


def cache_text(g: dict) -> str:
    if "error" in g:
        return f"(g) cache of the deterministic stage: failed: {g['error']}"

    def s(v: dict, unit: str = "") -> str:
        return f"{v['median']:.1f}{unit} ({v['min']:.1f}-{v['max']:.1f})"

    return (f"(g) cache of the deterministic stage (medical, {g['cases']} cases x "
            f"{g['patches_per_case']} patches, {g['workers']} workers, {g['reps']} reps, "
            f"median (range)):\n"
            f"  patches/s epoch 1 (cache cold) {s(g['epoch1_patches_per_s'])}, epoch 2 (warm) "
            f"{s(g['epoch2_patches_per_s'])}: epoch 2 = {s(g['epoch2_x_epoch1'], 'x')} epoch 1\n"
            f"  cache {g['cache_mib']:.0f} MiB; workers' memory after 2 epochs (Pss summed): "
            f"one shared cache {s(g['shared_workers_pss_mib'], ' MiB')}, a copy per worker "
            f"(MONAI-style) {s(g['per_worker_workers_pss_mib'], ' MiB')}")


def measure_section(workload: str, n: int, peers: list[str], reps: int, workers: int,
                    env: dict) -> dict:
    """Every peer once per repetition, repetitions outer (A, B, C, A, B, C, ...),
    each run in a fresh interpreter, so the machine's drift hits every peer
    alike; a row holds the medians and the runs themselves."""
    runs: dict[str, list[dict]] = {peer: [] for peer in peers}
    rows: dict[str, dict] = {}
    for peer in peers:
        reason = skip_reason(peer)
        if reason:
            rows[peer] = {"skipped": reason}
    for _ in range(reps):
        for peer in peers:
            if peer not in rows:
                runs[peer].append(run_measure(workload, peer, n, 1, workers, env))
    for peer, done in runs.items():
        if peer in rows:
            continue
        failed = [r for r in done if "error" in r]
        if failed:
            rows[peer] = failed[0]
            continue
        rows[peer] = {key: statistics.median(r[key] for r in done)
                      for key in ("first_element_s", "steady_items_per_s", "overall_items_per_s")}
        rows[peer]["steady_runs"] = [r["steady_items_per_s"] for r in done]
        rows[peer]["mploader_stats"] = done[-1].get("mploader_stats")
    return {peer: rows[peer] for peer in peers}


def _ratio(row: dict, base: dict) -> tuple[float, float, float]:
    """Median, min and max of the run-by-run ratios (runs of one repetition pair up)."""
    ratios = [a / b for a, b in zip(row["steady_runs"], base["steady_runs"])]
    return statistics.median(ratios), min(ratios), max(ratios)


def add_ratios(name: str, section: dict) -> None:
    """Steady items/s as ratios, repetition by repetition, to the section's
    baseline, to the best non-mploader peer, and to the parallel ceiling."""
    rows = {k: v for k, v in section["peers"].items() if "steady_runs" in v}
    if not rows:
        return
    base_name = BASELINE.get(name) if BASELINE.get(name) in rows else next(iter(rows))
    others = [k for k in rows if not k.startswith(MPLOADER_PEERS) and k not in REFERENCES]
    best = max(others, key=lambda k: rows[k]["steady_items_per_s"]) if others else None
    section["baseline"] = base_name
    section["best_peer"] = best
    for row in rows.values():
        row["x_baseline"], row["x_baseline_min"], row["x_baseline_max"] = _ratio(
            row, rows[base_name])
        row["x_best_peer"] = _ratio(row, rows[best])[0] if best else None
        if "ceiling" in rows:
            row["x_ceiling"], row["x_ceiling_min"], row["x_ceiling_max"] = _ratio(
                row, rows["ceiling"])


def table(name: str, section: dict, bytes_per_item: int | None) -> str:
    ceiling = "ceiling" in section["peers"] and "x_ceiling" in section["peers"]["ceiling"]
    lines = [f"({name}) {section['title']}: {section['items']} items, {section['workers']} "
             f"workers; medians of {section.get('reps', 1)} interleaved runs, ratios run by "
             "run (min-max)",
             f"  {'peer':<22}{'first s':>9}{'steady it/s':>13}{'overall it/s':>14}"
             f"{'x ' + section.get('baseline', 'base'):>28}{'x best peer':>13}"
             + (f"{'x ceiling':>22}" if ceiling else "")
             + (f"{'GB/s':>8}" if bytes_per_item else "")]
    for peer, row in section["peers"].items():
        if "x_baseline" not in row:
            lines.append(f"  {peer:<22}skipped: {row.get('skipped') or row.get('error')}")
            continue
        best = f"{row['x_best_peer']:.2f}" if row.get("x_best_peer") else "-"
        base = spread(row, "x_baseline")
        ceil = spread(row, "x_ceiling") if ceiling else ""
        gbs = (f"{row['steady_items_per_s'] * bytes_per_item / 1e9:8.2f}" if bytes_per_item else "")
        lines.append(f"  {peer:<22}{row['first_element_s']:9.3f}{row['steady_items_per_s']:13.1f}"
                     f"{row['overall_items_per_s']:14.1f}{base:>28}{best:>13}"
                     + (f"{ceil:>22}" if ceiling else "") + gbs)
    return "\n".join(lines)


def report(results: dict) -> str:
    """The tables and figures of a run, as text, from its results alone."""
    text = []
    for name, section in results["sections"].items():
        big = results.get("big_bytes") if section["workload"] == "big" else None
        text.append(table(name, section, big))
    if "startup" in results:
        text.append(f"(e) start-up, script importing TF at top level, 2 workers: first element "
                    f"{results['startup']['first_element_s']:.3f} s, worker RSS "
                    f"{results['startup']['worker_rss_mib']:.1f} MiB")
    if "cache" in results:
        text.append(cache_text(results["cache"]))
    for key in ("consumer", "consumer_bfc"):
        if key in results:
            text.append(consumer_text(results[key]))
    for key in ("many", "many_bfc"):
        if key in results:
            text.append(many_text(results[key]))
    if "volume" in results:
        text.append(volume_text(results["volume"]))
    if "ray" in results:
        text.append(ray_text(results["ray"]))
    if "lifecycle" in results:
        text.append("(f) lifecycle, seconds:\n" + "\n".join(
            f"  {k:<45} median {v['median_s']:.3f} s   max {v['max_s']:.3f} s"
            for k, v in results["lifecycle"].items()))
    return "\n\n".join(text)


def write_outputs(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(
        f"Machine: {json.dumps(results['machine'])}\n\n```\n{report(results)}\n```\n")
    if results["sections"]:
        plot(results, out / "results.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    for ax, (name, section) in zip(axes.flat, results["sections"].items()):
        rows = {k: v for k, v in section["peers"].items() if "x_baseline" in v}
        colors = ["tab:orange" if k.startswith("mploader") else "tab:gray" for k in rows]
        ratios = [v["x_baseline"] for v in rows.values()]
        ax.barh(list(rows), ratios, color=colors)
        if max(ratios) / max(min(ratios), 1e-9) > 20:
            ax.set_xscale("log")  # tiny items: the serial loop is hundreds of times faster
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"({name}) {section['title']}", fontsize=9)
        ax.set_xlabel(f"steady items/s, x {section.get('baseline')}")
        ax.invert_yaxis()
    m = results["machine"]
    fig.suptitle(f"mploader bench: {m['cpu']}, {m['cores_usable']} cores usable, "
                 f"Python {m['python']}, TF {m['versions']['tensorflow']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few items, once: a smoke test")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", help="where results go: benchmarks/results/, or for --tiny "
                        "a temporary folder (a smoke test never replaces the committed results)")
    parser.add_argument("--sections", default="abcdefghijk")
    parser.add_argument("--replot", action="store_true",
                        help="measure nothing: rebuild ratios, results.md and the plot from results.json")
    args = parser.parse_args()
    reps = 1 if args.tiny else args.reps
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="mploader-bench-") if args.tiny else HERE / "results"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        results = json.loads((out / "results.json").read_text())
        for name, section in results["sections"].items():
            add_ratios(name, section)
        results.setdefault("big_bytes", 32 * ONE_MIB)
        write_outputs(results, out)
        print(report(results))
        return 0
    started = time.time()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=os.pathsep.join(
        [str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if args.tiny:
        env.update(MPLOADER_BENCH_GIL_LOOP="2000", MPLOADER_BENCH_BIG_BYTES=str(ONE_MIB))
    if "b" in args.sections or "g" in args.sections:
        env["MPLOADER_BENCH_CASES"] = str(medical_cases(args.tiny))
    results: dict = {"machine": machine(), "tiny": args.tiny, "reps": reps, "sections": {},
                     "big_bytes": int(env.get("MPLOADER_BENCH_BIG_BYTES", 32 * ONE_MIB))}
    print(f"machine: {json.dumps(results['machine'])}\n", flush=True)
    results["section_s"] = {}  # where make bench's time goes, section by section
    clock = [time.time()]

    def took(name: str) -> None:
        results["section_s"][name] = round(time.time() - clock[0], 1)
        print(f"({name}) took {results['section_s'][name]:.0f} s\n", flush=True)
        clock[0] = time.time()

    for name, (workload, n, n_tiny, peers, title) in SECTIONS.items():
        if name not in args.sections:
            continue
        n = n_tiny if args.tiny else n
        section = {"title": title, "workload": workload, "items": n, "workers": args.workers,
                   "reps": reps,
                   "peers": measure_section(workload, n, peers, reps, args.workers, env)}
        for peer, row in section["peers"].items():
            if row.get("mploader_stats"):
                s = row["mploader_stats"]
                print(f"  [{name}/{peer}] loader.stats(): workers busy "
                      f"{[round(b, 2) for b in s['worker_busy_fraction']]}, consumer waited "
                      f"{s['consumer_wait_s']:.2f} of {s['elapsed_s']:.2f} s", flush=True)
        add_ratios(name, section)
        results["sections"][name] = section
        big = results["big_bytes"] if workload == "big" else None
        print(table(name, section, big) + "\n", flush=True)
        took(name)
    if "e" in args.sections:
        results["startup"] = startup(reps, 2)
        print(f"(e) start-up: {results['startup']}\n", flush=True)
        took("e")
    if "g" in args.sections:
        results["cache"] = run_script("cache_bench.py", env, "--reps", str(reps),
                                      "--workers", str(args.workers))
        print(cache_text(results["cache"]) + "\n", flush=True)
        took("g")
    if "h" in args.sections:
        for key, section_env, extra in (
                ("consumer", env, ()),
                ("consumer_bfc", {**env, **BFC_ENV}, ("--peers", "bare,dataset_batch32"))):
            results[key] = run_script("consumer_bench.py", section_env, "--reps", str(reps),
                                      "--workers", str(args.workers),
                                      "--scale", "0.05" if args.tiny else "1", *extra)
            print(consumer_text(results[key]) + "\n", flush=True)
        took("h")
    if "i" in args.sections:
        size = ["--scale", "0.05", "--in-flight", "8"] if args.tiny else ["--in-flight", "64"]
        # 1800 s: on a host where Python runs slowly, starting 64 worker
        # processes takes seconds per run, and 900 s were too few for 3 reps
        for key, section_env, extra in (
                ("many", env, ["--loaded", *(size if args.tiny else [])]),
                ("many_bfc", {**env, **BFC_ENV}, ["--consumers", "dataset_batch32",
                                                  "--peers", "", "--no-long-pass", *size])):
            results[key] = run_script("many_bench.py", section_env, "--reps", str(reps), *extra,
                                      timeout=1800)
            print(many_text(results[key]) + "\n", flush=True)
        took("i")
    if "j" in args.sections:
        results["volume"] = run_script("volume_bench.py", env, "--reps", str(reps),
                                       "--workers", "2",
                                       *(["--scale", "0.03125"] if args.tiny else []),
                                       timeout=600)
        print(volume_text(results["volume"]) + "\n", flush=True)
        took("j")
    if "k" in args.sections:
        results["ray"] = ray_section(env, args.tiny)
        print(ray_text(results["ray"]) + "\n", flush=True)
        took("k")
    if "f" in args.sections:
        print("(f) lifecycle (close() and every way of ending), seconds:", flush=True)
        figures = subprocess.run([sys.executable, str(HERE / "lifecycle.py"), "--reps",
                                  str(1 if args.tiny else 5), "--json", str(out / ".lifecycle.json")],
                                 capture_output=True, text=True, env=env, timeout=600)
        print(figures.stdout, flush=True)
        results["lifecycle"] = json.loads((out / ".lifecycle.json").read_text())
        (out / ".lifecycle.json").unlink()
        took("f")
    results["wall_s"] = time.time() - started
    write_outputs(results, out)
    print(f"wrote {out}/results.json, results.md, results.png in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
