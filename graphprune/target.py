"""Pruning targets and the global unit selection every optimizer and scorer shares.

A :class:`Target` says *how much* to remove (a fraction of units, parameters or FLOPs)
and the structural guards: a per-group floor (by default no group keeps less than a quarter
of its width, and no layer of channels is cut to one: a detector's 16-channel stem pruned
to 1 channel loses all accuracy, issue 19) and a hardware multiple for the kept widths.  :func:`select_units`
turns per-unit scores into per-group removal masks under that target, so HESSO, the
one-shot scorers and the benchmarks all prune by the same rule.

Costs start first-order: removing a unit saves its group's ``params_per_unit`` /
``flops_per_unit``.  When two groups slice one parameter along different dims (a conv's
input and output channels) the true saving is smaller than that sum: removing half the
rows and half the columns removes 3/4 of the weight, not all of it.  Given the
parameters' shapes (and, for FLOPs, the MACs each parameter takes part in),
:class:`Overlap` subtracts that double count, so a 50% FLOPs target really halves the
compact model's FLOPs.
"""
from __future__ import annotations

import heapq
import math
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import torch

from graphprune.analysis.groups import Group
from graphprune.errors import NumericalError, UnprunableTargetError

if TYPE_CHECKING:
    from graphprune.prunable import PrunableGraph

Kind = Literal["groups", "params", "flops", "latency"]

PORTABLE_MULTIPLE = 8
"""Width multiple when no codegen target is named (``graphprune prune``, ``gp.compile`` without
``codegen``): 8 float32 lanes fill an AVX2 register and two NEON ones, and tensor cores take
fp16 channels in eights, so one ONNX file serves all of them; 16 (AVX-512) would cost
accuracy for little gain elsewhere."""


