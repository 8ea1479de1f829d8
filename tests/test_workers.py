"""Clean workers: fresh interpreters with the user's modules, one numeric thread each."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mploader import MPLoader

from .procs import wait_gone

ROOT = Path(__file__).resolve().parent.parent
THREAD_VARIABLES = ["OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"]


def _thread_settings(_item):
    import os
    return tuple(os.environ.get(name, "") for name in ["OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                        "OPENBLAS_NUM_THREADS"])


def test_workers_run_numeric_libraries_single_threaded(monkeypatch):
    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with MPLoader(_thread_settings, range(2), num_workers=2) as loader:
        assert set(loader) == {("1", "1", "1")}


def test_a_thread_count_the_user_sets_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    with MPLoader(_thread_settings, range(2), num_workers=1) as loader:
        assert next(iter(loader))[0] == "3"


def test_a_function_from_a_module_next_to_the_script_imports_in_workers(tmp_path):
    (tmp_path / "my_preprocessing.py").write_text(
        "import os\n\ndef load(path):\n    return f'{path}:{os.getpid()}'\n")
    (tmp_path / "train.py").write_text(
        "import json, sys\n"
        "from my_preprocessing import load\n"
        "from mploader import MPLoader\n"
        "loader = MPLoader(load, ['a', 'b', 'c'], num_workers=2)\n"
        "print(json.dumps({'out': list(loader), 'pids': loader.worker_pids()}))\n")
    done = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert [o.split(":")[0] for o in report["out"]] == ["a", "b", "c"]
    assert {int(o.split(":")[1]) for o in report["out"]} <= set(report["pids"])
    assert not wait_gone(report["pids"])


@pytest.mark.tf  # examples/from_tf_data.py imports TensorFlow
def test_from_tf_data_example_runs_and_exits_clean():
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "from_tf_data.py")],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", EXAMPLE_ITEMS="40"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "remain; new /dev/shm entries: none" in done.stdout
    assert ", 0 remain;" in done.stdout and "left: none" in done.stdout
