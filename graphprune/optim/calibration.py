"""What every consumer of every group really reads, measured on unlabeled calibration inputs.

The data-free criteria model a consumer's input from the weights (:func:`~graphprune.optim.obspa.input_moments`);
with a few unlabeled batches we can measure it instead.  One pass over the batches
accumulates, for each (group, consumer layer), the first and second moments of the
group's units as that layer reads them — never the activations themselves, so memory
is bounded by the moment matrices, not by the number of batches:

* ``moments``: an :class:`~graphprune.optim.obspa.InputMoments` over the units (or over a
  unit's features for attention values, ``block > 1``), the real input Hessian that OBS
  scoring and compensation need;
* ``within``: per unit, the ``k x k`` second moments of the ``k`` columns the consumer
  reads it at (a flatten before a linear layer gives each channel ``k`` positions), so the
  output error of removing one unit is exact for that layer (:mod:`.calibrated`).

The inputs are caught where the consumer layer runs: for a PyTorch model by a
``TorchFunctionMode`` that sees every ``linear``/``conv`` call made with a consumer's weight
(whatever module or function makes it); for an ONNX model by evaluating the traced graph in
torch (:class:`~graphprune.frontends.onnx_program.GraphProgram`) and observing the data
input of each consumer node.  A consumer not seen (a weight used through another op, a
grouped convolution) keeps the data-free estimate, and :attr:`Calibration.uncalibrated`
names it, so the report can say so.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from graphprune.analysis.groups import Group, Slice
from graphprune.errors import GraphPruneError, ShapeMismatchError
from graphprune.frontends.onnx_program import GraphProgram
from graphprune.optim.obspa import GraphRoutes, InputMoments, block_of, consumer_slices, input_moments

if TYPE_CHECKING:
    from graphprune.prunable import PrunableGraph


@dataclass
class ConsumerStats:
    """Measured (or, when ``measured`` is False, data-free) input statistics of one consumer.

    ``moments`` is over ``size * block`` entries; ``within`` is ``[size, k, k]`` (second
    moments of a unit's ``k`` columns) and ``within_mean`` ``[size, k]``, with ``block == 1``.
    """

    moments: InputMoments
    within: torch.Tensor
    within_mean: torch.Tensor
    measured: bool


@dataclass
class Calibration:
    """Per group, per consumer (in :func:`~graphprune.optim.obspa.consumer_slices` order) statistics."""

    stats: list[list[ConsumerStats]]
    samples: int
    uncalibrated: list[str] = field(default_factory=list)

    def moments(self, i: int) -> list[InputMoments]:
        return [s.moments for s in self.stats[i]]

    def __repr__(self) -> str:
        n = sum(len(s) for s in self.stats)
        return (f"Calibration({self.samples} samples, {n - len(self.uncalibrated)}/{n} consumers measured"
                + (f"; data-free: {', '.join(self.uncalibrated[:5])}" if self.uncalibrated else "") + ")")


class _Accumulator:
    """Running sums for one (group, consumer): ``Σ x xᵀ`` over units, ``Σ x``, and the within-unit blocks."""

    def __init__(self, s: Slice, block: int) -> None:
        self.index, self.block = s.index.reshape(-1), block
        self.size, self.k = s.index.shape
        n = self.size * (block if block > 1 else 1)
        self.second = torch.zeros(n, n, dtype=torch.float64)
        self.sum = torch.zeros(n, dtype=torch.float64)
        self.within = torch.zeros(self.size, self.k, self.k, dtype=torch.float64)
        self.within_sum = torch.zeros(self.size, self.k, dtype=torch.float64)
        self.rows = 0

    def add(self, x2d: torch.Tensor) -> None:
        cols = x2d[:, self.index.to(x2d.device)].double().cpu()  # [N, size * k], unit-major
        n = cols.shape[0]
        per = cols.reshape(n, self.size, self.k)
        if self.block > 1:
            self.second += cols.T @ cols
            self.sum += cols.sum(0)
        else:
            self.second += torch.einsum("nuj,nvj->uv", per, per)
            self.sum += per.sum((0, 2))
        self.within += torch.einsum("nui,nuj->uij", per, per)
        self.within_sum += per.sum(0)
        self.rows += n

    def result(self) -> ConsumerStats:
        per = self.rows * (1 if self.block > 1 else self.k)
        second, mean = self.second / per, self.sum / per
        mom = InputMoments(second - torch.outer(mean, mean), mean, self.block)
        return ConsumerStats(mom, self.within / self.rows, self.within_sum / self.rows, True)


def _data_free(g: Group, s: Slice, params: dict[str, torch.Tensor], routes: GraphRoutes | None) -> ConsumerStats:
    """The weight-based estimate, in the same form, for a consumer the calibration did not see."""
    mom = input_moments(g, params, graph=routes, consumer=s)
    k = s.index.shape[1]
    if mom.block > 1:
        second = mom.second.diagonal().reshape(g.size, k)
        mean = mom.mean.reshape(g.size, k)
    else:
        second = mom.second.diagonal()[:, None].expand(g.size, k)
        mean = mom.mean[:, None].expand(g.size, k)
    return ConsumerStats(mom, torch.diag_embed(second).clone(), mean.clone(), False)


def as_inputs(batch: Any, n_inputs: int, names: Sequence[str] = ()) -> tuple[Any, ...]:
    """One calibration batch as positional model inputs.

    A batch is a tensor or array (one input), a tuple/list with one per input, or a dict keyed
    by input name.  A labelled pair ``(x, y)`` for a one-input model is accepted and its
    labels ignored, so the loaders of gradient criteria work here too.
    """
    if isinstance(batch, Mapping):
        missing = [n for n in names if n not in batch]
        if missing or not names:
            raise ShapeMismatchError(f"calibration batch lacks input {missing[0] if missing else '?'}",
                                     node=missing[0] if missing else None,
                                     hint=f"key each batch by the model's input names: {', '.join(names)}")
        return tuple(batch[n] for n in names)
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return (batch,)
    if isinstance(batch, (tuple, list)):
        if len(batch) == n_inputs:
            return tuple(batch)
        if n_inputs == 1 and len(batch) == 2:
            return (batch[0],)
    raise GraphPruneError(f"a calibration batch must be a tensor, a tuple of {n_inputs} tensors or a dict by "
                          f"input name; got {type(batch).__name__}",
                          hint="pass data=[x1, x2, ...] (unlabeled batches of model inputs)")


class _Watch(TorchFunctionMode):
    """Calls ``seen(name, x, axis)`` for every linear/conv call made with a watched weight."""

    def __init__(self, weights: dict[int, str], seen: Any) -> None:
        super().__init__()
        self.weights, self.seen = weights, seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if len(args) > 1 and id(args[1]) in self.weights and isinstance(args[0], torch.Tensor):
            fname = getattr(func, "__name__", "")
            axis = -1 if fname == "linear" else 1 if fname.startswith("conv") and "transpose" not in fname else None
            if axis is not None:
                self.seen(self.weights[id(args[1])], args[0], axis)
        return func(*args, **kwargs)


def calibrate(g: PrunableGraph, data: Iterable, *, batches: int | None = None) -> Calibration:
    """Measure the input statistics of every consumer of every group of ``g`` on ``data``.

    ``data`` yields unlabeled batches (:func:`as_inputs`); ``batches`` caps how many are read.
    Runs the model once per batch in eval mode without gradients and leaves it unchanged.
    A graph with a PyTorch model and no IR (groups written by hand) is calibrated through
    the model alone, every consumer read as one feature per unit.
    """
    ir, params, groups = getattr(g, "ir", None), g.params, list(g.groups)
    model = getattr(g, "model", None)
    if ir is None and model is None:
        raise GraphPruneError("calibration needs a traced graph or its PyTorch model", hint="g = gp.trace(model, x)")
    routes = GraphRoutes(ir, params) if ir is not None else None
    consumers = [consumer_slices(grp) for grp in groups]
    acc: dict[str, list[tuple[int, int, _Accumulator]]] = {}
    for i, (grp, cs) in enumerate(zip(groups, consumers)):
        for j, s in enumerate(cs):
            route = routes.route(grp, s) if routes is not None else None
            acc.setdefault(s.param, []).append((i, j, _Accumulator(s, block_of(s, route))))
    skipped: set[str] = set()
    dims = {s.param: s.dim for cs in consumers for s in cs}

    def seen(param: str, x: torch.Tensor, axis: int) -> None:
        w = params[param]
        if x.dim() < 2 or x.shape[axis] != w.shape[dims[param]] or not x.is_floating_point():
            skipped.add(param)  # a grouped conv or an unusual layout: keep the data-free estimate
            return
        x2d = x.detach().movedim(axis, -1).reshape(-1, x.shape[axis])
        for _, _, a in acc[param]:
            a.add(x2d)

    names = list(ir.inputs) if ir is not None else []
    n_inputs = len(names) if ir is not None else arity(model)
    samples = 0
    for b, batch in enumerate(data):
        if batches is not None and b >= batches:
            break
        inputs = as_inputs(batch, n_inputs, names)
        shape = getattr(inputs[0], "shape", ())
        samples += int(shape[0]) if len(shape) else 1
        with torch.no_grad():
            if model is not None:
                _run_torch(model, inputs, {id(params[p]): p for p in acc}, seen)
            else:
                _run_onnx(ir, params, inputs, acc, routes, seen)
    if samples == 0:
        raise GraphPruneError("the calibration data yielded no batches",
                              hint="pass a non-empty iterable of model inputs")
    stats: list[list[ConsumerStats]] = [[None] * len(cs) for cs in consumers]  # type: ignore[list-item]
    uncalibrated = []
    for param, entries in acc.items():
        for i, j, a in entries:
            if a.rows and param not in skipped:
                stats[i][j] = a.result()
            else:
                stats[i][j] = _data_free(groups[i], consumers[i][j], params, routes)
                uncalibrated.append(f"{param} (group {groups[i].name})")
    return Calibration(stats, samples, sorted(set(uncalibrated)))


def arity(model: torch.nn.Module) -> int:
    """Positional inputs ``model.forward`` needs (those without a default)."""
    ps = inspect.signature(model.forward).parameters.values()
    return max(len([p for p in ps if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                    and p.default is p.empty]), 1)


def _run_torch(model: torch.nn.Module, inputs: tuple, weights: dict[int, str], seen: Any) -> None:
    was = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with _Watch(weights, seen):
            model(*(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs))
    finally:
        model.train(was)


def _run_onnx(ir: Any, params: dict[str, torch.Tensor], inputs: tuple, acc: dict[str, Any],
              routes: GraphRoutes, seen: Any) -> None:
    """Evaluate the traced ONNX graph in torch and observe each consumer node's data input."""
    observe: dict[str, list[tuple[str, int]]] = {}
    for param in acc:
        for node in routes.readers.get(param, [])[:1]:
            data = [i for i in node.inputs if ir.values[i].kind in ("act", "input")]
            if data:
                observe.setdefault(data[0], []).append((param, 1 if node.op == "conv" else -1))

    def hook(value: str, x: Any) -> None:
        for param, axis in observe.get(value, ()):
            if isinstance(x, torch.Tensor):
                seen(param, x, axis)
    tensors = [torch.as_tensor(x) for x in inputs]
    try:
        GraphProgram(ir, params).run(tensors, observe=hook if observe else None)
    except (RuntimeError, ValueError, IndexError) as exc:
        other = [(n, tuple(t.shape), tuple(ir.values[n].shape)) for n, t in zip(ir.inputs, tensors)
                 if tuple(t.shape) != tuple(ir.values[n].shape)]
        if not other:
            raise
        n, given, traced = other[0]
        # shape arithmetic the importer resolved into attributes keeps the traced sizes (GraphProgram)
        raise ShapeMismatchError(f"calibration input {n!r} has shape {'x'.join(map(str, given))}, and the ONNX "
                                 f"graph, traced at {'x'.join(map(str, traced))}, does not run at it: "
                                 f"{type(exc).__name__}: {str(exc)[:200]}", node=n, source=ir.source,
                                 hint="trace with example inputs of the calibration batches' shape, and give "
                                      "every batch that shape") from exc
