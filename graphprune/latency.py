"""Pruning to a latency budget, with the compiler in the loop (HALP-style).

FLOPs are a poor proxy for what a compiled layer costs: kernels run in tiles and vector
lanes, so latency falls in steps as channels go, and a depthwise layer costs far more per
FLOP than a dense one.  So the budget is met against measurements:

1. **Latency tables.**  Every layer with a weight (the registry's :meth:`Rule.layer`) is
   rebuilt alone at several widths, with the elementwise ops the compiler fuses into it
   (:func:`epilogue`), and compiled and timed on the codegen target
   (:func:`graphprune.codegen.layer_latency.measure_layers`, which reads the shared tuning
   database: with its epilogue a layer is the kernel the model tuned).  A layer's time at
   input width ``i`` and output width ``o`` is taken as ``T(i, C_out) * T(C_in, o) / T(C_in, C_out)`` from two measured curves, linear between
   the measured widths.  Tables are cached per target in a JSON file, so the next model
   with the same layer shapes measures nothing, except where the database has since learnt
   a faster schedule for a layer's function.  The dense model's time beyond its layers'
   (norms, attention products, softmax, copies) is spread over the elements those other ops
   write (:func:`op_traffic`), so a unit also saves its share of them.
2. **Selection.**  Greedy knapsack: each group steps down through its allowed widths
   (floor, multiple); the next step taken anywhere is the one that loses the least score
   (weighted by its FLOPs, see :func:`select_for_latency`) per millisecond the model says
   it saves, until the predicted latency meets the budget.  Scores normalised per group
   do not trade against milliseconds across groups, and the table misses the compiled
   model by a few percent, as much as the knapsack's choices differ by; so where there
   is calibration data the budget is also met in the order a FLOPs target removes units,
   and the pruned model whose outputs move least from the dense model's is kept
   (:meth:`LatencyPlan.select`'s ``judge``).
3. **Correction.**  The whole compact model is compiled and timed; the prediction misses
   what it cannot see (fusion, memory traffic between layers, ops whose time does not
   follow the elements they write), so the next budget is interpolated
   between the tries measured under and over the budget (:func:`_next_layer_budget`) and the
   selection repeated, until the measured latency is within half the ``tolerance`` of the
   budget (a model compiled and timed again measures a few percent apart, so a try at the
   edge of the tolerance is not settled for while rounds remain).

One-shot pruning does this once (:func:`meet_latency`); the OTO optimizers choose under a
:class:`LatencyPlan` at every pruning period: partial budgets (the schedule's way from the
dense latency to the budget) from the table alone, the whole budget with the correction, so
the units a training run ends with meet the budget as compiled.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Sequence

import torch

from graphprune.analysis.groups import Group
from graphprune.atomic import atomic_path
from graphprune.errors import UnprunableTargetError
from graphprune.ops.catalog import rule_for
from graphprune.ops.common import numel
from graphprune.ops.registry import Layer, op_kind
from graphprune.target import Target, graph_totals, select_units

if TYPE_CHECKING:
    from graphprune.analysis.labels import Labels
    from graphprune.ir.graph import Graph, Node
    from graphprune.prunable import PrunableGraph

#: Widths (fractions of the full width) each layer curve is measured at.
GRID = (1.0, 0.75, 0.5, 0.25)

MeasureLayers = Callable[[Sequence[tuple[Layer, int, int]]], Sequence[tuple[float, dict[str, float | None]]]]
MeasureMasks = Callable[[Sequence[torch.Tensor]], float]

#: The selections a budget can be met with: the knapsack (:func:`select_for_latency`), and
#: the order a FLOPs target removes units in (:func:`select_in_flops_order`).
ORDERS = ("knapsack", "flops order")


def graph_layers(ir: Graph) -> list[tuple[Layer, str]]:
    """Every layer of the traced graph with its weight's user-facing name (what group slices name),
    with the :func:`epilogue` the compiler fuses into it."""
    out, users = [], ir.users()
    for node in ir:
        layer = rule_for(node.op).layer(node, ir)
        if layer is not None:
            layer = replace(layer, epilogue=epilogue(node, ir, users), lead=_lead(layer, node, ir))
            out.append((layer, ir.values[layer.weight].source_name or layer.weight))
    return out


def _lead(layer: Layer, node: Node, ir: Graph) -> tuple[int, ...]:
    """A dense layer's input dims before its channels where there are several (a transformer's
    batch and tokens): a 3-d matmul is another kernel than the 2-d one of the same rows."""
    if layer.kind != "dense":
        return ()
    acts = [ir.values[i].shape for i in node.inputs if ir.values[i].kind == "act"]
    shape = tuple(acts[0]) if acts else ()
    return shape[:-1] if len(shape) > 2 and shape[-1] == layer.channels[0] else ()


#: activations a layer's kernel takes as its epilogue, by op name (ATen or ONNX, lower case),
#: each an epilogue entry of its own name (and ``relu6``: a clip to [0, 6])
ACTIVATIONS = frozenset({"relu", "gelu", "silu", "sigmoid", "hardswish"})
#: per-channel affine ops that fold into a layer's bias before code generation
_FOLDED = {"batch_norm", "_native_batch_norm_legit_no_training", "batchnormalization"}
#: ops an inference graph compiles to nothing
_IDENTITY = {"dropout", "identity", "clone", "contiguous"}


def _clip_bounds(node: Node, ir: Graph) -> tuple[float, float] | None:
    """A clip's constant bounds (hardtanh's arguments, ONNX Clip's constant inputs), or None."""
    if str(node.source_op).startswith("aten."):
        bounds = [a for a in node.args[1:3] if isinstance(a, (int, float))]
        return (float(bounds[0]), float(bounds[1])) if len(bounds) == 2 else None
    data = [ir.values[i].data for i in node.inputs[1:3]]
    if len(data) != 2 or any(d is None or d.numel() != 1 for d in data):
        return None
    return float(data[0]), float(data[1])


