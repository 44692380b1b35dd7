"""Normalisation layers.

Batch and instance norm are per channel (identity; their affine parameters and
running statistics are sliced with the channel).  Group norm normalises over groups
of channels, so a unit is a whole group.

Layer and RMS norm reduce over their normalised axes.  Over one trailing axis (a
transformer's hidden columns) they are exact on the compact graph when the removed
input entries are exactly zero (:meth:`Labels.is_zero`) and the statistics keep the
original count ``N``: mean = Σx/N, var = (Σ(x-mean)² + (N-N')·mean²)/N, RMS² = Σx²/N
(:func:`phantom_layer_norm`, :func:`phantom_rms_norm`; on ONNX the same body as a
model-local function the ONNX lowering inlines).  A removed output column is then zero iff
its weight and bias entries are (an RMS norm's always is), so input columns, output
columns and the affine entries form one unit.  A layer norm without a trained weight
(its removed outputs are -mean/σ), an input that is not zero where removed (after a
sigmoid) and normalisation over several axes keep those atoms pinned.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ..analysis.labels import Field, Labels
from ..ir.graph import Node
from .common import ref_name, same_shape
from .registry import OnnxOp, Rule, register
from .rewrite import Call, OnnxCall, OnnxContext, Phantom, Rewrite

DOMAIN = "graphprune"  # the model-local ONNX functions' domain (inlined before the model is written)
F = torch.nn.functional


def _onnx_batch_norm(x, scale, bias, mean, var, *, epsilon=1e-5, **_):
    """Inference mode, as the traced graph runs it (running statistics are not updated)."""
    return F.batch_norm(x, mean.detach(), var.detach(), scale, bias, False, 0.0, epsilon)


def _onnx_layer_norm(x, scale, bias=None, *, axis=-1, epsilon=1e-5, **_):
    """Y, Mean, InvStdDev over the axes from ``axis`` on (statistics keep those axes as 1)."""
    axis %= x.dim()
    axes = tuple(range(axis, x.dim()))
    shape = x.shape[axis:]  # an affine with leading ones (tf2onnx's [1, 1, C]) broadcasts the same
    y = F.layer_norm(x, shape, scale.reshape(shape) if scale is not None else None,
                     bias.reshape(shape) if bias is not None else None, epsilon)
    mean = x.mean(axes, keepdim=True)
    return y, mean, torch.rsqrt(x.var(axes, unbiased=False, keepdim=True) + epsilon)


def _onnx_rms_norm(x, scale, *_, axis=-1, epsilon=1e-5, **__):
    """Y, InvStdDev: ``x / sqrt(mean(x²) + eps) * scale`` over the axes from ``axis`` on."""
    axes = tuple(range(axis % x.dim(), x.dim()))
    rstd = torch.rsqrt(x.square().mean(axes, keepdim=True) + epsilon)
    return x * rstd * scale, rstd


def _onnx_group_norm(x, scale, bias, *, num_groups, epsilon=1e-5, **_):
    """Scale and bias per channel (opset 21) or per group (opset 18)."""
    c = x.shape[1]
    if scale.numel() != c:
        scale, bias = scale.repeat_interleave(c // num_groups), bias.repeat_interleave(c // num_groups)
    return F.group_norm(x, num_groups, scale, bias, epsilon)


@register("batch_norm", aten=("batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm",
                              "_native_batch_norm_legit", "instance_norm"),
          onnx={"BatchNormalization": OnnxOp(_onnx_batch_norm, ("input", "scale", "B", "input_mean", "input_var")),
                "InstanceNormalization": OnnxOp(lambda x, scale, b, *, epsilon=1e-5, **_:
                                                F.instance_norm(x, weight=scale, bias=b, eps=epsilon),
                                                ("input", "scale", "B"))},
          shape_only={"batch_norm.default": same_shape, "instance_norm.default": same_shape})
class BatchNorm(Rule):
    mode_args = {"batch_norm": "training"}
    mixes_channels = normalises = True

    def mode_arg(self, packet: str, arg: Callable[[str], Any]) -> str | None:
        """Only a batch norm with running statistics follows ``.eval()``: one without
        (``F.batch_norm(w, None, None, training=True)``, weight standardisation in timm's
        ``StdConv2d``/``ScaledStdConv2d``) always normalises by its input's own statistics,
        and in evaluation mode it would have none to use."""
        if packet == "batch_norm" and arg("running_mean") is None:
            return None
        return super().mode_arg(packet, arg)

    def propagate(self, node: Node, lab: Labels) -> None:
        x = ref_name(node.attrs.get("input"))
        ch = lab.axis_labels(x, 1) if x else None
        shift = ref_name(node.attrs.get("bias", node.attrs.get("B")))
        for key in ("weight", "bias", "running_mean", "running_var", "scale", "B", "input_mean", "input_var"):
            p = ref_name(node.attrs.get(key))
            if p is not None and lab.graph.values[p].kind != "act":
                lab.param_axis(p, 0, ch, *(("norm", shift) if key in ("weight", "scale") else ()))
        lab.set_field(node.outputs[0], Field((1,), ch) if ch is not None else None)
        for o in node.outputs[1:]:
            lab.fields[o] = None

    def keeps_zero(self, node: Node, lab: Labels) -> bool:
        """A removed channel's output is its bias, after a zero scale."""
        return _trained(lab, node, ("weight", "scale"), ("bias", "B"))


