"""The ONNX side of a PrunableGraph: initializers as editable torch tensors, compact
ModelProto emission (a :class:`~graphprune.passes.plan.CompactPlan` lowered by
:mod:`graphprune.lower.onnx`), and onnxruntime checks."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..errors import ZeroInvarianceError
from ..ir.graph import Graph
from ..lower.onnx import lower_onnx
from ..passes.erase import Evaluate
from ..passes.plan import CompactPlan, plan_compact
from .onnx_inputs import feeds_at
from .onnx_skeleton import is_large, run_onnx, runs_fed
from ..pre_activation import pre_activations
from ..rel_error import max_rel_error

if TYPE_CHECKING:
    from ..prunable import PrunableGraph
    from .backend import CheckExample


class OnnxBackend:
    def __init__(self, proto: onnx.ModelProto, feeds: dict[str, np.ndarray],
                 second: dict[str, np.ndarray] | None = None) -> None:
        # the traced model's structure: its fed weights are stubs (onnx_skeleton.stub), their
        # data is the IR's tensors, so the proto holds no second copy of the weights
        self.proto, self.feeds = proto, feeds
        # the inputs at other sizes of every dynamic axis (None: none is dynamic): a compact
        # model is checked there too, so one that only works at the example's size fails
        self.second = second

    @classmethod
    def of(cls, ir: Graph, proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> OnnxBackend:
        """The backend of a traced model: the second feeds at the sizes the importer
        captured again (the inputs' ``alt_shape``)."""
        alt = {i: ir.values[i].alt_shape for i in ir.inputs if ir.values[i].alt_shape is not None}
        changed = {k: s for k, s in alt.items() if tuple(s) != tuple(np.shape(feeds[k]))}
        return cls(proto, feeds, feeds_at(feeds, changed) if changed else None)

    @property
    def all_feeds(self) -> list[dict[str, np.ndarray]]:
        """The example feeds, then those at the other sizes (when an axis is dynamic)."""
        return [self.feeds] + ([self.second] if self.second is not None else [])

    @staticmethod
    def initial_params(ir: Graph) -> dict[str, torch.Tensor]:
        """The float initializers as torch tensors that optimizers and scorers edit: the
        IR's own tensors (read from the file once, as the PyTorch side's are the module's
        parameters), not another copy of every weight."""
        return {name: v.data for name, v in ir.values.items() if v.kind == "param"}

    def plan(self, pg: PrunableGraph, tensors: dict[str, torch.Tensor], removed: torch.Tensor,
             fold_bn: bool = False, biases: dict[str, torch.Tensor] | None = None) -> CompactPlan:
        """The compact plan for removing the components ``removed`` (adding ``biases``)."""
        return plan_compact(pg.ir, pg.labels, pg.comp, removed, tensors, fold_bn=fold_bn, biases=biases,
                            dynamic=lambda name: pg.ir.values[name].dynamic_axes,
                            evaluate=_evaluator(pg.ir, self.proto, tensors))

    def emit(self, pg: PrunableGraph, tensors: dict[str, torch.Tensor], removed: torch.Tensor | None = None,
             weights: dict[str, np.ndarray] | None = None, fold_bn: bool = False,
             biases: dict[str, torch.Tensor] | None = None) -> onnx.ModelProto:
        """The compact ModelProto; with ``weights`` its fed weights stay stubs and their
        arrays go there (for ``run_onnx(model, feeds, weights)``); ``fold_bn``: fold
        inference batch norms into the convolutions before them; ``biases``: biases added
        to layers without one (:attr:`PrunableGraph.added_biases`)."""
        units = pg.removed_units(tensors) if removed is None else removed
        return lower_onnx(pg.ir, self.proto, self.plan(pg, tensors, units, fold_bn, biases), tensors, weights)

    def full(self, pg: PrunableGraph, tensors: dict[str, torch.Tensor],
             weights: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
        """The full model with ``tensors`` as weights (nothing removed); ``weights`` as for
        :meth:`emit`.  A model over 2 GiB is not shape-inferred and checked again: its
        structure is the traced one."""
        plan = self.plan(pg, tensors, torch.zeros(0, dtype=torch.long))
        return lower_onnx(pg.ir, self.proto, plan, tensors, weights, check=not is_large(self.proto))

    def check_examples(self, pg: PrunableGraph) -> list[CheckExample]:
        """None: an ONNX model is checked at its example's sizes and at the second ones."""
        return []

    def compare(self, pg: PrunableGraph, tensors: dict[str, torch.Tensor],
                removed: torch.Tensor | None = None, example: CheckExample | None = None) -> float:
        """Relative error of the compact model (``removed`` as for :meth:`emit`) against
        the zeroed full model (onnxruntime); ``example`` is not used (see :meth:`check_examples`).
        A model that onnxruntime runs with its weights fed is emitted with them as stubs and
        fed straight from ``tensors`` (and their slices): no serialised copy of them.
        With dynamic axes both models run at the example's sizes and at the second ones:
        the worst error counts."""
        logits = pre_activations(pg.ir)
        if runs_fed(self.proto):
            weights: dict[str, np.ndarray] = {}
            full = with_outputs(self.full(pg, tensors, weights), logits)
            ref = [run_onnx(full, f, weights) for f in self.all_feeds]
            del full
            weights = {}
            compact = with_outputs(self.emit(pg, tensors, removed, weights=weights), logits)
            out = [run_onnx(compact, f, weights) for f in self.all_feeds]
            del weights
        else:
            full = with_outputs(self.full(pg, tensors), logits)
            compact = with_outputs(self.emit(pg, tensors, removed), logits)
            ref = [run_onnx(full, f) for f in self.all_feeds]
            out = [run_onnx(compact, f) for f in self.all_feeds]
        return max(max_rel_error(r, o) for r, o in zip(ref, out))


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """``model`` (an emitted copy, changed in place) with ``names`` as extra graph outputs."""
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    return model


def _evaluator(ir: Graph, proto: onnx.ModelProto, tensors: dict[str, torch.Tensor]) -> Evaluate:
    """Compute input-independent values with onnxruntime: the nodes they depend on, in a
    model of their own whose initializers are the current weights and zeros for the
    empty values (the model's inputs are never reached).  onnxruntime runs every ONNX
    op, so a failure is a bug and raised as one."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    initial = {i.name: i for i in proto.graph.initializer}

    def evaluate(wanted: set[str], empty: set[str]) -> dict[str, torch.Tensor]:
        graph = onnx.GraphProto(name="erased")
        nodes, seen, stack = set(), set(), list(wanted)
        while stack:
            name = stack.pop()
            if name in seen or not name:
                continue
            seen.add(name)
            v = ir.values.get(name)
            if name in empty:
                arr = np.zeros(v.shape, dtype=torch.empty(0, dtype=v.dtype).numpy().dtype)
                graph.initializer.append(numpy_helper.from_array(arr, name))
            elif v is not None and v.kind == "param":
                arr = tensors.get(name, v.data).detach().cpu().numpy()
                graph.initializer.append(numpy_helper.from_array(np.array(arr, order="C"), name))
            elif name in initial:
                graph.initializer.append(initial[name])
            else:
                nodes.add(id(producer[name]))
                stack.extend(producer[name].input)
        graph.node.extend(n for n in proto.graph.node if id(n) in nodes)
        names = sorted(wanted)
        graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
        model = onnx.helper.make_model(graph, opset_imports=proto.opset_import, ir_version=proto.ir_version)
        try:
            outs = run_onnx(model, {})
        except Exception as exc:
            raise ZeroInvarianceError(f"onnxruntime failed on the erased branches' constants: {str(exc)[:300]}",
                                      node=names[0], source=ir.source,
                                      hint="this is a graphprune bug; please report it with the model") from exc
        return {n: torch.from_numpy(a) for n, a in zip(names, outs)}
    return evaluate