def epilogue(node: Node, ir: Graph, users: dict[str, list[Node]] | None = None) -> tuple[str, ...]:
    """The elementwise ops after layer ``node`` that fuse into its kernel, in order: ``relu``,
    ``relu6``, ``gelu``..., and ``add`` for a residual (another activation of the output's
    shape).  Batch norms and constant bias adds fold into the layer's own bias and are not
    listed.  A layer is timed with them (:func:`graphprune.codegen.layer_latency.layer_module`)
    because the compiler fuses them: timed bare, a convolution is a different kernel from the
    one the model runs, with no tuned record (a resnet18 stem alone ran on default schedules
    at 77 ms, 30 times its tuned time in the model).  The walk stops where the value has
    another user or the op is anything else.  An add that joins two layers' outputs (a
    residual block's shortcut convolution) is listed for both: it fuses into one of them."""
    return tuple(op for op, _ in _epilogue_walk(node, ir, ir.users() if users is None else users) if op)


def _epilogue_walk(node: Node, ir: Graph, users: dict[str, list[Node]]) -> list[tuple[str, Node]]:
    """The nodes :func:`epilogue` walks through after ``node``, each with its epilogue entry
    ("" for those that fold into the layer: batch norms, constant biases, identities)."""
    walked: list[tuple[str, Node]] = []
    value = node.outputs[0]
    while len(users.get(value, [])) == 1:
        user = users[value][0]
        name = op_kind(user).rstrip("_").lower()  # relu_ and Relu read as relu
        acts = [i for i in user.inputs if i != value and ir.values[i].kind == "act"]
        if name in _FOLDED or name in _IDENTITY or (name == "add" and not acts):
            walked.append(("", user))
        elif name in ACTIVATIONS:
            walked.append((name, user))
        elif name in ("hardtanh", "clip", "clamp") and _clip_bounds(user, ir) == (0.0, 6.0):
            walked.append(("relu6", user))
        elif name == "add" and len(acts) == 1 and ir.values[acts[0]].shape == ir.values[value].shape:
            walked.append(("add", user))
        else:
            break
        value = user.outputs[0]
    return walked


#: ops that compile to no kernel of their own: views of their input
_VIEWS = {"reshape"}


def op_traffic(ir: Graph, labels: Labels, comp: torch.Tensor, groups: Sequence[Group]) -> tuple[float, list[float]]:
    """The elements written by the ops the latency table does not time (everything but the
    layers with weights, their fused epilogues and views): in all, and per unit of each group
    (the elements a unit's removal takes out of those ops' outputs).

    A small transformer spends much of its time there: layer norms, softmax, the attention
    products and the copies between heads and tokens run over the hidden width and the
    heads, and no layer timing sees them shrink.  :class:`LatencyModel` spreads the time the
    table misses over these elements: on 24 random widths of a digits ViT at batch 32
    (compiled, 1 thread) the predicted share of the dense time was off by 0.045 on average
    with them and by 0.097 with the layers alone (rank correlation 0.955 and 0.925)."""
    users = ir.users()
    covered: set[str] = set()
    for node in ir:
        if rule_for(node.op).layer(node, ir) is not None:
            covered.add(node.name)
            covered.update(n.name for _, n in _epilogue_walk(node, ir, users))
    owner = torch.full((int(comp.max()) + 1 if comp.numel() else 0,), -1, dtype=torch.long)
    for gi, g in enumerate(groups):
        owner[g.atoms] = gi
    total, per_group = 0.0, torch.zeros(len(groups), dtype=torch.float64)
    for node in ir:
        if node.name in covered or node.op in _VIEWS or op_kind(node).rstrip("_").lower() in _IDENTITY:
            continue
        for out in node.outputs:
            value = ir.values[out]
            if value.kind != "act" or value.shape is None or not all(isinstance(d, int) for d in value.shape):
                continue
            elements = float(numel(tuple(value.shape)))
            total += elements
            f = labels.fields.get(out)
            if f is None or not f.labels.numel():
                continue
            atoms = f.labels.reshape(-1)
            atoms = atoms[atoms >= 0]
            gi = owner[comp[atoms]]
            gi = gi[gi >= 0]
            per_group.index_add_(0, gi, torch.full((gi.numel(),), elements / f.labels.numel(), dtype=torch.float64))
    return total, [float(e) / max(g.size, 1) for e, g in zip(per_group, groups)]


class LayerTime(NamedTuple):
    """One compiled layer's milliseconds, and the tuning database's best seconds for each of
    its functions (by structural hash; None: no measured record) when it was timed."""
    ms: float
    schedules: dict[str, float | None]


