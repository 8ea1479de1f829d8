"""Random objects and the functions that use them, for test_random_state.py.

A module of its own, imported by reference in the workers (as users' modules
are): each worker builds ``JITTER`` anew at import, from the same seed, which
is the situation of every library transform unpickled in several workers.
"""
from __future__ import annotations

import os
import random

import numpy as np

import mploader


class Jitter:
    """A user's own random object, taking part through the protocol:
    ``set_random_state(seed=...)``.  Starts from seed 0 in every process."""

    def __init__(self) -> None:
        self.rng = np.random.RandomState(0)

    def set_random_state(self, seed: int) -> None:
        self.rng = np.random.RandomState(seed)

    def __call__(self, x: float) -> float:
        return float(x + self.rng.random_sample())


class GeneratorsApi:
    """albumentations 2.x's shape: ``set_random_state`` takes generators,
    ``set_random_seed`` takes the seed."""

    def __init__(self) -> None:
        self.set_random_seed(0)

    def set_random_state(self, random_generator: np.random.Generator,
                         py_random: random.Random) -> None:
        self.random_generator, self.py_random = random_generator, py_random

    def set_random_seed(self, seed: int) -> None:
        self.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __call__(self, x: float) -> float:
        return float(x + self.random_generator.random() + self.py_random.random())


class BrokenState(Jitter):
    def set_random_state(self, seed: int) -> None:
        raise ValueError("this transform cannot be reseeded")


JITTER = Jitter()
WORKER_BUILT: Jitter | None = None


def jittered(i: int) -> float:
    return JITTER(i)


def build_in_worker_init(_worker_id: int) -> None:
    global WORKER_BUILT
    WORKER_BUILT = Jitter()


def jittered_by_worker_init_object(i: int) -> float:
    return WORKER_BUILT(i)


def every_source(i: int) -> tuple:
    """A draw from each kind of source a worker seeds, but torch."""
    return (i, JITTER(0), float(np.random.rand()), random.random(),
            float(mploader.item_rng().random()))


def patches(i: int):
    """A generator fn: three samples per item, each jittered."""
    for s in range(3):
        yield np.float64(JITTER(10 * i + s))


def die_once_on_5(flag: str):
    """fn: jittered, and the first time item 5 comes its worker dies."""
    def fn(i: int) -> float:
        if i == 5 and not os.path.exists(flag):
            open(flag, "w").close()
            os._exit(3)
        return JITTER(i)
    return fn


def prepare_with_randomness(i: int) -> float:
    """A prepare that draws random numbers (it should not: it is cached)."""
    return float(i + np.random.rand() + JITTER(0))
