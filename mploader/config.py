"""A loader's options, checked once and frozen.

Every option is checked here, before anything starts, with an error that
names the option and the value; the result is frozen, so changing an option
of a running loader (``loader.batch_size = 8``) is an error, never a silent
no-op that the workers, already started with the old value, would ignore.
"""
from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass
from typing import Any, Callable

from . import resources
from .epochs import shard_of
from .layout import Padding
from .slots import MAX_ROWS
from .sources import Source


def check(condition: bool, message: str) -> None:
    """A ValueError with ``message`` unless ``condition``."""
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class Config:
    """The options of one loader (see MPLoader's docstring for each)."""
    num_workers: int
    ordered: bool
    batch_size: int | None
    drop_remainder: bool
    padding: Padding | None
    prefetch: int
    output_signature: Any
    seed: int | None
    shuffle: bool
    shard: tuple[int, int]
    samples_per_item: int | None
    samples: bool            # fn yields several samples (elements) per item
    timeout: float | None
    on_error: str
    on_worker_death: str
    close_timeout: float
    threads_per_worker: int = 1
    copy_fn_per_thread: bool = True
    backend: Any = "process"  # "process" (the local pool), or a ray_backend.RayBackend

    @classmethod
    def of(cls, fn: Callable[[Any], Any], source: Source, *, num_workers: int,
           ordered: bool, batch_size: int | None, drop_remainder: bool,
           padded_shapes: Any, padding_values: Any, prefetch: int, output_signature: Any,
           seed: int | None, shuffle: bool, shard: Any, samples_per_item: int | None,
           timeout: float | None, on_error: str, on_worker_death: str,
           close_timeout: float, threads_per_worker: int = 1,
           copy_fn_per_thread: bool = True, backend: Any = "process") -> Config:
        """The checked options (``num_workers`` already resolved from None)."""
        backend = backend_of(backend)
        check(isinstance(num_workers, numbers.Integral) and num_workers >= 1,
              f"num_workers must be an int >= 1 or None, not {num_workers!r}")
        if backend == "process":  # a local worker costs the parent descriptors
            resources.check_workers(int(num_workers))
        check(batch_size is None or (isinstance(batch_size, int) and batch_size >= 1),
              f"batch_size must be an int >= 1 or None, not {batch_size!r}")
        check(not drop_remainder or batch_size is not None,
              "drop_remainder=True needs batch_size: it drops the last, short batch")
        check(isinstance(prefetch, int) and prefetch >= 1,
              f"prefetch must be an int >= 1, not {prefetch!r}")
        check(isinstance(threads_per_worker, numbers.Integral)
              and not isinstance(threads_per_worker, bool)
              and 1 <= threads_per_worker <= MAX_ROWS,
              f"threads_per_worker must be an int from 1 to {MAX_ROWS}, "
              f"not {threads_per_worker!r}")
        check(backend == "process" or threads_per_worker == 1,
              "threads_per_worker > 1 runs in the local backend's worker processes; "
              "with the Ray backend, ask for more actors (num_workers) instead")
        check(isinstance(copy_fn_per_thread, bool),
              f"copy_fn_per_thread must be True or False, not {copy_fn_per_thread!r}")
        check(on_error in ("raise", "skip"),
              f"on_error must be 'raise' or 'skip', not {on_error!r}")
        check(on_worker_death in ("raise", "restart"),
              f"on_worker_death must be 'raise' or 'restart', not {on_worker_death!r}")
        check(timeout is None or (isinstance(timeout, numbers.Real) and timeout > 0),
              f"timeout must be > 0 (seconds) or None, not {timeout!r}")
        check(isinstance(close_timeout, numbers.Real) and close_timeout > 0,
              f"close_timeout must be > 0 (seconds), not {close_timeout!r}")
        check(seed is None or isinstance(seed, numbers.Integral),
              f"seed must be an int or None, not {seed!r}")
        check(isinstance(shuffle, bool), f"shuffle must be True or False, not {shuffle!r}")
        check(samples_per_item is None
              or (isinstance(samples_per_item, numbers.Integral) and samples_per_item >= 1),
              f"samples_per_item must be an int >= 1 or None, not {samples_per_item!r}")
        samples = samples_per_item is not None or inspect.isgeneratorfunction(fn)
        padded = padded_shapes is not None or padding_values is not None
        check(not padded or batch_size is not None,
              "padded_shapes and padding_values need batch_size: they pad the items of a batch")
        check(not padded or not samples,
              "padded batches are made in the workers from one result per item; a fn that "
              "yields samples is batched in the parent, without padding")
        padding = Padding(padded_shapes, padding_values) if padded else None
        if padding is not None and output_signature is not None:
            padding.check_signature(output_signature)  # a pad value that cannot fit
        shards = shard_of(shard)
        if (shuffle or shards[1] > 1) and not source.indexable:
            what = "shuffle=True" if shuffle else f"shard={shard!r}"
            raise TypeError(
                f"{what} needs a source with len() and [] (a sequence or an int), to read "
                f"any index of it; this source is a {source.kind}.  Pass a list "
                "of the items (e.g. file paths), or an int and index your data in fn")
        if shuffle and shards[1] > 1 and seed is None:
            raise ValueError(
                f"shuffle=True with shard={shards} needs seed=: every shard's loader "
                "shuffles the whole source and keeps its part, so all of them must draw "
                "the same order. A seed drawn on each host would give each its own order, "
                "and the shards would overlap and miss items. Pass the same seed=... to "
                "the loader of every shard")
        return cls(num_workers=int(num_workers), ordered=ordered, batch_size=batch_size,
                   drop_remainder=drop_remainder, padding=padding, prefetch=prefetch,
                   output_signature=output_signature, seed=None if seed is None else int(seed),
                   shuffle=shuffle, shard=shards,
                   samples_per_item=None if samples_per_item is None else int(samples_per_item),
                   samples=samples, timeout=timeout, on_error=on_error,
                   on_worker_death=on_worker_death, close_timeout=close_timeout,
                   threads_per_worker=int(threads_per_worker),
                   copy_fn_per_thread=copy_fn_per_thread, backend=backend)


def backend_of(value: Any) -> Any:
    """The ``backend`` option checked: "process", or a RayBackend ("ray" is
    ``RayBackend()``, the defaults).  Ray itself is not imported here."""
    from .ray_backend import RayBackend
    if isinstance(value, RayBackend) or (isinstance(value, str) and value == "process"):
        return value
    if isinstance(value, str) and value == "ray":
        return RayBackend()
    raise ValueError(f"backend must be 'process', 'ray' or a mploader.RayBackend(...), "
                     f"not {value!r}")