class LatencyTable:
    """Measured milliseconds per (layer geometry, widths), cached in a JSON file per target.

    ``measure(requests)`` times a batch of ``(layer, in_width, out_width)`` (each a
    :class:`LayerTime`'s fields); it is called only
    for keys the cache lacks, or, given ``best_known`` (the database's best seconds per
    function now), whose functions the database has since learnt faster schedules for.  An
    entry is as good as the schedules it was timed on: a digits ViT's ``mlp.0`` at 144 of 192
    outputs, timed before the database held a schedule of its own, read 0.195 ms (its full
    width's time) where the same width re-timed later took 0.168 ms, and the flat curve told
    the selection that its first 48 units saved nothing.  The file is rewritten atomically
    after each batch (:meth:`save`), so an interrupted run keeps what it measured.
    """

    def __init__(self, measure: MeasureLayers, path: str | os.PathLike | None = None, target: str = "",
                 best_known: Callable[[], Mapping[str, float]] | None = None) -> None:
        self.measure, self.target, self.best_known = measure, target, best_known
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, LayerTime] = {}
        self.measured = 0  # new measurements this session (the rest came from the cache)
        self.refreshed = 0  # of those, entries the database had improved on since they were timed
        self.reused = 0  # entries read from the cache this session
        self._checked: set[str] = set()  # entries timed or found current in this session
        if self.path is not None and self.path.exists():
            for k, v in json.loads(self.path.read_text()).items():
                if isinstance(v, dict) and "ms" in v:  # older files (bare numbers) are timed anew
                    self.entries[k] = LayerTime(float(v["ms"]), dict(v.get("schedules", {})))

    def key(self, layer: Layer, cin: int, cout: int) -> str:
        g = _groups_at(layer, cin)
        return (f"{self.target}|{layer.kind}|rows={layer.rows}|size={layer.size}|k={layer.kernel}|s={layer.stride}"
                f"|p={layer.padding}|d={layer.dilation}|g={g}|{cin}x{cout}"
                + (f"|then={'+'.join(layer.epilogue)}" if layer.epilogue else "")
                + (f"|lead={layer.lead}" if layer.lead else ""))

    def fill(self, requests: Sequence[tuple[Layer, int, int]]) -> None:
        """Time, in one batch, the requests missing from the table or timed on schedules the
        database has since improved on."""
        todo: dict[str, tuple[Layer, int, int]] = {}
        best: Mapping[str, float] | None = None  # read once, when a cached entry is first checked
        for layer, cin, cout in requests:
            k = self.key(layer, cin, cout)
            if k in todo or k in self._checked:
                continue
            if k in self.entries and self.best_known is not None and best is None:
                best = self.best_known()
            if k not in self.entries:
                todo[k] = (layer, cin, cout)
            elif best is not None and _improved(self.entries[k].schedules, best):
                todo[k] = (layer, cin, cout)
                self.refreshed += 1
            else:
                self._checked.add(k)
                self.reused += 1
        if not todo:
            return
        for k, timed in zip(todo, self.measure(list(todo.values()))):
            self.entries[k] = LayerTime(*timed)
            self._checked.add(k)
        self.measured += len(todo)
        self.save()

    def ms(self, layer: Layer, cin: int, cout: int) -> float:
        self.fill([(layer, cin, cout)])
        return self.entries[self.key(layer, cin, cout)].ms

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            Path(tmp).write_text(json.dumps({k: v._asdict() for k, v in self.entries.items()}, indent=0,
                                            sort_keys=True))


def _improved(schedules: Mapping[str, float | None], best: Mapping[str, float]) -> bool:
    """Whether ``best`` (seconds per function now) is faster than the ``schedules`` an entry
    was timed on, for any of its functions (beyond rounding in the records)."""
    for h, then in schedules.items():
        now = best.get(h)
        if now is not None and (then is None or now < then * (1 - 1e-6)):
            return True
    return False


def _groups_at(layer: Layer, cin: int) -> int:
    """The layer's group count at input width ``cin``: a depthwise layer keeps one channel per group."""
    return cin if layer.depthwise else layer.groups


def _widths(full: int, quantum: int) -> list[int]:
    """The widths a curve is measured at: :data:`GRID` of ``full``, multiples of ``quantum``, distinct."""
    ws = {max(quantum, round(full * f / quantum) * quantum) for f in GRID}
    return sorted(w for w in ws if w <= full)


class _Curve:
    """A layer's time along one width, linear between measured widths (flat below the lowest).

    A width measured slower than a wider one is taken at the wider one's time: a narrower
    layer is never predicted slower.  Such a point is timing noise or a schedule's bad luck
    (a 72-wide matmul at 57 us beside the 96-wide one at 47 us); believed, it makes the
    first step down look like a loss, so the selection skips it and takes two at once."""

    def __init__(self, points: list[tuple[int, float]]) -> None:
        ordered = sorted(points)
        kept, lowest = [], float("inf")
        for w, t in reversed(ordered):
            lowest = min(lowest, t)
            kept.append((w, lowest))
        self.points = kept[::-1]

    def __call__(self, width: float) -> float:
        pts = self.points
        if width <= pts[0][0]:
            (w0, t0), (w1, t1) = pts[0], pts[min(1, len(pts) - 1)]
            slope = (t1 - t0) / (w1 - w0) if w1 != w0 else 0.0
            return max(t0 - slope * (w0 - width), 0.0)
        for (w0, t0), (w1, t1) in zip(pts, pts[1:]):
            if width <= w1:
                return t0 + (t1 - t0) * (width - w0) / (w1 - w0)
        return pts[-1][1]


@dataclass
class _LayerModel:
    layer: Layer
    full: float
    by_in: _Curve | None
    by_out: _Curve | None
    # (group index, channels removed per unit) along the input and output dims
    ins: list[tuple[int, int]] = field(default_factory=list)
    outs: list[tuple[int, int]] = field(default_factory=list)

    def ms(self, removed: Sequence[int]) -> float:
        cin, cout = self.layer.channels
        i = cin - sum(removed[g] * r for g, r in self.ins)
        o = cout - sum(removed[g] * r for g, r in self.outs)
        if self.layer.depthwise:
            return self.by_in(min(i, o)) if self.by_in is not None else self.full
        t_in = self.by_in(i) if self.by_in is not None else self.full
        t_out = self.by_out(o) if self.by_out is not None else self.full
        return t_in * t_out / self.full if self.full > 0 else 0.0


