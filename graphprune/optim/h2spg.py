"""H2SPG: hierarchical half-space projected gradient (OTOv3).

The update is DHSPG's (penalty plus half-space projection on the redundant units); what
changes is how the redundant set is formed.  The search space is a list of candidates,
each a set of units that go together: a single unit, a whole group, or, once the core
exposes ``g.hierarchy``, a whole residual branch or block spanning several groups.
Candidates are visited from least to most salient (mean saliency of their units) and
one joins the redundant set only if ``connected(masks)`` says the network is still
connected with it removed, so erasing an operator never cuts the path from input to
output.  Visiting stops once the target is met.

By default the candidates are the single units and the check is the width guard (no
group left with fewer than ``target.keep_min`` units), which reduces to DHSPG's
partition.

>>> branch = frozenset((3, u) for u in range(g.groups[3].size))  # all of group 3
>>> opt = H2SPG(g, lr=0.1, target=0.4, candidates=[branch, ...], connected=my_check)
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence, Union

import torch

from graphprune.errors import UnprunableTargetError
from graphprune.optim.base import broadcast_masks
from graphprune.optim.dhspg import DHSPG
from graphprune.target import Target, achieved

Candidate = Union[int, Iterable[tuple[int, int]]]
"""A group index (the whole group) or a set of ``(group index, unit)`` pairs."""


class H2SPG(DHSPG):
    """DHSPG with a hierarchical, connectivity-checked partition; see the module docstring."""

    def __init__(self, g: Any, lr: float = 0.1, *, target: Target | float = 0.5,
                 candidates: Sequence[Candidate] | Callable[[Any], Sequence[Candidate]] | None = None,
                 connected: Callable[[list[torch.Tensor]], bool] | None = None, **kwargs: Any) -> None:
        super().__init__(g, lr, target=target, **kwargs)
        if candidates is None and hasattr(g, "hierarchy"):
            # whole erasable groups (residual branches) first-class, single units as well
            candidates = list(g.hierarchy) + [[(i, u)] for i, grp in enumerate(self.groups) for u in range(grp.size)]
        if callable(candidates):
            candidates = candidates(g)
        self.candidates = None if candidates is None else [self._as_masks(c) for c in candidates]
        self.connected = connected or getattr(g, "stays_connected", None) or self.keeps_width

    def _as_masks(self, candidate: Candidate) -> list[torch.Tensor]:
        masks = self._empty()
        if isinstance(candidate, int):
            masks[candidate][:] = True
            return masks
        for group, unit in candidate:
            if not 0 <= unit < self.groups[group].size:
                raise IndexError(f"candidate unit {unit} out of range for {self.groups[group]!r}")
            masks[group][unit] = True
        return masks

    def keeps_width(self, masks: list[torch.Tensor]) -> bool:
        """Default connectivity check: every group keeps at least ``target.keep_min`` units."""
        return all(grp.size - int(m.sum()) >= min(grp.size, self.target.keep_min)
                   for grp, m in zip(self.groups, masks))

    def partition(self) -> list[torch.Tensor]:
        scores = self.saliency_scores(self.saliency_weights)
        if self.candidates is None:
            return self.select(scores, self.target)
        masks = [m.clone() for m in self.masks]
        order = sorted(range(len(self.candidates)), key=lambda c: (self._mean(scores, self.candidates[c]), c))
        for c in order:
            if self._reached(masks):
                break
            trial = [m | add for m, add in zip(masks, self.candidates[c])]
            if self.connected(trial):
                masks = trial
        if not self._reached(masks):
            raise UnprunableTargetError(
                f"{self.target!r} cannot be met by candidates that keep the network connected "
                f"(reached {self.reduction(masks)[self.target.kind]:.1%})",
                hint="lower the target or offer finer candidates")
        return broadcast_masks(masks, self.named)

    @staticmethod
    def _mean(scores: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
        picked = torch.cat([s[m] for s, m in zip(scores, candidate)])
        return float(picked.mean()) if picked.numel() else float("inf")

    def _reached(self, masks: list[torch.Tensor]) -> bool:
        red = achieved(self.groups, masks, total_params=getattr(self.graph, "total_params", None),
                       total_flops=getattr(self.graph, "total_flops", None), params=self.named,
                       param_macs=self.param_macs)
        return red[self.target.kind] >= self.target.fraction