def _trained(lab: Labels, node: Node, weight: tuple[str, ...], bias: tuple[str, ...]) -> bool:
    """:func:`_zero_affine` for the scale under one of the ``weight`` keys and the shift
    under one of the ``bias`` keys."""
    w = next((ref_name(node.attrs.get(k)) for k in weight if ref_name(node.attrs.get(k))), None)
    b = next((ref_name(node.attrs.get(k)) for k in bias if ref_name(node.attrs.get(k))), None)
    return _zero_affine(lab, w, b)


def _zero_affine(lab: Labels, scale: str | None, shift: str | None) -> bool:
    """Whether the scale is a parameter and the shift one or absent: a removed unit's
    output, scale·(...) + shift, is then zero (its entries of both are)."""
    param = lambda n: lab.graph.values[n].kind == "param"  # noqa: E731
    return scale is not None and param(scale) and (shift is None or param(shift))


# The width-corrected layer norm as data: (value, op, operands) over the inputs ``x``, ``n``
# (the original width), ``missing`` (n minus the kept width) and ``eps``; "sum" is over the
# last axis, keeping it.  :func:`phantom_layer_norm` computes it in torch and
# :func:`phantom_onnx_function` writes it as ONNX; codegen's FusePhantomLayerNorm
# (codegen/phantom_norm.py) builds its Relax pattern from it, so the sequence the
# emitters produce and the one codegen fuses into one kernel cannot drift apart.
LAYER_NORM_STEPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("total", "sum", ("x",)),
    ("mean", "divide", ("total", "n")),
    ("d", "subtract", ("x", "mean")),
    ("d2", "square", ("d",)),
    ("squares", "sum", ("d2",)),
    ("m2", "square", ("mean",)),
    ("phantom", "multiply", ("missing", "m2")),
    ("ss", "add", ("squares", "phantom")),
    ("var", "divide", ("ss", "n")),
    ("shifted", "add", ("var", "eps")),
    ("rstd", "rsqrt", ("shifted",)),
    ("y", "multiply", ("d", "rstd")),
)
_TORCH_OPS = {"sum": lambda a: a.sum(-1, keepdim=True), "divide": lambda a, b: a / b, "subtract": lambda a, b: a - b,
              "square": lambda a: a.square(), "multiply": lambda a, b: a * b, "add": lambda a, b: a + b,
              "rsqrt": torch.rsqrt}