class LatencyModel:
    """Predicted milliseconds of the graph's weighted layers for per-group removed unit counts,
    and, given the :func:`op_traffic` outside them and the measured ``dense_ms``, of the rest:
    the dense time the layers do not account for, shrinking with the elements the removed
    units take out of the other ops.  Without them (or where the layers alone predict more
    than the whole model, on other schedules than its own) the rest is left out."""

    def __init__(self, layers: Sequence[tuple[Layer, str]], groups: Sequence[Group], table: LatencyTable,
                 traffic: tuple[float, Sequence[float]] | None = None, dense_ms: float | None = None) -> None:
        self.groups = list(groups)
        self.layers: list[_LayerModel] = []
        self.macs: list[_LayerModel] = []  # the layers' multiply-accumulates, modelled alike
        self.touching: list[list[int]] = [[] for _ in groups]  # group -> layers it changes
        self.users: list[list[int]] = []  # layer -> groups that change it
        changed: list[tuple[Layer, list[tuple[int, int]], list[tuple[int, int]]]] = []
        for layer, name in layers:
            ins, outs = [], []
            for gi, g in enumerate(groups):
                for s in g.slices:
                    if s.param != name or s.is_block:
                        continue
                    rows = int(s.index.shape[1])
                    if s.dim == layer.in_dim:
                        ins.append((gi, rows))
                    elif s.dim == layer.out_dim:
                        outs.append((gi, rows))
            if ins or outs:
                changed.append((layer, ins, outs))
        table.fill([r for layer, ins, outs in changed for r in _requests(layer, ins, outs)])
        for idx, (layer, ins, outs) in enumerate(changed):
            self.layers.append(_layer_model(layer, ins, outs, table.ms))
            self.macs.append(_layer_model(layer, ins, outs, layer_macs))
            self.users.append(sorted({gi for gi, _ in ins + outs}))
            for gi in self.users[-1]:
                self.touching[gi].append(idx)
        # ms per element of the other ops, and each group's elements per unit
        self.rest_per_element, self.rest_per_unit = 0.0, [0.0] * len(self.groups)
        if traffic is not None and dense_ms is not None and traffic[0] > 0:
            rest = dense_ms - sum(m.full for m in self.layers)
            self.rest_per_element = max(rest, 0.0) / traffic[0]
            self.rest_per_unit = [self.rest_per_element * e for e in traffic[1]]
        self.rest_ms = self.rest_per_element * traffic[0] if traffic is not None else 0.0

    def predict(self, removed: Sequence[int]) -> float:
        rest = self.rest_ms - sum(r * u for r, u in zip(removed, self.rest_per_unit))
        return sum(m.ms(removed) for m in self.layers) + max(rest, 0.0)

    def saving(self, removed: list[int], group: int, more: int) -> float:
        """Milliseconds saved by removing ``more`` units of ``group`` on top of ``removed``."""
        return self._drop(self.layers, removed, group, more) + more * self.rest_per_unit[group]

    def macs_saved(self, removed: list[int], group: int, more: int) -> float:
        """The layers' multiply-accumulates removing ``more`` units of ``group`` on top of
        ``removed`` takes out, at the widths ``removed`` leaves: a hidden channel removes less
        once the heads it fed are gone."""
        return self._drop(self.macs, removed, group, more)

    def _drop(self, models: list[_LayerModel], removed: list[int], group: int, more: int) -> float:
        """How much the layers ``group`` changes fall in ``models`` when it loses ``more`` units."""
        before = sum(models[i].ms(removed) for i in self.touching[group])
        removed[group] += more
        after = sum(models[i].ms(removed) for i in self.touching[group])
        removed[group] -= more
        return before - after


def layer_macs(layer: Layer, cin: int, cout: int) -> float:
    """Multiply-accumulates of ``layer`` at input width ``cin`` and output width ``cout``."""
    if layer.kind != "conv2d":
        return float(layer.rows * cin * cout)  # rows: every activation row (batch x tokens)
    out = [(n + 2 * p - d * (k - 1) - 1) // s + 1
           for n, p, d, k, s in zip(layer.size, layer.padding, layer.dilation, layer.kernel, layer.stride)]
    per_filter = 1 if layer.depthwise else cin // max(layer.groups, 1)
    return float(layer.rows * out[0] * out[1] * layer.kernel[0] * layer.kernel[1] * per_filter * cout)


