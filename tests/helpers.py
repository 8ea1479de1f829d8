"""Functions the tests run in workers.  A module of its own, so the workers
import it by reference (as users' own modules are) rather than by value."""
from __future__ import annotations

import time

import numpy as np

import mploader


def slow_square(x: int) -> int:
    """x*x after a delay that varies per item, so completion order is scrambled."""
    time.sleep(((x * 7919) % 13) / 1000)
    return x * x


def nest(x: int):
    return {"image": np.full((2, 3), x, np.float32), "meta": (np.int64(x), f"id{x}", b"raw"),
            "label": x % 3}


def variable(x: int) -> np.ndarray:
    return np.arange(x % 5 + 1, dtype=np.int32) + x


def augmented(x: int) -> np.ndarray:
    """Uses both item_rng() and the legacy global numpy generator."""
    return np.concatenate([mploader.item_rng().normal(size=3), np.random.rand(2)]) + x


def fail_on_7(x: int) -> int:
    if x == 7:
        raise ValueError(f"bad item {x}")
    return x


def pid_of_worker(_x):
    import os
    return os.getpid()


def hang_on_2500(x: int) -> int:
    if x == 2500:
        time.sleep(60)
    return x


def die_on_5(x: int) -> int:
    """Item 5 ends its worker the way named by the MPLOADER_TEST_DEATH variable."""
    import ctypes
    import os
    import signal
    if x == 5:
        how = os.environ["MPLOADER_TEST_DEATH"]
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif how == "segfault":
            ctypes.string_at(0)
        elif how == "exit3":
            os._exit(3)
    time.sleep(0.01)
    return x


def sleep_ms(ms: int) -> int:
    time.sleep(ms / 1000)
    return ms


def sleep_forever_on_3(x: int) -> int:
    if x == 3:
        time.sleep(600)
    return x


def stall_once(path: str):
    """Returns fn: the first call for item 4 stalls (as a hung NFS read would), later ones do not."""
    def fn(x: int) -> int:
        import os
        if x == 4 and not os.path.exists(path):
            open(path, "w").close()
            time.sleep(600)
        return x
    return fn


def image(i):
    """A 224x224x3 float32 image whose every value names its item."""
    return np.full((224, 224, 3), i, np.float32) + np.arange(3, dtype=np.float32)


def ragged(i):
    """Items of varying shape (a volume whose depth varies), failing on 13."""
    if i == 13:
        raise ValueError("unreadable case 13")
    return np.full((i % 4 + 1, 8), i, np.int32)


def slow_item(i):
    time.sleep(0.02)
    return np.float32(i)


def slow_last(i):
    """Item 9 takes 1 s, then fails."""
    if i == 9:
        time.sleep(1.0)
        raise ValueError("slow and bad")
    return np.float32(i)


def small_record(x: int) -> dict:
    """A small fixed-shape element (several go per TensorFlow call); item 7 fails."""
    if x == 7:
        raise ValueError(f"bad item {x}")
    return {"x": np.full(4, x, np.float32), "label": (np.int64(x % 3), x % 2 == 0)}


def empty_leaf(x: int) -> tuple:
    """A leaf with no values next to a scalar: TensorFlow's unbatch cannot take it."""
    return np.zeros((0, 3), np.float32), np.int64(x)


def float8_leaf(x: int) -> np.ndarray:
    """A dtype numpy knows through ml_dtypes (TensorFlow's float8) that unbatch cannot take."""
    import ml_dtypes
    return np.full(2, x % 8, ml_dtypes.float8_e4m3fn)


def large_record(x: int) -> dict:
    """A large fixed-shape element (through dataset(), grouped by the
    workers); Python scalars beside the array, item 7 fails."""
    if x == 7:
        raise ValueError(f"bad item {x}")
    return {"image": np.full((128, 128, 4), x, np.float32), "label": (x % 3, x % 2 == 0)}


def large_float64_on_11(x: int) -> np.ndarray:
    """A 256 KiB float32 element, but float64 for item 11 (a file of another dtype)."""
    return np.full((64, 1024), x, np.float64 if x == 11 else np.float32)


def large_odd_leaf_on_5(x: int) -> tuple:
    """Item 5's label is an object nothing can send."""
    return np.full((256, 256), x, np.float32), (object() if x == 5 else x)


_BUFFER = np.zeros((256, 256), np.float32)


def large_one_buffer(x: int) -> np.ndarray:
    """Fills and returns the same buffer every time (a preallocated output)."""
    _BUFFER.fill(x)
    return _BUFFER


def large_kill_once(path: str):
    """Returns fn: the first call for item 13 kills its worker, later ones do not."""
    def fn(x: int) -> np.ndarray:
        import os
        import signal
        if x == 13 and not os.path.exists(path):
            open(path, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return np.full((256, 256), x, np.float32)
    return fn


def large_slow(x: int) -> np.ndarray:
    """A 256 KiB element that takes 70 ms (groups of slow items are short)."""
    time.sleep(0.07)
    return np.full((128, 128, 4), x, np.float32)


def volume_80mib(x: int) -> np.ndarray:
    """An 80 MiB volume: two of them are over a worker's lease budget (128 MiB)."""
    return np.full(20 << 20, x, np.float32)


def sized_rows(size: int, fail: int | None = None):
    """Returns fn: item i a uint8 row of ``size`` bytes that costs no memory (a
    zero-stride broadcast), item 0 of ``size`` and the others 16 bytes when
    ``size`` is negative; item ``fail`` raises."""
    def fn(i: int) -> np.ndarray:
        if i == fail:
            raise ValueError(f"item {i} fails")
        n = abs(size) if size > 0 or i == 0 else 16
        return np.broadcast_to(np.uint8(i), (n,))
    return fn


def stamped_sleep(item: tuple[str, int]) -> int:
    """Append ``i start_time`` to the file ``path``, then sleep 0.1 s: when each item began."""
    path, i = item
    with open(path, "a") as f:
        f.write(f"{i} {time.monotonic()}\n")
    time.sleep(0.1)
    return i
