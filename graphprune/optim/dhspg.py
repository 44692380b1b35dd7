"""DHSPG: dual half-space projected gradient (OTOv2).

After ``warmup_steps`` of plain training the units are split once, by saliency, into
important and redundant ones, the redundant set sized to meet the target.  Important
units keep the base update.  A redundant unit ``x`` takes a plain gradient step with an
adaptive group penalty ``lambda * x/||x||`` added to its gradient:

* ``lambda`` first cancels the part of the gradient that would make the unit grow (the
  angle between the unit and its gradient above 90 degrees), times ``1 + margin``, and
* adds the pace ``||x|| / (lr * r)`` that would bring the unit to zero in the ``r``
  steps left of the pruning window,

then the half-space projection sets the unit to exactly zero as soon as the trial point
leaves the half-space around it, ``<x_new, x> < epsilon * ||x||^2``: a unit that the
penalty has pushed through the origin is zero, not small.  At the end of the window any
redundant unit still nonzero is projected, so the target is met when the window closes.

>>> opt = DHSPG(g, lr=0.1, target=0.5, warmup_steps=200, pruning_steps=2000)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from graphprune.optim.base import GroupOptimizer
from graphprune.target import Target

if TYPE_CHECKING:
    from graphprune.prunable import PrunableGraph


class DHSPG(GroupOptimizer):
    """DHSPG over the graph's groups; see the module docstring for the update."""

    def __init__(self, g: PrunableGraph, lr: float = 0.1, *, target: Target | float = 0.5, warmup_steps: int = 0,
                 pruning_steps: int = 1000, epsilon: float = 0.0, margin: float = 0.1, log_every: int | None = None,
                 saliency_weights: Mapping[str, float] | None = None, **base: Any) -> None:
        if warmup_steps < 0 or pruning_steps < 1 or not 0.0 <= epsilon < 1.0 or margin < 0:
            raise ValueError(f"need warmup_steps >= 0, pruning_steps >= 1, 0 <= epsilon < 1, margin >= 0 "
                             f"(got {warmup_steps}, {pruning_steps}, {epsilon}, {margin})")
        super().__init__(g, lr, target=target, **base)
        self.warmup_steps = warmup_steps
        self.pruning_steps = pruning_steps
        self.epsilon = epsilon
        self.margin = margin
        self.log_every = log_every or max(pruning_steps // 10, 1)
        self.saliency_weights = saliency_weights

    @property
    def window_end(self) -> int:
        """The step after which every redundant unit is exactly zero."""
        return self.warmup_steps + self.pruning_steps

    def _decide(self) -> None:
        if self.num_steps == self.warmup_steps:
            self.masks = self.partition()
            self.log("partition")

    def partition(self) -> list[torch.Tensor]:
        """The redundant units: the least salient ones, globally, up to the target."""
        return self.select(self.saliency_scores(self.saliency_weights), self.target)

    def _held(self) -> list[torch.Tensor]:
        return self.masks if self.num_steps >= self.warmup_steps else self.pruned

    def _update_held(self, i: int, units: torch.Tensor, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        remaining = self.window_end - self.num_steps
        if remaining <= 1:
            self.pruned[i][units] = True
            return torch.zeros_like(x)
        lr = self.current_lr()
        wd = self.param_groups[0]["weight_decay"] if self.param_groups[0]["variant"] == "sgd" else 0.0
        norm = x.norm(dim=1, keepdim=True)
        direction = x / norm.clamp_min(torch.finfo(x.dtype).tiny)
        growing = (-(grad * direction).sum(1, keepdim=True)).clamp_min(0.0)
        lam = growing * (1.0 + self.margin) + norm / (lr * remaining)
        trial = x - lr * (grad + wd * x + lam * direction)
        project = (trial * x).sum(1) < self.epsilon * norm.squeeze(1) ** 2
        project |= norm.squeeze(1) == 0
        self.pruned[i][units[project.cpu()]] = True
        return trial.masked_fill(project.unsqueeze(1), 0.0)

    def _finish_step(self) -> None:
        after = self.num_steps - self.warmup_steps
        if self.num_steps == self.window_end:
            self.pruned = [m.clone() for m in self.masks]
            self.log("window_end")
        elif 0 < after < self.pruning_steps and after % self.log_every == 0:
            self.log("progress")
