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
from torch._prims_common import suggest_memory_format

from ..analysis.labels import Field, Labels
from ..errors import GraphPruneError
from ..ir.graph import Node
from .common import as_list, ref_name, same_pads
from .registry import OnnxOp, Rule, op_kind, register
from .rewrite import Call, OnnxArg, OnnxCall, OnnxContext, Phantom, Rewrite

F = torch.nn.functional


# ---- ONNX reductions, softmax and spatial ops in torch

def _reduction(fn) -> OnnxOp:
    """An ONNX Reduce* op as ``fn(x, dims, keepdim)``: axes from the attribute or the
    input (resolved by the importer), none meaning all unless ``noop_with_empty_axes``."""
    def run(x, *_, axes=None, keepdims=1, noop_with_empty_axes=0, **__):
        if not axes and noop_with_empty_axes:
            return x
        dims = tuple(a % x.dim() for a in axes) if axes else tuple(range(x.dim()))
        return fn(x, dims, bool(keepdims))
    return OnnxOp(run, ("data", "axes"), ("axes",), _reduce_attrs)


def _reduce_attrs(attrs: dict, _: list) -> None:
    attrs.setdefault("keepdims", 1)
    if "axis" in attrs:
        attrs["axes"] = [attrs["axis"]]


def _arg_extreme(fn) -> OnnxOp:
    """ArgMax/ArgMin along ``axis``; ``select_last_index`` finds the last of equal extremes."""
    def run(x, *_, axes, keepdims=1, select_last_index=0, **__):
        axis = axes[0] % x.dim()
        if not select_last_index:
            return fn(x, axis, keepdim=bool(keepdims))
        return x.shape[axis] - 1 - fn(x.flip(axis), axis, keepdim=bool(keepdims))
    return OnnxOp(run, normalise=_reduce_attrs)


def _pool_pads(x, kernel_shape, strides, dilations, auto_pad, pads) -> tuple[list[int], list[int]]:
    return same_pads(list(x.shape[2:]), list(kernel_shape), list(strides), list(dilations), auto_pad, pads)


def _padded(x: torch.Tensor, begin: list[int], end: list[int], value: float = 0.0) -> torch.Tensor:
    return F.pad(x, [p for be in zip(reversed(begin), reversed(end)) for p in be], value=value)


