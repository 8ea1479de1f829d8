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


def prepare_drawing(item) -> tuple:
    """A prepare that draws from every source it is seeded with: the item and its draws."""
    return item, float(np.random.rand()), random.random(), JITTER(0)


def given(x):
    """fn: what prepare gave."""
    return x


class Randomizable:
    """MONAI's shape (monai.transforms.Randomizable): its own ``R``, which the
    worker reseeds in place, as it does MONAI's (its method's module says
    monai: see random_state._way_to_reseed)."""

    def __init__(self) -> None:
        self.R = np.random.RandomState(0)

    def set_random_state(self, seed=None, state=None):
        self.R = np.random.RandomState(seed)
        return self

    set_random_state.__module__ = "monai.transforms.transform"
    set_random_state.__qualname__ = "Randomizable.set_random_state"

    def __call__(self, x: float) -> float:
        return float(x + self.R.random_sample())


class Compose(Randomizable):
    """MONAI's Compose's shape: its set_random_state passes seeds on to the
    transforms it holds."""

    def __init__(self, transforms: list) -> None:
        super().__init__()
        self.transforms = transforms

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        for t in self.transforms:
            t.set_random_state(seed=int(self.R.randint(2**32, dtype="uint32")))
        return self

    set_random_state.__module__ = "monai.transforms.compose"
    set_random_state.__qualname__ = "Compose.set_random_state"

    def __call__(self, x: float) -> float:
        for t in self.transforms:
            x = t(x)
        return x


class BesideBigData:
    """fn holding big data beside its transforms: ``tables`` of plain values
    (cheap for the walk), and ``lists``: ``width`` empty lists in each of 11,
    each a value to walk into: 110,000 by default, more than the walk's budget,
    spent before it reaches ``aug``'s transforms."""

    def __init__(self, aug, width: int = 10_000) -> None:
        self.tables = [{"case": f"case{i:05d}", "image": f"images/{i:05d}.nii.gz", "label": i % 3,
                        "fold": i % 5, "age": 40.5, "sex": "F", "weight": 0.5, "site": None,
                        "flag": True, "volume": np.zeros(2)} for i in range(20_000)]
        self.lists = [[[] for _ in range(width)] for _ in range(11)]
        self.aug = aug

    def __call__(self, i: int) -> tuple:
        return i, self.aug(i)