def phantom_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                       n: int, stats: bool = False, upcast: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``layer_norm`` over the last axis of ``x`` as if it had ``n`` entries, the missing
    ones zero (:data:`LAYER_NORM_STEPS`): the compact graph's layer norm where hidden
    columns were removed (``upcast``: statistics in float32 for a half-precision ``x``).
    No control flow on tensors, so fx traces through it (unpickling a GraphModule does).

    >>> x = torch.randn(2, 5); full = torch.cat([x, torch.zeros(2, 3)], -1)
    >>> torch.allclose(phantom_layer_norm(x, None, None, 1e-5, 8), torch.layer_norm(full, (8,))[:, :5], atol=1e-6)
    True
    """
    env = {"x": x.float() if upcast else x, "n": n, "missing": n - x.shape[-1], "eps": eps}
    for out, op, args in LAYER_NORM_STEPS:
        env[out] = _TORCH_OPS[op](*(env[a] for a in args))
    y = env["y"]
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    y = y.type_as(x) if upcast else y
    return (y, env["mean"], env["rstd"]) if stats else y


def phantom_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, n: int, stats: bool = False,
                     upcast: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``rms_norm`` over the last axis of ``x`` as if it had ``n`` entries, the missing ones
    zero (mean square = Σx²/n)."""
    xf = x.float() if upcast else x
    rstd = torch.rsqrt(xf.square().sum(-1, keepdim=True) / n + eps)
    y = xf * rstd
    if weight is not None:
        y = y * weight
    y = y.type_as(x) if upcast else y
    return (y, rstd) if stats else y


def phantom_onnx_function(rms: bool, bias: bool, opset: int):
    """The ONNX body of :func:`phantom_layer_norm` (``rms``: :func:`phantom_rms_norm`) as a
    FunctionProto in the ``graphprune`` domain.  Attributes: ``N`` (the original count),
    ``missing`` (N - N', the removed entries: known when emitting, so no shape arithmetic
    for TVM's frontend to fold) and ``epsilon``, float scalar tensors (every Constant holds
    a ``value`` tensor, in any opset), and ``to`` (X's element type); statistics in float,
    as ``stash_type``.  Inputs X, Scale[, B]; outputs Y, Mean, InvStdDev (Y, InvStdDev
    for RMS)."""
    from onnx import AttributeProto, helper, numpy_helper

    node = helper.make_node

    def given(out: str, attr: str):  # a Constant holding the call's tensor attribute
        n = node("Constant", [], [out])
        n.attribute.append(AttributeProto(name="value", ref_attr_name=attr, type=AttributeProto.TENSOR))
        return n

    axes = node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([-1], dtype=np.int64)))
    body = [axes, node("Cast", ["X"], ["Xf"], to=1), given("N_", "N"), given("eps", "epsilon")]

    def reduce_sum(x: str, out: str) -> None:
        if opset >= 13:
            body.append(node("ReduceSum", [x, "axes"], [out], keepdims=1))
        else:
            body.append(node("ReduceSum", [x], [out], axes=[-1], keepdims=1))

    if rms:
        body.append(node("Mul", ["Xf", "Xf"], ["X2"]))
        reduce_sum("X2", "S2")
        body += [node("Div", ["S2", "N_"], ["MS"]), node("Add", ["MS", "eps"], ["Veps"]),
                 node("Sqrt", ["Veps"], ["Std"]), node("Reciprocal", ["Std"], ["InvStdDev"]),
                 node("Mul", ["Xf", "InvStdDev"], ["Yf"])]
    else:  # LAYER_NORM_STEPS, op by op
        body.append(given("Missing", "missing"))
        names = {"x": "Xf", "n": "N_", "missing": "Missing", "eps": "eps", "mean": "Mean", "rstd": "InvStdDev",
                 "y": "Yf"}
        binary = {"divide": "Div", "subtract": "Sub", "multiply": "Mul", "add": "Add"}
        for out, op, args in LAYER_NORM_STEPS:
            o, a = names.get(out, out), [names.get(v, v) for v in args]
            if op == "sum":
                reduce_sum(a[0], o)
            elif op == "square":
                body.append(node("Mul", [a[0], a[0]], [o]))
            elif op == "rsqrt":
                body += [node("Sqrt", a, [f"{o}_sqrt"]), node("Reciprocal", [f"{o}_sqrt"], [o])]
            else:
                body.append(node(binary[op], a, [o]))
    cast = node("Cast", ["Yf"], ["Yn"])
    cast.attribute.append(AttributeProto(name="to", ref_attr_name="to", type=AttributeProto.INT))
    body += [cast, node("Mul", ["Yn", "Scale"], ["Ys" if bias else "Y"])]
    if bias:
        body.append(node("Add", ["Ys", "B"], ["Y"]))
    name = "PhantomRMSNorm" if rms else ("PhantomLayerNorm" if bias else "PhantomLayerNormNoBias")
    return helper.make_function(DOMAIN, name, ["X", "Scale"] + (["B"] if bias else []),
                                ["Y", "InvStdDev"] if rms else ["Y", "Mean", "InvStdDev"], body,
                                [helper.make_opsetid("", opset)], attributes=["N", "missing", "epsilon", "to"])