def _max_pool(x, *_, kernel_shape, strides=None, dilations=None, pads=None, auto_pad="NOTSET", ceil_mode=0,
              storage_order=0, **__):
    """Y and Indices (flat over the whole unpadded input, as ONNX numbers them)."""
    n = len(kernel_shape)
    strides, dilations = strides or [1] * n, dilations or [1] * n
    begin, end = _pool_pads(x, kernel_shape, strides, dilations, auto_pad, pads)
    sizes = list(x.shape[2:])
    padded = begin != end
    if padded:  # torch pads both ends alike: pad by hand, then map indices back
        x = _padded(x, begin, end, float("-inf"))
    fn = getattr(F, f"max_pool{n}d")
    y, idx = fn(x, kernel_shape, strides, 0 if padded else begin, dilations, ceil_mode=bool(ceil_mode),
                return_indices=True)
    if padded:
        flat, stride = torch.zeros_like(idx), 1
        for a in reversed(range(n)):
            size_p = x.shape[2 + a]
            flat += (idx // int(torch.tensor(x.shape[3 + a:]).prod()) % size_p - begin[a]) * stride
            stride *= sizes[a]
        idx = flat
    plane = int(torch.tensor(sizes).prod())
    return y, idx + torch.arange(x.shape[0] * x.shape[1]).reshape(x.shape[0], x.shape[1], *[1] * n) * plane


def _avg_pool(x, *_, kernel_shape, strides=None, pads=None, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0,
              dilations=None, **__):
    n = len(kernel_shape)
    strides = strides or [1] * n
    if dilations and any(d != 1 for d in dilations):
        raise GraphPruneError("AveragePool with dilations has no torch implementation", op="AveragePool")
    begin, end = _pool_pads(x, kernel_shape, strides, [1] * n, auto_pad, pads)
    fn = getattr(F, f"avg_pool{n}d")
    if begin == end:
        return fn(x, kernel_shape, strides, begin, ceil_mode=bool(ceil_mode),
                  count_include_pad=bool(count_include_pad))
    # pads that differ at the two ends: window sums over the zero-padded input, divided by
    # the window size or by how many of its entries are the input's
    total = fn(_padded(x, begin, end), kernel_shape, strides, 0, ceil_mode=bool(ceil_mode), count_include_pad=True)
    if count_include_pad:
        return total
    ones = _padded(torch.ones_like(x[:1, :1]), begin, end)
    return total / fn(ones, kernel_shape, strides, 0, ceil_mode=bool(ceil_mode), count_include_pad=True)


def _lp_pool(x, *_, kernel_shape, strides=None, pads=None, auto_pad="NOTSET", p=2, dilations=None, ceil_mode=0,
             **__):
    """``(Σ |x|^p)^(1/p)`` over each window, zero padding counted as zeros."""
    n = len(kernel_shape)
    strides = strides or [1] * n
    begin, end = _pool_pads(x, kernel_shape, strides, dilations or [1] * n, auto_pad, pads)
    xp = _padded(x.abs().pow(p), begin, end)
    total = getattr(F, f"avg_pool{n}d")(xp, kernel_shape, strides, 0, ceil_mode=bool(ceil_mode)) \
        * float(torch.tensor(kernel_shape).prod())
    return total.pow(1.0 / p)


def _source_coords(out: int, size: int, scale: float, mode: str) -> torch.Tensor:
    """Where output index ``i`` of an axis samples the input, by ONNX's coordinate transform."""
    i = torch.arange(out, dtype=torch.float64)
    if mode == "half_pixel":
        return (i + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (i + 0.5) / scale - 0.5 if out > 1 else torch.zeros(out, dtype=torch.float64)
    if mode == "align_corners":
        return i * (size - 1) / (out - 1) if out > 1 else torch.zeros(out, dtype=torch.float64)
    if mode == "asymmetric":
        return i / scale
    if mode == "tf_half_pixel_for_nn":
        return (i + 0.5) / scale
    raise GraphPruneError(f"Resize coordinate_transformation_mode={mode} has no torch implementation", op="Resize")


def _nearest(x: torch.Tensor, axis: int, coords: torch.Tensor, rounding: str) -> torch.Tensor:
    pick = {"round_prefer_floor": lambda c: torch.ceil(c - 0.5), "round_prefer_ceil": lambda c: torch.floor(c + 0.5),
            "floor": torch.floor, "ceil": torch.ceil}[rounding](coords)
    return x.index_select(axis, pick.long().clamp(0, x.shape[axis] - 1))


def _taps(x: torch.Tensor, axis: int, coords: torch.Tensor, weights: list[torch.Tensor],
          offsets: list[int]) -> torch.Tensor:
    """Σ_k weights[k] · x[floor(c) + offsets[k]] along ``axis`` (indices clamped: edge values)."""
    base = torch.floor(coords).long()
    shape = [1] * x.dim()
    shape[axis] = -1
    out = None
    for w, o in zip(weights, offsets):
        term = x.index_select(axis, (base + o).clamp(0, x.shape[axis] - 1)) * w.to(x.dtype).reshape(shape)
        out = term if out is None else out + term
    return out


def _cubic_weights(t: torch.Tensor, a: float) -> list[torch.Tensor]:
    def k(d):
        d = d.abs()
        return torch.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                           torch.where(d < 2, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a, torch.zeros_like(d)))
    return [k(t + 1), k(t), k(1 - t), k(2 - t)]


def _resize(x, roi=None, scales=None, sizes=None, *, mode="nearest", coordinate_transformation_mode="half_pixel",
            nearest_mode="round_prefer_floor", cubic_coeff_a=-0.75, antialias=0, exclude_outside=0, axes=None, **__):
    """ONNX Resize, one axis at a time (nearest, linear and cubic are separable)."""
    if antialias or exclude_outside or axes:
        raise GraphPruneError("Resize with antialias, exclude_outside or axes has no torch implementation", op="Resize")
    if sizes is not None and sizes.numel():
        out_sizes = [int(v) for v in sizes.tolist()]
        factors = [o / s for o, s in zip(out_sizes, x.shape)]
    else:
        factors = [float(v) for v in scales.tolist()]
        out_sizes = [int(s * f) for s, f in zip(x.shape, factors)]
    for axis, (size, out, f) in enumerate(zip(x.shape, out_sizes, factors)):
        if size == out and f == 1.0:
            continue
        c = _source_coords(out, size, f, coordinate_transformation_mode)
        if mode == "nearest":
            x = _nearest(x, axis, c, nearest_mode)
        elif mode == "linear":
            t = c - torch.floor(c)
            x = _taps(x, axis, c, [1 - t, t], [0, 1])
        elif mode == "cubic":
            x = _taps(x, axis, c, _cubic_weights(c - torch.floor(c), cubic_coeff_a), [-1, 0, 1, 2])
        else:
            raise GraphPruneError(f"Resize mode={mode} has no torch implementation", op="Resize")
    return x


def _upsample(x, scales=None, *, mode="nearest", **attrs):
    """ONNX Upsample (before opset 10): Resize with asymmetric coordinates, rounding down."""
    if scales is None:
        scales = torch.tensor(attrs["scales"])
    return _resize(x, None, scales, None, mode=mode, coordinate_transformation_mode="asymmetric",
                   nearest_mode="floor")


def _softmax_axis(attrs: dict, _: list) -> None:
    attrs.setdefault("axis", -1)


ONNX_REDUCE = {
    "ReduceMean": _reduction(lambda x, d, k: x.mean(d, keepdim=k)),
    "ReduceSum": _reduction(lambda x, d, k: x.sum(d, keepdim=k)),
    "ReduceMax": _reduction(lambda x, d, k: x.amax(d, keepdim=k)),
    "ReduceMin": _reduction(lambda x, d, k: x.amin(d, keepdim=k)),
    "ReduceProd": _reduction(lambda x, d, k: _prod(x, d, k)),
    "ReduceL1": _reduction(lambda x, d, k: x.abs().sum(d, keepdim=k)),
    "ReduceL2": _reduction(lambda x, d, k: x.square().sum(d, keepdim=k).sqrt()),
    "ReduceLogSumExp": _reduction(lambda x, d, k: torch.logsumexp(x, d, keepdim=k)),
    "ReduceSumSquare": _reduction(lambda x, d, k: x.square().sum(d, keepdim=k)),
    "ArgMax": _arg_extreme(torch.argmax), "ArgMin": _arg_extreme(torch.argmin),
    "GlobalAveragePool": OnnxOp(lambda x, **_: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)),
    "GlobalMaxPool": OnnxOp(lambda x, **_: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)),
    "GlobalLpPool": OnnxOp(lambda x, *_, p=2, **__:
                           x.abs().pow(p).sum(dim=tuple(range(2, x.dim())), keepdim=True).pow(1.0 / p)),
    "ReduceLogSum": _reduction(lambda x, d, k: torch.log(x.sum(d, keepdim=k))),
}
ONNX_SPATIAL = {"MaxPool": OnnxOp(_max_pool), "AveragePool": OnnxOp(_avg_pool), "LpPool": OnnxOp(_lp_pool),
                "Resize": OnnxOp(_resize, ("X", "roi", "scales", "sizes")), "Upsample": OnnxOp(_upsample)}


