"""The medical demo's pipeline on tiny volumes: one training step, and the corrupt case both ways."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from mploader import MPLoader, WorkerError

pytestmark = pytest.mark.tf  # TensorFlow, and the demo extra (nibabel, scipy)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "medical_3d"))
try:
    import pipeline  # noqa: E402
    import synth  # noqa: E402
    from model import tiny_unet  # noqa: E402
except ModuleNotFoundError:  # a venv without the demo extra: `pytest -m "not tf"` deselects this module
    pipeline = synth = tiny_unet = None

TINY = (48, 48, 12)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return synth.make_dataset(tmp_path_factory.mktemp("nifti"), 3, shape=TINY)


def test_synthetic_cases_are_ct_like_and_anisotropic(cases):
    import nibabel as nib
    image = nib.load(cases[0]["image"])
    data = np.asanyarray(image.dataobj)
    assert data.dtype == np.int16 and data.shape == TINY
    assert data.min() < -900 and 0 < np.median(data[data > -500]) < 150
    spacing = image.header.get_zooms()
    assert spacing[2] > 2 * spacing[0]
    assert np.asanyarray(nib.load(cases[0]["label"]).dataobj).sum() > 0
    assert synth.is_truncated(cases[-1]["image"]) and not synth.is_truncated(cases[0]["image"])


def test_patch_based_pipeline_with_a_cached_prepare_trains_one_step(cases):
    """The demo's loader: k patches per case, load+resample cached."""
    patch = pipeline.PATCH + (1,)
    with MPLoader(pipeline.patches, cases[:-1], prepare=pipeline.prepare_case,
                  samples_per_item=pipeline.PATCHES_PER_CASE, num_workers=2, batch_size=2,
                  seed=0) as loader:
        assert len(loader) == (len(cases) - 1) * pipeline.PATCHES_PER_CASE // 2
        first = [x[0].copy() for x in loader]
        again = [x[0].copy() for x in loader]  # from the cache; another epoch's patches
        assert loader.stats()["cache"]["hits"] == len(cases) - 1
        assert len(first) == len(again) and not all(
            np.array_equal(a, b) for a, b in zip(first, again))
        ds = loader.dataset()
        assert ds.element_spec[0].shape[1:] == patch
        model = tiny_unet(pipeline.PATCH, width=4)
        history = model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_pipeline_output_is_the_same_on_any_worker(cases):
    def run(workers):
        with MPLoader(pipeline.preprocess, cases[:-1], num_workers=workers, seed=7) as loader:
            return list(loader)
    for (a_img, a_lab), (b_img, b_lab) in zip(run(1), run(2), strict=True):
        np.testing.assert_array_equal(a_img, b_img)
        np.testing.assert_array_equal(a_lab, b_lab)


def test_a_corrupt_case_is_skipped_and_reported_with_its_file(cases, caplog):
    with MPLoader(pipeline.preprocess, cases, num_workers=2, on_error="skip") as loader:
        out = list(loader.dataset().as_numpy_iterator())
    assert len(out) == len(cases) - 1
    assert [s.index for s in loader.skipped] == [len(cases) - 1]
    assert "case_corrupt_image.nii.gz" in loader.skipped[0].item
    assert "case_corrupt_image.nii.gz" in caplog.text


def test_a_corrupt_case_stops_the_job_naming_its_file(cases):
    with MPLoader(pipeline.preprocess, cases, num_workers=2) as loader:
        with pytest.raises(WorkerError) as info:
            list(loader)
    assert info.value.index == len(cases) - 1
    assert "case_corrupt_image.nii.gz" in str(info.value)


def test_real_nifti_files_from_nibabel_load_in_workers():
    from nibabel.testing import data_path
    files = sorted(str(p) for p in Path(data_path).glob("*.nii*") if "dconn" not in p.name)
    with MPLoader(pipeline.describe, files, num_workers=2) as loader:
        infos = {i["file"]: i for i in loader}
    assert tuple(infos["anatomical.nii"]["shape"]) == (33, 41, 25)
    np.testing.assert_allclose(infos["example4d.nii.gz"]["spacing_mm"], [2.0, 2.0, 2.2], rtol=1e-5)
