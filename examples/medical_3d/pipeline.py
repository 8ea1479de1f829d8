"""Per-case preprocessing, written the way 3D segmentation code usually is.

numpy and scipy with some Python glue, in two stages.  The deterministic one
(:func:`prepare_case`): load a NIfTI pair, crop to the body, resample to a
common spacing, window the intensities; the same every epoch, so it can be
cached.  The random one (:func:`patches`): sample patches with a balance of
organ and background, then augment each (affine, elastic, flips, noise).  All randomness comes from one ``numpy.random.Generator``: inside an
MPLoader worker that is ``mploader.item_rng()``, so the output depends only on
(seed, epoch, case), not on which worker ran it.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage

TARGET_SPACING_MM = (1.5, 1.5, 1.5)
PATCH = (32, 32, 32)
HU_WINDOW = (-200.0, 300.0)
POSITIVE_FRACTION = 0.5
PATCHES_PER_CASE = 4


def load(path: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The voxel array and its spacing in mm, from the NIfTI header."""
    image = nib.load(path)
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    return np.asanyarray(image.dataobj), spacing


def resample(volume: np.ndarray, spacing, order: int) -> np.ndarray:
    factors = [s / t for s, t in zip(spacing, TARGET_SPACING_MM)]
    return ndimage.zoom(volume, factors, order=order, prefilter=False)


def foreground_box(image_hu: np.ndarray, margin: int = 2) -> tuple[slice, ...]:
    """The bounding box of the body (everything denser than air), slice by slice."""
    rows, cols, slices = [], [], []
    for z in range(image_hu.shape[2]):          # Python glue, as in real pipelines
        body = np.argwhere(image_hu[:, :, z] > -500)
        if len(body):
            rows += [body[:, 0].min(), body[:, 0].max()]
            cols += [body[:, 1].min(), body[:, 1].max()]
            slices.append(z)
    if not slices:
        return tuple(slice(0, n) for n in image_hu.shape)
    lo = [max(0, min(v) - margin) for v in (rows, cols, slices)]
    hi = [min(n, max(v) + margin + 1) for n, v in zip(image_hu.shape, (rows, cols, slices))]
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def sample_patch(image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
    """A PATCH-sized window, centred on the organ with POSITIVE_FRACTION probability."""
    pad = [(p // 2, p // 2) for p in PATCH]
    image = np.pad(image, pad, constant_values=0.0)
    label = np.pad(label, pad, constant_values=0)
    positives = np.argwhere(label > 0)
    if len(positives) and rng.random() < POSITIVE_FRACTION:
        centre = positives[rng.integers(len(positives))]
    else:
        centre = [rng.integers(p // 2, n - p // 2) for n, p in zip(image.shape, PATCH)]
    window = tuple(slice(c - p // 2, c - p // 2 + p) for c, p in zip(centre, PATCH))
    return image[window], label[window]


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
    """Random affine (rotation, scale), elastic deformation, flips and noise."""
    angle = np.deg2rad(rng.uniform(-15, 15))
    scale = rng.uniform(0.9, 1.1)
    c, s = np.cos(angle) / scale, np.sin(angle) / scale
    matrix = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1 / scale]])
    centre = (np.array(PATCH) - 1) / 2
    offset = centre - matrix @ centre
    image = ndimage.affine_transform(image, matrix, offset, order=1, mode="nearest")
    label = ndimage.affine_transform(label, matrix, offset, order=0, mode="constant")
    grid = np.meshgrid(*[np.arange(p, dtype=np.float32) for p in PATCH], indexing="ij")
    coords = [g + ndimage.gaussian_filter(rng.uniform(-1, 1, PATCH), sigma=4) * 6
              for g in grid]
    image = ndimage.map_coordinates(image, coords, order=1, mode="nearest")
    label = ndimage.map_coordinates(label, coords, order=0, mode="constant")
    for axis in range(3):
        if rng.random() < 0.5:
            image, label = np.flip(image, axis), np.flip(label, axis)
    image = image + rng.normal(0, 0.02, size=image.shape)
    return image, label


def prepare_case(case: dict) -> dict:
    """The deterministic, expensive stage: load, crop to the body, resample to
    TARGET_SPACING_MM, window.  The same every epoch, so MPLoader can cache it
    (``prepare=prepare_case``): the image as float32 in [0, 1], the label as uint8."""
    image_hu, spacing = load(case["image"])
    label, _ = load(case["label"])
    box = foreground_box(image_hu)
    image = resample(image_hu[box].astype(np.float32), spacing, order=1)
    label = resample(label[box], spacing, order=0)
    low, high = HU_WINDOW
    image = (np.clip(image, low, high) - low) / (high - low)
    return {"image": np.ascontiguousarray(image, np.float32),
            "label": np.ascontiguousarray(label, np.uint8)}


def one_patch(prepared: dict, rng: np.random.Generator):
    """The random stage: a patch sampled from a prepared case, augmented;
    (image, label), each float32 of shape PATCH + (1,), ready for a 3D U-Net."""
    image, label = sample_patch(prepared["image"], prepared["label"], rng)
    image, label = augment(image, label, rng)
    return (np.ascontiguousarray(image, np.float32)[..., None],
            np.ascontiguousarray(label, np.float32)[..., None])


def patches(prepared: dict, count: int = PATCHES_PER_CASE):
    """``count`` patches of one prepared case (fn of a patch-based MPLoader:
    each one it yields is one element), drawn from the item's generator."""
    import mploader
    rng = mploader.item_rng()
    for _ in range(count):
        yield one_patch(prepared, rng)


def preprocess(case: dict, rng: np.random.Generator | None = None):
    """The whole chain for one patch, as a per-case map function would run it."""
    if rng is None:
        import mploader
        rng = mploader.item_rng()
    return one_patch(prepare_case(case), rng)


def describe(path: str) -> dict:
    """Header facts of any NIfTI file: shape, spacing, orientation, data type."""
    image = nib.load(path)
    return {"file": path.rsplit("/", 1)[-1], "shape": np.array(image.shape, np.int64),
            "spacing_mm": np.array(image.header.get_zooms()[:3], np.float32),
            "orientation": "".join(nib.aff2axcodes(image.affine)),
            "dtype": str(image.get_data_dtype())}
