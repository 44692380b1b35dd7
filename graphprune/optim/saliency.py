"""How much each unit matters while training: the score HESSO and the OTO partitions rank by.

Five criteria per unit, each a different guess at the loss increase from removing it:
its norm, its mean absolute weight (fair between wide and narrow units), the angle
between the unit and its gradient (a gradient pointing along the weights wants the unit
smaller, so it matters less), and first/second-order Taylor estimates of the loss change
from zeroing it (|g.x| and 1/2 sum (g*x)^2, the Fisher diagonal standing in for the
Hessian).  The criteria live on different scales, so each is replaced by its dense rank
over all units of all groups (ties share a rank, so a criterion that is constant, such
as the Taylor terms before any gradient exists, says nothing) and the ranks are mixed
with ``weights``.  Ranks are comparable across groups, which global selection needs.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

CRITERIA = ("magnitude", "avg_magnitude", "cosine", "taylor_first", "taylor_second")
DEFAULT_WEIGHTS: dict[str, float] = {c: 1.0 for c in CRITERIA}


def unit_criteria(x: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each criterion (larger = more important) for the rows of ``x`` ``[k, n]`` and their gradient."""
    x, grad = x.double(), grad.double()
    xg = x * grad
    cos = xg.sum(1) / (x.norm(dim=1) * grad.norm(dim=1)).clamp_min(torch.finfo(torch.float64).tiny)
    return {
        "magnitude": x.norm(dim=1),
        "avg_magnitude": x.abs().mean(dim=1),
        "cosine": (1.0 - cos) / 2.0,
        "taylor_first": xg.sum(1).abs(),
        "taylor_second": 0.5 * xg.pow(2).sum(1),
    }


def dense_rank(values: torch.Tensor) -> torch.Tensor:
    """Ranks in [0, 1], equal values sharing one rank; all-equal values rank 0."""
    uniq, inverse = torch.unique(values, sorted=True, return_inverse=True)
    return inverse.double() / max(len(uniq) - 1, 1)


def saliency(per_group: Sequence[Mapping[str, torch.Tensor]],
             weights: Mapping[str, float] | None = None) -> list[torch.Tensor]:
    """Mix the criteria of every group's units into one score per unit, comparable globally."""
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    unknown = set(weights) - set(CRITERIA)
    if unknown or not any(w > 0 for w in weights.values()):
        raise ValueError(f"saliency weights need positive entries among {CRITERIA} (got {weights})")
    sizes = [len(next(iter(c.values()))) for c in per_group]
    total = torch.zeros(sum(sizes), dtype=torch.float64)
    for name, w in weights.items():
        if w:
            values = torch.cat([c[name].detach().cpu().double() for c in per_group])
            total += w * dense_rank(values)
    total /= sum(weights.values())
    return list(total.split(sizes))