def _phantom_norm_onnx(rms: bool) -> Callable[[Call, OnnxContext], OnnxCall]:
    """The ONNX form of a phantom norm call: :func:`phantom_onnx_function` with the
    removed count known when the model is written."""
    def form(call: Call, ctx: OnnxContext) -> OnnxCall:
        from onnx import helper, numpy_helper
        x, n = call.inputs[0], call.attrs["n"]
        bias = not rms and len(call.inputs) > 2 and call.inputs[2] is not None
        to = helper.np_dtype_to_tensor_dtype(torch.empty(0, dtype=ctx.dtype(x)).numpy().dtype)
        scalar = lambda v: numpy_helper.from_array(np.array(v, dtype=np.float32))  # noqa: E731
        return OnnxCall(phantom_onnx_function(rms, bias, ctx.opset(17)),
                        dict(N=scalar(n), missing=scalar(n - ctx.shape(x)[-1]), epsilon=scalar(call.attrs["eps"]),
                             to=to))
    return form


PHANTOM_LAYER_NORM = Phantom("phantom_layer_norm", phantom_layer_norm, _phantom_norm_onnx(rms=False))
PHANTOM_RMS_NORM = Phantom("phantom_rms_norm", phantom_rms_norm, _phantom_norm_onnx(rms=True))


@register("layer_norm", aten=("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"),
          onnx={"LayerNormalization": OnnxOp(_onnx_layer_norm, ("input", "scale", "B")),
                "RMSNormalization": OnnxOp(_onnx_rms_norm), "SimplifiedLayerNormalization": OnnxOp(_onnx_rms_norm)},
          shape_only={"layer_norm.default": same_shape})
class LayerNorm(Rule):
    mixes_channels = normalises = True

    def propagate(self, node: Node, lab: Labels) -> None:
        x = node.inputs[0]
        rank = len(lab.shape(x))
        f = lab.field(x)
        if self._exact(node, lab):  # one unit: an input column, its output column, its scale and shift
            cols = lab.axis_labels(x, rank - 1)
            for p in _affine(node):
                if p is not None and lab.field(p) is not None:
                    pl = lab.axis_labels(p, -1)
                    lab.union(cols, pl) if pl is not None else lab.pin(cols)
            scale, shift = _affine(node)
            if scale is not None and lab.graph.values[scale].kind == "param":
                lab.param_role(scale, -1, "norm", shift)
            lab.set_field(node.outputs[0], Field((rank - 1,), cols))
        else:
            k = _normalised_axes(node, rank)
            if f is not None and any(a >= rank - k for a in f.axes):
                lab.pin(f.labels)
            for affine in node.inputs[1:]:  # scale/bias live on the normalised (pinned) axes
                fa = lab.field(affine)
                if fa is not None:
                    lab.pin(fa.labels)
            lab.set_field(node.outputs[0], f)
        for o in node.outputs[1:]:
            lab.fields[o] = None

    @staticmethod
    def _exact(node: Node, lab: Labels) -> bool:
        """Whether the compact norm can keep the original statistics: one normalised axis
        carrying atoms, input zero where removed, and a removed output column zero
        (always for RMS; for a layer norm only with a trained scale and shift, or none)."""
        x = node.inputs[0]
        rank = len(lab.shape(x))
        f = lab.fields.get(x)
        if f is None or _normalised_axes(node, rank) != 1 or rank - 1 not in f.axes or not lab.is_zero(x):
            return False
        return _is_rms(node) or _zero_affine(lab, *_affine(node))

    def keeps_zero(self, node: Node, lab: Labels) -> bool:
        return self._exact(node, lab)

    def rewrite(self, node, shrink) -> Rewrite | None:
        """A norm over a shrunk axis computes its statistics with the original count."""
        x = node.inputs[0]
        n, kept = shrink.old_shape(x)[-1], shrink.new_shape(x)[-1]
        if n == kept:
            return None
        w, b = _affine(node)
        dtype = shrink.graph.values[x].dtype
        upcast = dtype in (torch.float16, torch.bfloat16)
        stats = node.source_op.startswith(("aten.native_layer_norm.", "aten._fused_rms_norm."))
        if node.source_op.startswith("onnx::"):
            eps = float(node.attrs.get("epsilon", 1e-5))
        elif node.attrs.get("eps") is not None:
            eps = float(node.attrs["eps"])
        else:  # the ATen defaults
            eps = torch.finfo(dtype).eps if _is_rms(node) else 1e-5
        attrs = dict(eps=eps, n=n, stats=stats, upcast=upcast)
        if _is_rms(node):
            return Rewrite(call=Call(PHANTOM_RMS_NORM, (x, w), attrs))
        return Rewrite(call=Call(PHANTOM_LAYER_NORM, (x, w, b), attrs))


