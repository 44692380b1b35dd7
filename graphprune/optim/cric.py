"""HESSO with the corrective redundant identification cycle (CRIC).

Saliency is a local guess; it can call a unit redundant that the network cannot do
without (the only path through a layer, a bottleneck the rest depends on).  CRIC
checks the guess against the loss before committing to it.  At each period start,
after the saliency choice:

1. for every group, the units newly chosen in it are zeroed *temporarily* and
   ``loss_fn()`` (the loss on a held-out batch) is evaluated, then they are restored;
2. a group whose probe loss exceeds ``(1 + collapse_ratio)`` times the unpruned loss is
   protected: none of its units is chosen this period (later periods probe it again),
   worst collapse first and only while the whole target stays reachable without the
   protected units (a protection that would make the target impossible is not taken;
   the probe's penalty below still steers the choice away from that group);
3. the other probed units get their measured loss increase added to their score (as a
   rank, like the saliency criteria) and the choice is re-sampled under the same
   target, so the budget moves to groups whose removal the loss tolerates;

repeated for up to ``cycles`` cycles or until nothing changes.  Probes run in eval
mode under ``no_grad`` and restore the weights bit for bit, so training is unaffected.

>>> held_x, held_y = next(iter(val_loader))
>>> opt = HESSO_CRIC(g, lr=0.1, target=0.5, loss_fn=lambda: F.cross_entropy(model(held_x), held_y))
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from graphprune.errors import NumericalError, UnprunableTargetError
from graphprune.optim.base import broadcast_masks
from graphprune.optim.hesso import HESSO
from graphprune.optim.saliency import dense_rank
from graphprune.target import Target

if TYPE_CHECKING:
    from graphprune.prunable import PrunableGraph


class HESSO_CRIC(HESSO):
    """HESSO whose period choices are corrected by loss probes; see the module docstring."""

    def __init__(self, g: PrunableGraph, lr: float = 0.1, *, loss_fn: Callable[[], torch.Tensor | float],
                 target: Target | float = 0.5, cycles: int = 3, collapse_ratio: float = 1.0,
                 probe_weight: float = 1.0, **kwargs: Any) -> None:
        if not callable(loss_fn):
            raise TypeError("HESSO_CRIC needs loss_fn=, a closure returning the loss on a held-out batch")
        if cycles < 1 or collapse_ratio <= 0 or probe_weight < 0:
            raise ValueError(f"need cycles >= 1, collapse_ratio > 0, probe_weight >= 0 "
                             f"(got {cycles}, {collapse_ratio}, {probe_weight})")
        super().__init__(g, lr, target=target, **kwargs)
        self.loss_fn = loss_fn
        self.cycles = cycles
        self.collapse_ratio = collapse_ratio
        self.probe_weight = probe_weight
        self.protected = self._empty()

    def choose(self, target: Target) -> list[torch.Tensor]:
        base_scores = self.saliency_scores(self.saliency_weights)
        scores = [s.clone() for s in base_scores]
        protect = self._empty()
        masks = self.select_period(scores, target, protect=protect, broadcast=False)
        for cycle in range(self.cycles):
            reference = self._probe_loss()
            new = [m & ~old for m, old in zip(masks, self.masks)]
            deltas: list[tuple[int, float]] = []
            for i, units in enumerate(new):
                if units.any():
                    deltas.append((i, self._probe_loss(i, units) - reference))
            changed = False
            limit = self.collapse_ratio * max(abs(reference), torch.finfo(torch.float32).eps)
            for i, delta in sorted(deltas, key=lambda t: -t[1]):  # worst collapse first
                if delta > limit and not bool((protect[i] | self.masks[i]).all()):
                    trial = [p.clone() for p in protect]
                    trial[i] |= ~self.masks[i]
                    if self._feasible(scores, trial):  # never protect the target out of reach
                        protect = trial
                        changed = True
            if deltas and self.probe_weight:
                ranks = dense_rank(torch.tensor([d for _, d in deltas], dtype=torch.float64))
                for (i, _), r in zip(deltas, ranks):
                    scores[i][new[i]] = base_scores[i][new[i]] + self.probe_weight * float(r)
            resampled = self.select_period(scores, target, protect=protect, broadcast=False)
            changed |= any(not torch.equal(a, b) for a, b in zip(resampled, masks))
            masks = resampled
            self.log("cric_cycle", cycle=cycle, reference_loss=reference,
                     protected_units=int(sum(int(p.sum()) for p in protect)))
            if not changed:
                break
        self.protected = [p.clone() for p in protect]
        return [m | old for m, old in zip(broadcast_masks(masks, self.named), self.masks)]

    def _feasible(self, scores: list[torch.Tensor], protect: list[torch.Tensor]) -> bool:
        """Whether the whole target can still be met with ``protect`` kept."""
        try:
            self.select(scores, self.target, protect=protect, broadcast=False)
        except UnprunableTargetError:
            return False
        return True

    @torch.no_grad()
    def _probe_loss(self, group: int | None = None, units: torch.Tensor | None = None) -> float:
        """``loss_fn()`` in eval mode, with ``units`` of ``group`` zeroed for the call (then restored)."""
        model = self.graph.model
        flags = {m: m.training for m in model.modules()}
        saved = None
        if group is not None:
            idx = units.nonzero().flatten()
            saved = (idx, self.units[group].gather(self.named, idx))
            self.units[group].put_(self.named, idx, 0.0)
        model.eval()
        try:
            loss = self.loss_fn()
        finally:
            for m, training in flags.items():
                m.training = training
            if saved is not None:
                self.units[group].put_(self.named, *saved)
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if value != value or value in (float("inf"), float("-inf")):
            raise NumericalError(f"loss_fn returned {value} while probing group "
                                 f"{self.groups[group].name if group is not None else '(none)'}",
                                 hint="check the held-out batch and the model for NaN/Inf")
        return value

    def _extra_state(self) -> dict[str, Any]:
        return dict(super()._extra_state(), protected=[p.clone() for p in self.protected])

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self.protected = [p.clone().bool().cpu() for p in extra["protected"]]


HESSOCRIC = HESSO_CRIC