def _prod(x: torch.Tensor, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):
        x = x.prod(d, keepdim=keep)
    return x

REDUCE = ("mean", "sum", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean", "logsumexp",
          "norm", "linalg_vector_norm", "prod", "argmax", "argmin", "any", "all")
SPATIAL = ("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
           "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
           "_adaptive_avg_pool3d", "max_pool3d_with_indices",
           "adaptive_max_pool1d", "adaptive_max_pool2d", "max_pool2d_with_indices", "upsample_nearest1d",
           "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d", "upsample_bicubic2d",
           "upsample_linear1d", "upsample_trilinear3d", "_upsample_nearest_exact2d", "_upsample_bilinear2d_aa",
           "lp_pool2d")


def _reduced_dims(node: Node, rank: int) -> list[int]:
    """The reduced axes; no axes (or an empty list) means all of them."""
    if node.source_op.startswith("onnx::Global"):
        return list(range(2, rank))
    dims = as_list(node.attrs.get("dim", node.attrs.get("axes")))
    return sorted({d % rank for d in dims}) if dims else list(range(rank))


ZERO_PRESERVING = ("sum", "mean", "amax", "amin", "max", "min", "norm", "linalg_vector_norm", "prod", "ReduceMean",
                   "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare",
                   "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")  # of zeros: zero