def _is_rms(node: Node) -> bool:
    return "rms" in node.source_op.lower() or node.source_op == "onnx::SimplifiedLayerNormalization"


def _normalised_axes(node: Node, rank: int) -> int:
    shape = node.attrs.get("normalized_shape")
    return len(shape) if shape is not None else rank - (node.attrs.get("axis", -1) % rank)


def _affine(node: Node) -> tuple[str | None, str | None]:
    """The scale and shift values (None where absent)."""
    if node.source_op.startswith("onnx::"):
        args = list(node.args) + [None, None]
        w, b = args[1], (None if _is_rms(node) else args[2])
    else:
        w, b = node.attrs.get("weight"), node.attrs.get("bias")
    return ref_name(w), ref_name(b)


@register("group_norm", aten=("group_norm", "native_group_norm"),
          onnx={"GroupNormalization": OnnxOp(_onnx_group_norm, ("input", "scale", "bias"))},
          shape_only={"group_norm.default": same_shape})
class GroupNorm(Rule):
    mixes_channels = normalises = True

    def propagate(self, node: Node, lab: Labels) -> None:
        x = ref_name(node.attrs.get("input")) or node.inputs[0]
        g = int(node.attrs.get("num_groups", node.attrs.get("group", 1)))
        ch = lab.axis_labels(x, 1)
        if ch is not None:
            rows = ch.reshape(g, -1)
            lab.union(rows[:, :1], rows)
        shift = ref_name(node.attrs.get("bias"))
        for key in ("weight", "bias", "scale"):
            p = ref_name(node.attrs.get(key))
            if p is not None:
                lab.param_axis(p, 0, ch, *(("norm", shift) if key != "bias" else ()))
        lab.set_field(node.outputs[0], Field((1,), ch) if ch is not None else None)
        for o in node.outputs[1:]:
            lab.fields[o] = None

    def keeps_zero(self, node: Node, lab: Labels) -> bool:
        return _trained(lab, node, ("weight", "scale"), ("bias",))

    def rewrite(self, node, shrink) -> Rewrite | None:
        """Removed channels take whole groups with them: the group count falls."""
        old_c, new_c = shrink.old_shape(node.outputs[0])[1], shrink.new_shape(node.outputs[0])[1]
        if old_c == new_c:
            return None
        g = int(node.attrs.get("num_groups", node.attrs.get("group", 1)))
        new_g = new_c // (old_c // g)
        if "num_groups" in node.attrs:
            return Rewrite(args={"num_groups": new_g})
        return Rewrite(args={"group": new_g, "C": new_c})  # native_group_norm
