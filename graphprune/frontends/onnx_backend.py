"""The ONNX side of a PrunableGraph: initializers as editable torch tensors, compact
ModelProto emission, and onnxruntime checks."""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch

from ..ir.graph import Graph
from ..passes.emit_onnx import emit_onnx
from ..passes.shrink import Shrink


def run_onnx(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """One onnxruntime run on the CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


class OnnxBackend:
    def __init__(self, proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
        self.proto, self.feeds = proto, feeds

    @staticmethod
    def initial_params(ir: Graph) -> dict[str, torch.Tensor]:
        """The float initializers as torch tensors that optimizers and scorers edit."""
        return {name: v.data.clone() for name, v in ir.values.items() if v.kind == "param"}

    def emit(self, pg: Any, tensors: dict[str, torch.Tensor], removed: torch.Tensor | None = None) -> onnx.ModelProto:
        units = pg.removed_units(tensors) if removed is None else removed
        return emit_onnx(pg.ir, self.proto, Shrink(pg.labels, pg.comp, units), tensors)

    def full(self, pg: Any, tensors: dict[str, torch.Tensor]) -> onnx.ModelProto:
        """The full model with ``tensors`` as initializers (nothing removed)."""
        return self.emit(pg, tensors, torch.zeros(0, dtype=torch.long))

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