@dataclass(frozen=True)
class Target:
    """Fraction of the network to REMOVE, measured in units, parameters or FLOPs; or a latency budget.

    Exactly one of ``groups`` (fraction of all group units), ``params`` or ``flops`` is
    set, in ``[0, 1)``, or a latency budget on the codegen target, met by
    :mod:`graphprune.latency` with the compiler in the loop: ``latency_ms``, the compact
    model's milliseconds, or ``latency``, the fraction of the dense model's measured latency
    to remove (``latency=0.4``: 60% of the dense time).  The fraction is judged against the
    dense model timed in turn with each compact one, so it holds on a machine whose speed
    drifts; an absolute budget taken from a separate timing of the dense model inherits that
    timing's noise (a mobilenet_v2 timed 13.6 ms right after tuning and 10.3-10.6 ms later,
    which made a "40%" budget one the pruning met by removing a third of the MACs).
    ``min_units`` is the fewest units any group keeps (never below
    one: a group left empty would kill a layer); ``min_fraction`` is the fewest as a
    fraction of each group's width (default 0.25; 0 turns the floor off): a global
    ranking otherwise empties whole layers whose scores are low only relatively, and the
    network collapses (issue 19).  A quarter, measured (``benchmarks/pretrained.py --alloc``,
    a pretrained ResNet-20, data-free OBSPA, no fine-tuning): at 50% MACs removed it lifts
    test accuracy from 0.526 to 0.626 and costs nothing at 10-30%, while half of each width
    binds too early (0.874 against 0.972 at 30% with a multiple of 8).
    ``multiple`` rounds each group's kept *width* (channels) to a multiple of it, the
    hardware's vector lanes; None (the default) is 1 here and is filled in by the pipelines
    that know the hardware (``gp.compile``, ``graphprune prune``/``compile``:
    :meth:`for_hardware`), while ``multiple=1`` asks for no rounding anywhere.  A group
    whose unit is several channels wide (an attention head of 32) needs fewer units per
    multiple (:meth:`unit_multiple`); a group too small for one multiple above its floor
    is kept whole (see :meth:`floor`).
    ``slack`` is how far past the fraction (as a fraction of the same total) a selection
    may land: a unit whose removal would overshoot further is passed over for smaller
    units that fit, so coarse units (a whole attention head) do not overshoot the target
    by their whole size (see :func:`select_units`).

    >>> Target(flops=0.5)
    Target(flops=0.5)
    """

    groups: float | None = None
    params: float | None = None
    flops: float | None = None
    latency_ms: float | None = None
    latency: float | None = None
    min_units: int = 1
    multiple: int | None = None
    slack: float = 0.005
    min_fraction: float = 0.25
    #: a latency target's share of the way from the dense latency to its budget (a training
    #: schedule's partial target, see :meth:`scaled`); 1 is the whole budget
    progress: float = 1.0

    def __post_init__(self) -> None:
        given = [k for k in ("groups", "params", "flops", "latency_ms", "latency") if getattr(self, k) is not None]
        if len(given) != 1:
            raise UnprunableTargetError(
                f"Target needs exactly one of groups=, params=, flops=, latency_ms=, latency= (got {given or 'none'})",
                hint="e.g. Target(flops=0.5) removes half of the FLOPs")
        value = getattr(self, given[0])
        if given[0] == "latency_ms":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise UnprunableTargetError(f"Target latency_ms={value!r} must be a positive number of milliseconds")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise UnprunableTargetError(
                f"Target {given[0]}={value!r} must be a fraction to remove in [0, 1)",
                hint="pass the fraction to remove, e.g. 0.5; 1.0 would remove the whole network")
        if isinstance(self.min_units, bool) or not isinstance(self.min_units, int) or self.min_units < 0:
            raise UnprunableTargetError(f"Target min_units={self.min_units!r} must be an int >= 0")
        if self.multiple is not None and (isinstance(self.multiple, bool) or not isinstance(self.multiple, int)
                                          or self.multiple < 1):
            raise UnprunableTargetError(f"Target multiple={self.multiple!r} must be an int >= 1")
        if (isinstance(self.min_fraction, bool) or not isinstance(self.min_fraction, (int, float))
                or not 0.0 <= self.min_fraction <= 1.0):
            raise UnprunableTargetError(f"Target min_fraction={self.min_fraction!r} must be a fraction in [0, 1]",
                                        hint="e.g. min_fraction=0.25 keeps a quarter of every group; 0 turns it off")
        if isinstance(self.slack, bool) or not isinstance(self.slack, (int, float)) or not 0.0 <= self.slack < 1.0:
            raise UnprunableTargetError(f"Target slack={self.slack!r} must be a fraction in [0, 1)")
        if not 0.0 < self.progress <= 1.0 or (self.progress != 1.0 and self.kind != "latency"):
            raise UnprunableTargetError(f"Target progress={self.progress!r} must be in (0, 1], and only with a "
                                        "latency target")

    @property
    def kind(self) -> Kind:
        """What the target measures: "groups", "params" or "flops" (a fraction), or "latency"."""
        if self.latency_ms is not None or self.latency is not None:
            return "latency"
        return "groups" if self.groups is not None else "params" if self.params is not None else "flops"

    @property
    def fraction(self) -> float:
        """The fraction to remove, whatever it measures (a latency target has none)."""
        if self.kind == "latency":
            raise UnprunableTargetError("a latency target is a measured budget, not a fraction of the network to remove",
                                        hint="prune to it with graphprune.prune (one-shot) or graphprune.compile")
        return float(getattr(self, self.kind))

    def budget_ms(self, dense_ms: float) -> float:
        """A latency target's whole budget in ms, for a dense model measured at ``dense_ms``."""
        if self.kind != "latency":
            raise UnprunableTargetError(f"{self!r} is not a latency target")
        return float(self.latency_ms) if self.latency_ms is not None else (1.0 - float(self.latency)) * dense_ms

    @property
    def keep_min(self) -> int:
        """Fewest units a group may keep: ``max(min_units, 1)``."""
        return max(self.min_units, 1)

    def unit_multiple(self, group: Group) -> int:
        """Units per hardware multiple in ``group``: ``multiple`` channels, in units of its width.

        A unit is ``lanes`` channels wide (an attention head of 32 is 32 rows of q, k and v),
        so ``multiple // gcd(multiple, lanes)`` units make a multiple of ``multiple`` channels:
        any count of 32-wide heads is already a multiple of 8.
        """
        multiple = self.multiple or 1
        return multiple // math.gcd(multiple, unit_lanes(group))

    def floor(self, group: Group) -> int:
        """Fewest units ``group`` may keep: the larger of ``keep_min`` and ``min_fraction`` of
        its width, two channels for a group of single channels while the floor is on (no layer
        cut to one channel), rounded up to :meth:`unit_multiple`; the whole group (no pruning)
        where that reaches its size, so a group never lands off the multiple or below the floor.
        Block groups (weight blocks inside one layer, for sparse kernels) have no fraction floor:
        emptying blocks narrows no layer, and 80-90% block sparsity is what makes BSR pay."""
        fraction = 0.0 if group.kind == "block" else self.min_fraction
        floor = max(self.keep_min, math.ceil(fraction * group.size - 1e-9))
        if fraction > 0 and unit_lanes(group) == 1:
            floor = max(floor, 2)
        step = self.unit_multiple(group)
        return min(group.size, -(-floor // step) * step)

    def allows(self, group: Group, kept: int) -> bool:
        """Whether ``kept`` units of ``group`` respect the floor and the multiple (the whole group does)."""
        return kept == group.size or (kept >= self.floor(group) and kept % self.unit_multiple(group) == 0)

    def for_hardware(self, multiple: int) -> "Target":
        """This target with ``multiple`` as its width multiple, unless the user already set one."""
        return self if self.multiple is not None else replace(self, multiple=multiple)

    def scaled(self, factor: float) -> "Target":
        """The same target with its fraction multiplied by ``factor`` (a schedule's partial target);
        for a latency budget, ``factor`` of the way from the dense latency to it (:attr:`progress`)."""
        if self.kind == "latency":
            return replace(self, progress=self.progress * factor)
        return replace(self, **{self.kind: self.fraction * factor})

    def covers(self, other: "Target") -> bool:
        """Whether this (partial) target reaches at least as far as ``other`` of the same kind."""
        if self.kind == "latency":
            return self.progress >= other.progress
        return self.fraction >= other.fraction

    @classmethod
    def coerce(cls, x: "Target | float | int") -> "Target":
        """A :class:`Target` as is; a bare number as a FLOPs fraction (``0.5`` = remove half the FLOPs)."""
        if isinstance(x, Target):
            return x
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return cls(flops=float(x))
        raise UnprunableTargetError(f"cannot read a pruning target from {x!r}",
                                    hint="pass graphprune.Target(flops=...) or a float (the FLOPs fraction)")

    def __repr__(self) -> str:
        extra = "".join(f", {k}={getattr(self, k)}" for k, d in (("min_units", 1), ("multiple", None), ("slack", 0.005),
                                                                  ("min_fraction", 0.25), ("progress", 1.0))
                        if getattr(self, k) != d)
        value = (f"latency_ms={self.latency_ms:g}" if self.latency_ms is not None
                 else f"latency={self.latency:g}" if self.latency is not None else f"{self.kind}={self.fraction:g}")
        return f"Target({value}{extra})"


def unit_lanes(group: Group) -> int:
    """Channels one unit of ``group`` is wide: the fewest rows a unit owns in any of its
    (non-block) slices, e.g. 1 for a channel, the head dimension for an attention head."""
    rows = [s.index.shape[1] for s in group.slices if not s.is_block]
    return max(1, min(rows)) if rows else 1


def unit_cost(group: Group, kind: Kind) -> float:
    """What removing one unit of ``group`` saves, in the target's currency."""
    return 1.0 if kind == "groups" else float(group.params_per_unit if kind == "params" else group.flops_per_unit)


def _unit_costs(groups: Sequence[Group], kind: Kind, params: Mapping[str, torch.Tensor] | None,
                param_macs: Mapping[str, float] | None) -> list[float]:
    """Per-group unit cost; for FLOPs, at least the MACs of the weight rows a unit owns.

    ``flops_per_unit`` is meant to be everything a unit's removal saves; where the
    weights' own MACs (``param_macs``) say a unit saves more, that figure wins, so the
    FLOPs count agrees with :class:`Overlap`, which works from the same MACs.
    """
    costs = [unit_cost(g, kind) for g in groups]
    if kind != "flops" or params is None or not param_macs:
        return costs
    for i, g in enumerate(groups):
        owned = sum(param_macs[s.param] * s.share(params[s.param].shape)
                    for s in g.slices if s.param in param_macs)
        costs[i] = max(costs[i], owned)
    return costs


def _total(groups: Sequence[Group], kind: Kind, total_params: float | None, total_flops: float | None,
           costs: Sequence[float] | None = None) -> float:
    given = total_params if kind == "params" else total_flops if kind == "flops" else None
    costs = costs if costs is not None else [unit_cost(g, kind) for g in groups]
    total = float(given) if given is not None else sum(g.size * c for g, c in zip(groups, costs))
    if total <= 0:
        raise UnprunableTargetError(f"nothing to prune: the groups remove no {kind}",
                                    hint="check that the graph has prunable groups")
    return total


def kept_widths(group: Group, target: Target) -> list[int]:
    """Kept counts ``group`` may step down through, largest first (its size excluded): the
    multiples of :meth:`Target.unit_multiple` from below its size down to :meth:`Target.floor`."""
    step, floor = target.unit_multiple(group), target.floor(group)
    return list(range((group.size - 1) // step * step, floor - 1, -step)) if floor < group.size else []


class Overlap:
    """Removes the double count when several dims of one parameter are pruned.

    A parameter ``p`` worth ``M_p`` (its element count for params, the MACs it takes
    part in for FLOPs) with fractions ``f_d`` of its rows removed along each sliced dim
    loses ``M_p * (1 - prod(1 - f_d))``; first-order unit costs count ``M_p * sum(f_d)``.
    :attr:`correction` is the difference, kept up to date as units are removed.
    """

    def __init__(self, groups: Sequence[Group], shapes: Mapping[str, Sequence[int]],
                 weights: Mapping[str, float]) -> None:
        dims: dict[str, set[int]] = defaultdict(set)
        for g in groups:
            for s in g.slices:
                if not s.is_block:  # blocks remove no rows; their overlap with channels is not corrected
                    dims[s.param].add(s.dim)
        shared = {p for p, ds in dims.items() if len(ds) > 1 and weights.get(p, 0.0) > 0}
        self._weights = {p: float(weights[p]) for p in shared}
        self._dims = {p: {d: int(shapes[p][d]) for d in sorted(dims[p])} for p in shared}
        self._rows = [[(s.param, s.dim, s.index.shape[1]) for s in g.slices if s.param in shared and not s.is_block]
                      for g in groups]
        # each group's parameters, once each: the greedy selection calls :meth:`remove` once per
        # step taken (16k steps on vit_b_16), and a hidden-column group touches every weight
        self._touched = [list(dict.fromkeys(p for p, _, _ in rows)) for rows in self._rows]
        self._removed: dict[tuple[str, int], int] = defaultdict(int)
        self._per_param: dict[str, float] = {}
        self.correction = 0.0

    def remove(self, group: int, units: int) -> None:
        """Account for ``units`` more units of ``groups[group]`` being removed."""
        for p, d, rows in self._rows[group]:
            self._removed[(p, d)] += rows * units
        for p in self._touched[group]:
            new = self._double_count(p, None)
            self.correction += new - self._per_param.get(p, 0.0)
            self._per_param[p] = new

    def preview(self, group: int, units: int) -> float:
        """What :attr:`correction` would become if ``units`` more units of ``groups[group]`` went."""
        return self.correction + sum(new - self._per_param.get(p, 0.0)
                                     for p, new in self._corrections(group, units).items())

    def _corrections(self, group: int, units: int) -> dict[str, float]:
        """Per touched parameter, its double count with ``units`` more units of ``group`` removed."""
        extra: dict[tuple[str, int], int] = defaultdict(int)
        for p, d, rows in self._rows[group]:
            extra[(p, d)] += rows * units
        return {p: self._double_count(p, extra) for p in self._touched[group]}

    def _double_count(self, p: str, extra: dict[tuple[str, int], int] | None) -> float:
        """Parameter ``p``'s double count with the rows removed so far (plus ``extra``)."""
        fractions = [min((self._removed[(p, d)] + (extra.get((p, d), 0) if extra else 0)) / n, 1.0)
                     for d, n in self._dims[p].items()]
        return self._weights[p] * (sum(fractions) - (1.0 - math.prod(1.0 - f for f in fractions)))


def _overlap(groups: Sequence[Group], kind: Kind, params: Mapping[str, torch.Tensor] | None,
             param_macs: Mapping[str, float] | None) -> Overlap | None:
    """The :class:`Overlap` for ``kind``, or None where first-order costs are all we can know."""
    if params is None or kind == "groups" or (kind == "flops" and not param_macs):
        return None
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    weights = {n: float(p.numel()) for n, p in params.items()} if kind == "params" else param_macs
    return Overlap(groups, shapes, weights)


def graph_totals(g: PrunableGraph) -> dict[str, Any]:
    """:func:`select_units`'s keywords for graph ``g``: its totals, which fractions are of, and
    what exact overlap accounting needs (weights pruned along two dims)."""
    return {"total_params": g.total_params, "total_flops": g.total_flops, "params": g.params,
            "param_macs": g.param_macs}


def select_units(groups: Sequence[Group], scores: Sequence[torch.Tensor], target: Target | float, *,
                 total_params: float | None = None, total_flops: float | None = None,
                 protect: Sequence[torch.Tensor | None] | None = None,
                 params: Mapping[str, torch.Tensor] | None = None,
                 param_macs: Mapping[str, float] | None = None) -> list[torch.Tensor]:
    """Pick the globally lowest-scoring units until ``target`` is removed.

    ``scores[i]`` has one entry per unit of ``groups[i]``; scores must be comparable
    across groups (the caller normalises).  ``-inf`` forces a unit first (units an
    earlier period already chose).  ``protect[i]`` marks units never to choose.
    Removal walks each group in steps that keep its width a multiple of
    ``target.multiple`` channels and at least its :meth:`Target.floor`; a step's score is the mean of
    its units, so with ``multiple=1`` this is the plain global sort, except near the end:
    a step that would land more than ``target.slack`` past the target is passed over
    (with the rest of its group) for the next steps that fit, so a coarse unit such as
    an attention head (6% of a small ViT's FLOPs) does not overshoot by its whole size;
    only if nothing that fits is left is the passed-over step that lands closest taken.
    Fractions are of
    ``total_params``/``total_flops`` when given (the whole model), else of what the
    groups hold.  With ``params`` (name -> tensor, for shapes) the count is corrected
    for parameters pruned along several dims (:class:`Overlap`); for FLOPs that also
    needs ``param_macs`` (name -> MACs the parameter takes part in).
    Returns one CPU BoolTensor per group, True = remove.
    """
    target = Target.coerce(target)
    if len(scores) != len(groups):
        raise ValueError(f"{len(scores)} score vectors for {len(groups)} groups")
    masks = [torch.zeros(g.size, dtype=torch.bool) for g in groups]
    if target.fraction == 0.0:
        return masks
    costs = _unit_costs(groups, target.kind, params, param_macs)
    need = target.fraction * _total(groups, target.kind, total_params, total_flops, costs)

    heap: list[tuple[float, int, int]] = []  # (step score, group, step number)
    unit_scores: list[list[float]] = []  # each group's scores, lowest first (plain floats: the
    orders: list[torch.Tensor] = []      # loop below ran 16k steps on vit_b_16, 2 s in torch calls)
    levels: list[list[int]] = []
    for i, (g, s) in enumerate(zip(groups, scores)):
        s = s.detach().to("cpu", torch.float64).flatten()
        if s.numel() != g.size:
            raise ValueError(f"scores for {g!r} have {s.numel()} entries, expected {g.size}")
        if torch.isnan(s).any():
            raise NumericalError(f"NaN pruning score in group {g.name!r}", node=g.name,
                                 hint="check the weights and gradients for NaN/Inf before scoring")
        if protect is not None and protect[i] is not None:
            s = s.masked_fill(protect[i].cpu(), math.inf)
            allowed = g.size - int(protect[i].sum())
        else:
            allowed = g.size
        ordered = torch.sort(s, stable=True)
        unit_scores.append(ordered.values.tolist())
        orders.append(ordered.indices)
        steps = [k for k in kept_widths(g, target) if g.size - k <= allowed]
        levels.append(steps)
        if steps:
            heapq.heappush(heap, (_step_score(unit_scores[i], g.size, steps[0]), i, 0))

    overlap = _overlap(groups, target.kind, params, param_macs)
    total = _total(groups, target.kind, total_params, total_flops, costs)
    limit = need + target.slack * total  # land in [need, limit] where the units allow it
    removed = 0.0  # first-order count; the net saving is removed - overlap.correction

    # Units taken but not yet given to the overlap, per group.  The correction is never
    # negative, so ``removed`` bounds the net saving from above: while it stays below what
    # a test needs, the correction is not needed, and the 16k steps of vit_b_16's selection
    # update it once per group instead of once per step (half the selection's time).
    pending: dict[int, int] = defaultdict(int)

    def flush() -> None:
        if overlap is not None:
            for i, units in pending.items():
                overlap.remove(i, units)
        pending.clear()

    def gain(i: int, step: int) -> float:
        """Net saving after taking step ``step`` of group ``i`` next."""
        units = (groups[i].size if step == 0 else levels[i][step - 1]) - levels[i][step]
        flush()
        correction = overlap.preview(i, units) if overlap is not None else 0.0
        return removed + units * costs[i] - correction

    def within(i: int, step: int) -> bool:
        """Whether taking the step lands at most at ``limit``.  Removing more only grows
        the overlap correction, so ``net() + units * cost`` bounds the gain: only steps near
        the limit pay for :meth:`Overlap.preview`."""
        units = (groups[i].size if step == 0 else levels[i][step - 1]) - levels[i][step]
        return removed + units * costs[i] <= limit or net() + units * costs[i] <= limit or gain(i, step) <= limit

    taken: list[list[float]] = [[] for _ in groups]  # scores of the steps taken, per group
    kept_now = [g.size for g in groups]  # each group's width so far: its lowest-scoring rest go

    def take(i: int, step: int, score: float, back: bool = False) -> None:
        """Take step ``step`` of group ``i`` (or, ``back``, give it back)."""
        nonlocal removed
        g = groups[i]
        start = g.size if step == 0 else levels[i][step - 1]
        kept = levels[i][step]
        kept_now[i] = start if back else kept
        sign = -1 if back else 1
        removed += sign * (start - kept) * costs[i]
        pending[i] += sign * (start - kept)
        if back:
            taken[i].pop()
        else:
            taken[i].append(score)

    def net() -> float:
        flush()
        return removed - (overlap.correction if overlap is not None else 0.0)

    def short() -> bool:
        """Whether the net saving is still below ``need``."""
        return removed < need or net() < need

    # Greedy by score, passing over a step that would land past ``limit`` (and the rest of
    # its group): smaller units further down the order fill the gap instead.  Forced
    # units (-inf) are always taken.
    passed: list[tuple[int, int, float]] = []
    while heap and short():
        score, i, step = heapq.heappop(heap)
        if score != -math.inf and not within(i, step):
            passed.append((i, step, score))
            continue
        take(i, step, score)
        if step + 1 < len(levels[i]):
            heapq.heappush(heap, (_step_score(unit_scores[i], levels[i][step], levels[i][step + 1]), i, step + 1))
    # Nothing small enough was left: take the passed-over step that lands closest past the
    # target (or, if none reaches it, the largest, and look again).
    while passed and short():
        gains = [gain(i, step) for i, step, _ in passed]
        reaching = [k for k, v in enumerate(gains) if v >= need * (1 - 1e-12)]
        k = min(reaching, key=lambda k: (gains[k], k)) if reaching else max(range(len(gains)), key=gains.__getitem__)
        i, step, score = passed.pop(k)
        take(i, step, score)
        if step + 1 < len(levels[i]):
            passed.append((i, step + 1, _step_score(unit_scores[i], levels[i][step], levels[i][step + 1])))
    # Still past the slack (the small units were all taken before a big one was needed):
    # give back the highest-scoring steps taken, last step of a group first, while the
    # target stays met.  Forced units are never given back.
    if net() > limit:
        back = [(-taken[i][-1], i) for i in range(len(groups)) if taken[i] and taken[i][-1] != -math.inf]
        heapq.heapify(back)
        while back and net() > need:
            _, i = heapq.heappop(back)
            step = len(taken[i]) - 1
            units = levels[i][step] - (groups[i].size if step == 0 else levels[i][step - 1])  # negative
            correction = overlap.preview(i, units) if overlap is not None else 0.0
            if removed + units * costs[i] - correction < need * (1 - 1e-12):
                continue  # this group's steps are needed (its earlier ones score lower still)
            take(i, step, 0.0, back=True)
            if taken[i] and taken[i][-1] != -math.inf:
                heapq.heappush(back, (-taken[i][-1], i))
    removed = net()
    if removed < need * (1 - 1e-9):
        raise UnprunableTargetError(
            f"{target!r} cannot be met: at most {removed / total:.1%} of the {target.kind} can go "
            f"while every group keeps its floor ({target.min_fraction:.0%} of its width, >= {target.keep_min} "
            f"unit(s)) on a multiple of {target.multiple or 1} channels",
            hint="lower the target, or lower min_fraction / min_units / multiple (--min-fraction 0, --multiple 1; "
                 "the default multiple is the hardware's, and a small model may have no width to spare)")
    for g, m, order, kept in zip(groups, masks, orders, kept_now):
        m[order[:g.size - kept]] = True
    return masks


def _step_score(ordered: list[float], kept_before: int, kept_after: int) -> float:
    """Mean score of the units removed when a group shrinks from ``kept_before`` to
    ``kept_after`` (``ordered``: the group's scores, lowest first)."""
    size = len(ordered)
    part = ordered[size - kept_before:size - kept_after]
    return sum(part) / len(part)


def achieved(groups: Sequence[Group], masks: Sequence[torch.Tensor], *, total_params: float | None = None,
             total_flops: float | None = None, params: Mapping[str, torch.Tensor] | None = None,
             param_macs: Mapping[str, float] | None = None) -> dict[str, float]:
    """Removed fractions of units (``groups``), ``params`` and ``flops`` for these masks.

    Same accounting (and overlap correction, given ``params``/``param_macs``) and the
    same totals rule as :func:`select_units`.
    """
    out: dict[str, float] = {}
    for kind in ("groups", "params", "flops"):
        costs = _unit_costs(groups, kind, params, param_macs)
        if kind != "groups" and not any(costs):
            out[kind] = 0.0
            continue
        counts = [int(m.sum()) for m in masks]
        removed = sum(n * c for n, c in zip(counts, costs))
        overlap = _overlap(groups, kind, params, param_macs)
        if overlap is not None:
            for i, n in enumerate(counts):
                overlap.remove(i, n)
            removed -= overlap.correction
        out[kind] = removed / _total(groups, kind, total_params, total_flops, costs)
    return out
