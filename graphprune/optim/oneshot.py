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
* **after training, with unlabeled inputs only** — ``data=`` calibration batches make
  ``obspa`` use the input Hessian measured on them (and enable ``wanda``,
  ``reconstruction``); then :func:`graphprune.recover` distils the compact model from the
  dense one on the same inputs, no labels needed.

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
import itertools
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Sequence

import torch
from torch import nn

from graphprune.analysis.groups import Group
from graphprune.errors import GraphPruneError, UnprunableTargetError
from graphprune.frontends.onnx_program import GraphProgram
from graphprune.latency import LatencyPlan, LatencyRun
from graphprune.optim.calibrated import absorb_means
from graphprune.optim.calibration import Calibration, calibrate
from graphprune.optim.drift import DRIFT_BATCHES, OutputDrift
from graphprune.optim.generated import generated_inputs, sampled_reason, samples_for
from graphprune.optim.obspa import Activation, GraphRoutes, InputMoments, compensate, consumer_moments
from graphprune.optim.scoring import CALIBRATED, Normalize, normalize, score
from graphprune.optim.uniform import select_uniform
from graphprune.target import Target, achieved, graph_totals, select_units

if TYPE_CHECKING:
    from graphprune.prunable import PrunableGraph

Scope = Literal["global", "layer"]


@dataclass
class PruneReport:
    """What :func:`prune` removed: per-group counts and the achieved reductions.

    ``masks[i]`` is True for the removed units of ``groups[i]``; ``achieved`` holds the
    removed fractions of ``groups`` (units), ``params`` and ``flops`` in the same
    first-order accounting as the target.  ``reason`` says why ``criterion`` was run;
    ``calibration`` holds the statistics measured on calibration data, if any;
    ``added_biases`` names the weights whose layers got a bias from this call
    (``add_biases``, kept in the graph's ``added_biases``).
    """

    criterion: str
    scope: Scope
    target: Target
    compensated: bool
    groups: list[Group] = field(repr=False)
    masks: list[torch.Tensor] = field(repr=False)
    achieved: dict[str, float] = field(default_factory=dict)
    reason: str = "asked for"
    calibration: Calibration | None = field(default=None, repr=False)
    latency: LatencyRun | None = None
    added_biases: list[str] = field(default_factory=list)

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
        n = len(self.added_biases)
        comp += f", a bias added to {n} layer{'s' if n > 1 else ''}" if n else ""
        return f"PruneReport({self.criterion}, {self.scope}, {self.target!r}{comp}: removed {got})"


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
           scope: Scope = "global", uniform: bool = False, **totals: Any) -> list[torch.Tensor]:
    """Removal masks under ``target``: one global ranking, or one fraction for every layer;
    ``uniform``: the same count in every group of one role (:mod:`.uniform`)."""
    target = Target.coerce(target)
    if uniform and scope == "global":
        return select_uniform(groups, scores, target, **totals)
    if scope == "global":
        return select_units(groups, scores, target, **totals)
    if scope == "layer":
        return _select_layerwise(groups, scores, target, totals)
    raise GraphPruneError(f"unknown scope {scope!r}", hint="use scope='global' or scope='layer'")


#: What ``prune`` runs when no criterion is named, and why: measured by held-out accuracy of the
#: pruned model on the trained digits models (the tests' ConvNet and MLP, the benchmarks' ResNet
#: and ViT: ``benchmarks/results/one_shot_calibrated.txt``); see ``choose_criterion``.
DEFAULT_DATA_FREE = "obspa"
DEFAULT_CALIBRATED = "obspa"


