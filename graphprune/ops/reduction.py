"""Reductions, softmax and spatial ops.

Reducing over an axis mixes its entries (a mean divides by their count, a max compares
them), so atoms on reduced axes are pinned; atoms on other axes pass through.
Pooling and resizing act on spatial axes only and keep channel atoms.
"""
from __future__ import annotations

from ..analysis.labels import Field, Labels
from ..ir.graph import Node
from .common import as_list
from .registry import Rule, register

REDUCE = ("mean", "sum", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean", "logsumexp",
          "norm", "linalg_vector_norm", "prod", "argmax", "argmin", "any", "all", "cumsum", "cumprod")
ONNX_REDUCE = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
               "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin", "GlobalAveragePool", "GlobalMaxPool")
SPATIAL = ("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
           "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
           "adaptive_max_pool1d", "adaptive_max_pool2d", "max_pool2d_with_indices", "upsample_nearest1d",
           "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d", "upsample_bicubic2d",
           "upsample_linear1d", "upsample_trilinear3d", "_upsample_nearest_exact2d", "_upsample_bilinear2d_aa",
           "lp_pool2d")
ONNX_SPATIAL = ("MaxPool", "AveragePool", "Resize", "Upsample", "LpPool")


def _reduced_dims(node: Node, rank: int) -> list[int]:
    """The reduced axes; no axes (or an empty list) means all of them."""
    if node.source_op.startswith("onnx::Global"):
        return list(range(2, rank))
    dims = as_list(node.attrs.get("dim", node.attrs.get("axes")))
    return sorted({d % rank for d in dims}) if dims else list(range(rank))


@register("reduce", aten=REDUCE, onnx=ONNX_REDUCE)
class Reduce(Rule):
    def propagate(self, node: Node, lab: Labels) -> None:
        x = node.inputs[0]
        rank = len(lab.shape(x))
        dims = _reduced_dims(node, rank)
        if node.source_op in ("aten.cumsum.default", "aten.cumprod.default"):
            dims = [as_list(node.attrs.get("dim"))[0] % rank]
        f = lab.field(x)
        keep = bool(node.attrs.get("keepdim", node.attrs.get("keepdims", False))) or node.source_op.startswith(
            ("onnx::Global", "aten.cumsum", "aten.cumprod"))
        out_f = None
        if f is not None:
            if any(a in dims for a in f.axes):
                lab.pin(f.labels)
            else:
                axes = f.axes if keep else tuple(a - sum(d < a for d in dims) for a in f.axes)
                out_f = Field(axes, f.labels)
        for o in node.outputs:
            lab.set_field(o, out_f if len(lab.shape(o)) == (rank if keep else rank - len(dims)) else None)


@register("diff", aten=("diff",))
class Diff(Rule):
    """Differences of neighbours along ``dim``: that axis is mixed (its atoms are pinned),
    and prepended/appended entries cannot follow pruned channels, so they pin too."""

    def propagate(self, node: Node, lab: Labels) -> None:
        x = node.inputs[0]
        dim = int(node.attrs.get("dim", -1)) % len(lab.shape(x))
        f = lab.field(x)
        if f is not None and (dim in f.axes or len(node.inputs) > 1):
            lab.pin(f.labels)
            f = None
        for extra in node.inputs[1:]:
            if lab.field(extra) is not None:
                lab.pin(lab.field(extra).labels)
        lab.set_field(node.outputs[0], f)


@register("softmax", aten=("softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax"),
          onnx=("Softmax", "LogSoftmax"))
class Softmax(Rule):
    def propagate(self, node: Node, lab: Labels) -> None:
        x = node.inputs[0]
        rank = len(lab.shape(x))
        dim = int(node.attrs.get("dim", node.attrs.get("axis", -1))) % rank
        f = lab.field(x)
        if f is not None and dim in f.axes:
            lab.pin(f.labels)
        lab.set_field(node.outputs[0], f)


@register("spatial", aten=SPATIAL, onnx=ONNX_SPATIAL)
class Spatial(Rule):
    """Pooling/resizing: batch and channel atoms pass; atoms on spatial axes are pinned."""

    def propagate(self, node: Node, lab: Labels) -> None:
        f = lab.field(node.inputs[0])
        if f is not None and any(a >= 2 for a in f.axes):
            lab.pin(f.labels)
            f = None
        for o in node.outputs:
            lab.set_field(o, f)