SUMS = ("sum", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2")  # exact over kept entries when the rest are 0
MEANS = ("mean", "ReduceMean")  # exact as a sum over the original count (rewritten below)


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


def _mixes_channels(node: Node, lab: Labels) -> str:
    """Why a reduction over labelled (channel) entries keeps them: what it computes
    changes when one is removed (a sum or mean only unless its input is zero where removed)."""
    kind = op_kind(node)
    if kind in SUMS + MEANS:
        what = "a mean" if kind in MEANS else "a sum"
        why = "its input is not zero where channels would be removed" if not lab.is_zero(node.inputs[0]) \
            else "it reduces several, not all, of its channel axes"
        return f"{kind} over the channel axis: {what} over channels changes when one is removed ({why})"
    return f"{kind} over the channel axis: its result changes when a channel is removed"


@register("reduce", aten=REDUCE, onnx=ONNX_REDUCE)
class Reduce(Rule):
    def propagate(self, node: Node, lab: Labels) -> None:
        x = node.inputs[0]
        rank = len(lab.shape(x))
        dims = _reduced_dims(node, rank)
        f = lab.field(x)
        keep = bool(node.attrs.get("keepdim", node.attrs.get("keepdims", False))) or node.source_op.startswith("onnx::Global")
        out_f = None
        if f is not None:
            if self._over_removed(node, lab, dims):  # a sum of the kept entries (the rest are zero)
                reduced = [a for a in f.axes if a in dims]
                if len(reduced) < len(f.axes):  # atoms also on kept axes: one unit per reduced index
                    lab.axis_labels(x, reduced[0])
            elif any(a in dims for a in f.axes):
                lab.pin_reported(node, f.labels, _mixes_channels(node, lab))
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
        return op_kind(node) in SUMS + MEANS and len(node.outputs) == 1 and lab.is_zero(x) \
            and (len(reduced) == len(f.axes) or len(reduced) == 1)

    def keeps_zero(self, node: Node, lab: Labels) -> bool:
        return op_kind(node) in ZERO_PRESERVING and lab.is_zero(node.inputs[0])

    def rewrite(self, node, shrink) -> Rewrite | None:
        """A mean over a shrunk axis divides by the original count."""
        if op_kind(node) not in MEANS:
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
          onnx={"Softmax": OnnxOp(lambda x, *, axis, **_: torch.softmax(x, axis), normalise=_softmax_axis),
                "LogSoftmax": OnnxOp(lambda x, *, axis, **_: torch.log_softmax(x, axis), normalise=_softmax_axis)})
class Softmax(Rule):
    probabilities = True

    def propagate(self, node: Node, lab: Labels) -> None:
        x = node.inputs[0]
        rank = len(lab.shape(x))
        dim = int(node.attrs.get("dim", node.attrs.get("axis", -1))) % rank
        f = lab.field(x)
        if f is not None and dim in f.axes:
            lab.pin(f.labels)
        lab.set_field(node.outputs[0], f)


def _upsample_shape(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """An ``upsample_*.vec`` output on meta tensors: ``[N, C, *sizes]``, the sizes given or
    each input size times its scale rounded down (ATen's ``upsample_compute_output_size``),
    in the input's memory format as the kernel suggests it.  ATen's meta path runs the
    interpolation's decomposition in Python: the 36 bilinear upsamples of timm's coat_tiny
    took 0.3 s of each of its three recordings.  None (the kernel runs) for keyword arguments
    or sizes that do not match the input's spatial axes."""
    if kwargs or len(args) < 3:
        return None
    x, sizes, scales = args[0], args[1], args[-1]
    spatial = x.shape[2:]
    if sizes is None and scales is not None and len(scales) == len(spatial):
        sizes = [int(float(n) * f) for n, f in zip(spatial, scales)]
    if sizes is None or len(sizes) != len(spatial):
        return None
    return torch.empty((*x.shape[:2], *sizes), dtype=x.dtype, device="meta",
                       memory_format=suggest_memory_format(x))


@register("spatial", aten=SPATIAL, onnx=ONNX_SPATIAL,
          shape_only={f"{op}.vec": _upsample_shape for op in SPATIAL if "upsample" in op})
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