def choose_criterion(criterion: str | None, calibrated: bool) -> tuple[str, str]:
    """The criterion ``prune`` runs and the reason the report gives for it.

    Named criteria are run as asked.  Without one: with calibration data, OBSPA with the
    measured input Hessian (the most held-out accuracy of the calibrated criteria on the
    trained digits ResNet and ViT at 30 and 50% of MACs removed, ahead of wanda and
    reconstruction, which do not compensate); without data, data-free OBSPA (ahead of l2
    in every one of those cells).
    """
    if criterion is not None:
        return criterion, "asked for"
    if calibrated:
        return DEFAULT_CALIBRATED, ("default with calibration data: OBS error and compensation under the input "
                                    "Hessian measured on it (best calibrated criterion on trained models)")
    return DEFAULT_DATA_FREE, ("default without data: OBS error and compensation under a Hessian modelled from "
                               "the weights (best data-free criterion on trained models)")


def prune(g: PrunableGraph, criterion: str | None = None, target: Target | float = 0.4, *,
          data: Iterable | None = None, loss_fn: Callable | None = None, normalize: Normalize | None = None,
          scope: Scope = "global", compensate_consumers: bool | None = None, batches: int = 4,
          damping: float = 0.1, activation: Activation | None = None, rescale: float = 2.0,
          calibration: Calibration | None = None, calibration_batches: int | None = None, uniform: bool = False,
          add_biases: bool | None = None, codegen: str = "x86", tuning_db: str | None = None,
          generate: bool | None = None) -> PruneReport:
    """Score, select and zero units of the traced graph ``g`` in place; returns a report.

    ``target`` is a :class:`~graphprune.target.Target` or a float (fraction of FLOPs to
    remove).  ``criterion`` None picks the best for what is given (:func:`choose_criterion`;
    the report says which and why).  ``data``/``loss_fn``/``batches`` feed the gradient
    criteria (``taylor``, ``hessian``).  For ``obspa``, ``wanda`` and ``reconstruction``,
    ``data`` is calibration data instead: unlabeled batches of model inputs (a tensor, a
    tuple of tensors, or a dict by input name per batch; ``(x, y)`` pairs have their labels
    ignored), read once, at most ``calibration_batches`` of them, to measure what every
    consuming layer reads (:func:`~graphprune.optim.calibration.calibrate`); or pass those
    statistics as ``calibration``.
    ``compensate_consumers`` applies the OBS consumer update after selection (with the
    measured moments when there are some); it defaults to on for ``obspa`` and can be
    combined with any criterion; ``reconstruction`` by default moves the removed units'
    measured means into the consumers' biases instead.  ``add_biases``: where a consumer
    has no bias (nor a BatchNorm after it) to take that mean, give it one (Llama's
    ``o_proj``/``down_proj``), kept in ``g.added_biases`` and added by ``construct_subnet``;
    on by default with calibration data, where the means are measured, off without.
    ``normalize`` makes scores comparable across groups before the global ranking
    (:func:`~graphprune.optim.scoring.normalize`); by default ``max`` for ``obspa`` (each
    group's most damaging unit is 1: OBS errors are heavy-tailed, and a group of four
    heads has a mean dominated by one head) and ``mean`` for the others.
    ``damping`` and ``activation`` tune OBSPA's data-free Hessian proxy (see
    :func:`~graphprune.optim.obspa.input_moments`): by default the activation between
    each group and each of its consumers is read from the traced graph (relu, relu6,
    gelu, silu, attention values, identity); ``activation=`` forces one everywhere.
    ``uniform`` removes the same number of units from the groups of one role in every
    layer (:mod:`.uniform`: heads per layer, MLP width), so a transformer's compact model
    fits its standard config; ``scope="layer"`` already gives groups of one size one count.
    A latency target (``Target(latency_ms=...)``, or ``Target(latency=...)`` as a share of
    the dense model's time) is met on the ``codegen`` target with the compiler in the loop
    (:mod:`graphprune.latency`: per-layer tables measured with the tuning database
    ``tuning_db``, the machine's shared one by default); the report's ``latency`` holds the
    measurements.
    ``generate``: a generative language model (a transformers causal LM) given no data
    calibrates on sequences it samples itself (:mod:`.generated`: as good as real text on
    the benchmarks' LM, and far ahead of the weights-only estimate), unless ``False``; the
    report says so.  ``True`` requires it.
    Call ``g.construct_subnet()`` afterwards for the compact model.
    """
    target = Target.coerce(target)
    model, params, groups = getattr(g, "model", None), g.params, list(g.groups)
    sampled = None
    if generate and criterion is not None and criterion not in CALIBRATED:
        raise GraphPruneError(f"generate=True gives calibration data, which {criterion!r} does not read",
                              hint=f"use a calibrated criterion ({', '.join(sorted(CALIBRATED))}) or leave generate unset")
    if data is None and calibration is None and generate is not False:
        if samples_for(model, criterion):
            data = generated_inputs(model)
            sampled = sum(len(b) for b in data)
        elif generate:
            raise GraphPruneError(f"generate=True needs a generative language model; this graph's model is "
                                  f"{type(model).__name__ if model is not None else 'none (an ONNX file)'}",
                                  hint="pass calibration data, or leave generate unset")
    judged_on = None  # the batches a latency target judges its selections on, taken before anything reads data
    if target.kind == "latency" and data is not None:
        data, judged_on = _first_batches(data, DRIFT_BATCHES)
    criterion, reason = choose_criterion(criterion, data is not None or calibration is not None)
    if sampled is not None:
        reason = sampled_reason(sampled, reason)
    ir = getattr(g, "ir", None)
    routes = GraphRoutes(ir, params) if ir is not None else None
    totals = graph_totals(g)
    if criterion in CALIBRATED and calibration is None and data is not None:
        calibration = calibrate(g, data, batches=calibration_batches)
    if calibration is not None and criterion not in CALIBRATED:
        calibration = None  # a gradient or magnitude criterion: the statistics play no part
    moments = [calibration.moments(i) for i in range(len(groups))] if calibration is not None else None
    if add_biases is None:  # on with measured means, where the graph can keep the biases (not a bare stand-in)
        add_biases = calibration is not None and hasattr(g, "added_biases")
    added = getattr(g, "added_biases", None) if add_biases else None
    before = {k: v.clone() for k, v in added.items()} if added else {}
    if add_biases and added is None:
        raise GraphPruneError("add_biases needs a traced graph (gp.trace) to keep the biases in",
                              hint="pass add_biases=False")
    with _differentiable(g, model, criterion) as program:
        raw = score(groups, params, criterion, model=program, data=data, loss_fn=loss_fn, batches=batches,
                    damping=damping, activation=activation, graph=routes, calibration=calibration,
                    moments=moments, add_biases=add_biases)
    if normalize is None:
        normalize = "max" if criterion == "obspa" else "mean"
    do_comp = criterion == "obspa" if compensate_consumers is None else compensate_consumers
    absorb = (not do_comp and compensate_consumers is None and criterion == "reconstruction"
              and calibration is not None)

    def apply(masks: Sequence[torch.Tensor], tensors: dict[str, torch.Tensor],
              biases: dict[str, torch.Tensor] | None) -> None:
        """This call's edits for ``masks`` on ``tensors`` and ``biases``: compensation or
        absorbed means, then the units zeroed."""
        if do_comp:
            _compensate_all(groups, masks, tensors, damping, activation, routes, rescale, moments, biases)
        elif absorb:
            absorb_means(groups, masks, tensors, calibration, routes, biases)
        for grp, m in zip(groups, masks):
            grp.scatter_(tensors, m)
        if biases:
            _zero_removed_outputs(groups, masks, biases)

    latency = None
    if target.kind == "latency":
        if scope != "global" or uniform:
            raise GraphPruneError("a latency target is met by one global, per-group selection",
                                  hint="use scope='global' and uniform=False with a latency target")
        judge = _drift_judge(g, judged_on, apply, adds=added is not None) if judged_on is not None else None
        masks, latency = _select_latency(g, groups, _normalize(raw, normalize), target, codegen, tuning_db, judge)
    else:
        masks = select(groups, _normalize(raw, normalize), target, scope, uniform, **totals)
    apply(masks, params, added)
    done = achieved(groups, masks, **totals)
    if latency is not None:
        done["latency_ms"] = latency.achieved_ms
    given = [k for k, v in (added or {}).items() if k not in before or not torch.equal(v, before[k])]
    return PruneReport(criterion, scope, target, do_comp, groups, masks, done, reason=reason,
                       calibration=calibration, latency=latency, added_biases=given)


