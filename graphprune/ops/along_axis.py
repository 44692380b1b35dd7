"""Ops that mix entries along some axes of their input and keep every other axis apart.

A sort, a top-k, a cumulative sum, a sequence reversal, a grid sample or an RoI pooling
computes each output fibre along its *mixed* axes from the input fibre at the same
position of the other axes.  A channel axis that is not mixed passes through untouched
(values and indices alike): a removed channel's fibre is computed from that channel
alone, so removing it changes no other.  A labelled atom on a mixed axis would change
what the others see (which entries a top-k keeps, the window of a local response
normalisation): the op is then a barrier, with the reason its entry gives.
"""
from __future__ import annotations

import torch

from ..analysis.labels import Labels
from ..ir.graph import Node
from .common import as_list
from .registry import OnnxOp, Rule, register

F = torch.nn.functional


class AlongAxes(Rule):
    """Base rule: :meth:`mixed` names the axes the op mixes; the entry's ``reason`` says
    why a channel there is kept; ``zero``: whether a zero fibre stays zero."""

    reason: str = ""
    zero: bool = True

    def mixed(self, node: Node, rank: int) -> set[int]:
        raise NotImplementedError

    def propagate(self, node: Node, lab: Labels) -> None:
        x = node.inputs[0]
        shape = lab.shape(x)
        f = lab.field(x)
        if f is not None and set(f.axes) & self.mixed(node, len(shape)):
            return lab.barrier(node, self.reason)
        for extra in dict.fromkeys(node.inputs[1:]):
            fe = lab.field(extra) if extra != x else None
            if fe is not None:  # grids, boxes, a labelled k: their entries steer the op, never pruned
                lab.pin(fe.labels)
        for o in node.outputs:
            out = lab.shape(o)
            if f is not None and (len(out) != len(shape) or any(out[a] != shape[a] for a in f.axes)):
                return lab.barrier(node, f"output {o} does not keep the input's channel axes")
        for o in node.outputs:
            lab.set_field(o, f)

    def keeps_zero(self, node: Node, lab: Labels) -> bool:
        return self.zero and lab.is_zero(node.inputs[0])


def _axis(node: Node, rank: int, key: str, default: int) -> int:
    v = node.attrs.get(key, default)
    v = as_list(v)[0] if isinstance(v, (list, tuple)) else int(v)
    return v % rank


def _topk(x, K=None, *_, k=None, axis=-1, largest=1, sorted=1, **__):  # noqa: A002,N803 - ONNX names
    """ONNX TopK: ``k`` an input from opset 10 on, an attribute before."""
    count = int(K.reshape(-1)[0]) if K is not None else int(k)
    out = torch.topk(x, count, dim=axis, largest=bool(largest), sorted=bool(sorted))
    return out.values, out.indices


@register("topk", aten=("topk", "sort"), onnx={"TopK": OnnxOp(_topk)})
class TopK(AlongAxes):
    """Selects or orders along one axis; its indices index that axis only, so they pass
    a channel axis as the values do.  The indices are not zero where removed."""

    reason = "selects/sorts along the channel axis: which entries it keeps depends on every channel's values"
    zero = False

    def mixed(self, node: Node, rank: int) -> set[int]:
        return {_axis(node, rank, "dim" if "dim" in node.attrs else "axis", -1)}


def _cumsum(x, axis_input=None, *_, axis=None, exclusive=0, reverse=0, **__):
    """ONNX CumSum; ``axis`` resolved by the importer (a list) when it is a constant."""
    d = _scalar(axis if axis is not None else axis_input, 0)
    y = x.flip(d) if reverse else x
    out = y.cumsum(d)
    if exclusive:
        out = out - y
    return out.flip(d) if reverse else out


@register("cumsum", aten=("cumsum", "cumprod"), onnx={"CumSum": OnnxOp(_cumsum, ("x", "axis"), ("axis",))})
class CumSum(AlongAxes):
    """A running sum (or product) along one axis; a zero fibre sums to zero."""

    reason = "running sum along the channel axis: each channel adds up the channels before it"

    def mixed(self, node: Node, rank: int) -> set[int]:
        return {_axis(node, rank, "dim" if "dim" in node.attrs else "axis", 0)}


def _reverse_sequence(x, lens, *_, batch_axis=1, time_axis=0, **__):
    y = x.movedim((batch_axis, time_axis), (0, 1)).clone()
    for b, n in enumerate(int(v) for v in lens.reshape(-1).tolist()):
        y[b, :n] = y[b, :n].flip(0)
    return y.movedim((0, 1), (batch_axis, time_axis))


@register("reverse_sequence", onnx={"ReverseSequence": OnnxOp(_reverse_sequence)})
class ReverseSequence(AlongAxes):
    """Reverses each batch row's first ``lens[b]`` steps; features pass."""

    reason = "reverses along its time axis, with one length per batch entry: neither axis can lose entries"

    def mixed(self, node: Node, rank: int) -> set[int]:
        return {_axis(node, rank, "batch_axis", 1), _axis(node, rank, "time_axis", 0)}


def _hardmax(x, *_, axis=-1, **__):
    return F.one_hot(x.argmax(axis), x.shape[axis]).movedim(-1, axis).to(x.dtype)


@register("hardmax", onnx={"Hardmax": OnnxOp(_hardmax)})
class Hardmax(AlongAxes):
    """One-hot of the arg-max along ``axis``.  Before opset 13 the input is seen as 2-D
    from ``axis`` on: every axis from there is taken as mixed, which covers both."""

    reason = "arg-max over the channel axis: the winner depends on every channel"
    zero = False  # a zero fibre's first entry wins

    def mixed(self, node: Node, rank: int) -> set[int]:
        return set(range(_axis(node, rank, "axis", -1), rank))