def _curve_points(layer: Layer, ins: list[tuple[int, int]], outs: list[tuple[int, int]]
                  ) -> tuple[list[tuple[int, int, int]] | None, list[tuple[int, int, int]] | None]:
    """The (width, in width, out width) each of ``layer``'s curves is measured at: along the
    widths its groups change (one curve for a depthwise layer: its channels go together)."""
    cin, cout = layer.channels
    quantum = layer.groups if layer.groups > 1 and not layer.depthwise else 1
    if layer.depthwise:
        return [(w, w, w * cout // cin) for w in _widths(cin, 1)], None
    return ([(w, w, cout) for w in _widths(cin, quantum)] if ins else None,
            [(w, cin, w) for w in _widths(cout, quantum)] if outs else None)


def _requests(layer: Layer, ins: list[tuple[int, int]], outs: list[tuple[int, int]]) -> list[tuple[Layer, int, int]]:
    """Every (layer, in width, out width) :func:`_layer_model` reads."""
    points = [p for curve in _curve_points(layer, ins, outs) if curve for p in curve]
    return [(layer, *layer.channels)] + [(layer, i, o) for _, i, o in points]


def _layer_model(layer: Layer, ins: list[tuple[int, int]], outs: list[tuple[int, int]],
                 measure: Callable[[Layer, int, int], float]) -> _LayerModel:
    """``layer``'s curves along the widths its groups change, from ``measure(layer, cin, cout)``."""
    by_in, by_out = (_Curve([(w, measure(layer, i, o)) for w, i, o in points]) if points else None
                     for points in _curve_points(layer, ins, outs))
    return _LayerModel(layer, measure(layer, *layer.channels), by_in, by_out, ins, outs)


def select_for_latency(model: LatencyModel, scores: Sequence[torch.Tensor], budget_ms: float,
                       levels: Sequence[Sequence[int]],
                       protect: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """Removal masks whose predicted layer time is at most ``budget_ms``, losing the least score per ms.

    ``levels[i]``: the kept widths group ``i`` may step down through, largest first (its
    floor and multiple applied).  Units go lowest score first within a group (a score of
    ``-inf`` forces a unit first); a step that would take a unit ``protect[i]`` marks is
    never taken.  Stops short of the budget only when no step left saves anything predicted.
    The last step is the one, of all that reach the budget, that loses the least score: by
    price per ms alone it can be a coarse step (a whole head, a plateau's width) that loses more
    and lands further under the budget than a smaller step that reaches it too.

    A step's price is its units' mean score times the layer multiply-accumulates it removes at
    the widths already chosen (:meth:`LatencyModel.macs_saved`; FLOPs or parameters per unit
    for a group that changes no layer, such as an embedding's columns), per millisecond saved.
    The MACs are the step's as it is taken, not the dense model's: once a ViT's heads went,
    a hidden channel fed fewer q/k/v channels and saved a quarter of the time, and priced
    on its dense FLOPs it looked four times too dear: a digits ViT pruned to 40% of its
    latency lost all but one head per block and kept 88 of 96 hidden channels (accuracy
    0.62 before recovery),
    where FLOPs-targeted pruning kept 40 channels and two to four heads, scored 0.77 and
    measured 5% faster.
    Scores are normalised per group (:func:`~graphprune.optim.scoring.normalize`), so a head
    and an MLP neuron both score about 1 at most: dividing those by the time each saves alone
    made a small ViT give up all but one head per block, a cut worth a tenth of its accuracy
    against FLOPs-targeted pruning at the same measured latency.  Weighted by FLOPs, the
    order is the FLOPs-targeted order (:func:`graphprune.target.select_units`) wherever a
    layer's time follows its FLOPs, and departs from it only where the measurements say
    the time does not: a plateau that saves nothing, a layer slower than its FLOPs.
    """
    groups = model.groups
    weight = [g.flops_per_unit or float(g.params_per_unit) or 1.0 for g in groups]
    removed = [0] * len(groups)
    orders = [torch.sort(s.detach().double().flatten(), stable=True).indices for s in scores]
    step = [0] * len(groups)  # next index into levels[i]
    current = model.predict(removed)
    flat = [s.detach().double().flatten() for s in scores]
    guarded = [None if p is None or not bool(p.any()) else p.flatten() for p in (protect or [None] * len(groups))]

    def candidate(i: int) -> tuple[float, int, float] | None:
        """Group ``i``'s next step as (score lost per ms saved, step index, ms saved). On a plateau of the
        table (a kernel's tile not yet emptied) one step saves nothing: look down to the first
        step that does."""
        for j in range(step[i], len(levels[i])):
            more = groups[i].size - levels[i][j] - removed[i]
            if guarded[i] is not None and bool(guarded[i][orders[i][removed[i]:removed[i] + more]].any()):
                return None  # this step and every deeper one would take a protected unit
            saved = model.saving(removed, i, more)
            if saved > 1e-12:
                mass = model.macs_saved(removed, i, more) or more * weight[i]
                return float(flat[i][orders[i][removed[i]:removed[i] + more]].mean()) * mass / saved, j, saved
        return None

    # a step changes the savings of the groups sharing a layer with it, and only theirs
    sharing = [sorted({h for layer in model.touching[i] for h in model.users[layer]}) for i in range(len(groups))]
    best = [candidate(i) for i in range(len(groups))]
    while current > budget_ms:
        live = [(c[0], i) for i, c in enumerate(best) if c is not None]
        if not live:
            break
        _, i = min(live)
        gap = current - budget_ms
        if best[i][2] >= gap:  # the last step: of those that reach the budget, the one losing least
            i = min((c[0] * c[2], h) for h, c in enumerate(best) if c is not None and c[2] >= gap)[1]
        _, j, saved = best[i]
        removed[i], step[i] = groups[i].size - levels[i][j], j + 1
        current -= saved
        for h in sharing[i]:
            best[h] = candidate(h)
    masks = []
    for g, order, r in zip(groups, orders, removed):
        m = torch.zeros(g.size, dtype=torch.bool)
        m[order[:r]] = True
        masks.append(m)
    return masks


def select_in_flops_order(model: LatencyModel, scores: Sequence[torch.Tensor], budget_ms: float, target: Target,
                          protect: Sequence[torch.Tensor | None] | None = None,
                          totals: Mapping[str, Any] | None = None) -> list[torch.Tensor]:
    """The masks a FLOPs target would choose (:func:`graphprune.target.select_units`, with
    ``target``'s floors and multiple, and the graph's ``totals``, :func:`~graphprune.target.graph_totals`:
    without them a coarse unit is passed over at other points), at the smallest FLOPs share whose predicted layer
    time is at most ``budget_ms`` (found by bisection); the deepest share the floors allow
    where none is.  The knapsack's alternative: the FLOPs target's order, where only the
    stopping point is the table's."""
    def at(share: float) -> list[torch.Tensor] | None:
        try:
            return select_units(model.groups, scores, replace(target, latency=None, latency_ms=None, progress=1.0,
                                                              flops=share), protect=protect, **(totals or {}))
        except UnprunableTargetError:  # past what the floors leave
            return None

    lo, hi = 0.0, 0.999
    best, deepest = None, at(0.0)
    for _ in range(20):
        mid = (lo + hi) / 2
        masks = at(mid)
        if masks is None:
            hi = mid
            continue
        deepest = masks
        if model.predict([int(m.sum()) for m in masks]) <= budget_ms:
            best, hi = masks, mid
        else:
            lo = mid
    chosen = best if best is not None else deepest
    assert chosen is not None  # a share of 0 removes nothing and always fits the floors
    return chosen


@dataclass
class LatencyRun:
    """What :meth:`LatencyPlan.select` measured: the dense model, each round's prediction and
    measurement.  Each round keeps the dense time it was read against (``dense_ms`` in the
    round), so a try is compared with the budget as a share of the dense model at its time,
    and :attr:`achieved_ms` states it on the run's last dense time."""

    budget_ms: float
    dense_ms: float
    rounds: list[dict[str, float]] = field(default_factory=list)
    layers_measured: int = 0
    layers_cached: int = 0
    layers_refreshed: int = 0  # of the measured, cached ones the database had since improved on
    chosen: int | None = None  # the index in ``rounds`` of the try that was kept
    order: str = "knapsack"  # the entry of ORDERS the rounds selected in
    judged: dict[str, float] = field(default_factory=dict)  # each order's judged output drift, where compared
    compiled: int = 0  # compact models compiled for every order compared (0: only these rounds')

    @property
    def achieved_ms(self) -> float:
        """The kept try's measurement, on the last dense time (the dense time when nothing was pruned)."""
        return self.achieved_share * self.dense_ms

    @property
    def achieved_share(self) -> float:
        """The kept try's time as a share of the dense model's, as they were timed together."""
        if self.chosen is None:
            return 1.0
        kept = self.rounds[self.chosen]
        return kept["measured_ms"] / kept["dense_ms"]


class LatencyPlan:
    """A latency budget for a model whose weights change while it is pruned: the table
    (:class:`LatencyModel`), each group's allowed widths, and a way to time a compact model.

    :meth:`select` chooses for any share of the way from the dense latency to the budget
    (the OTO optimizers' schedule; one-shot pruning asks for the whole way at once). The
    time outside the table's layers is learnt from each measurement and kept for the next
    choice, so a training run's later periods start from the last correction.

    ``dense_ms`` is the dense model's time: a number, or a function that reads it anew (a
    :class:`~graphprune.codegen.layer_latency.PairedTimer`'s reference, whose estimate
    improves with every timing), measured through ``measure`` when not given.  Every try is
    judged as a share of the dense time read with it, so a machine that slows or speeds up
    between rounds moves the budget with the tries.
    """

    def __init__(self, model: LatencyModel, levels: Sequence[Sequence[int]], measure: MeasureMasks,
                 tolerance: float = 0.05, rounds: int = 6,
                 dense_ms: float | Callable[[], float] | None = None,
                 totals: Mapping[str, Any] | None = None) -> None:
        self.model, self.levels, self.measure = model, list(levels), measure
        self.totals = dict(totals or {})  # select_units' keywords, so the FLOPs order is a FLOPs target's
        self.tolerance, self.rounds = tolerance, rounds
        self.order = "knapsack"  # what partial budgets select under: the last judged whole budget's choice
        if dense_ms is None:
            dense_ms = measure([torch.zeros(g.size, dtype=torch.bool) for g in model.groups])
        self._dense = dense_ms if callable(dense_ms) else (lambda: float(dense_ms))
        self.other_ms = self.dense_ms - model.predict([0] * len(model.groups))  # the rest assumed unchanged
        self.run: LatencyRun | None = None
        self.table: LatencyTable | None = None  # where the layer times came from, when measured here

    @property
    def dense_ms(self) -> float:
        """The dense model's time as now known."""
        return float(self._dense())

    def budget(self, target: Target) -> float:
        """``target``'s budget in ms, :attr:`~graphprune.target.Target.progress` of the way from
        the dense latency to its whole budget."""
        dense = self.dense_ms
        return dense - target.progress * max(dense - target.budget_ms(dense), 0.0)

    def select(self, scores: Sequence[torch.Tensor], target: Target,
               protect: Sequence[torch.Tensor | None] | None = None, measured: bool = True,
               judge: Callable[[Sequence[torch.Tensor]], float] | None = None) -> list[torch.Tensor]:
        """Masks for ``target`` (a latency target, maybe part of the way): predicted from the
        table alone below the whole way or when not ``measured`` (a probe); for the whole
        way, compiled and timed until within half the ``tolerance`` (a re-measure of the same
        model moves by a few percent: resnet18's last round at 4.7% under its budget
        re-measured at 7.4% under), else the closest of ``rounds`` tries, preferring one not
        over the budget by more than ``tolerance``, recorded in :attr:`run`.

        With a ``judge`` (masks -> how far that pruned model's outputs move, lower is better:
        :class:`~graphprune.optim.drift.OutputDrift` on calibration data), the whole way is
        met in each of :data:`ORDERS` and the pruned model the judge prefers is kept,
        its order used for later choices: the knapsack weighs per-group normalised scores
        against milliseconds, and where those scales disagree, or the table misses the
        compiled model by more than the knapsack gains, the FLOPs order is better
        (:mod:`graphprune.optim.drift`).  A model both orders choose is compiled once."""
        if target.progress < 1.0 or not measured:
            dense_layers = self.model.predict([0] * len(self.model.groups))
            layers = _first_layer_budget(dense_layers, self.dense_ms, self.other_ms, self.budget(target))
            return self._choose(self.order, scores, max(layers, 0.0), target, protect)
        dense = self.dense_ms
        if target.budget_ms(dense) >= dense:
            self.run = LatencyRun(target.budget_ms(dense), dense)
            return [torch.zeros(g.size, dtype=torch.bool) for g in self.model.groups]
        timed: dict[bytes, float] = {}
        tries: list[tuple[list[torch.Tensor], LatencyRun]] = []
        failed: list[UnprunableTargetError] = []
        for order in (ORDERS if judge is not None else [self.order]):
            try:
                tries.append(self._meet(scores, target, protect, order, timed))
            except UnprunableTargetError as exc:
                failed.append(exc)
        if not tries:
            raise failed[0]
        if judge is not None:
            judged: dict[bytes, float] = {}  # one judgement per model, as one timing
            for masks, run in tries:
                if _key(masks) not in judged:
                    judged[_key(masks)] = judge(masks)
            losses = {run.order: judged[_key(masks)] for masks, run in tries}
            final, run = min(tries, key=lambda t: losses[t[1].order])
            run.judged = losses
            run.compiled = len(timed)
        else:
            final, run = tries[0]
        self.run, self.order = run, run.order
        # the time outside the table, as the kept try measured it, is where a later choice starts;
        # the kept try is not timed again: a second timing of the same model would be another
        # draw of the machine's noise, reported as if it were the kept model's time
        assert run.chosen is not None
        self.other_ms = run.achieved_ms - run.rounds[run.chosen]["predicted_layers_ms"]
        return final

    def _meet(self, scores: Sequence[torch.Tensor], target: Target, protect: Sequence[torch.Tensor | None] | None,
              order: str, timed: dict[bytes, float]) -> tuple[list[torch.Tensor], LatencyRun]:
        """The whole budget met in ``order``, corrected by measurement (see :meth:`select`);
        ``timed`` holds the measurements of this call's earlier tries, by their masks."""
        dense_layers = self.model.predict([0] * len(self.model.groups))
        dense = self.dense_ms
        run = LatencyRun(target.budget_ms(dense), dense, order=order)
        best: tuple[float, list[torch.Tensor], int] | None = None  # (rank, masks, index in run.rounds)
        layer_budget = _first_layer_budget(dense_layers, dense, self.other_ms, run.budget_ms)
        for _ in range(self.rounds):
            masks = self._choose(order, scores, max(layer_budget, 0.0), target, protect)
            predicted = self.model.predict([int(m.sum()) for m in masks])
            if run.rounds and any(predicted == r["predicted_layers_ms"] for r in run.rounds):
                break  # the units allow nothing between the tries that bracket the budget
            key = _key(masks)
            if key not in timed:
                timed[key] = self.measure(masks)
            measured = timed[key]
            dense = self.dense_ms  # as now known, read with this try; the budget and earlier tries move with it
            run.rounds.append({"layer_budget_ms": layer_budget, "predicted_layers_ms": predicted,
                               "measured_ms": measured, "dense_ms": dense})
            run.dense_ms, run.budget_ms = dense, target.budget_ms(dense)
            goal = run.budget_ms
            miss = abs(measured - goal) / goal
            rank = (miss if measured <= goal * (1 + self.tolerance) else 1.0 + miss)
            if best is None or rank < best[0]:
                best = (rank, masks, len(run.rounds) - 1)
            if miss <= self.tolerance / 2:
                break
            seen = [(dense_layers, dense)] + [(r["predicted_layers_ms"], r["measured_ms"] / r["dense_ms"] * dense)
                                              for r in run.rounds]
            layer_budget = min(max(_next_layer_budget(seen, goal, layer_budget), 0.0), dense_layers)
        assert best is not None
        if best[0] > 1.0:
            fastest = min(r["measured_ms"] / r["dense_ms"] for r in run.rounds) * run.dense_ms
            raise UnprunableTargetError(
                f"latency budget {run.budget_ms:.3f} ms not reached: the closest of {len(run.rounds)} compiled "
                f"models measured {fastest:.3f} ms (dense {run.dense_ms:.3f} ms; selected by {order})",
                hint="raise the budget, or lower the floor (min_fraction/min_units) that keeps layers wide")
        _, final, run.chosen = best
        return final, run

    def _choose(self, order: str, scores: Sequence[torch.Tensor], layers_ms: float, target: Target,
                protect: Sequence[torch.Tensor | None] | None) -> list[torch.Tensor]:
        """Masks predicted to run the layers in ``layers_ms``, selected in ``order``."""
        if order == "knapsack":
            return select_for_latency(self.model, scores, layers_ms, self.levels, protect)
        return select_in_flops_order(self.model, scores, layers_ms, target, protect, self.totals)

    @classmethod
    def for_graph(cls, g: PrunableGraph, groups: Sequence[Group], target: Target, codegen: str = "x86",
                  tuning_db: str | None = None) -> "LatencyPlan":
        """The plan for traced graph ``g`` on ``codegen``: its layers measured (or read from the table
        cached beside the tuning database), compact models compiled with that database and timed
        in turn with the dense model (:class:`~graphprune.codegen.layer_latency.PairedTimer`), so
        the machine's drift between rounds is not read as a miss, each after a few trials of every
        function were run into the database (:data:`~graphprune.codegen.layer_latency.ROUND_TRIALS`,
        starting from its carried-over schedules: what a compile that tunes would build)."""
        from graphprune.codegen import layer_latency  # TVM on use only
        from graphprune.target import kept_widths

        table = LatencyTable(lambda requests: layer_latency.measure_layers(requests, codegen, tuning_db),
                             layer_latency.table_path(codegen, tuning_db), codegen,
                             best_known=lambda: layer_latency.best_known(codegen, tuning_db))
        timer = layer_latency.PairedTimer(g.backend.emit(g, g.zeroed_copy([])), g.example[0], codegen, tuning_db,
                                          schedule_trials=layer_latency.ROUND_TRIALS)
        traffic = op_traffic(g.ir, g.analysis.labels, g.analysis.comp, groups)
        model = LatencyModel(graph_layers(g.ir), groups, table, traffic, timer.reference_ms)
        plan = cls(model, [kept_widths(grp, target) for grp in groups], measure_masks_fn(g, timer),
                   dense_ms=lambda: timer.reference_ms, totals=graph_totals(g))
        plan.table = table
        return plan


def _key(masks: Sequence[torch.Tensor]) -> bytes:
    """The identity of one pruned model among a budget's tries: its masks' bytes."""
    return torch.cat(list(masks)).numpy().tobytes() if masks else b""


def _first_layer_budget(dense_layers: float, dense_ms: float, other_ms: float, budget_ms: float) -> float:
    """The layers' time to ask for first: the budget less the time outside the layers, where
    the table and the model agree that there is such time; else (the layers alone predicted
    slower than the whole model: kernels the table times on other schedules than the model's)
    the layers' predicted time scaled by the budget's share of the dense time."""
    if 0.0 <= other_ms < dense_ms:
        return budget_ms - other_ms
    return dense_layers * budget_ms / dense_ms


def _next_layer_budget(seen: Sequence[tuple[float, float]], goal: float, last: float) -> float:
    """The layers' time to ask for next, from each try's (predicted layer time, measured
    model time), the dense model first: interpolated between the nearest tries under and over
    ``goal`` where there are both, else through the two fastest tries (all over).

    The time outside the weighted layers is not fixed: attention scores, softmax and norms
    shrink with the heads and widths the layers lose, so the whole model can move two or
    three times as much as its layers do.  Shifting the layers' budget by each miss alone
    assumes it moves one for one; a digits ViT at batch 32 then swung between 6 and 15 ms
    around a 9.4 ms budget for every round.

    Interpolating between the bracket's ends alone (regula falsi) creeps where the model's
    time is curved: on a curve that falls faster than the table near the dense end, every try
    lands under the budget, the dense model stays the far end, and each round moves a fraction
    of the way (a ViT's 40% budget: five tries 5-12% under in six rounds).  So, as the Illinois
    method does, an end kept while the last ``k`` tries landed on the other side counts
    ``2**-(k-1)`` of its miss, and the interpolation reaches the budget in a few rounds."""
    under = [p for p in seen if p[1] <= goal]
    over = [p for p in seen if p[1] > goal]
    if under and over:
        (p0, m0), (p1, m1) = max(under), min(over)
        side = seen[-1][1] <= goal
        k = next((i for i, p in enumerate(reversed(seen)) if (p[1] <= goal) != side), len(seen))
        weight = 0.5 ** max(k - 1, 0)  # for the end on the other side of the last k tries
        f0, f1 = (m0 - goal) * (1.0 if side else weight), (m1 - goal) * (weight if side else 1.0)
    else:
        (p0, m0), (p1, m1) = sorted(seen)[:2]
        f0, f1 = m0 - goal, m1 - goal
    if abs(p1 - p0) <= 1e-3 * max(p0, p1) or f1 == f0:
        # nothing to interpolate: scale by the last try's miss (a ratio holds where the table's
        # milliseconds are not the model's; a shift by the miss does not)
        return last * goal / seen[-1][1]
    slope = (f1 - f0) / (p1 - p0)
    if slope <= 0:  # noise: slower at fewer layer-milliseconds; shift by the miss of the fastest
        return p0 + goal - m0
    return p0 - f0 / slope


def meet_latency(model: LatencyModel, scores: Sequence[torch.Tensor], target: Target,
                 levels: Sequence[Sequence[int]], measure: MeasureMasks, tolerance: float = 0.05,
                 rounds: int = 6) -> tuple[list[torch.Tensor], LatencyRun]:
    """Masks whose compiled model measures within ``tolerance`` of ``target``'s budget (see
    :meth:`LatencyPlan.select`), and the record of the rounds."""
    plan = LatencyPlan(model, levels, measure, tolerance, rounds)
    masks = plan.select(scores, target)
    assert plan.run is not None
    return masks, plan.run


def measure_masks_fn(g: PrunableGraph, measure_model: Callable[[object], float]) -> MeasureMasks:
    """Time the compact model of ``g`` with ``masks`` removed (``g``'s weights untouched)."""
    def measure(masks: Sequence[torch.Tensor]) -> float:
        return float(measure_model(g.backend.emit(g, g.zeroed_copy(zip(g.groups, masks)))))
    return measure


__all__ = ["ACTIVATIONS", "GRID", "ORDERS", "LatencyModel", "LatencyPlan", "LatencyRun", "LatencyTable",
           "LayerTime", "epilogue",
           "graph_layers", "layer_macs", "meet_latency", "measure_masks_fn", "op_traffic", "select_for_latency",
           "select_in_flops_order"]
