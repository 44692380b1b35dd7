"""A time budget per analysis phase.

Analysis time should grow linearly with the graph; a rule or a coupling that grows
faster (issue 22's transformer detector took 262 s) should stop with an error naming
where the time went, not hold a user's process for minutes.  Each phase (propagating
the rules, solving the couplings) gets ``GRAPHPRUNE_PHASE_BUDGET_S`` seconds (default
120: the slowest model of the coverage benchmark analyses in under 30 s), read when
the phase starts; ``0`` turns the guard off.

>>> budget = PhaseBudget("propagate", source="MyModel")
>>> for node in graph.nodes:
...     with budget.step(node.name, node.op):
...         run_rule(node)
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator

from ..errors import TimeBudgetError

DEFAULT_SECONDS = 120.0


def budget_seconds() -> float | None:
    """The per-phase budget in seconds (None: no budget)."""
    raw = os.environ.get("GRAPHPRUNE_PHASE_BUDGET_S", "")
    try:
        seconds = float(raw) if raw else DEFAULT_SECONDS
    except ValueError:
        raise TimeBudgetError(f"GRAPHPRUNE_PHASE_BUDGET_S={raw!r} is not a number of seconds",
                              hint="set it to a number of seconds, or 0 for no budget") from None
    return seconds if seconds > 0 else None


class PhaseBudget:
    """Times the steps of one phase; raises :class:`TimeBudgetError` once the phase has
    run past its budget, naming the step it was at and the slowest step so far."""

    def __init__(self, phase: str, *, source: str | None = None, seconds: float | None = None) -> None:
        self.phase, self.source = phase, source
        self.seconds = budget_seconds() if seconds is None else seconds
        self.start = time.perf_counter()
        self.slowest = (0.0, "", "")

    @contextlib.contextmanager
    def step(self, node: str = "", op: str = "") -> Iterator[None]:
        t = time.perf_counter()
        yield
        now = time.perf_counter()
        if now - t > self.slowest[0]:
            self.slowest = (now - t, node, op)
        if self.seconds is not None and now - self.start > self.seconds:
            took, slow_node, slow_op = self.slowest
            raise TimeBudgetError(
                f"the analysis phase '{self.phase}' ran past its budget of {self.seconds:.0f} s "
                f"(slowest step: {slow_node or '?'} [{slow_op or '?'}], {took:.1f} s)",
                node=node or None, op=op or None, source=self.source,
                hint="this graph makes the analysis grow faster than its size: please report it with the "
                     "model; GRAPHPRUNE_PHASE_BUDGET_S raises the budget (0: none)")
