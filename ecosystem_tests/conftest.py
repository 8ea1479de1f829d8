"""The ecosystem tests run under the main suite's leak check (tests/conftest.py):
no child process and no /dev/shm entry may outlive a test."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import no_leaks  # noqa: F401 - an autouse fixture, used by being here


@pytest.fixture(scope="session")
def volume(tmp_path_factory) -> str:
    """A 24x24x24 float32 NIfTI volume written by nibabel, the same for every item."""
    path = tmp_path_factory.mktemp("nifti") / "case.nii.gz"
    data = np.linspace(0, 1, 24 ** 3, dtype=np.float32).reshape(24, 24, 24)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return str(path)
