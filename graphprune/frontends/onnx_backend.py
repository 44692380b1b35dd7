"""The ONNX side of a PrunableGraph: initializers as editable torch tensors, compact
ModelProto emission, and onnxruntime checks."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from onnx import helper

from ..ir.graph import Graph
from ..passes.emit_onnx import emit_onnx
from ..passes.shrink import Shrink
from ..rel_error import max_rel_error

if TYPE_CHECKING:
    from ..prunable import PrunableGraph


def run_onnx(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
             weights: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """One onnxruntime run on the CPU.  A big model runs with its weights fed (see
    :func:`.onnx_import.session`); ``weights`` are the arrays of an emitted model's stubs."""
    import onnxruntime as ort

    from .onnx_import import session

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess, fed = session(model, opts, weights)
    return sess.run(None, {**feeds, **fed})


def _np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


class OnnxBackend:
    def __init__(self, proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
        # the traced model's structure: its fed weights are stubs (onnx_import.stub), their
        # data is the IR's tensors, so the proto holds no second copy of the weights
        self.proto, self.feeds = proto, feeds

    @staticmethod
    def initial_params(ir: Graph) -> dict[str, torch.Tensor]:
        """The float initializers as torch tensors that optimizers and scorers edit: the
        IR's own tensors (read from the file once, as the PyTorch side's are the module's
        parameters), not another copy of every weight."""
        return {name: v.data for name, v in ir.values.items() if v.kind == "param"}

    def emit(self, pg: PrunableGraph, tensors: dict[str, torch.Tensor], removed: torch.Tensor | None = None,
             weights: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
        """The compact ModelProto; with ``weights`` its fed weights stay stubs and their
        arrays go there (for ``run_onnx(model, feeds, weights)``)."""
        units = pg.removed_units(tensors) if removed is None else removed
        return emit_onnx(pg.ir, self.proto, Shrink(pg.labels, pg.comp, units), tensors, weights)

    def full(self, pg: PrunableGraph, tensors: dict[str, torch.Tensor],
             weights: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
        """The full model with ``tensors`` as initializers (nothing removed); ``weights`` as
        for :meth:`emit`.  A model over 2 GiB is not emitted but has its initializers
        replaced directly: nothing else changes."""
        from .onnx_import import fill, is_large, put_weight
        if not is_large(self.proto):
            return self.emit(pg, tensors, torch.zeros(0, dtype=torch.long), weights)
        model = onnx.ModelProto()
        model.CopyFrom(self.proto)  # cheap: the weights are stubs
        fed: dict[str, np.ndarray] = {}
        for init in model.graph.initializer:
            v = pg.ir.values.get(init.name)
            if v is not None and v.kind == "param":
                arr = tensors.get(init.name, v.data).detach().cpu().numpy()
                put_weight(init, init.name, arr.astype(_np_dtype(init.data_type), copy=False), fed)
        for n in list(model.graph.node):  # weights the importer untied from a shared initializer
            if n.op_type == "Identity" and n.output[0] in tensors:
                arr = tensors[n.output[0]].detach().cpu().numpy()
                put_weight(model.graph.initializer.add(), n.output[0], arr, fed)
                model.graph.node.remove(n)
        if weights is None:
            fill(model, fed)
        else:
            weights.update(fed)
        return model

    def compare(self, pg: PrunableGraph, tensors: dict[str, torch.Tensor]) -> float:
        """Relative error of the compact model against the zeroed full model (onnxruntime).
        A model that onnxruntime runs with its weights fed is emitted with them as stubs and
        fed straight from ``tensors`` (and their slices): no serialised copy of them."""
        from .onnx_import import runs_fed
        if runs_fed(self.proto):
            weights: dict[str, np.ndarray] = {}
            ref = run_onnx(self.full(pg, tensors, weights), self.feeds, weights)
            weights = {}
            out = run_onnx(self.emit(pg, tensors, weights=weights), self.feeds, weights)
            del weights
        else:
            ref = run_onnx(self.full(pg, tensors), self.feeds)
            out = run_onnx(self.emit(pg, tensors), self.feeds)
        return max_rel_error(ref, out)
