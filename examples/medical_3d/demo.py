"""mploader demo: NIfTI volumes -> preprocessing in workers -> a 3D U-Net training.

Run with `make demo`.  Steps:
 1. write a small synthetic CT dataset (cached), one case deliberately corrupt;
 2. read the real NIfTI files that nibabel ships, through the same loader;
 3. time the same preprocessing through tf.data.map(AUTOTUNE) and through
    mploader, interleaved runs, and print what this run measured;
 4. patch-based training: k patches per case with the deterministic stage
    (load, crop, resample) cached in shared memory; input throughput of epoch 1
    (cache cold) against epoch 2 (warm); a tiny 3D U-Net trained on
    MPLoader(...).dataset(), skipping the corrupt case (and on_error="raise"
    names the file instead); the memory of one shared cache against a copy per
    worker (MONAI-style), measured;
 5. check that no worker process remains and /dev/shm holds nothing new.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the pipeline, and examples/clean_exit.py

import numpy as np  # noqa: E402

import clean_exit  # noqa: E402
import per_worker_cache  # noqa: E402
import pipeline  # noqa: E402
import synth  # noqa: E402
from footprint import footprint  # noqa: E402
from mploader import MPLoader, WorkerError  # noqa: E402


def say(text: str = "") -> None:
    print(text, flush=True)


def per_s(iterable, count_rows: bool = False) -> float:
    """Elements per second over one pass (rows of every batch with ``count_rows``)."""
    start = time.perf_counter()
    count = sum(len(x[0]) if count_rows else 1 for x in iterable)
    return count / (time.perf_counter() - start)


def spread(values: list[float]) -> str:
    """'median 3.1 (2.9-3.4)'."""
    return f"median {statistics.median(values):5.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=32)
    parser.add_argument("--shape", type=int, nargs=3, default=(192, 192, 64))
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--cache", default=str(HERE / ".cache"))
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="  [%(name)s] %(message)s")
    shm_before = clean_exit.shm_entries()
    workers_seen: set[int] = set()

    say("== 1. synthetic CT dataset")
    start = time.perf_counter()
    cases = synth.make_dataset(args.cache, args.cases, tuple(args.shape))
    good = [c for c in cases if not synth.is_truncated(c["image"])]
    say(f"   {len(good)} cases of {tuple(args.shape)} voxels + {len(cases) - len(good)} "
        f"corrupt, in {args.cache} ({time.perf_counter() - start:.1f} s)")

    say("== 2. real NIfTI files shipped with nibabel, read by the same workers")
    # nibabel.testing would name this folder, but it imports pytest, which a
    # user's environment need not have: the folder is found beside the package.
    import nibabel
    data_path = Path(nibabel.__file__).parent / "tests" / "data"
    files = sorted(str(p) for p in data_path.glob("*.nii*") if "dconn" not in p.name)
    with MPLoader(pipeline.describe, files, num_workers=args.workers) as loader:
        workers_seen.update(loader.worker_pids())
        for info in loader:
            say(f"   {info['file']:<28} shape {tuple(int(v) for v in info['shape'])!s:<18} "
                f"spacing {np.round(info['spacing_mm'], 2).tolist()!s:<18} "
                f"{info['orientation']} {info['dtype']}")

    import tensorflow as tf
    from model import tiny_unet
    patch = pipeline.PATCH + (1,)
    signature = (tf.TensorSpec(patch, tf.float32), tf.TensorSpec(patch, tf.float32))

    say(f"== 3. the same preprocessing, one patch per case: tf.data.map(AUTOTUNE) vs "
        f"mploader, {args.reps} interleaved runs each")

    def tf_preprocess(image_path, label_path):
        case = {"image": image_path.decode(), "label": label_path.decode()}
        return pipeline.preprocess(case, np.random.default_rng())

    paths = tf.data.Dataset.from_tensor_slices(([c["image"] for c in good], [c["label"] for c in good]))
    tf_ds = paths.map(lambda i, l: tf.numpy_function(tf_preprocess, [i, l], [tf.float32, tf.float32]),
                      num_parallel_calls=tf.data.AUTOTUNE)
    for _ in tf_ds:  # warm-up: imports, TensorFlow's graph, the file cache
        pass
    with MPLoader(pipeline.preprocess, good, num_workers=args.workers, seed=0,
                  output_signature=signature) as loader:
        workers_seen.update(loader.worker_pids())
        mp_ds = loader.dataset()
        for _ in mp_ds:
            pass
        rates: dict[str, list[float]] = {"tf": [], "mp": []}
        for _ in range(args.reps):  # interleaved, so the machine's drift hits both alike
            rates["tf"].append(per_s(tf_ds))
            rates["mp"].append(per_s(mp_ds))
        n = loader.num_workers
    ratios = sorted(m / t for m, t in zip(rates["mp"], rates["tf"]))
    say(f"   tf.data.map(AUTOTUNE): {spread(rates['tf'])} cases/s")
    say(f"   mploader ({n} workers):  {spread(rates['mp'])} cases/s")
    say(f"   mploader / tf.data, run by run: {', '.join(f'{r:.2f}x' for r in ratios)} "
        f"({len(os.sched_getaffinity(0))} cores usable; this run's figures, not a promise)")

    k = pipeline.PATCHES_PER_CASE
    say(f"== 4. patch-based training: {k} patches per case, load+resample cached "
        "(prepare=prepare_case), a tiny 3D U-Net")
    say("   (the corrupt case is skipped, and reported with its file name)")
    # on_error="skip" means the number of batches is not known in advance, and
    # Keras says so once at the end of the first epoch; that is expected here.
    warnings.filterwarnings("ignore", message="Your input ran out of data")
    warnings.filterwarnings("ignore", message="`shuffle=True` was passed")
    with MPLoader(pipeline.patches, cases, prepare=pipeline.prepare_case,
                  samples_per_item=k, num_workers=args.workers, batch_size=4, shuffle=True,
                  seed=0, on_error="skip") as loader:
        workers_seen.update(loader.worker_pids())
        cold, warm = per_s(loader, count_rows=True), per_s(loader, count_rows=True)
        memory = footprint(os.getpid(), loader.worker_pids())
        cache = loader.stats()["cache"]
        say(f"   input alone, patches/s: epoch 1 (cache cold) {cold:.1f}, epoch 2 (cache warm) "
            f"{warm:.1f} = {warm / cold:.2f}x")
        say(f"   cache: {cache['entries']} cases, {cache['bytes'] / 2**20:.0f} MiB in shared "
            f"memory, {cache['hits']} hits, {cache['misses']} misses")
        model = tiny_unet(pipeline.PATCH)
        history = model.fit(loader.dataset(), epochs=args.epochs, verbose=2)
        skipped = loader.skipped
        stats = loader.stats()
    say(f"   loss per epoch: {[round(v, 4) for v in history.history['loss']]}")
    say(f"   skipped (once per epoch): {sorted({f'index {s.index}: {s.exc_type}' for s in skipped})}")
    say(f"   workers busy {[round(b, 2) for b in stats['worker_busy_fraction']]} of the time; "
        f"the consumer waited {stats['consumer_wait_s']:.1f} s")
    with MPLoader(per_worker_cache.patches_from_own_copy, good, samples_per_item=k,
                  worker_init=per_worker_cache.filler(good), num_workers=args.workers,
                  batch_size=4, shuffle=True, seed=0) as loader:
        workers_seen.update(loader.worker_pids())
        per_s(loader, count_rows=True), per_s(loader, count_rows=True)
        theirs = footprint(os.getpid(), loader.worker_pids())
    say(f"   memory after 2 epochs, Pss summed over the {n} workers (each shared page once; "
        f"a worker's interpreter with numpy, scipy and nibabel is part of it):")
    say(f"     one cache shared by all (mploader):        {memory['workers_pss_mib']:5.0f} MiB "
        f"(+ parent {memory['parent_pss_mib']:.0f} MiB)")
    say(f"     a full copy in each worker (MONAI-style):  {theirs['workers_pss_mib']:5.0f} MiB "
        f"(+ parent {theirs['parent_pss_mib']:.0f} MiB)")
    say('   with on_error="raise" the same case stops the job, naming the file:')
    with MPLoader(pipeline.preprocess, cases[-1:], num_workers=1) as loader:
        workers_seen.update(loader.worker_pids())
        try:
            list(loader)
        except WorkerError as err:
            say(f"   WorkerError: {str(err).splitlines()[0][:160]}")

    say("== 5. clean exit")
    time.sleep(0.2)
    left, new_shm = clean_exit.leftovers(workers_seen, shm_before)
    say(f"   {len(workers_seen)} worker processes were started; {len(left)} remain")
    say(f"   new entries in /dev/shm: {new_shm if new_shm else 'none'}")
    return 1 if left or new_shm else 0


if __name__ == "__main__":
    sys.exit(main())
