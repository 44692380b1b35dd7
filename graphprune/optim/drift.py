"""How far a pruned model's outputs move from the dense model's on calibration data.

Pruning scores are normalised per group before a global selection, so a head's score and
an MLP unit's are comparable only by rank within their groups.  A latency-priced selection
(:func:`graphprune.latency.select_for_latency`) weighs those scores against predicted
milliseconds, and where the scales disagree, or the prediction misses, it can trade
accuracy for nothing: on the digits ViT at 40% of its latency it gave up all but one head
in three blocks, for a model no faster than the FLOPs order's and far less accurate (0.57
against 0.77 before recovery).  The outputs themselves are the one scale every choice
shares, so where there is calibration data the choice between selections is made on them
(:meth:`graphprune.latency.LatencyPlan.select`'s ``judge``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ..errors import GraphPruneError
from ..frontends.backend import CompactModel
from .calibration import arity, as_inputs

if TYPE_CHECKING:
    from ..prunable import PrunableGraph


#: Calibration batches a drift is measured on: every candidate model runs on them all.
DRIFT_BATCHES = 4


class OutputDrift:
    """``drift(tensors, biases)``: the squared error of the compact model built from
    ``tensors`` (and added ``biases``) against the dense model's outputs on the first
    ``batches`` batches of ``data``, over the dense outputs' squared norm, summed over every
    floating-point output.  Both models are the backend's emitted ones (a compact module,
    or an ONNX model run by onnxruntime), so what is judged is what pruning hands over."""

    def __init__(self, g: PrunableGraph, data: Iterable, batches: int = DRIFT_BATCHES) -> None:
        self.g = g
        ir = getattr(g, "ir", None)
        names = list(ir.inputs) if ir is not None else []
        n_inputs = len(names) if names else arity(g.model)
        self.names = names
        self.inputs: list[tuple[Any, ...]] = []
        for b, batch in enumerate(data):
            if b >= batches:
                break
            self.inputs.append(as_inputs(batch, n_inputs, names))
        if not self.inputs:
            raise GraphPruneError("the calibration data yielded no batches to judge pruned models on",
                                  hint="pass a non-empty iterable of model inputs")
        dense = g.backend.emit(g, g.zeroed_copy([]), biases=dict(getattr(g, "added_biases", {}) or {}))
        self.reference = [self.outputs(dense, x) for x in self.inputs]

    def __call__(self, tensors: dict[str, torch.Tensor], biases: dict[str, torch.Tensor] | None = None) -> float:
        compact = self.g.backend.emit(self.g, tensors, biases=biases)
        err = norm = 0.0
        for x, ref in zip(self.inputs, self.reference):
            for a, b in zip(ref, self.outputs(compact, x)):
                err += float(((b - a) ** 2).sum())
                norm += float((a ** 2).sum())
        return err / max(norm, 1e-30)

    def outputs(self, model: CompactModel, inputs: Sequence[Any]) -> list[torch.Tensor]:
        """``model``'s floating-point outputs on ``inputs``, as float64 tensors."""
        if isinstance(model, torch.nn.Module):
            model.eval()
            with torch.no_grad():
                out = model(*inputs)
        else:
            from ..frontends.onnx_skeleton import run_onnx

            out = run_onnx(model, {n: np.asarray(torch.as_tensor(x).numpy()) for n, x in zip(self.names, inputs)})
        leaves = [torch.as_tensor(v) for v in pytree.tree_leaves(out) if isinstance(v, (torch.Tensor, np.ndarray))]
        return [v.double() for v in leaves if v.is_floating_point()]
