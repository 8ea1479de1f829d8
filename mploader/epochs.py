"""The order of an epoch, its shards, and the state that resumes it exactly.

An epoch visits positions ``0 .. n-1`` of its *global order*; position ``p``
reads source index ``p`` or, with ``shuffle``, ``permutation(p)``, where the
permutation depends only on ``(seed, epoch, n)``: never on the workers,
``prefetch`` or timing.  The permutation is a keyed Feistel network over the
smallest even power of two ``>= n`` with cycle walking (the construction of
Grain's index_shuffle and of format-preserving encryption), computed in numpy
blocks: O(1) memory, no list per epoch, a fraction of a microsecond per index.

A *plan* says what one loader reads of an epoch.  Starting from a global
position ``base`` (0 for a fresh epoch), shard ``k`` of ``K`` takes positions
``base + k + K*j`` for steps ``j = 0 .. (n - base) // K - 1``: the shards are
disjoint, every one takes the same number of steps (collective ops hang when
one host runs out first), and the ``(n - base) % K`` last positions are left
out of the epoch; with shuffle that tail is a different set of items every
epoch.

The state a loader saves is ``(epoch, position, ahead)``: every global
position before ``position`` is handed out, counting every shard as having
taken as many steps as this one (they stop at the same step: a training step
takes one batch on every replica), plus, for ``ordered=False``, the positions
this shard handed out beyond that.  Nothing about workers, so any
``num_workers``, ``prefetch`` or ``ordered`` restores it.  For a ``fn``
that yields several samples per item, ``samples`` counts the samples already
handed out of items begun but not finished (position -> count); the resumed
pass runs such an item again (its ``item_rng`` gives the same samples) and
drops that many.  When ``ahead`` and ``samples`` are empty, any shard count (elastic resume: the rest of the epoch is split
over the new shards from ``position``).
"""
from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

log = logging.getLogger("mploader")

