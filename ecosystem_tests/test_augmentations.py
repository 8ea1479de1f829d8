"""The medical ecosystem's random transforms through the loader: every item its
own augmentation, the same on any number of workers (mploader/random_state.py).

Each pipeline augments the same NIfTI volume (or image) for every item, so
two items that got the same random state give the same array.  Promises
checked for each library (check_per_item_randomness):

- with 2 workers no two items get the same augmentation, seed=None and seed=0
  (each worker unpickles an identical copy of the transforms' random state);
- with seed=0 the output is identical for 1, 2 and 3 workers, ordered or not.

The fns are closures built in the tests, shipped by value as a script's fns
are, so a worker imports only the library its fn uses.
"""
from __future__ import annotations

import warnings

import numpy as np

from mploader import MPLoader, item_scope

from . import lazy_torch

N = 8


def _run(fn, source, num_workers, seed, ordered=True) -> dict[int, np.ndarray]:
    with MPLoader(fn, source, num_workers=num_workers, seed=seed, ordered=ordered) as loader:
        return {int(index): np.asarray(value) for index, value in loader}


def _assert_distinct(results: dict[int, np.ndarray], what: str) -> None:
    arrays = [results[i] for i in sorted(results)]
    same = [(a, b) for a in range(len(arrays)) for b in range(a)
            if np.array_equal(arrays[a], arrays[b])]
    assert not same, f"{what}: items {same} got the same augmentation"


def check_per_item_randomness(fn, source) -> dict[int, np.ndarray]:
    """Both promises; returns the seed=0 output."""
    _assert_distinct(_run(fn, source, 2, None), "seed=None, 2 workers")
    one = _run(fn, source, 1, 0)
    assert sorted(one) == list(range(len(source)))
    _assert_distinct(one, "seed=0, 1 worker")
    for workers, ordered in ((2, True), (3, False)):
        other = _run(fn, source, workers, 0, ordered)
        assert sorted(other) == sorted(one)
        for i in one:
            np.testing.assert_array_equal(other[i], one[i], err_msg=(
                f"item {i}: seed=0 gives other output with {workers} workers, ordered={ordered}"))
    return one


def test_monai_compose_of_random_transforms_on_a_nifti_volume(volume):
    import monai.transforms as mt
    pipeline = mt.Compose([
        mt.LoadImaged(keys=["image"], image_only=True),
        mt.EnsureChannelFirstd(keys=["image"], channel_dim="no_channel"),
        mt.RandSpatialCropd(keys=["image"], roi_size=(12, 12, 12), random_size=False),
        mt.RandFlipd(keys=["image"], prob=0.5, spatial_axis=0),
        mt.OneOf([mt.RandGaussianNoised(keys=["image"], prob=1.0),
                  mt.RandScaleIntensityd(keys=["image"], factors=0.2, prob=1.0)]),
        mt.RandAffined(keys=["image"], prob=1.0, rotate_range=0.2, padding_mode="zeros"),
    ])

    def fn(item):
        index, path = item
        return index, np.asarray(pipeline({"image": path})["image"])

    source = [(i, volume) for i in range(N)]
    seeded = check_per_item_randomness(fn, source)
    assert seeded[0].shape == (1, 12, 12, 12)
    with item_scope(0, 0, 5, fn=fn):  # replay one item in this process, transforms reseeded
        np.testing.assert_array_equal(fn(source[5])[1], seeded[5])


