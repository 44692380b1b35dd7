"""An ONNX graph as a differentiable torch program.

Gradient criteria (Taylor, Hessian) need a function of the weights they can
differentiate; for a model traced from ONNX that is the traced graph itself, run with
torch ops: every node the registry knows carries its entry's torch implementation
(:class:`graphprune.ops.registry.OnnxOp`, bound by the importer).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import GraphPruneError


class GraphProgram(nn.Module):
    """The traced ONNX graph as a differentiable torch function of ``params`` (the graph's
    editable initializers), so gradient criteria work on ONNX input as on PyTorch.

    Integer shape arithmetic the importer resolved into attributes keeps the traced sizes
    (where the exporter baked them in, so does the model).
    """

    def __init__(self, ir: Any, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.ir, self.tensors = ir, params

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.run(inputs)

    def run(self, inputs: Sequence[torch.Tensor], observe: Callable[[str, Any], None] | None = None) -> Any:
        """The graph's outputs on ``inputs``; ``observe(value name, value)`` is called for every
        input and computed value (calibration reads what each layer consumes this way)."""
        ir = self.ir
        env: dict[str, Any] = dict(zip(ir.inputs, inputs))
        if observe is not None:
            for k, v in env.items():
                observe(k, v)

        def look(name: str) -> Any:
            if name in env:
                return env[name]
            if name in self.tensors:
                return self.tensors[name]
            v = ir.values[name]
            if v.data is None:
                raise GraphPruneError(f"value {name!r} is neither computed nor known")
            return v.data
        for n in ir.nodes:
            if n.target is None:
                raise GraphPruneError(f"ONNX op {n.source_op.split('::', 1)[-1]} has no torch implementation",
                                      node=n.name, op=n.source_op,
                                      hint="add it to its registry entry (graphprune/ops), or use a data-free "
                                           "criterion (obspa, l1, l2, bn_scale)")
            out = n.call({a.name: look(a.name) for a in n.args if a is not None})
            outs = out if isinstance(out, (list, tuple)) else [out]
            env.update(zip(n.outputs, outs))
            if observe is not None:
                for k, v in zip(n.outputs, outs):
                    observe(k, v)
        results = [look(o) for o in ir.outputs]
        return results[0] if len(results) == 1 else tuple(results)
