"""Where a pass's time went: waiting on the workers, or the workers waiting on the consumer.

Two clocks tell the limit apart.  The consumer's wait (the time ``next()``
spent in the pool's ``poll`` with nothing ready) is high when the workers
cannot keep up: the pass is input-bound.  The workers' busy time (reported
with each result) is low when they had nothing to do because their slots
were full of results nobody took yet: the consumer is the limit, either the
model or the hand-off into TensorFlow, which costs the parent CPU per
element (``batch_size`` moves the batching into the workers, one hand-off
per batch).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

_INPUT_BOUND = 0.5     # the consumer waited at least this fraction of the pass
_CONSUMER_BOUND = 0.5  # the workers were busy at most this fraction of it


@dataclass
class PassClock:
    """What a pass needs to say, at any time, where its time went so far.

    The clock runs from the first element handed out to the last, so the
    workers' start-up and the first item's latency do not count, and the
    consumer's wait is read at the last element too (not later: a report made
    after the pass would otherwise count waits outside it).
    """
    epoch: int
    via_tensorflow: bool
    batched: bool
    cached: bool
    workers: list[Any]            # the pool's handles (their busy_s grows)
    stats: Any                    # passes.Stats: the consumer's wait, summed
    threads: int = 1              # per worker: busy time is summed over them
    busy_at_start: dict[int, float] = field(default_factory=dict)
    started_at: float = 0.0
    last_at: float = 0.0          # when the last element was handed out
    waited_at_start: float = 0.0
    waited_at_last: float = 0.0
    elements: int = 0

    def handed_out(self) -> None:
        now = time.perf_counter()
        if not self.elements:
            self.started_at, self.waited_at_start = now, self.stats.waited_s
            self.busy_at_start = {id(h): h.busy_s for h in self.workers}
        self.elements += 1
        self.last_at, self.waited_at_last = now, self.stats.waited_s

    def report(self) -> dict[str, Any]:
        """The pass so far: elements, seconds, the two fractions, the verdict and a hint."""
        elapsed = self.last_at - self.started_at
        busy = sum(h.busy_s - self.busy_at_start.get(id(h), 0.0) for h in self.workers)
        wait_fraction = min(1.0, (self.waited_at_last - self.waited_at_start) / elapsed
                            if elapsed > 0 else 0.0)
        busy_fraction = min(1.0, busy / (elapsed * len(self.workers) * self.threads)
                            if elapsed > 0 and self.workers else 0.0)
        bound, hint = verdict(wait_fraction, busy_fraction, self.via_tensorflow, self.batched,
                              self.cached)
        return {"epoch": self.epoch, "elements": self.elements, "elapsed_s": elapsed,
                "elements_per_s": (self.elements - 1) / elapsed if elapsed > 0 else 0.0,
                "consumer_wait_fraction": wait_fraction,
                "worker_busy_fraction": busy_fraction, "bound": bound, "hint": hint}


def verdict(wait_fraction: float, busy_fraction: float, via_tensorflow: bool, batched: bool,
            cached: bool) -> tuple[str, str]:
    """("input" | "consumer" | "source" | "balanced", a one-line hint)."""
    numbers = (f"the consumer waited {wait_fraction:.0%} of the time, the workers were busy "
               f"{busy_fraction:.0%}")
    if wait_fraction >= _INPUT_BOUND and busy_fraction <= _CONSUMER_BOUND:
        return "source", (f"neither side is busy ({numbers}): the parent's reading and "
                          "sending of items is the limit (a slow source, large items to "
                          "pickle), or tasks are few for the workers")
    if wait_fraction >= _INPUT_BOUND:
        more = "" if cached else ", cache the deterministic stage (prepare=)"
        return "input", (f"input-bound ({numbers}): the workers are the limit; use more "
                         f"workers (cores){more}, or less work per item")
    if busy_fraction <= _CONSUMER_BOUND:
        if via_tensorflow and not batched:
            return "consumer", (f"the consumer is the limit ({numbers}): the model, or the "
                                "hand-off into TensorFlow one element at a time; pass "
                                "batch_size to MPLoader to batch in the workers")
        return "consumer", f"the consumer (the model) is the limit ({numbers}): the input keeps up"
    return "balanced", f"balanced ({numbers})"