@register("lrn", onnx={"LRN": OnnxOp(lambda x, *_, size, alpha=1e-4, beta=0.75, bias=1.0, **__:
                                     F.local_response_norm(x, size, alpha, beta, bias))})
class LocalResponseNorm(AlongAxes):
    """Normalises each channel by a window of its neighbours'; other axes pass."""

    reason = "normalises each channel by a window of neighbouring channels: removing one moves its neighbours' windows"

    def mixed(self, node: Node, rank: int) -> set[int]:
        return {1}


def _grid_sample(x, grid, *_, align_corners=0, mode="linear", padding_mode="zeros", **__):
    mode = {"linear": "bilinear", "cubic": "bicubic"}.get(mode, mode)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=bool(align_corners))


@register("grid_sample", aten=("grid_sampler", "grid_sampler_2d", "grid_sampler_3d"),
          onnx={"GridSample": OnnxOp(_grid_sample)})
class GridSample(AlongAxes):
    """Samples every channel at the grid's points: channels pass, a zero channel samples
    zeros (any interpolation and padding mode)."""

    reason = "samples along the batch or spatial axes at positions its grid gives: those axes cannot lose entries"

    def mixed(self, node: Node, rank: int) -> set[int]:
        return {0, *range(2, rank)}


def _roi_align(x, rois, batch, *_, mode="avg", output_height=1, output_width=1, sampling_ratio=0,
               spatial_scale=1.0, coordinate_transformation_mode="half_pixel", **__):
    from torchvision.ops import roi_align, roi_pool
    boxes = torch.cat([batch.to(rois.dtype)[:, None], rois], 1)
    size = (int(output_height), int(output_width))
    if mode == "max":
        return roi_pool(x, boxes, size, spatial_scale)
    return roi_align(x, boxes, size, spatial_scale, sampling_ratio,
                     aligned=coordinate_transformation_mode == "half_pixel")


def _max_roi_pool(x, rois, *_, pooled_shape, spatial_scale=1.0, **__):
    from torchvision.ops import roi_pool
    return roi_pool(x, rois, tuple(int(s) for s in pooled_shape), spatial_scale)


@register("roi_pool", onnx={"RoiAlign": OnnxOp(_roi_align), "MaxRoiPool": OnnxOp(_max_roi_pool)})
class RoiPool(AlongAxes):
    """Pools every channel over each box: channels pass, a zero channel pools to zero.
    (ONNX's ``max`` RoiAlign samples like the average mode and takes the maximum;
    torchvision's ``roi_pool`` stands in for it in torch, which only gradient criteria use.)"""

    reason = "pools boxes over the batch and spatial axes: those axes cannot lose entries"

    def mixed(self, node: Node, rank: int) -> set[int]:
        return {0, *range(2, rank)}


def _center_crop_pad(x, shape, *_, axes=None, **__):
    axes = [a % x.dim() for a in (axes if axes is not None else range(x.dim()))]
    for a, s in zip(axes, (int(v) for v in shape.reshape(-1).tolist())):
        n = x.shape[a]
        if s <= n:
            x = x.narrow(a, (n - s) // 2, s)
        else:
            before = (s - n) // 2
            pad = [0, 0] * (x.dim() - a - 1) + [before, s - n - before]
            x = F.pad(x, pad)
    return x


@register("center_crop_pad", onnx={"CenterCropPad": OnnxOp(_center_crop_pad)})
class CenterCropPad(AlongAxes):
    """Crops or pads ``axes`` around their centre to a given size; other axes pass."""

    reason = "crops or pads the channel axis to a fixed size: the size cannot follow a pruned axis"

    def mixed(self, node: Node, rank: int) -> set[int]:
        axes = node.attrs.get("axes")
        return {a % rank for a in as_list(axes)} if axes is not None else set(range(rank))


def _scalar(v, default):
    if v is None:
        return default
    return int(v.reshape(-1)[0]) if isinstance(v, torch.Tensor) else int(as_list(v)[0])


def _dft(x, dft_length=None, axis=None, *_, inverse=0, onesided=0, **attrs):
    """ONNX DFT: the last axis holds (real[, imaginary]); ``axis`` an attribute before opset
    20, an input from then on."""
    ax = _scalar(axis, attrs.get("axis", 1 if axis is None else -2)) % x.dim()
    c = torch.view_as_complex(x.contiguous()) if x.shape[-1] == 2 else x[..., 0].to(torch.complex64)
    n = _scalar(dft_length, c.shape[ax])
    y = (torch.fft.ifft if inverse else torch.fft.fft)(c, n, dim=ax)
    if onesided:
        y = y.narrow(ax, 0, n // 2 + 1)
    return torch.view_as_real(y).to(x.dtype)


@register("fft", aten=("_fft_r2c", "_fft_c2r", "_fft_c2c"),
          onnx={"DFT": OnnxOp(_dft, ("input", "dft_length", "axis"), ("dft_length", "axis"))})
class FFT(AlongAxes):
    """A Fourier transform along some axes; the others (channels) pass, and the transform
    of a zero fibre is zero.  ONNX's DFT also mixes its last (real, imaginary) axis."""

    reason = "a Fourier transform along the channel axis mixes every channel into every frequency"

    def mixed(self, node: Node, rank: int) -> set[int]:
        if node.source_op == "onnx::DFT":
            return {_axis(node, rank, "axis", 1), rank - 1}
        return {d % rank for d in as_list(node.attrs.get("dim"))}