def test_monai_and_albumentations_give_the_same_output_on_four_threads(volume):
    """Each thread has its own copy of fn, so of the transforms and their
    generators, seeded per item: T=4 gives what T=1 gives."""
    import albumentations as A
    import monai.transforms as mt
    pipeline = mt.Compose([
        mt.LoadImaged(keys=["image"], image_only=True),
        mt.EnsureChannelFirstd(keys=["image"], channel_dim="no_channel"),
        mt.RandSpatialCropd(keys=["image"], roi_size=(12, 12, 12), random_size=False),
        mt.RandFlipd(keys=["image"], prob=0.5, spatial_axis=0),
        mt.RandGaussianNoised(keys=["image"], prob=1.0),
        mt.RandAffined(keys=["image"], prob=1.0, rotate_range=0.2, padding_mode="zeros"),
    ])
    augment = A.Compose([A.HorizontalFlip(p=0.5), A.GaussNoise(p=1.0)])

    def fn(item):
        index, path = item
        volume_ = np.asarray(pipeline({"image": path})["image"])
        image = (np.abs(volume_[0, :, :, :3]) * 50).astype(np.uint8)
        return index, volume_, augment(image=image)["image"]

    source = [(i, volume) for i in range(2 * N)]

    def run(workers, threads):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # about the global generators
            with MPLoader(fn, source, num_workers=workers, seed=0,
                          threads_per_worker=threads) as loader:
                return {int(i): (np.asarray(v), np.asarray(a)) for i, v, a in loader}

    one, four = run(1, 1), run(2, 4)
    assert sorted(one) == sorted(four) == list(range(2 * N))
    _assert_distinct({i: v for i, (v, _) in one.items()}, "seed=0, MONAI")
    for i in one:
        np.testing.assert_array_equal(four[i][0], one[i][0], err_msg=f"MONAI, item {i}")
        np.testing.assert_array_equal(four[i][1], one[i][1], err_msg=f"albumentations, item {i}")


def test_torchio_compose_uses_torchs_global_generator(volume):
    import torchio as tio
    augment = tio.Compose([tio.RandomFlip(axes=(0, 1, 2)), tio.RandomNoise(std=0.1),
                           tio.RandomAffine(scales=0.1, degrees=10)])

    def fn(item):
        index, path = item
        subject = tio.Subject(image=tio.ScalarImage(path))
        return index, augment(subject)["image"].data.numpy()

    check_per_item_randomness(fn, [(i, volume) for i in range(N)])


def test_plain_torch_in_fn(volume):
    import nibabel as nib
    import torch

    def fn(item):
        index, path = item
        image = torch.from_numpy(np.asarray(nib.load(path).dataobj))
        return index, (image + 0.1 * torch.randn(image.shape)).numpy()

    check_per_item_randomness(fn, [(i, volume) for i in range(N)])


def test_torch_imported_by_fn_itself_inside_the_first_item():
    """Before torch is imported the worker cannot seed it; it seeds it as the
    import ends, else each worker's first item drew from torch's fixed default seed."""
    check_per_item_randomness(lazy_torch.noise, [(i, None) for i in range(N)])


def test_albumentations_compose_keeps_its_own_generators():
    import albumentations as A
    augment = A.Compose([A.HorizontalFlip(p=0.5), A.RandomBrightnessContrast(p=1.0),
                         A.GaussNoise(p=1.0), A.Affine(rotate=(-20, 20), p=1.0)])
    image = np.linspace(0, 255, 64 * 64 * 3).astype(np.uint8).reshape(64, 64, 3)

    def fn(item):
        return item[0], augment(image=image)["image"]

    check_per_item_randomness(fn, [(i, None) for i in range(N)])


def test_batchgenerators_use_numpys_and_pythons_global_generators(volume):
    import nibabel as nib
    from batchgenerators.transforms.abstract_transforms import Compose
    from batchgenerators.transforms.noise_transforms import GaussianNoiseTransform
    from batchgenerators.transforms.spatial_transforms import MirrorTransform
    augment = Compose([MirrorTransform(axes=(0, 1, 2)),
                       GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_sample=1.0)])

    def fn(item):
        index, path = item
        data = np.asarray(nib.load(path).dataobj)[None, None]  # (batch, channel, x, y, z)
        return index, augment(data=data)["data"]

    check_per_item_randomness(fn, [(i, volume) for i in range(N)])


