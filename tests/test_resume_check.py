"""mploader.testing.assert_resume_exact: the resume check users run on their own
pipeline passes on loaders whose resume is exact, and names the first element
that differs on one whose state is wrong."""
from __future__ import annotations

import numpy as np
import pytest

from mploader import MPLoader, item_rng
from mploader.testing import assert_resume_exact

from . import helpers


def noisy_patches(i):
    """Two samples per item from item_rng(); item 5 fails (skipped)."""
    if i == 5:
        raise ValueError("unreadable")
    for _ in range(2):
        yield np.float32(i) + item_rng().random(2).astype(np.float32)


def test_exact_resume_of_shuffled_batches_at_every_element_and_epoch_end():
    def make(workers):
        return MPLoader(helpers.nest, 11, num_workers=workers, shuffle=True, seed=3,
                        batch_size=3)
    assert assert_resume_exact(make, epochs=2, every=1) == 2 * (4 + 1)


def test_exact_resume_of_samples_with_skips_on_another_worker_count():
    def make(workers):
        return MPLoader(noisy_patches, 8, num_workers=workers, samples_per_item=2,
                        on_error="skip", shuffle=True, seed=0)
    assert assert_resume_exact(make, epochs=2, every=3, workers=(1, 3)) > 4


class OffByOne(MPLoader):
    """A loader whose saved position is one element late: a resume skips one."""

    def state_dict(self):
        state = super().state_dict()
        state["position"] += 1 if state["position"] < 10 else 0
        return state


def test_a_wrong_state_is_caught_and_the_first_differing_element_named():
    with pytest.raises(AssertionError, match=r"interrupted after element 0 of epoch 0, "
                                             r"resumed: epoch 0, element 0 differs: expected"):
        assert_resume_exact(lambda workers: OffByOne(helpers.slow_square, 10,
                                                     num_workers=workers), epochs=1)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="via must be"):
        assert_resume_exact(lambda w: MPLoader(helpers.slow_square, 3, num_workers=w), via="x")


@pytest.mark.tf
def test_exact_resume_through_dataset():
    def make(workers):
        return MPLoader(helpers.nest, 9, num_workers=workers, shuffle=True, seed=1)
    assert assert_resume_exact(make, epochs=2, every=4, via="dataset") == 2 * (3 + 1)
