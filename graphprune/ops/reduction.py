"""Reductions, softmax and spatial ops.

Reducing over an axis mixes its entries (a mean divides by their count, a max compares
them), so atoms on reduced axes are pinned; atoms on other axes pass through.  Sums
are the exception when the removed entries are exactly zero (:meth:`Labels.is_zero`):
a sum over the kept entries is then the sum over all, and a mean is that sum over the
original count (the compact graph divides by it: :func:`mean_of_original`), which is
what makes a hand-written RMS norm (``x.pow(2).mean(-1)``) prunable along its axis.
Pooling and resizing act on spatial axes only and keep channel atoms.
"""
from __future__ import annotations

import torch

from ..analysis.labels import Field, Labels
from ..ir.graph import Node
from .common import as_list, ref_name
from .registry import Rule, register
from .rewrite import Call, OnnxArg, OnnxCall, OnnxContext, Phantom, Rewrite

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


ZERO_PRESERVING = ("sum", "mean", "amax", "amin", "max", "min", "norm", "linalg_vector_norm", "prod", "cumsum",
                   "cumprod", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                   "ReduceL2", "ReduceSumSquare", "GlobalAveragePool", "GlobalMaxPool")  # of zeros: zero
SUMS = ("sum", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2")  # exact over kept entries when the rest are 0
MEANS = ("mean", "ReduceMean")  # exact as a sum over the original count (rewritten below)


def _kind(node: Node) -> str:
    """``sum`` for ``aten.sum.dim_IntList``, ``ReduceSum`` for ``onnx::ReduceSum``."""
    return node.source_op.split(".")[1] if node.source_op.startswith("aten.") else node.source_op[len("onnx::"):]


def mean_of_original(x: torch.Tensor, dim: list[int] | None, keepdim: bool, n: int,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x.mean(dim)`` as if the reduced axes still had ``n`` entries in all, the missing
    ones zero: the compact graph's mean over a pruned axis."""
    s = torch.sum(x, dim=dim, keepdim=keepdim, dtype=dtype) if dim else torch.sum(x, dtype=dtype)
    return s / n


def mean_onnx_function(opset: int):
    """:func:`mean_of_original` as an ONNX FunctionProto (``graphprune`` domain, inlined by
    the ONNX lowering): ``ReduceSum(data, axes) / count`` with attributes ``count`` (the original
    count, a scalar tensor of the data's type: valid in every opset), ``keepdims``, and
    before opset 13 ``axes`` (an attribute of ReduceSum then, an input from 13 on)."""
    from onnx import AttributeProto, helper

    from .normalization import DOMAIN

    def ref(attr: str, kind: int, name: str | None = None) -> AttributeProto:
        return AttributeProto(name=attr, ref_attr_name=name or attr, type=kind)

    inputs = ["data", "axes"] if opset >= 13 else ["data"]
    total = helper.make_node("ReduceSum", inputs, ["S"])
    total.attribute.append(ref("keepdims", AttributeProto.INT))
    if opset < 13:
        total.attribute.append(ref("axes", AttributeProto.INTS))
    count = helper.make_node("Constant", [], ["count_"])
    count.attribute.append(ref("value", AttributeProto.TENSOR, "count"))
    body = [total, count, helper.make_node("Div", ["S", "count_"], ["reduced"])]
    return helper.make_function(DOMAIN, "MeanOfOriginal", inputs, ["reduced"], body,
                                [helper.make_opsetid("", opset)],
                                attributes=["count", "keepdims"] + (["axes"] if opset < 13 else []))


def _mean_onnx(call: Call, ctx: OnnxContext) -> OnnxCall:
    """The ONNX form of a :data:`MEAN_OF_ORIGINAL` call (:func:`mean_onnx_function`)."""
    import numpy as np
    from onnx import numpy_helper
    opset = ctx.opset(13)
    dtype = torch.empty(0, dtype=ctx.dtype(call.inputs[0])).numpy().dtype
    count = numpy_helper.from_array(np.array(call.attrs["n"], dtype=dtype))
    attrs = dict(count=count, keepdims=int(call.attrs["keepdim"]))
    if opset >= 13:
        return OnnxCall(mean_onnx_function(opset), attrs, {1: list(call.attrs["dim"])})
    return OnnxCall(mean_onnx_function(opset), dict(attrs, axes=list(call.attrs["dim"])))


MEAN_OF_ORIGINAL = Phantom("mean_of_original", mean_of_original, _mean_onnx)


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
            if self._over_removed(node, lab, dims):  # a sum of the kept entries (the rest are zero)
                reduced = [a for a in f.axes if a in dims]
                if len(reduced) < len(f.axes):  # atoms also on kept axes: one unit per reduced index
                    lab.axis_labels(x, reduced[0])
            elif any(a in dims for a in f.axes):
                lab.pin(f.labels)
            else:
                axes = f.axes if keep else tuple(a - sum(d < a for d in dims) for a in f.axes)
                out_f = Field(axes, f.labels)
        for o in node.outputs:
            lab.set_field(o, out_f if len(lab.shape(o)) == (rank if keep else rank - len(dims)) else None)

    @staticmethod
    def _over_removed(node: Node, lab: Labels, dims: list[int]) -> bool:
        """Whether the reduction is a sum (or a mean) of an input that is zero where removed,
        over all its labelled axes or over one of them (whose hyperplanes then become its
        units): then no atom is pinned and none reaches the output."""
        x = node.inputs[0]
        f = lab.field(x)
        reduced = [a for a in f.axes if a in dims]
        return _kind(node) in SUMS + MEANS and len(node.outputs) == 1 and lab.is_zero(x) \
            and (len(reduced) == len(f.axes) or len(reduced) == 1)

    def keeps_zero(self, node: Node, lab: Labels) -> bool:
        return _kind(node) in ZERO_PRESERVING and lab.is_zero(node.inputs[0])

    def rewrite(self, node, shrink) -> Rewrite | None:
        """A mean over a shrunk axis divides by the original count."""
        if _kind(node) not in MEANS:
            return None
        x = node.inputs[0]
        old, new = shrink.old_shape(x), shrink.new_shape(x)
        dims = _reduced_dims(node, len(old))
        if all(old[d] == new[d] for d in dims):
            return None
        n = 1
        for d in dims:
            n *= old[d]
        keep = bool(node.attrs.get("keepdim", node.attrs.get("keepdims", False)))
        attrs = dict(dim=dims, keepdim=keep, n=n, dtype=node.attrs.get("dtype"))
        return Rewrite(call=Call(MEAN_OF_ORIGINAL, (x,), attrs))


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

    def keeps_zero(self, node: Node, lab: Labels) -> bool:
        return lab.is_zero(node.inputs[0])


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

    onnx_args = {("Resize", "sizes"): OnnxArg(input=3, since=11)}

    def propagate(self, node: Node, lab: Labels) -> None:
        f = lab.field(node.inputs[0])
        if f is not None and any(a >= 2 for a in f.axes):
            lab.pin(f.labels)
            f = None
        for o in node.outputs:
            lab.set_field(o, f)

    def keeps_zero(self, node: Node, lab: Labels) -> bool:
        return lab.is_zero(node.inputs[0])

    def rewrite(self, node, shrink) -> Rewrite | None:
        """A Resize to explicit ``sizes``: the channel entry follows the compact output
        (a constant target is rewritten, a run-time one fed through a fix-up call)."""
        sizes = ref_name(node.attrs.get("sizes")) if node.source_op == "onnx::Resize" else None
        if sizes is None:
            return None
        out = node.outputs[0]
        old, new = shrink.old_shape(out), shrink.new_shape(out)
        if old == new:
            return None
        from .movement import _resize, shape_shrunk
        v = shrink.graph.values[sizes]
        if v.kind == "const" and v.data is not None:
            return Rewrite(args={"sizes": _resize(v.data.tolist(), old, new)})
        return Rewrite(feeds={sizes: shape_shrunk(sizes, [int(o == n) for o, n in zip(old, new)], list(new))})