def test_batchgeneratorsv2_use_torchs_global_generator(volume):
    import nibabel as nib
    import torch
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    augment = ComposeTransforms([MirrorTransform(allowed_axes=(0, 1, 2)),
                                 GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1)])

    def fn(item):
        index, path = item
        image = torch.from_numpy(np.asarray(nib.load(path).dataobj))[None]
        return index, augment(image=image)["image"].numpy()

    check_per_item_randomness(fn, [(i, volume) for i in range(N)])


def test_monai_random_crops_as_samples_of_a_generator_fn(volume):
    """A generator fn yielding several random crops per item (MONAI's
    RandCropByPosNegLabeld's kind of use): the same crops on any worker count."""
    import monai.transforms as mt
    samples = 2
    crop = mt.RandSpatialCropSamplesd(keys=["image"], roi_size=(8, 8, 8), num_samples=samples,
                                     random_size=False)
    load = mt.Compose([mt.LoadImaged(keys=["image"], image_only=True),
                       mt.EnsureChannelFirstd(keys=["image"], channel_dim="no_channel")])

    def fn(path):
        for patch in crop(load({"image": path})):
            yield np.asarray(patch["image"])

    def run(workers):
        with MPLoader(fn, [volume] * N, num_workers=workers, seed=0,
                      samples_per_item=samples) as loader:
            return list(loader)

    one = run(1)
    _assert_distinct(dict(enumerate(one)), "samples, 1 worker")
    for a, b in zip(one, run(2), strict=True):
        np.testing.assert_array_equal(a, b)


class _BesideMetadata:
    """fn as a class holding a dataset's metadata beside its MONAI Compose."""

    def __init__(self, aug, lists: int = 0) -> None:
        self.meta = [{f"field{k}": (f"case{i}" if k % 2 else i * k) for k in range(10)}
                     for i in range(20_000)]
        self.lists = [[[] for _ in range(lists)] for _ in range(11)]
        self.aug = aug

    def __call__(self, item):
        return item[0], np.asarray(self.aug(np.zeros((1, 4, 4), np.float32)))


def test_monai_compose_beside_big_metadata_is_reseeded_whole():
    """20,000 rows of plain metadata in fn cost the walk of fn little: the
    Compose's transforms are found and reseeded (they were left to the
    Compose's own R, which does not reach them: seed=0 differed between 1 and
    2 workers, and seed=None gave two workers' items the same noise)."""
    import monai.transforms as mt
    fn = _BesideMetadata(mt.Compose([mt.RandGaussianNoise(prob=1.0)]))
    source = [(i, None) for i in range(N)]
    one = _run(fn, source, 1, 0)
    _assert_distinct(one, "seed=0, 1 worker")
    two = _run(fn, source, 2, 0)
    _assert_distinct(two, "seed=0, 2 workers")  # (with seed=None, workers' copies agreed)
    for i in one:
        np.testing.assert_array_equal(two[i], one[i], err_msg=f"item {i}, 1 and 2 workers")


def test_monai_compose_past_the_walks_budget_passes_seeds_on_to_its_transforms():
    """110,000 lists beside the Compose spend the walk's budget before its
    transforms: the Compose is reseeded through its own set_random_state,
    which passes seeds on.  In this process, as workers do: each copy of fn
    (unpickled, as every worker unpickles its own) gives the same item the
    same output, whatever items it ran before."""
    import pickle

    import cloudpickle
    import monai.transforms as mt

    from mploader.random_state import WorkerRandomness
    fn = _BesideMetadata(mt.Compose([mt.RandGaussianNoise(prob=1.0)]), lists=10_000)
    data = cloudpickle.dumps(fn)

    def run(items):
        copy = pickle.loads(data)
        randomness = WorkerRandomness(0, copy)
        assert "stopped at its budget" in randomness.notes[0]  # the loader logs it
        out = {}
        for i in items:
            with randomness.item(0, i):
                out[i] = copy((i, None))[1]
        return out

    one = run(range(N))
    _assert_distinct(one, "one copy")
    other = {**run(range(N // 2, N)), **run(range(N // 2))}  # "two workers", other order
    for i in one:
        np.testing.assert_array_equal(other[i], one[i], err_msg=f"item {i}")
