"""For comparison only: a cache that every worker holds for itself.

This is what MONAI's ``CacheDataset`` amounts to once its workers are
spawned (or once per rank under DDP): every process holds its own copy of
every prepared case, so the cache's memory grows with the number of
workers.  The demo and ``make bench`` measure it against
``MPLoader(..., prepare=prepare_case)``, whose one copy all workers share.
"""
from __future__ import annotations

import functools
from typing import Callable

import pipeline

_own_copies: dict[str, dict] = {}  # in each worker process


def filler(cases: list[dict]) -> Callable[[int], None]:
    """worker_init: prepare every case into this worker's own cache, as
    CacheDataset does when it is built.  (A partial of a module function, so
    the worker imports it, and fills this module's dict, not a pickled copy.)"""
    return functools.partial(_fill, cases)


def _fill(cases: list[dict], _worker_id: int) -> None:
    for case in cases:
        _own_copies[case["image"]] = pipeline.prepare_case(case)


def patches_from_own_copy(case: dict, count: int = pipeline.PATCHES_PER_CASE):
    """fn: ``pipeline.patches`` of the case, from this worker's own copy."""
    yield from pipeline.patches(_own_copies[case["image"]], count)
