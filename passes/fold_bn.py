"""Batch-norm folding: an inference batch norm right after a convolution (or a linear
layer on ``[N, C]``) becomes part of that layer's weight and bias.

For ``y = conv(x, W) + b`` and ``z = (y - mean) / sqrt(var + eps) * gamma + beta``,
with ``s = gamma / sqrt(var + eps)`` per output channel::

    z = conv(x, W * s) + (b - mean) * s + beta

which is exact up to rounding (computed in float64, stored in the weight's dtype).
A fold is planned only where it is sound: the norm uses its running statistics (not
training mode, not an instance norm), its input is the layer's output and read by
nothing else, the layer's weight and bias belong to it alone and its output channels
are the weight's first axis (grouped convolutions included, transposed ones not).
Values are those of the compact model: the plan's kept indices are applied first.

The compact module then has no batch norm to switch to training mode, which is why
folding is an option of the lowering (``fold_bn=True``: inference and code generation)
and not the default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from graphprune.ir.graph import Graph, Node
from graphprune.ops.common import ref_name

if TYPE_CHECKING:
    from .plan import CompactPlan

# where each frontend keeps a norm's parameters (ATen schema names, ONNX input names)
_NORM_ARGS = {"aten": ("weight", "bias", "running_mean", "running_var", "eps"),
              "onnx": ("scale", "B", "input_mean", "input_var", "epsilon")}


@dataclass(frozen=True)
class Fold:
    """The norm ``norm`` folded into the layer ``producer``: its weight ``weight`` is
    multiplied by ``scale`` along axis 0, its bias (``bias``; None: it has none and gets
    one) becomes ``shift``; the norm's output is the layer's output from then on.
    ``scale`` and ``shift`` have the compact channel count."""

    producer: str
    norm: str
    weight: str
    bias: str | None
    scale: torch.Tensor
    shift: torch.Tensor

    def scaled(self, w: torch.Tensor) -> torch.Tensor:
        """The compact weight ``w`` with the norm's scale folded in."""
        s = self.scale.to(torch.float64).reshape((-1,) + (1,) * (w.dim() - 1))
        return (w.to(torch.float64) * s).to(w.dtype)


def fold_batch_norms(ir: Graph, plan: "CompactPlan", tensors: dict[str, torch.Tensor]) -> tuple[Fold, ...]:
    """Every batch norm of ``ir`` that the plan keeps and that can be folded into the
    layer before it (see the module docstring), with compact scale and shift."""
    producers = {o: n for n in ir.nodes for o in n.outputs}
    users = ir.users()
    uses: dict[str, int] = {}
    for n in ir.nodes:
        for i in set(n.inputs):
            uses[i] = uses.get(i, 0) + 1
    folds = []
    for node in ir.nodes:
        if node.op != "batch_norm" or plan.removes(node) or not _inference(node):
            continue
        x = ref_name(node.attrs.get("input"))
        layer = producers.get(x) if x else None
        if layer is None or plan.removes(layer) or not _foldable_layer(ir, layer, x):
            continue
        if len(users.get(x, [])) != 1 or x in ir.outputs or any(users.get(o) for o in node.outputs[1:]):
            continue
        w, b = ref_name(layer.attrs.get("weight")), ref_name(layer.attrs.get("bias"))
        if w is None or uses.get(w) != 1 or (b is not None and uses.get(b) != 1):
            continue
        if b is not None and ir.values[b].kind != "param":
            continue
        fold = _fold(ir, plan, tensors, layer, node, w, b)
        if fold is not None:
            folds.append(fold)
    return tuple(folds)


def _inference(node: Node) -> bool:
    """A batch norm that normalises with its running statistics."""
    op = node.source_op
    if op.startswith("aten.batch_norm."):
        return not node.attrs.get("training", False)
    if op.startswith("aten._native_batch_norm_legit_no_training."):
        return True
    return op == "onnx::BatchNormalization" and not int(node.attrs.get("training_mode", 0))


def _foldable_layer(ir: Graph, layer: Node, out: str) -> bool:
    """A convolution (not transposed) or an ATen linear on ``[N, C]``: output channels on
    axis 1 of ``out`` and axis 0 of the weight."""
    if layer.op == "conv":
        return not (layer.attrs.get("transposed") or "transpose" in layer.source_op
                    or layer.source_op == "onnx::ConvTranspose")
    return layer.op == "linear" and len(ir.values[out].shape) == 2


def _fold(ir: Graph, plan: "CompactPlan", tensors: dict[str, torch.Tensor], layer: Node, norm: Node,
          w: str, b: str | None) -> Fold | None:
    gamma, beta, mean, var, eps_key = _NORM_ARGS["onnx" if norm.source_op.startswith("onnx::") else "aten"]
    names = {k: ref_name(norm.attrs.get(k)) for k in (gamma, beta, mean, var)}
    if any(n is not None and not ir.values[n].fixed for n in names.values()):
        return None  # statistics or affine computed at run time

    def compact(key: str) -> torch.Tensor | None:
        name = names[key]
        return None if name is None else _compact(ir, plan, tensors, name)

    m, v = compact(mean), compact(var)
    if m is None or v is None:
        return None
    eps = norm.attrs.get(eps_key)
    eps = 1e-5 if eps is None else float(eps)
    s = 1.0 / torch.sqrt(v.to(torch.float64) + eps)
    g = compact(gamma)
    if g is not None:
        s = s * g.to(torch.float64)
    shift = -m.to(torch.float64) * s
    if b is not None:
        shift = shift + _compact(ir, plan, tensors, b).to(torch.float64) * s
    be = compact(beta)
    if be is not None:
        shift = shift + be.to(torch.float64)
    dtype = ir.values[w].dtype
    return Fold(layer.name, norm.name, w, b, s.to(dtype), shift.to(dtype))


def _compact(ir: Graph, plan: "CompactPlan", tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The current tensor of the fixed value ``name`` (by the user's name in ``tensors``,
    else the IR's data), cut to the compact channels."""
    v = ir.values[name]
    return plan.slice(name, tensors.get(v.source_name or name, v.data).detach())
