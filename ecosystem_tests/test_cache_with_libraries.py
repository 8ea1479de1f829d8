"""A directory cache over what torch, MONAI and albumentations users give
prepare (mploader/cache/keys.py): two separate jobs on one directory, real
workers, the second job hits what did not change.

A torch tensor's pickle holds its storage's address, and a MONAI or
albumentations ``Compose`` holds random generators seeded from the operating
system (and albumentations a dict built in the order of string hashes): keyed
by their pickles, the workers' check refused every tensor (CacheError), and
every Compose missed in every run, the directory growing each time.  Tensors
are now keyed by value, generators by their type, so what is the same hits,
and a tensor of other values misses.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("monai")
pytest.importorskip("albumentations")

JOB = """
import json, os, sys
import numpy as np
import torch
import albumentations as A
import monai.transforms as mt
from mploader import MPLoader

torch.manual_seed(0)  # the net's weights: the same in both jobs
SCALE = torch.full((3,), @SCALE@)
WEIGHTS = torch.full((3,), 1.0)
NET = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU())
MONAI = mt.Compose([mt.Lambda(lambda x: x * 2), mt.ScaleIntensityRange(0, 100, 0, 1),
                    mt.Resize((4, 4))])
MONAI_RANDOM = mt.Compose([mt.RandFlip(prob=0.5, spatial_axis=0),
                           mt.RandGaussianNoise(prob=1.0)])
ALBU = A.Compose([A.Normalize(mean=0, std=1, max_pixel_value=1.0), A.HorizontalFlip(p=0.5)])
GENERATOR = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))

cases = {  # (one loader each: each starts a worker, which imports torch)
    "torch": lambda i: (NET(WEIGHTS * i).detach() + torch.rand(2, generator=GENERATOR)).numpy(),
    "tensor_changed": lambda i: (SCALE * i).numpy(),
    "monai": lambda i: np.asarray(MONAI_RANDOM(MONAI(np.full((1, 8, 8), i, np.float32)))),
    "albumentations": lambda i: ALBU(image=np.full((8, 8, 3), i, np.float32))["image"],
}
found = {}
for name, prepare in cases.items():
    where = os.path.join(sys.argv[1], name)
    with MPLoader(np.asarray, 3, prepare=prepare, cache=where, num_workers=1) as loader:
        values = [np.asarray(v).round(5).tolist() for v in loader]
        stats = loader.stats()["cache"]
    entries = sum(name.endswith(".entry") for name in os.listdir(where))
    found[name] = {"values": values, "hits": stats["hits"], "misses": stats["misses"],
                   "entries": entries}
print(json.dumps(found))
"""


def _job(tmp_path, phase: int) -> dict:
    where = tmp_path / f"job{phase}"  # another directory, another hash seed
    where.mkdir()
    (where / "job.py").write_text(JOB.replace("@SCALE@", "1.0" if phase == 1 else "2.0"))
    env = dict(os.environ, PYTHONHASHSEED=str(phase))
    result = subprocess.run([sys.executable, str(where / "job.py"), str(tmp_path / "cache")],
                            cwd=where, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_torch_monai_and_albumentations_in_prepare_hit_in_a_second_job(tmp_path):
    one, two = _job(tmp_path, 1), _job(tmp_path, 2)
    for name, got in one.items():
        assert (got["hits"], got["misses"], got["entries"]) == (0, 3, 3), (name, got)
    for name, got in two.items():
        if name == "tensor_changed":  # a tensor of other values: prepare's results differ
            assert (got["hits"], got["misses"], got["entries"]) == (0, 3, 6), got
            assert got["values"] != one[name]["values"]
        else:  # the same: served, and the directory does not grow
            assert (got["hits"], got["misses"], got["entries"]) == (3, 0, 3), (name, got)
            assert got["values"] == one[name]["values"], name