_normalize = normalize  # `prune`'s keyword shadows the function's name


def _select_latency(g: PrunableGraph, groups: Sequence[Group], scores: Sequence[torch.Tensor], target: Target,
                    codegen: str, tuning_db: str | None,
                    judge: Callable[[Sequence[torch.Tensor]], float] | None) -> tuple[list[torch.Tensor], LatencyRun]:
    """Masks meeting ``target``'s latency budget as measured on ``codegen`` (see :mod:`graphprune.latency`),
    the order ``judge`` prefers where there is one (:meth:`LatencyPlan.select`)."""
    plan = LatencyPlan.for_graph(g, groups, target, codegen, tuning_db)
    masks = plan.select(scores, target, judge=judge)
    run = plan.run
    assert run is not None and plan.table is not None
    table = plan.table
    run.layers_measured, run.layers_cached, run.layers_refreshed = table.measured, table.reused, table.refreshed
    return masks, run


def _first_batches(data: Iterable, n: int) -> tuple[Iterable, list]:
    """``data``'s first ``n`` batches, and ``data`` to read as if none were taken: a one-shot
    iterator (a generator) gets them chained back in front."""
    if isinstance(data, Iterator):
        head = list(itertools.islice(data, n))
        return itertools.chain(head, data), head
    return data, list(itertools.islice(data, n))


