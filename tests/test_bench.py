"""`make bench` in its tiny mode, so the benchmark cannot rot."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# benchmarks/run.py imports TensorFlow and matplotlib (the bench extra): `make test-bench`
pytestmark = [pytest.mark.tf, pytest.mark.bench]

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(660)  # the run below may take its 600 s on a slow machine
def test_bench_tiny_mode_writes_table_json_and_plot(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--tiny",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["machine"]["cores_usable"] >= 1 and results["machine"]["cpu"]
    assert results["machine"]["python_loop_3m_s"] > 0  # the speed probe (run.py speed())
    assert results["machine"]["fresh_memory_gb_s"] > 0
    assert results["machine"]["fresh_4k_pages_gb_s"] > 0
    assert set(results["sections"]) == {"a", "b", "c", "d"}
    for name, section in results["sections"].items():
        for peer, row in section["peers"].items():
            assert "error" not in row, f"({name}) {peer} failed: {row['error']}"
            assert "skipped" in row or row["steady_items_per_s"] > 0, (name, peer, row)
        assert section["peers"]["mploader"]["mploader_stats"]["items"] > 0
    assert results["startup"]["worker_rss_mib"] > 0
    assert len(results["lifecycle"]) == 8
    cache = results["cache"]
    assert "error" not in cache, cache["error"]
    assert cache["epoch2_patches_per_s"]["median"] > 0 and cache["cache_mib"] > 0
    assert cache["per_worker_workers_pss_mib"]["median"] > 0
    consumer = results["consumer"]
    assert "error" not in consumer, consumer["error"]
    for element in consumer["elements"].values():
        assert set(element) == {"bare", "dataset_batch32", "batch_size32", "loader"}
        assert all(row["per_s"] > 0 and row["cpu_ms"] > 0 for row in element.values())
    bfc = results["consumer_bfc"]  # the same, with TensorFlow's BFC allocator
    assert "error" not in bfc, bfc["error"]
    assert bfc["tf_cpu_allocator_use_bfc"] == "true"
    for element in bfc["elements"].values():
        assert set(element) == {"bare", "dataset_batch32"}
    many = results["many"]
    assert "error" not in many, many["error"]
    hows = {row["how"] for row in many["rows"]}
    assert {"mploader processes 8x1 loop", "mploader threads 1x8 batch_size32",
            "mploader both 4x2 dataset_batch32",
            "mploader both 4x2 dataset_batch32, a 4 s pass",
            "bare from_generator, results ready at the ideal pace, batch(32)",
            "bare from_generator, results ready at the ideal pace, batch(32), a 4 s pass"} <= hows
    assert all(row["efficiency"] > 0 for row in many["rows"])
    many_bfc = results["many_bfc"]
    assert "error" not in many_bfc, many_bfc["error"]
    assert {row["how"] for row in many_bfc["rows"]} == {
        "mploader processes 8x1 dataset_batch32", "mploader threads 1x8 dataset_batch32",
        "mploader both 4x2 dataset_batch32",
        "bare from_generator, results ready at the ideal pace, batch(32)"}
    md = (tmp_path / "results.md").read_text()
    assert "(i) many workers" in md
    assert "(again, TensorFlow's CPU allocator BFC: TF_CPU_ALLOCATOR_USE_BFC=true)" in md
    volume = results["volume"]
    assert "error" not in volume, volume["error"]
    assert set(volume["sizes"]) == {"1", "8"}  # 32 and 256 MiB, scaled down
    for size in volume["sizes"].values():
        assert set(size["peers"]) == {"bare", "dataset_batch2", "batch_size2", "slow_consumer"}
        assert all(r["per_s"] > 0 and r["peak_elements"] > 0 for r in size["peers"].values())
    assert "(j) large volumes" in md and "MPLoader(..., batch_size=2).dataset()" in md
    ray = results["ray"]
    if "skipped" in ray:  # skipped only for a reason it names, in the table too
        if importlib.util.find_spec("ray") is None:
            assert ray["skipped"].startswith("ray is not installed"), ray
        else:
            assert os.geteuid() != 0 and "network namespace" in ray["skipped"], ray
        assert f"(k) the Ray backend: skipped: {ray['skipped']}" in md
    else:
        assert "error" not in ray, ray["error"]
        assert set(ray["workers"]) == {"2"}
        rows = ray["workers"]["2"]
        assert set(rows) == {"bare", "ray", "ray_dataset_batch32", "local"}
        assert all(r["per_s"] > 0 for r in rows.values())
        assert "(k) the Ray backend (fn sleeps" in md
    assert (tmp_path / "results.png").stat().st_size > 10_000
    assert "(a) GIL-bound Python" in md
    assert "x serial" in done.stdout
