"""A small, deterministic synthetic CT dataset written as NIfTI files.

Each case is a CT-like int16 volume (air at -1000 HU, a body ellipse around
40 HU with smooth texture and noise, an organ-like ellipsoid at 90 HU) and a
uint8 label of the organ, with anisotropic voxel spacing that differs per case
(as real scans do), saved as ``.nii.gz`` with the spacing in the affine.  One
extra case is truncated on purpose, as a corrupt download would be.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


def make_case(index: int, shape: tuple[int, int, int], seed: int = 0):
    """(image int16, label uint8, spacing in mm) for case ``index``."""
    rng = np.random.default_rng([seed, index])
    in_plane = rng.uniform(0.7, 1.0)
    spacing = (in_plane, in_plane, rng.uniform(2.5, 4.0))
    mm = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    extent = [n * s for n, s in zip(shape, spacing)]
    centre = [e / 2 for e in extent]
    body = (((mm[0] - centre[0]) / (0.42 * extent[0])) ** 2
            + ((mm[1] - centre[1]) / (0.34 * extent[1])) ** 2) <= 1
    texture = ndimage.gaussian_filter(rng.normal(size=shape), sigma=3) * 120
    image = np.where(body, 40 + texture, -1000.0)
    organ_centre = [c + rng.uniform(-0.15, 0.15) * e for c, e in zip(centre, extent)]
    radii = rng.uniform(0.12, 0.2, size=3) * np.array(extent[:2] + [extent[2] * 1.5])
    organ = sum(((m - c) / r) ** 2 for m, c, r in zip(mm, organ_centre, radii)) <= 1
    organ &= body
    image = np.where(organ, 90 + texture * 0.5, image)
    image += rng.normal(0, 12, size=shape)
    return image.astype(np.int16), organ.astype(np.uint8), spacing


def _save(array: np.ndarray, spacing, path: Path) -> None:
    affine = np.diag(list(spacing) + [1.0])
    nib.save(nib.Nifti1Image(array, affine), str(path))


def make_dataset(folder: str | os.PathLike, n_cases: int, shape=(96, 96, 40), seed: int = 0,
                 corrupt: bool = True) -> list[dict[str, str]]:
    """Write (or reuse) the cases; returns [{"name", "image", "label"}], corrupt one last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for index in range(n_cases):
        name = f"case_{index:03d}_{shape[0]}x{shape[1]}x{shape[2]}_s{seed}"
        image_path, label_path = folder / f"{name}_image.nii.gz", folder / f"{name}_label.nii.gz"
        if not (image_path.exists() and label_path.exists()):
            image, label, spacing = make_case(index, shape, seed)
            _save(image, spacing, image_path)
            _save(label, spacing, label_path)
        cases.append({"name": name, "image": str(image_path), "label": str(label_path)})
    if corrupt:
        good = cases[0]
        bad_image = folder / "case_corrupt_image.nii.gz"
        data = Path(good["image"]).read_bytes()
        bad_image.write_bytes(data[: len(data) // 2])  # a download cut in half
        cases.append({"name": "case_corrupt", "image": str(bad_image), "label": good["label"]})
    return cases


def is_truncated(path: str) -> bool:
    """True if a .nii.gz file cannot be decompressed to its end."""
    try:
        with gzip.open(path) as f:
            while f.read(1 << 20):
                pass
        return False
    except (EOFError, OSError):
        return True