STATE_FORMAT = "mploader.state/1"
_ROUNDS = 6            # Feistel rounds: enough mixing for a shuffle, cheap in numpy
_BLOCK = 1024          # positions permuted per numpy call
_M1 = np.uint64(0xBF58476D1CE4E5B9)   # splitmix64's finalizer constants
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """A 64-bit integer hash (splitmix64's finalizer), elementwise, wrapping."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A bijection of ``range(n)`` chosen by ``(seed, epoch)``, evaluated per block."""

    def __init__(self, n: int, seed: int, epoch: int) -> None:
        self.n = n
        self._half = max(1, ((max(n, 2) - 1).bit_length() + 1) // 2)
        self._mask = np.uint64((1 << self._half) - 1)
        keys = np.random.SeedSequence([seed % (1 << 64), epoch]).generate_state(
            _ROUNDS, dtype=np.uint64)
        self._keys = [np.uint64(k) for k in keys]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self._half)
        left, right = x >> half, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (_mix(right ^ key) & self._mask)
        return (left << half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The source indices at ``positions`` (each in ``range(n)``)."""
        x = self._encrypt(positions.astype(np.uint64))
        outside = x >= self.n
        while outside.any():  # cycle walking: stays inside range(n), still a bijection
            x[outside] = self._encrypt(x[outside])
            outside = x >= self.n
        return x.astype(np.int64)


def shard_of(shard: Any) -> tuple[int, int]:
    """``(index, count)`` from ``None``, a pair, or a ``tf.distribute.InputContext``."""
    if shard is None:
        return 0, 1
    if hasattr(shard, "input_pipeline_id") and hasattr(shard, "num_input_pipelines"):
        shard = (shard.input_pipeline_id, shard.num_input_pipelines)
    try:
        index, count = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise ValueError(f"shard must be (index, count) or a tf.distribute.InputContext, "
                         f"not {shard!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard={shard!r}: need count >= 1 and 0 <= index < count")
    return index, count


@dataclass(frozen=True)
class Plan:
    """What one loader reads of one epoch (see the module docstring)."""
    n: int | None          # source length (None: an iterable without len, unsharded)
    epoch: int
    shuffle: bool
    seed: int
    shard: int = 0
    shards: int = 1
    base: int = 0          # global position the steps count from
    start: int = 0         # first step of this pass (a resume inside the epoch)
    ahead: frozenset[int] = field(default_factory=frozenset)  # steps >= start already out
    partial: tuple[tuple[int, int], ...] = ()   # (step, samples already out) of begun items

    def steps(self) -> int | None:
        """Steps of this shard in the epoch (from ``base``), None without a length."""
        return None if self.n is None else (self.n - self.base) // self.shards

    def remaining(self) -> int | None:
        """Steps this pass will hand out."""
        total = self.steps()
        return None if total is None else total - self.start - len(self.ahead)

    def position(self, step: int) -> int:
        return self.base + self.shard + self.shards * step

    def read(self, source: Any) -> Iterator[tuple[int, int, Any]]:
        """(step, source index, item) of this pass, in order."""
        total = self.steps()
        if total is None or not source.indexable:  # read, and drop what is already out
            items = itertools.islice(source.items(), self.base + self.start, None)
            for step, item in enumerate(items, self.start):
                if step not in self.ahead:
                    yield step, self.base + step, item
            return
        permutation = Permutation(self.n, self.seed, self.epoch) if self.shuffle else None
        for first in range(self.start, total, _BLOCK):
            steps = [j for j in range(first, min(first + _BLOCK, total)) if j not in self.ahead]
            positions = self.base + self.shard + self.shards * np.asarray(steps, np.int64)
            indices = permutation(positions) if permutation is not None else positions
            for step, index in zip(steps, indices.tolist()):
                yield step, index, source.item(index)


@dataclass(frozen=True)
class Record:
    """What handing out one element completes of its epoch: it travels with
    the element, and the epoch's progress advances when the consumer takes
    the element (``Progress.apply``), not when the pass makes it.

    ``handed``: steps whose items are now wholly out (the element's own, and
    those of items skipped just before it); ``sampled``: one step per sample
    out of an item not finished yet; ``ended``: the pass ran to its end.  A
    batch gathered in the parent carries the sum of its samples' records.
    """
    epoch: int
    handed: tuple[int, ...] = ()
    sampled: tuple[int, ...] = ()
    ended: bool = False

    def __add__(self, other: Record) -> Record:
        return Record(self.epoch, self.handed + other.handed, self.sampled + other.sampled,
                      self.ended or other.ended)

    def __bool__(self) -> bool:
        return bool(self.handed or self.sampled or self.ended)


class Progress:
    """The steps of one pass handed out so far: a prefix, and the steps beyond it.

    ``least`` is the fewest steps that still make an element (``batch_size``
    with ``drop_remainder``, else 1): fewer left, and the epoch is over.
    """

    def __init__(self, plan: Plan, least: int = 1, per_step: int | None = 1) -> None:
        self.plan = plan
        self.least = least                # in elements' units: items, or samples
        self.per_step = per_step          # samples per item: 1 without, None unknown
        self.prefix = plan.start          # every step before it is out
        self.ahead = set(plan.ahead)      # steps >= prefix that are out
        self.partial = dict(plan.partial)  # step -> samples out, of items not finished
        self.ended = False                # the pass ran to its end
        # handed() runs on the pass's thread, state() on any (a checkpoint
        # saved while TensorFlow's thread drives the generator).
        self._lock = threading.Lock()
        # Applies what was handed out but waits in TensorFlow, counted only
        # once the consumer took it (tf/grouping.py); state() runs it first.
        self.settle: Callable[[], None] | None = None

    def apply(self, record: Record) -> None:
        """The consumer took the element ``record`` came with: samples first
        (an item's last sample, in the same record, then ends it), then steps."""
        if record.epoch != self.plan.epoch:
            raise AssertionError(f"a record of epoch {record.epoch} applied to the "
                                 f"progress of epoch {self.plan.epoch}")
        with self._lock:
            for step in record.sampled:
                self.partial[step] = self.partial.get(step, 0) + 1
        if record.handed:
            self.handed(record.handed)
        if record.ended:
            self.ended = True

    def handed(self, steps: tuple[int, ...]) -> None:
        with self._lock:
            if len(steps) == 1 and steps[0] == self.prefix and not self.ahead:
                self.partial.pop(self.prefix, None)
                self.prefix += 1  # the common case: the next step in order
                return
            for step in steps:
                self.partial.pop(step, None)
            self.ahead.update(steps)
            while self.prefix in self.ahead:
                self.ahead.discard(self.prefix)
                self.prefix += 1

    def taken_all(self) -> bool:
        """The consumer took the whole pass (what waits in TensorFlow's
        buffers counts once it is taken: ``settle``)."""
        if self.settle is not None:
            self.settle()
        return self.done()

    def done(self) -> bool:
        total = self.plan.steps()
        if self.ended or total is None:
            return self.ended
        steps_left = total - self.prefix - len(self.ahead)
        if self.per_step is None:  # samples left unknown: over when every item is out
            return steps_left == 0
        return steps_left * self.per_step - sum(self.partial.values()) < self.least

    def state(self, fingerprint: dict[str, Any], then: int | None) -> dict[str, Any]:
        """The JSON-serialisable state (see the module docstring).  ``then``:
        the epoch after this one; an epoch with nothing left is that epoch's
        start, and one under way says it when it is not simply the next
        (``set_epoch`` during the pass), so a resume goes on to it too."""
        if self.settle is not None:
            self.settle()
        plan = self.plan
        with self._lock:
            epoch, position = plan.epoch, plan.base + plan.shards * self.prefix
            ahead = sorted(plan.position(step) for step in self.ahead)
            samples = {str(plan.position(step)): count for step, count in self.partial.items()}
            done = self.done()
        state = {"format": STATE_FORMAT, "epoch": epoch, "position": position,
                 "ahead": ahead, "samples": samples, "shard": [plan.shard, plan.shards],
                 "seed": plan.seed, "fingerprint": fingerprint}
        if then is not None and done:
            state.update(epoch=then, position=0, ahead=[], samples={})
        elif then is not None and then != epoch + 1:
            state["next_epoch"] = then
        return state


class Epochs:
    """The one owner of the epoch's state: the epoch the next pass runs, the
    progress of the newest pass, and a restored point the next pass starts at.

    Every pass begins here (:meth:`plan`, :meth:`begin`), ``set_epoch`` and
    the Keras callback change only what the *next* pass runs, and
    :meth:`state` describes the pass under way, or the next one's start when
    none is.  So ``set_epoch`` during a pass never makes the state lose the
    rest of that pass, and the Keras callback, which names the epoch that
    begins in Keras's count (:meth:`follow`), never sends the loader back to
    an order it already ran.  The loader calls it under its lock; ``state``
    may also run on TensorFlow's thread (Progress has its own lock).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed                       # of every epoch's order
        self.resume: Resume | None = None      # load_state_dict(): where the next pass starts
        self._next = 0                         # the epoch of the next pass
        self._progress: Progress | None = None  # of the newest pass
        self._running: Callable[[], bool] = lambda: False  # is the newest pass going on?
        self._trained: int | None = None   # Keras: the highest epoch a pass ran since fit began
        self._again: int | None = None     # set_epoch(e) while a pass of e was under way

    def plan(self, n: int | None, shuffle: bool, shard: tuple[int, int]) -> Plan:
        """What the next pass reads: the rest of a restored epoch, or a whole one."""
        if self.resume is not None:
            return self.resume.plan(n, shuffle, shard)
        epoch = self._next
        if self._again is not None and self._progress is not None and not self._progress.taken_all():
            epoch = self._again  # that pass was left unfinished: epoch e from its start
        return Plan(n, epoch, shuffle, self.seed, *shard)

    def begin(self, plan: Plan, progress: Progress, running: Callable[[], bool]) -> None:
        """The pass of ``plan`` starts; ``running()`` says whether it goes on."""
        then = self.resume.then if self.resume is not None else None
        self.resume, self._again = None, None
        self._next = plan.epoch + 1 if then is None else then
        self._progress, self._running = progress, running
        if self._trained is not None:
            self._trained = max(self._trained, plan.epoch)

    def running_epoch(self) -> int | None:
        """The epoch of the pass under way (begun, neither ended nor left), or None."""
        progress = self._progress
        if progress is None or not self._running():
            return None
        if progress.taken_all():
            return None
        return progress.plan.epoch

    def set_epoch(self, epoch: int) -> None:
        """The next pass runs ``epoch`` from its start, unless a restored state
        starts inside it.  While a pass of ``epoch`` is under way, which of two
        things the caller means shows only later: if that pass runs to its end,
        it was epoch ``epoch`` (a callback announcing the epoch it is in), and
        the next pass is ``epoch + 1``; if a new pass starts before it ends (a
        peek, a ``break``), the next pass is ``epoch`` from its start."""
        self._again = None
        if epoch == self.running_epoch():
            self._again = epoch
            return
        if self.resume is not None:
            if self.resume.epoch == epoch:
                return
            log.warning("set_epoch(%d) drops the restored state, which was inside epoch %d",
                        epoch, self.resume.epoch)
            self.resume = None
        self._next = epoch
        if self.running_epoch() is None:
            self._progress = None  # state(): the start of that epoch

    def follow(self, epoch: int) -> None:
        """Keras's epoch ``epoch`` begins: :meth:`set_epoch`, unless a pass begun
        during this training already ran that epoch or a later one (with
        ``steps_per_epoch`` over ``.repeat()`` passes and Keras's epochs do not
        line up, and a pass may be ahead of Keras's count: going back would
        run an order twice).  Passes begun before training (Keras may read a
        dataset once before its first epoch, to build the model) do not count:
        training gets its epoch 0 from its start."""
        self._trained = -1 if self._trained is None else self._trained
        if self._trained < epoch:
            self.set_epoch(epoch)

    def load(self, resume: Resume) -> None:
        """The next pass continues where ``resume`` says."""
        self.seed = resume.seed
        self.resume = resume
        self._next = resume.epoch
        self._progress = None

    def state(self, fingerprint: dict[str, Any], progress_of: Callable[[Plan], Progress],
              n: int | None, shuffle: bool, shard: tuple[int, int]) -> dict[str, Any]:
        """The state of the pass under way or just ended (then the next
        epoch's start), else the next pass's start (or the restored point)."""
        if self._progress is not None:
            return self._progress.state(fingerprint, self._next)
        return progress_of(self.plan(n, shuffle, shard)).state(
            fingerprint, self.resume.then if self.resume is not None else None)


@dataclass(frozen=True)
class Resume:
    """A parsed state: where the next pass starts."""
    epoch: int
    position: int
    ahead: tuple[int, ...]
    shard: tuple[int, int]
    seed: int
    samples: tuple[tuple[int, int], ...] = ()   # (position, samples out) of begun items
    then: int | None = None  # the epoch after this one, when set_epoch chose it

    def plan(self, n: int | None, shuffle: bool, shard: tuple[int, int]) -> Plan:
        """The plan of the interrupted epoch's rest for the shard ``shard``."""
        index, count = shard
        base, start, ahead, partial = self.position, 0, frozenset(), ()
        if (self.ahead or self.samples) and shard != self.shard:
            raise ValueError(
                f"this state was saved by shard {list(self.shard)} with elements handed "
                f"out beyond its position ({len(self.ahead)} items ahead with "
                f"ordered=False, {len(self.samples)} items part-way through their "
                f"samples); it restores only on that shard (here: {list(shard)})")
        # ``position`` counts the old shards' steps from their base; the steps
        # ahead and part-way are this shard's own, relative to the same base.
        ahead = frozenset((p - base - index) // count for p in self.ahead)
        partial = tuple(((p - base - index) // count, c) for p, c in self.samples)
        return Plan(n, self.epoch, shuffle, self.seed, index, count, base, start, ahead,
                    partial)


def fingerprint(n: int | None, shuffle: bool, batch_size: int | None,
                drop_remainder: bool, samples_per_item: int | None) -> dict[str, Any]:
    """What must match between the loader that saved a state and the one loading it."""
    return {"source_len": n, "shuffle": shuffle, "batch_size": batch_size,
            "drop_remainder": drop_remainder, "samples_per_item": samples_per_item}


def parse_state(state: Any, expected: dict[str, Any]) -> Resume:
    """Check a state against this loader; an error names the field that differs."""
    if (not isinstance(state, dict) or state.get("format") != STATE_FORMAT
            or not isinstance(state.get("fingerprint"), dict)):
        raise ValueError(f"not a state of MPLoader.state_dict() (format {STATE_FORMAT!r} "
                         f"with a fingerprint): {str(state)[:200]}")
    saved = state["fingerprint"]
    for name, value in expected.items():
        if saved.get(name) != value:
            raise ValueError(f"the state does not fit this loader: {name} was "
                             f"{saved.get(name)!r} when it was saved, and is {value!r} now")
    ahead, shard, samples = state.get("ahead"), state.get("shard"), state.get("samples", {})
    fields = {"epoch": state.get("epoch"), "position": state.get("position"),
              "seed": state.get("seed")}
    if isinstance(ahead, list):
        fields.update((f"ahead[{i}]", p) for i, p in enumerate(ahead))
    if isinstance(shard, list) and len(shard) == 2:
        fields.update({"shard[0]": shard[0], "shard[1]": shard[1]})
    if isinstance(samples, dict):
        for key, count in samples.items():
            fields[f"samples[{key!r}]"] = count
            fields[f"the position {key!r} in samples"] = int(key) if key.isdigit() else key
    for name, value in fields.items():
        if type(value) is not int or (value < 0 and name != "seed"):
            raise ValueError(f"a malformed state: {name} is {value!r}, not an int >= 0")
    if (not isinstance(ahead, list) or not isinstance(shard, list) or len(shard) != 2
            or not isinstance(samples, dict)):
        raise ValueError(f"a malformed state: ahead {ahead!r}, shard {shard!r}, "
                         f"samples {samples!r}")
    then = state.get("next_epoch")
    if then is not None and (type(then) is not int or then < 0):
        raise ValueError(f"a malformed state: next_epoch is {then!r}, not an int >= 0")
    resume = Resume(state["epoch"], state["position"], tuple(ahead), tuple(shard),
                    state["seed"], tuple((int(p), c) for p, c in samples.items()), then)
    per_item = expected.get("samples_per_item")
    for position, count in resume.samples:
        if count < 1 or (per_item is not None and count >= per_item):
            raise ValueError(f"a malformed state: samples[{str(position)!r}] is {count}, "
                             f"not between 1 and samples_per_item - 1 ({per_item})")
    n = expected["source_len"]
    end = n if n is not None else float("inf")
    begun = resume.ahead + tuple(p for p, _ in resume.samples)
    if resume.position > end or any(not resume.position <= p < end for p in begun):
        raise ValueError(f"a malformed state: position {resume.position}, ahead "
                         f"{list(resume.ahead)[:10]} (source length {n})")
    return resume
