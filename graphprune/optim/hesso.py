"""HESSO: hybrid efficient structured sparse optimizer (OTO family, "HESSO" paper).

Training runs normally for ``warmup_steps``; the pruning window that follows is cut
into ``pruning_periods`` equal periods.  At each period start the units are ranked by
saliency (:mod:`graphprune.optim.saliency`) and the globally least salient ones are
chosen, up to that period's share of the target (``k/K`` of it after period ``k``),
from among the units that would meet the whole target (so the last period can still
land on it: see :meth:`HESSO.select_period`).
Over the period the newly chosen units take no gradient step and shrink linearly,
``x <- x * (1 - 1/r)`` with ``r`` the steps left, so they reach exactly zero on the
period's last step and stay there; every other parameter trains with the base update.
Shrinking gradually instead of cutting lets the rest of the network absorb the loss of
the units, which is what makes HESSO accurate without a separate fine-tuning stage.

>>> opt = HESSO(g, lr=0.1, target=gp.Target(flops=0.5), warmup_steps=100,
...             pruning_steps=1000, pruning_periods=10)
>>> for x, y in loader:
...     loss = loss_fn(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
>>> compact = g.construct_subnet()
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from graphprune.errors import UnprunableTargetError
from graphprune.optim.base import GroupOptimizer
from graphprune.target import Target

if TYPE_CHECKING:
    from graphprune.prunable import PrunableGraph


class HESSO(GroupOptimizer):
    """HESSO over the graph's groups; see the module docstring for the schedule."""

    def __init__(self, g: PrunableGraph, lr: float = 0.1, *, target: Target | float = 0.5, warmup_steps: int = 0,
                 pruning_steps: int = 1000, pruning_periods: int = 10,
                 saliency_weights: Mapping[str, float] | None = None, **base: Any) -> None:
        if warmup_steps < 0 or pruning_periods < 1 or pruning_steps < pruning_periods:
            raise ValueError(f"need warmup_steps >= 0 and pruning_steps >= pruning_periods >= 1 "
                             f"(got {warmup_steps}, {pruning_steps}, {pruning_periods})")
        super().__init__(g, lr, target=target, **base)
        self.warmup_steps = warmup_steps
        self.pruning_periods = pruning_periods
        self.period_steps = pruning_steps // pruning_periods
        self.saliency_weights = saliency_weights

    @property
    def window_end(self) -> int:
        """The step at which every chosen unit is exactly zero (the target reached)."""
        return self.warmup_steps + self.pruning_periods * self.period_steps

    def period_of(self, step: int) -> int | None:
        """The pruning period step ``step`` falls in, or None outside the window."""
        if not self.warmup_steps <= step < self.window_end:
            return None
        return (step - self.warmup_steps) // self.period_steps

    def _decide(self) -> None:
        k = self.period_of(self.num_steps)
        if k is not None and (self.num_steps - self.warmup_steps) % self.period_steps == 0:
            self.masks = self.choose(self.target.scaled((k + 1) / self.pruning_periods))

    def choose(self, target: Target) -> list[torch.Tensor]:
        """Units redundant up to ``target`` (cumulative): the globally least salient."""
        return self.select_period(self.saliency_scores(self.saliency_weights), target)

    def select_period(self, scores: Sequence[torch.Tensor], target: Target,
                      protect: Sequence[torch.Tensor] | None = None, broadcast: bool = True) -> list[torch.Tensor]:
        """A period's choice: first the units for the *whole* target (the plan, landing
        within ``target.slack`` of it), then the least salient of the plan up to this
        period's share.  Choosing only inside the plan keeps room for the last period:
        chosen units are zero for good, and had early periods taken every small unit
        (all of a ViT's MLP channels rank below its heads), the last one could only
        overshoot with a whole head."""
        protect = list(protect) if protect is not None else self._empty()
        if target.covers(self.target):  # the last period: the whole target is the choice
            return self.select(scores, self.target, protect=protect, broadcast=broadcast)
        try:
            plan = self.select(scores, self.target, protect=protect, broadcast=False)
        except UnprunableTargetError:
            return self.select(scores, target, protect=protect, broadcast=broadcast)  # protected too much to plan
        return self.select(scores, target, protect=[p | ~m for p, m in zip(protect, plan)], broadcast=broadcast)

    def _held(self) -> list[torch.Tensor]:
        return self.masks

    def _update_held(self, i: int, units: torch.Tensor, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        k = self.period_of(self.num_steps)
        if k is None:
            return torch.zeros_like(x)
        remaining = self.warmup_steps + (k + 1) * self.period_steps - self.num_steps
        return x * (1.0 - 1.0 / remaining)

    def _finish_step(self) -> None:
        if self.num_steps > self.warmup_steps and (self.num_steps - self.warmup_steps) % self.period_steps == 0 \
                and self.num_steps <= self.window_end:
            self.pruned = [m.clone() for m in self.masks]
            self.log("period_end", period=(self.num_steps - self.warmup_steps) // self.period_steps - 1)