Biases = dict[str, torch.Tensor] | None  # added biases, where a call may add them


def _drift_judge(g: PrunableGraph, data: Iterable,
                 apply: Callable[[Sequence[torch.Tensor], dict[str, torch.Tensor], Biases], None],
                 adds: bool) -> Callable[[Sequence[torch.Tensor]], float]:
    """How far the model ``prune`` would hand over for some masks moves from the dense one on
    ``data`` (:class:`.drift.OutputDrift`): ``apply``'s edits made on a copy of the weights
    and of the added biases (written to only where ``adds``), ``g`` untouched."""
    drift = OutputDrift(g, data)

    def judge(masks: Sequence[torch.Tensor]) -> float:
        tensors = {k: v.detach().clone() for k, v in g.params.items()}
        biases = {k: v.clone() for k, v in (getattr(g, "added_biases", None) or {}).items()}
        apply(masks, tensors, biases if adds else None)
        return drift(tensors, biases)
    return judge


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
                    routes: GraphRoutes | None = None, rescale: float = 2.0,
                    measured: Sequence[Sequence[InputMoments]] | None = None,
                    added: dict[str, torch.Tensor] | None = None) -> None:
    """OBS updates for every group, all estimated from the weights as they were before any update
    (or measured on calibration data before any update, ``measured``).

    Estimating first keeps the result independent of the group order: one group's
    update rewrites consumer columns that another group reads as producer rows.
    """
    active = [(i, grp, m) for i, (grp, m) in enumerate(zip(groups, masks)) if m.any()]
    moments = [measured[i] if measured is not None else consumer_moments(grp, params, activation, routes)
               for i, grp, _ in active]
    for (_, grp, m), mom in zip(active, moments):
        compensate(grp, m, params, mom, damping, graph=routes, rescale=rescale, added=added)


def _zero_removed_outputs(groups: Sequence[Group], masks: Sequence[torch.Tensor],
                          added: dict[str, torch.Tensor]) -> None:
    """Zero the entries of added biases at output channels that are removed units
    themselves (a pruned hidden width through ``o_proj``): the bias is part of those
    units, which must be zero to be removed."""
    for grp, m in zip(groups, masks):
        if not m.any():
            continue
        for s in grp.slices:
            if s.role == "producer" and s.param in added and not s.is_block:
                added[s.param][s.index[m.to(s.index.device)].reshape(-1).to(added[s.param].device)] = 0


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
