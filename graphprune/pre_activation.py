"""The pre-activation values a zero-invariance check compares besides the outputs.

A model whose output leaves through a final sigmoid or softmax has saturated outputs:
a wrongly pruned unit that shifts the logits by 20 moves ``sigmoid`` by 1e-9, far under
any relative tolerance, so the check would pass a broken group.  The inputs of those
final activations (the logits) carry the difference unsquashed; the checks in
:meth:`PrunableGraph.verify` and in the coverage benchmark compare them too.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from .ir.graph import Graph
from .ops.registry import op_kind

# ops that squash their input into a bounded range (ATen packets and ONNX op types)
_SATURATING = frozenset({"softmax", "_softmax", "log_softmax", "_log_softmax", "sigmoid", "sigmoid_",
                         "_safe_softmax", "Softmax", "LogSoftmax", "Sigmoid", "HardSigmoid"})


def pre_activations(ir: Graph) -> list[str]:
    """Names of the values that a final saturating activation (one whose output is a graph
    output) takes as input, in output order, without repeats."""
    producer = {o: n for n in ir.nodes for o in n.outputs}
    out: list[str] = []
    for name in ir.outputs:
        node = producer.get(name)
        if node is not None and op_kind(node) in _SATURATING and node.inputs:
            x = node.inputs[0]
            if x not in out and ir.values[x].kind not in ("param", "buffer", "const"):
                out.append(x)
    return out


def run_capturing(gm: torch.fx.GraphModule, names: list[str], args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The values of the fx nodes ``names`` when ``gm`` (an unlifted exported module, whose
    placeholders are the flattened user inputs) runs on ``args``/``kwargs``."""
    from torch.fx import _pytree as fx_pytree

    spec = getattr(gm, "_in_spec", None)
    flat = fx_pytree.tree_flatten_spec((args, kwargs), spec) if spec is not None \
        else pytree.tree_leaves((args, kwargs))
    wanted, seen = set(names), {}

    class _Capture(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            value = super().run_node(n)
            if n.name in wanted:
                seen[n.name] = value
            return value

    _Capture(gm).run(*flat)
    missing = wanted - set(seen)
    if missing:
        raise KeyError(f"pre-activation values {sorted(missing)} are not in the emitted module")
    return [seen[n] for n in names]
