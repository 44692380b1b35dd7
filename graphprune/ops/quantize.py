"""ONNX QuantizeLinear / DequantizeLinear: elementwise, with a scale and zero-point.

Per tensor (one scale, one zero-point) they are channel identities.  Per axis, entry
``c`` of the scale (and zero-point) belongs to channel ``c`` of that axis: a float scale
initializer is a parameter and joins the channel's group, so the compact file keeps the
kept channels' scales.  A per-axis integer zero-point along a channel axis and blocked
quantisation (``block_size``) are barriers that say so.
"""
from __future__ import annotations

import torch

from ..analysis.labels import Labels
from ..ir.graph import Node
from .common import torch_dtype
from .registry import OnnxOp, Rule, register

_RANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.uint16: (0, 65535), torch.int16: (-32768, 32767),
          torch.int32: (-2 ** 31, 2 ** 31 - 1)}


def _along(v: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """A per-axis scale or zero-point shaped to broadcast along ``axis`` of ``x``."""
    if v.numel() == 1:
        return v.reshape(())
    shape = [1] * x.dim()
    shape[axis % x.dim()] = v.numel()
    return v.reshape(shape)


def _quantize(x, scale, zero_point=None, *_, axis=1, output_dtype=0, **__):
    dtype = zero_point.dtype if zero_point is not None else (torch_dtype(output_dtype) if output_dtype else
                                                             torch.uint8)
    zp = _along(zero_point, x, axis).to(torch.float32) if zero_point is not None else 0.0
    lo, hi = _RANGE.get(dtype, (float("-inf"), float("inf")))
    return (torch.round(x / _along(scale, x, axis)) + zp).clamp(lo, hi).to(dtype)


def _dequantize(x, scale, zero_point=None, *_, axis=1, **__):
    zp = _along(zero_point, x, axis).to(torch.float32) if zero_point is not None else 0.0
    return ((x.to(torch.float32) - zp) * _along(scale, x, axis)).to(scale.dtype)


@register("quantize_linear", onnx={"QuantizeLinear": OnnxOp(_quantize, ("x", "scale", "zero_point")),
                                   "DequantizeLinear": OnnxOp(_dequantize, ("x", "scale", "zero_point"))})
class QuantizeLinear(Rule):
    """Channel identity; a per-axis scale on a labelled axis is coupled with it."""

    def propagate(self, node: Node, lab: Labels) -> None:
        x, out = node.inputs[0], node.outputs[0]
        scale = node.inputs[1]
        zp = node.inputs[2] if len(node.inputs) > 2 else None
        rank = len(lab.shape(x))
        f = lab.field(x)
        if int(node.attrs.get("block_size", 0) or 0):
            return lab.barrier(node, "blocked quantisation: its scales tile the channel axis in blocks; not analysed")
        per_axis = len(lab.shape(scale)) == 1 and lab.shape(scale)[0] > 1
        axis = int(node.attrs.get("axis", 1)) % max(rank, 1)
        on_channels = f is not None and per_axis and axis in f.axes
        if on_channels and zp is not None:
            return lab.barrier(node, "per-axis zero-point along a channel axis: an integer constant that cannot "
                                     "shrink with it")
        for v in (scale, zp):
            fv = lab.field(v) if v is not None else None
            if fv is None:
                continue
            if on_channels and v == scale and fv.axes == (0,):
                lab.union(lab.axis_labels(x, axis), fv.labels)
                f = lab.field(x)  # collapsed onto the axis when it had others
            else:
                lab.pin(fv.labels)
        lab.set_field(out, f)

    def keeps_zero(self, node: Node, lab: Labels) -> bool:
        """Zero quantises to (and dequantises from) the zero-point: zero when it is 0."""
        if not lab.is_zero(node.inputs[0]):
            return False
        if len(node.inputs) < 3:
            return True
        zp = lab.data(node.inputs[2])
        return zp is not None and not bool(zp.any())
