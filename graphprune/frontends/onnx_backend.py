"""The ONNX side of a PrunableGraph: initializers as editable torch tensors, compact
ModelProto emission, and onnxruntime checks."""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from ..ir.graph import Graph
from ..passes.emit_onnx import emit_onnx
from ..passes.shrink import Shrink


def run_onnx(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """One onnxruntime run on the CPU (a model over 2 GiB runs with its weights fed)."""
    import onnxruntime as ort

    from .onnx_import import session

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess, weights = session(model, opts)
    return sess.run(None, {**feeds, **weights})


def _np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


class OnnxBackend:
    def __init__(self, proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
        self.proto, self.feeds = proto, feeds

    @staticmethod
    def initial_params(ir: Graph) -> dict[str, torch.Tensor]:
        """The float initializers as torch tensors that optimizers and scorers edit: the
        IR's own tensors (read from the file once, as the PyTorch side's are the module's
        parameters), not another copy of every weight."""
        return {name: v.data for name, v in ir.values.items() if v.kind == "param"}

    def emit(self, pg: Any, tensors: dict[str, torch.Tensor], removed: torch.Tensor | None = None) -> onnx.ModelProto:
        units = pg.removed_units(tensors) if removed is None else removed
        return emit_onnx(pg.ir, self.proto, Shrink(pg.labels, pg.comp, units), tensors)

    def full(self, pg: Any, tensors: dict[str, torch.Tensor]) -> onnx.ModelProto:
        """The full model with ``tensors`` as initializers (nothing removed).  A model over
        2 GiB cannot go through the emitter's shape inference and checker (they serialise
        it), so its initializers are replaced directly: nothing else changes."""
        from .onnx_import import is_large
        if not is_large(self.proto):
            return self.emit(pg, tensors, torch.zeros(0, dtype=torch.long))
        model = onnx.ModelProto()
        model.CopyFrom(self.proto)
        for init in model.graph.initializer:
            if init.name in tensors:
                arr = tensors[init.name].detach().cpu().numpy().astype(_np_dtype(init.data_type), copy=False)
                init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), init.name))
        for n in list(model.graph.node):  # weights the importer untied from a shared initializer
            if n.op_type == "Identity" and n.output[0] in tensors:
                arr = tensors[n.output[0]].detach().cpu().numpy()
                model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr), n.output[0]))
                model.graph.node.remove(n)
        return model

    def compare(self, pg: Any, tensors: dict[str, torch.Tensor]) -> float:
        """Relative error of the compact model against the zeroed full model (onnxruntime)."""
        ref = run_onnx(self.full(pg, tensors), self.feeds)
        out = run_onnx(self.emit(pg, tensors), self.feeds)
        worst = 0.0
        for a, b in zip(ref, out):
            if a.shape != b.shape:
                return float("inf")
            if np.issubdtype(a.dtype, np.floating):
                worst = max(worst, float(np.abs(a - b).max() / (np.abs(a).max() + 1e-12)))
        return worst
