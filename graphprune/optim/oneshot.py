"""One-shot structured pruning (SPA): score every group, pick units, zero them, compensate.

``prune(g, ...)`` works at any of three times, with the same call:

* **at initialisation** — on an untrained model, before any training: data-free
  criteria (``obspa``, ``l1``, ``l2``) or ``taylor`` with a few batches (SNIP-like
  connection sensitivity); then train the compact model from scratch.
* **after training, no fine-tuning** — ``obspa`` rewrites the consumers of removed
  units with an Optimal Brain Surgeon update so the compact model needs no retraining
  to stay close to the original.
* **after training, then fine-tune** — any criterion, then :func:`finetune` on the
  compact model for a short schedule.

>>> g = gp.trace(model, (x,))
>>> report = prune(g, "obspa", Target(flops=0.4))
>>> compact = g.construct_subnet()
>>> finetune(compact, loader, torch.nn.functional.cross_entropy, epochs=1)

``prune`` changes ``g.params`` in place (for a PyTorch graph, the user's live
parameters): chosen units become exactly zero, which is what ``construct_subnet``
removes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Sequence

import torch
from torch import nn

from graphprune.analysis.groups import Group
from graphprune.errors import GraphPruneError, UnprunableTargetError
from graphprune.frontends.onnx_program import GraphProgram
from graphprune.optim.obspa import Activation, GraphRoutes, compensate, consumer_moments
from graphprune.optim.scoring import Normalize, normalize, score
from graphprune.target import Target, achieved, select_units

if TYPE_CHECKING:
    from graphprune.prunable import PrunableGraph

Scope = Literal["global", "layer"]


@dataclass
class PruneReport:
    """What :func:`prune` removed: per-group counts and the achieved reductions.

    ``masks[i]`` is True for the removed units of ``groups[i]``; ``achieved`` holds the
    removed fractions of ``groups`` (units), ``params`` and ``flops`` in the same
    first-order accounting as the target.
    """

    criterion: str
    scope: Scope
    target: Target
    compensated: bool
    groups: list[Group] = field(repr=False)
    masks: list[torch.Tensor] = field(repr=False)
    achieved: dict[str, float] = field(default_factory=dict)

    @property
    def removed(self) -> dict[str, tuple[int, int]]:
        """``{group name: (units removed, units before)}``."""
        return {f"{g.name}#{g.id}": (int(m.sum()), g.size) for g, m in zip(self.groups, self.masks)}

    def summary(self) -> str:
        """A table of every group and the totals, for printing."""
        width = max([len(k) for k in self.removed] + [5])
        lines = [f"{'group':<{width}}  {'kind':<8}  removed / size"]
        for (name, (r, n)), g in zip(self.removed.items(), self.groups):
            lines.append(f"{name:<{width}}  {g.kind:<8}  {r:>7} / {n}")
        lines.append(f"{self!r}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        got = ", ".join(f"{k}={v:.1%}" for k, v in self.achieved.items())
        comp = ", compensated" if self.compensated else ""
        return f"PruneReport({self.criterion}, {self.scope}, {self.target!r}{comp}: removed {got})"


def _totals(g: PrunableGraph) -> dict[str, Any]:
    """Model totals plus what exact overlap accounting needs (weights pruned along two dims)."""
    return {"total_params": g.total_params, "total_flops": g.total_flops, "params": g.params,
            "param_macs": g.param_macs}


def _layer_masks(groups: Sequence[Group], scores: Sequence[torch.Tensor], fraction: float,
                 target: Target) -> list[torch.Tensor]:
    """Remove the same fraction of units from every group (lowest scores first, same guards)."""
    masks = []
    for g, s in zip(groups, scores):
        share = replace(target, groups=max(min(fraction, (g.size - target.floor(g)) / g.size), 0.0),
                        params=None, flops=None)
        try:
            masks.append(select_units([g], [s], share)[0])
        except UnprunableTargetError:  # the multiple rounds the share past the floor: go to the floor
            masks.append(select_units([g], [s], replace(share, groups=(g.size - target.floor(g)) / g.size))[0])
    return masks


def _select_layerwise(groups: Sequence[Group], scores: Sequence[torch.Tensor], target: Target,
                      totals: dict[str, Any], steps: int = 40) -> list[torch.Tensor]:
    """Uniform per-layer fraction, bisected until the global target is met (smallest such)."""
    def got(masks: list[torch.Tensor]) -> float:
        return achieved(groups, masks, **totals)[target.kind]

    lo, hi = 0.0, 1.0
    best = _layer_masks(groups, scores, hi, target)
    if got(best) < target.fraction:
        raise UnprunableTargetError(f"{target!r} cannot be met with a uniform per-layer fraction",
                                    hint="lower the target, or use scope='global'")
    for _ in range(steps):
        mid = (lo + hi) / 2
        masks = _layer_masks(groups, scores, mid, target)
        if got(masks) >= target.fraction:
            hi, best = mid, masks
        else:
            lo = mid
    return best


def select(groups: Sequence[Group], scores: Sequence[torch.Tensor], target: Target | float,
           scope: Scope = "global", **totals: Any) -> list[torch.Tensor]:
    """Removal masks under ``target``: one global ranking, or one fraction for every layer."""
    target = Target.coerce(target)
    if scope == "global":
        return select_units(groups, scores, target, **totals)
    if scope == "layer":
        return _select_layerwise(groups, scores, target, totals)
    raise GraphPruneError(f"unknown scope {scope!r}", hint="use scope='global' or scope='layer'")


def prune(g: PrunableGraph, criterion: str = "obspa", target: Target | float = 0.4, *, data: Iterable | None = None,
          loss_fn: Callable | None = None, normalize: Normalize | None = None, scope: Scope = "global",
          compensate_consumers: bool | None = None, batches: int = 4, damping: float = 0.1,
          activation: Activation | None = None, rescale: float = 2.0) -> PruneReport:
    """Score, select and zero units of the traced graph ``g`` in place; returns a report.

    ``target`` is a :class:`~graphprune.target.Target` or a float (fraction of FLOPs to
    remove).  ``data``/``loss_fn``/``batches`` feed the gradient criteria (``taylor``,
    ``hessian``).  ``compensate_consumers`` applies the OBS consumer update after
    selection; it defaults to on for ``obspa`` and can be combined with any criterion.
    ``normalize`` makes scores comparable across groups before the global ranking
    (:func:`~graphprune.optim.scoring.normalize`); by default ``max`` for ``obspa`` (each
    group's most damaging unit is 1: OBS errors are heavy-tailed, and a group of four
    heads has a mean dominated by one head) and ``mean`` for the others.
    ``damping`` and ``activation`` tune OBSPA's data-free Hessian proxy (see
    :func:`~graphprune.optim.obspa.input_moments`): by default the activation between
    each group and each of its consumers is read from the traced graph (relu, relu6,
    gelu, silu, attention values, identity); ``activation=`` forces one everywhere.
    Call ``g.construct_subnet()`` afterwards for the compact model.
    """
    target = Target.coerce(target)
    model, params, groups = getattr(g, "model", None), g.params, list(g.groups)
    ir = getattr(g, "ir", None)
    routes = GraphRoutes(ir, params) if ir is not None else None
    totals = _totals(g)
    with _differentiable(g, model, criterion) as program:
        raw = score(groups, params, criterion, model=program, data=data, loss_fn=loss_fn, batches=batches,
                    damping=damping, activation=activation, graph=routes)
    if normalize is None:
        normalize = "max" if criterion == "obspa" else "mean"
    masks = select(groups, _normalize(raw, normalize), target, scope, **totals)
    do_comp = criterion == "obspa" if compensate_consumers is None else compensate_consumers
    if do_comp:
        _compensate_all(groups, masks, params, damping, activation, routes, rescale)
    for grp, m in zip(groups, masks):
        grp.scatter_(params, m)
    return PruneReport(criterion, scope, target, do_comp, groups, masks, achieved(groups, masks, **totals))


_normalize = normalize  # `prune`'s keyword shadows the function's name


@contextlib.contextmanager
def _differentiable(g: PrunableGraph, model: nn.Module | None, criterion: str) -> Iterator[nn.Module | None]:
    """The model gradient criteria run: the user's module, or for an ONNX graph its
    :class:`GraphProgram` with the initializers made to require grad meanwhile."""
    ir = getattr(g, "ir", None)
    if model is not None or criterion not in ("taylor", "hessian") or getattr(ir, "frontend", None) != "onnx":
        yield model
        return
    flags = {n: p.requires_grad for n, p in g.params.items()}
    try:
        for p in g.params.values():
            if p.is_floating_point():
                p.requires_grad_(True)
        yield GraphProgram(ir, g.params)
    finally:
        for n, p in g.params.items():
            p.requires_grad_(flags[n])


def _compensate_all(groups: Sequence[Group], masks: Sequence[torch.Tensor], params: dict[str, torch.Tensor],
                    damping: float, activation: Activation | None,
                    routes: GraphRoutes | None = None, rescale: float = 2.0) -> None:
    """OBS updates for every group, all estimated from the weights as they were before any update.

    Estimating first keeps the result independent of the group order: one group's
    update rewrites consumer columns that another group reads as producer rows.
    """
    active = [(grp, m) for grp, m in zip(groups, masks) if m.any()]
    moments = [consumer_moments(grp, params, activation, routes) for grp, _ in active]
    for (grp, m), mom in zip(active, moments):
        compensate(grp, m, params, mom, damping, graph=routes, rescale=rescale)


def finetune(model: nn.Module, data: Iterable, loss_fn: Callable, epochs: int = 1, lr: float = 0.01,
             optimizer: Literal["sgd", "adam"] = "sgd", momentum: float = 0.9,
             weight_decay: float = 0.0) -> nn.Module:
    """Train ``model`` (usually the compact one) for ``epochs`` passes over ``data``; returns it.

    ``data`` yields ``(inputs, targets)`` and is iterated once per epoch (a DataLoader
    or a list).  A cosine learning-rate decay to zero lets a short schedule settle.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        raise GraphPruneError(f"unknown optimizer {optimizer!r}", hint="use 'sgd' or 'adam'")
    batches = list(data) if not hasattr(data, "__len__") else data
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * len(batches)))
    model.train()
    for _ in range(epochs):
        for x, y in batches:
            x = tuple(x) if isinstance(x, (tuple, list)) else (x,)
            opt.zero_grad(set_to_none=True)
            loss_fn(model(*x), y).backward()
            opt.step()
            sched.step()
    model.eval()
    return model
