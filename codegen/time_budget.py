"""Which task to tune next when the budget is time, not trials.

A model's latency is the sum over tasks of (calls x time per call), so a trial is worth
most on the task that takes the largest share of that sum, and less the more trials the
task has had (the first schedules found improve most).  The scheduler therefore:

1. gives every task without a measurement one chunk first, most FLOPs (times calls)
   first, since until it is measured its share is unknown and an untuned kernel can be
   the slowest of all;
2. then repeatedly picks the task with the largest ``share / (1 + chunks_run)``, where
   ``share`` is calls x best measured time (from the database, so a resumed run starts
   from the shares the last one measured);
3. starts a chunk only while the time left covers the longest chunk seen so far, so the
   run ends within its budget instead of one chunk past it.

It is a pure policy over :class:`TaskState`; :func:`codegen.tuning.tune` runs the chunks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass
class TaskState:
    """What the policy knows of one task."""

    calls: float                 # how often the model runs it (meta-schedule's task weight)
    flops: float                 # estimated FLOPs of one call
    best_seconds: float | None   # best measured time of one call; None before a measurement
    trials_left: int             # trials it may still get (its per-task cap minus trials done)
    chunks_run: int = 0

    @property
    def share(self) -> float:
        """Seconds this task adds to one inference (calls x best time)."""
        return self.calls * (self.best_seconds or 0.0)


def next_task(states: Sequence[TaskState]) -> int | None:
    """Index of the task to tune next; None when every task has used its trials."""
    open_ = [i for i, s in enumerate(states) if s.trials_left > 0]
    if not open_:
        return None
    unmeasured = [i for i in open_ if states[i].best_seconds is None]
    if unmeasured:
        return max(unmeasured, key=lambda i: states[i].calls * states[i].flops)
    return max(open_, key=lambda i: states[i].share / (1 + states[i].chunks_run))


def run_for(seconds: float, states: list[TaskState], tune_chunk: Callable[[int], float | None],
            chunk: int, clock: Callable[[], float] = time.monotonic) -> list[int]:
    """Tune chunks of ``chunk`` trials, task by :func:`next_task`, for at most ``seconds``.

    ``tune_chunk(i, ...)`` runs task ``i``'s next chunk and returns its best time since
    (None if still unmeasured).  Returns the tasks in the order they were tuned.
    """
    start, longest, order = clock(), 0.0, []
    while (i := next_task(states)) is not None:
        if clock() - start + longest > seconds:
            break
        began = clock()
        best = tune_chunk(i)
        longest = max(longest, clock() - began)
        s = states[i]
        s.trials_left -= min(chunk, s.trials_left)
        s.chunks_run += 1
        if best is not None:
            s.best_seconds = best if s.best_seconds is None else min(s.best_seconds, best)
        elif s.best_seconds is None:
            s.trials_left = 0  # a chunk that measured nothing (every candidate failed): do not retry it forever
        order.append(i)
    return order
