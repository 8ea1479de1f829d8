"""(g) The cache of the deterministic stage, on the medical workload.

Run by run.py in a fresh interpreter.  Patch-based loading, k patches per
case (``pipeline.patches``), with load+crop+resample cached by
``prepare=pipeline.prepare_case``:

- throughput: patches/s of epoch 1 (cache cold: every case prepared) and of
  epoch 2 (cache warm), each repetition with a new loader, so a new cache;
- memory, after two epochs: the workers' Pss summed (each shared page counted
  once) with mploader's one shared cache, against a full copy of the cache in
  each worker (MONAI's CacheDataset once its workers are spawned:
  ``per_worker_cache.py``).  The two designs alternate, repetition by
  repetition, so the machine's drift hits both alike.

Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "medical_3d"))

import per_worker_cache  # noqa: E402
import pipeline  # noqa: E402
from footprint import footprint  # noqa: E402

from mploader import MPLoader  # noqa: E402


def patches_per_s(loader) -> float:
    start = time.perf_counter()
    count = sum(1 for _ in loader)
    return count / (time.perf_counter() - start)


def shared(cases, workers):
    with MPLoader(pipeline.patches, cases, prepare=pipeline.prepare_case,
                  samples_per_item=pipeline.PATCHES_PER_CASE, num_workers=workers,
                  shuffle=True, seed=0) as loader:
        cold, warm = patches_per_s(loader), patches_per_s(loader)
        memory = footprint(os.getpid(), loader.worker_pids())
        cache = loader.stats()["cache"]
    return {"epoch1": cold, "epoch2": warm, "memory": memory, "cache_mib": cache["bytes"] / 2**20}


def per_worker(cases, workers):
    with MPLoader(per_worker_cache.patches_from_own_copy, cases,
                  samples_per_item=pipeline.PATCHES_PER_CASE, num_workers=workers,
                  worker_init=per_worker_cache.filler(cases), shuffle=True, seed=0) as loader:
        patches_per_s(loader), patches_per_s(loader)
        return {"memory": footprint(os.getpid(), loader.worker_pids())}


def spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    cases = json.loads(Path(os.environ["MPLOADER_BENCH_CASES"]).read_text())
    ours, theirs = [], []
    for _ in range(args.reps):
        ours.append(shared(cases, args.workers))
        theirs.append(per_worker(cases, args.workers))
    print(json.dumps({
        "cases": len(cases), "workers": args.workers, "reps": args.reps,
        "patches_per_case": pipeline.PATCHES_PER_CASE,
        "epoch1_patches_per_s": spread([r["epoch1"] for r in ours]),
        "epoch2_patches_per_s": spread([r["epoch2"] for r in ours]),
        "epoch2_x_epoch1": spread([r["epoch2"] / r["epoch1"] for r in ours]),
        "cache_mib": statistics.median(r["cache_mib"] for r in ours),
        "shared_workers_pss_mib": spread([r["memory"]["workers_pss_mib"] for r in ours]),
        "per_worker_workers_pss_mib": spread([r["memory"]["workers_pss_mib"] for r in theirs]),
    }))


if __name__ == "__main__":
    main()
