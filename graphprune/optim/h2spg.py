"""H2SPG: hierarchical half-space projected gradient (OTOv3).

The update is DHSPG's (penalty plus half-space projection on the redundant units); what
changes is how the redundant set is formed.  The search space is a list of candidates,
each a set of units that go together: a single unit, a whole group, or, once the core
exposes ``g.hierarchy``, a whole residual branch or block spanning several groups.
Candidates are visited from least to most salient (mean saliency of their units) and
one joins the redundant set only if ``connected(masks)`` says the network is still
connected with it removed, so erasing an operator never cuts the path from input to
output, and only if the reduction then lands at most ``target.slack`` past the target
(a whole branch passed over near the end leaves room for finer candidates; it is taken
after all only if nothing finer reaches the target).  Visiting stops once the target
is met.

By default the candidates are the single units and the check is the width guard (no
group left with fewer than ``target.keep_min`` units), which reduces to DHSPG's
partition.

>>> branch = frozenset((3, u) for u in range(g.groups[3].size))  # all of group 3
>>> opt = H2SPG(g, lr=0.1, target=0.4, candidates=[branch, ...], connected=my_check)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, Union

import torch

from graphprune.errors import UnprunableTargetError
from graphprune.optim.base import broadcast_masks
from graphprune.optim.dhspg import DHSPG
from graphprune.target import Target

if TYPE_CHECKING:
    from graphprune.prunable import PrunableGraph

Candidate = Union[int, Iterable[tuple[int, int]]]
"""A group index (the whole group) or a set of ``(group index, unit)`` pairs."""


class H2SPG(DHSPG):
    """DHSPG with a hierarchical, connectivity-checked partition; see the module docstring."""

    def __init__(self, g: PrunableGraph, lr: float = 0.1, *, target: Target | float = 0.5,
                 candidates: Sequence[Candidate] | Callable[[Any], Sequence[Candidate]] | None = None,
                 connected: Callable[[list[torch.Tensor]], bool] | None = None, **kwargs: Any) -> None:
        if Target.coerce(target).kind == "latency":
            raise UnprunableTargetError("H2SPG's hierarchical search lands on a fraction to remove, not a latency budget",
                                        hint="use HESSO or DHSPG with a latency target")
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
        """Default connectivity check: every group keeps at least its floor (:meth:`Target.floor`)."""
        return all(grp.size - int(m.sum()) >= self.target.floor(grp) for grp, m in zip(self.groups, masks))

    def partition(self) -> list[torch.Tensor]:
        """Candidates in saliency order, each kept if the network stays connected and the
        reduction does not land more than ``target.slack`` past the target; a candidate
        that would (a whole branch when little is left to remove) is passed over for later,
        finer ones, and taken only if nothing that fits reaches the target.  Still past the
        slack then, the most salient of the new units are given back while the target holds."""
        scores = self.saliency_scores(self.saliency_weights)
        if self.candidates is None:
            return self.select(scores, self.target)
        masks = [m.clone() for m in self.masks]
        order = sorted(range(len(self.candidates)), key=lambda c: (self._mean(scores, self.candidates[c]), c))
        goal, limit = self.target.fraction, self.target.fraction + self.target.slack
        now = self._fraction(masks)
        passed: list[int] = []
        added: list[int] = []
        for c in order:
            if now >= goal:
                break
            trial = [m | add for m, add in zip(masks, self.candidates[c])]
            if all(torch.equal(a, b) for a, b in zip(trial, masks)) or not self.connected(trial):
                continue
            got = self._fraction(trial)
            if got > limit:
                passed.append(c)
                continue
            masks, now = trial, got
            added.append(c)
        while now < goal and passed:  # nothing that fits was left: the closest landing past the target
            trials = [[m | add for m, add in zip(masks, self.candidates[c])] for c in passed]
            ok = [k for k, t in enumerate(trials) if self.connected(t)]
            if not ok:
                break
            got = {k: self._fraction(trials[k]) for k in ok}
            reaching = [k for k in ok if got[k] >= goal]
            k = min(reaching, key=lambda k: (got[k], k)) if reaching else max(ok, key=lambda k: (got[k], -k))
            if got[k] <= now:
                break
            masks, now = trials[k], got[k]
            added.append(passed.pop(k))
        if now > limit:  # past the slack: give back the most salient new choices while the target holds
            masks, now = self._give_back(scores, masks, added, goal, limit, now)
        if now < goal:
            raise UnprunableTargetError(
                f"{self.target!r} cannot be met by candidates that keep the network connected "
                f"(reached {now:.1%})",
                hint="lower the target or offer finer candidates")
        return broadcast_masks(masks, self.named)

    def _give_back(self, scores: list[torch.Tensor], masks: list[torch.Tensor], added: list[int], goal: float,
                   limit: float, now: float) -> tuple[list[torch.Tensor], float]:
        """Undo the most salient new choices while the target holds: single units where the
        candidates offer that unit alone, else whole added candidates (an erased branch
        offered only whole is given back whole or not at all)."""
        single = {(i, int(u)) for c in self.candidates if sum(int(m.sum()) for m in c) == 1
                  for i, m in enumerate(c) for u in m.nonzero().flatten()}
        items: list[tuple[float, list[tuple[int, int]]]] = []
        for i, (m, old) in enumerate(zip(masks, self.masks)):
            items += [(float(scores[i][u]), [(i, int(u))]) for u in (m & ~old).nonzero().flatten()
                      if (i, int(u)) in single]
        for c in added:
            units = [(i, int(u)) for i, (m, old) in enumerate(zip(self.candidates[c], self.masks))
                     for u in (m & ~old).nonzero().flatten()]
            if len(units) > 1:
                items.append((self._mean(scores, self.candidates[c]), units))
        for _, units in sorted(items, key=lambda t: (-t[0], t[1])):
            trial = [m.clone() for m in masks]
            for i, u in units:
                trial[i][u] = False
            got = self._fraction(trial)
            if goal <= got < now and self.connected(trial):
                masks, now = trial, got
                if now <= limit:
                    break
        return masks, now

    @staticmethod
    def _mean(scores: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
        picked = torch.cat([s[m] for s, m in zip(scores, candidate)])
        return float(picked.mean()) if picked.numel() else float("inf")

    def _fraction(self, masks: list[torch.Tensor]) -> float:
        """The target's measure of ``masks`` on the compact model."""
        return self.reduction(masks)[self.target.kind]
