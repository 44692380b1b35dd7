"""Elementwise ops: activations (channel identity) and broadcasting n-ary ops (coupling).

Broadcast add/sub/mul/div couple the channels of their operands element by element:
residual adds tie both branches, an SE block's gate ties the squeeze path to the
trunk, a learned position embedding ties its columns to the hidden channels.
"""
from __future__ import annotations

import numpy as np
import torch

from ..analysis.labels import Field, Labels
from ..ir.graph import Node, Ref
from .common import broadcast, in_place, same_shape, tensor_attr, torch_dtype, true_division
from .registry import OnnxOp, Rule, op_kind, register

F = torch.nn.functional


def _unary(fn) -> OnnxOp:
    """An ONNX op that is ``fn`` of its one input, with no attributes."""
    return OnnxOp(lambda x, *_, **__: fn(x))


def _binary(fn) -> OnnxOp:
    return OnnxOp(lambda a, b, **_: fn(a, b))


def _variadic(fn) -> OnnxOp:
    """``fn`` folded over any number of broadcasting inputs (ONNX Max, Min, Sum)."""
    def run(*xs, **_):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out
    return OnnxOp(run)


def _div(a: torch.Tensor, b: torch.Tensor, **_) -> torch.Tensor:
    """ONNX Div: integer division truncates (shape arithmetic), float division is exact."""
    if not a.dtype.is_floating_point and not b.dtype.is_floating_point:
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _bit_shift(a: torch.Tensor, b: torch.Tensor, direction: str) -> torch.Tensor:
    """ONNX BitShift on unsigned integers (torch shifts only some of them): in int64,
    wrapped to the type's width."""
    wide, by = a.to(torch.int64), b.to(torch.int64)
    out = wide << by if direction == "LEFT" else wide >> by
    return (out & ((1 << (8 * a.element_size())) - 1)).to(a.dtype)


def _clip(x, lo=None, hi=None, *, min=None, max=None, **_):  # noqa: A002 - ONNX attribute names
    """ONNX Clip: bounds as inputs (opset 11+) or attributes (before)."""
    lo = lo if lo is not None else min
    hi = hi if hi is not None else max
    return x.clamp(None if lo is None else float(lo), None if hi is None else float(hi))

UNARY = (
    "relu", "relu_", "relu6", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_",
    "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "hardtanh", "hardtanh_", "leaky_relu",
    "leaky_relu_", "elu", "elu_", "selu", "celu", "softplus", "mish", "mish_", "clamp", "clamp_", "clamp_min",
    "clamp_max", "neg", "exp", "log", "log1p", "sqrt", "rsqrt", "abs", "sin", "cos", "erf", "reciprocal",
    "square", "sign", "floor", "ceil", "round", "trunc", "logical_not", "isnan", "isinf", "bitwise_not",
    "dropout", "dropout_", "feature_dropout", "alpha_dropout", "native_dropout", "clone", "contiguous",
    "alias", "detach", "detach_", "to", "_to_copy", "float", "half", "bfloat16",
    "nan_to_num", "logit", "glu_backward", "lift_fresh_copy", "prelu_scalar",
    "acos", "acosh", "asin", "asinh", "atan", "atanh", "cosh", "sinh", "tan", "expm1", "log2", "log10",
    "bernoulli",
)
NARY = (
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "maximum", "minimum", "pow",
    "pow_", "where", "masked_fill", "masked_fill_", "eq", "ne", "lt", "gt", "le", "ge", "logical_and",
    "logical_or", "logical_xor", "fmod", "remainder", "floor_divide", "atan2", "copysign", "addcmul",
    "addcdiv", "lerp", "bitwise_and", "bitwise_or", "bitwise_xor", "__and__", "__or__", "__xor__", "prelu",
    "hypot", "_prelu_kernel", "copy", "bitwise_left_shift", "bitwise_right_shift",
)
CREATION = (
    "zeros", "ones", "full", "empty", "arange", "new_zeros", "new_ones", "new_full", "new_empty",
    "zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like", "scalar_tensor",
    "linspace", "eye", "fill", "fill_", "rand", "randn", "randint", "empty_strided", "tensor", "randperm",
)
ZERO_PRESERVING = (  # f(0) == 0: a removed (zero) entry stays zero
    "relu", "relu_", "relu6", "gelu", "gelu_", "silu", "silu_", "tanh", "tanh_", "hardswish", "hardswish_",
    "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu", "mish", "mish_", "neg", "log1p", "sqrt", "abs",
    "sin", "erf", "square", "sign", "floor", "ceil", "round", "trunc", "dropout", "dropout_", "feature_dropout",
    "clone", "contiguous", "alias", "detach", "detach_", "to", "_to_copy", "float", "half", "bfloat16",
    "nan_to_num", "lift_fresh_copy", "prelu_scalar", "asin", "asinh", "atan", "atanh", "sinh", "tan", "expm1",
    "bernoulli",
    # ONNX
    "Asin", "Asinh", "Atan", "Atanh", "Sinh", "Tan", "Swish", "Bernoulli", "Relu", "Tanh", "Gelu", "HardSwish",
    "LeakyRelu", "Elu", "Selu", "Mish", "Neg", "Sqrt", "Abs", "Sin", "Erf", "Sign", "Floor", "Ceil", "Round",
    "Dropout", "Identity", "Cast", "CastLike", "Celu", "ThresholdedRelu", "Softsign",
)
ONNX_UNARY = {
    "Relu": _unary(torch.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "Gelu": OnnxOp(lambda x, *_, approximate="none", **__: F.gelu(x, approximate=approximate)),
    "HardSwish": _unary(F.hardswish),
    "HardSigmoid": OnnxOp(lambda x, *_, alpha=0.2, beta=0.5, **__: (alpha * x + beta).clamp(0, 1)),
    "LeakyRelu": OnnxOp(lambda x, *_, alpha=0.01, **__: F.leaky_relu(x, alpha)),
    "Elu": OnnxOp(lambda x, *_, alpha=1.0, **__: F.elu(x, alpha)),
    "Selu": OnnxOp(lambda x, *_, alpha=1.67326319217681884765625, gamma=1.05070102214813232421875, **__:
                   gamma * torch.where(x > 0, x, alpha * torch.expm1(x))),
    "Celu": OnnxOp(lambda x, *_, alpha=1.0, **__: F.celu(x, alpha)),
    "ThresholdedRelu": OnnxOp(lambda x, *_, alpha=1.0, **__: torch.where(x > alpha, x, torch.zeros_like(x))),
    "Softplus": _unary(F.softplus), "Softsign": _unary(F.softsign), "Mish": _unary(F.mish),
    "Clip": OnnxOp(_clip), "Neg": _unary(torch.neg), "Exp": _unary(torch.exp), "Log": _unary(torch.log),
    "Sqrt": _unary(torch.sqrt), "Abs": _unary(torch.abs), "Sin": _unary(torch.sin), "Cos": _unary(torch.cos),
    "Erf": _unary(torch.erf), "Reciprocal": _unary(torch.reciprocal), "Sign": _unary(torch.sign),
    "Floor": _unary(torch.floor), "Ceil": _unary(torch.ceil), "Round": _unary(torch.round),
    "Not": _unary(torch.logical_not), "IsNaN": _unary(torch.isnan),
    "IsInf": OnnxOp(lambda x, *_, detect_negative=1, detect_positive=1, **__:
                    (torch.isneginf(x) & bool(detect_negative)) | (torch.isposinf(x) & bool(detect_positive))),
    "Acos": _unary(torch.acos), "Acosh": _unary(torch.acosh), "Asin": _unary(torch.asin),
    "Asinh": _unary(torch.asinh), "Atan": _unary(torch.atan), "Atanh": _unary(torch.atanh),
    "Cosh": _unary(torch.cosh), "Sinh": _unary(torch.sinh), "Tan": _unary(torch.tan),
    "BitwiseNot": _unary(torch.bitwise_not),
    "Shrink": OnnxOp(lambda x, *_, bias=0.0, lambd=0.5, **__:
                     torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))),
    "Swish": OnnxOp(lambda x, *_, alpha=1.0, **__: x * torch.sigmoid(alpha * x)),
    # inference draws with the given probabilities; a zero probability draws zero
    "Bernoulli": OnnxOp(lambda x, *_, dtype=None, seed=None, **__: torch.bernoulli(x).to(_like(x, dtype))),
    "Dropout": OnnxOp(lambda x, *_, **__: (x, torch.ones_like(x, dtype=torch.bool))),  # inference: identity
    "Identity": _unary(lambda x: x),
    "Cast": OnnxOp(lambda x, *_, to, **__: x.to(torch_dtype(to))),
    "CastLike": OnnxOp(lambda x, like, *_, **__: x.to(like.dtype)),
}
ONNX_NARY = {
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": OnnxOp(_div),
    "Pow": OnnxOp(lambda a, b, **_: torch.pow(a, b).to(a.dtype)),
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Sum": _variadic(torch.add),
    "Mean": OnnxOp(lambda *xs, **_: _variadic(torch.add).torch(*xs) / len(xs)),
    "Where": OnnxOp(lambda c, a, b, **_: torch.where(c, a, b)),
    "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "Greater": _binary(torch.gt),
    "LessOrEqual": _binary(torch.le), "GreaterOrEqual": _binary(torch.ge), "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or), "Xor": _binary(torch.logical_xor),
    "Mod": OnnxOp(lambda a, b, *_, fmod=0, **__: torch.fmod(a, b) if fmod else torch.remainder(a, b)),
    "PRelu": OnnxOp(lambda x, slope, **_: torch.where(x < 0, x * slope, x)),
    "BitwiseAnd": _binary(torch.bitwise_and), "BitwiseOr": _binary(torch.bitwise_or),
    "BitwiseXor": _binary(torch.bitwise_xor),
    "BitShift": OnnxOp(lambda a, b, *_, direction, **__: _bit_shift(a, b, direction)),
}


# the nonlinearity each activation op applies, as the optimizers model it (leaky and
# parametric ReLUs as ReLU, clamps and Clip as ReLU6, GELU's erf form as GELU)
ACTIVATIONS = {
    **dict.fromkeys(("relu", "relu_", "leaky_relu", "leaky_relu_", "prelu_scalar", "Relu", "LeakyRelu",
                     "ThresholdedRelu", "prelu", "_prelu_kernel", "PRelu"), "relu"),
    **dict.fromkeys(("relu6", "hardtanh", "hardtanh_", "clamp", "clamp_", "clamp_min", "clamp_max", "Clip"),
                    "relu6"),
    **dict.fromkeys(("gelu", "gelu_", "erf", "Gelu", "Erf"), "gelu"),
    **dict.fromkeys(("silu", "silu_"), "silu"),
}


@register("unary", aten=UNARY, onnx=ONNX_UNARY, shape_only={
    **dict.fromkeys(("gelu.default", "relu.default", "silu.default", "dropout.default", "hardswish.default",
                     "sigmoid.default"), same_shape),
    **dict.fromkeys(("relu_.default", "hardtanh_.default", "silu_.default", "hardswish_.default", "sigmoid_.default"),
                    in_place)})
class Unary(Rule):
    """Channel identity: the output element is the input element, transformed."""

    mode_args = {"dropout": "train", "feature_dropout": "train", "alpha_dropout": "train"}

    def propagate(self, node: Node, lab: Labels) -> None:
        f = lab.field(node.inputs[0]) if node.inputs else None
        for o in node.outputs:
            if lab.shape(o) == lab.shape(node.inputs[0]):
                lab.fields[o] = f
            else:
                lab.fields[o] = None  # e.g. native_dropout's mask of another dtype is still same shape

    def keeps_zero(self, node: Node, lab: Labels) -> bool:
        """Zero-preserving activations and casts of a zero-where-removed input; a clamp
        whose range holds 0."""
        if not node.inputs or not lab.is_zero(node.inputs[0]):
            return False
        kind = op_kind(node)
        if kind == "Shrink":  # 0 lies inside [-lambd, lambd] and maps to 0
            return float(node.attrs.get("lambd", 0.5)) >= 0 or float(node.attrs.get("bias", 0.0)) == 0
        if kind in ("clamp", "clamp_", "clamp_min", "clamp_max", "hardtanh", "hardtanh_"):
            lo = node.attrs.get("min", node.attrs.get("min_val", -1.0 if "hardtanh" in kind else None))
            hi = node.attrs.get("max", node.attrs.get("max_val", 1.0 if "hardtanh" in kind else None))
            return all(isinstance(v, (int, float, type(None))) for v in (lo, hi)) \
                and (lo is None or lo <= 0) and (hi is None or hi >= 0)
        return kind in ZERO_PRESERVING

    def activation(self, node: Node) -> str | None:
        return ACTIVATIONS.get(op_kind(node))


@register("elementwise", aten=NARY, onnx=ONNX_NARY, shape_only={
    **dict.fromkeys(("add.Tensor", "sub.Tensor", "mul.Tensor", "add.Scalar", "sub.Scalar", "mul.Scalar"), broadcast),
    **dict.fromkeys(("div.Tensor", "div.Scalar"), true_division),
    **dict.fromkeys(("add_.Tensor", "sub_.Tensor", "mul_.Tensor", "div_.Tensor", "add_.Scalar", "mul_.Scalar"),
                    in_place)})
class Elementwise(Rule):
    """Broadcasting n-ary op: operands' atoms are coupled element by element.

    An unlabelled operand that spans a labelled axis (size > 1 there) pins those atoms:
    its entries cannot be removed, so neither can the ones they meet; where the field has
    other axes too, only whole fibres along the spanned ones go instead.
    """

    def propagate(self, node: Node, lab: Labels) -> None:
        out = node.outputs[0]
        rank = len(lab.shape(out))
        ops = []
        for name in dict.fromkeys(node.inputs):
            shape = lab.shape(name)
            off = rank - len(shape)
            f = lab.field(name)
            ops.append((name, shape, off, f))
        labelled = [o for o in ops if o[3] is not None]
        if not labelled:
            lab.fields[out] = None
            return
        rep = _representative(labelled, lab)
        rep_axes = tuple(a + rep[2] for a in rep[3].axes)
        for name, shape, off, f in ops:
            if name == rep[0]:
                continue
            axes = tuple(a + off for a in f.axes) if f is not None else ()
            if f is not None and not set(axes) <= set(rep_axes) and lab.graph.values[name].fixed:
                # a constant table that also varies along axes the data keeps whole (a
                # constant-folded rotary cos/sin table [1, 1, seq, head_dim] against
                # q [b, heads, seq, head_dim]): its entries along those axes go together;
                # one that varies along none of the data's labelled axes (a pooling's
                # divisor counts [7, 7] against [b, c, 7, 7]) is a fixed table: kept whole
                table = f
                f, axes = _collapse(lab, f, axes, rep_axes)
                if f is None:
                    lab.pin(table.labels)
            if f is None:
                spanned = [j for j, a in enumerate(rep_axes) if a - off >= 0 and shape[a - off] > 1]
                if len(spanned) == len(rep_axes):
                    lab.pin(rep[3].labels)
                elif spanned:
                    # whole fibres along the spanned axes go together, the other axes keep
                    # their units (a per-token RMS scaling a stream with learned positions)
                    t = rep[3].labels.permute(*[j for j in range(len(rep_axes)) if j not in spanned], *spanned)
                    rows = t.reshape(-1, int(np.prod(t.shape[len(rep_axes) - len(spanned):])))
                    lab.union(rows[:, :1], rows)
                continue
            if set(axes) <= set(rep_axes):
                grid = _expand_to(f.labels, axes, rep_axes, lab.shape(out))
                if set(axes) < set(rep_axes) and _zero_preserving(node, rep[0]):
                    lab.union_unless_whole(rep[3].labels, grid,
                                           tuple(i for i, a in enumerate(rep_axes) if a not in axes))
                else:
                    lab.union(rep[3].labels, grid)
            else:
                lab.pin(rep[3].labels)
                lab.pin(f.labels)
        lab.set_field(out, Field(rep_axes, rep[3].labels))
        for o in node.outputs[1:]:
            lab.fields[o] = None

    def keeps_zero(self, node: Node, lab: Labels) -> bool:
        """A sum of zero-where-removed operands (a residual add; a scalar added must be
        0); a product with one; a quotient of one; a positive power of one.  Only an
        operand whose atoms are coupled with the output's at every position counts: an
        unlabelled one broadcast onto removed positions puts its entries there, and a
        product's smaller factor may be pinned instead (``union_unless_whole``)."""
        kind, ins, out = op_kind(node), list(dict.fromkeys(node.inputs)), node.outputs[0]
        if kind in ADDITIVE:  # every operand is coupled elementwise (propagate's plain union)
            scalars = [node.attrs.get(k) for k in ("input", "other") if k in node.attrs]
            return all(_zero_operand(lab, i, out, broadcast=True) for i in ins) \
                and all(v == 0 for v in scalars if isinstance(v, (int, float)))
        if kind in PRODUCT:
            return any(_zero_operand(lab, i, out) for i in ins)
        first = node.args[0] if node.args else None
        if not (isinstance(first, Ref) and _zero_operand(lab, first.name, out)):
            return False
        if kind in ("div", "div_", "Div", "prelu", "_prelu_kernel", "PRelu"):
            return True
        if kind in ("pow", "pow_", "Pow"):
            e = node.attrs.get("exponent", node.args[1] if len(node.args) > 1 else None)
            if isinstance(e, Ref):
                v = lab.graph.values[e.name]
                return v.kind in ("buffer", "const") and v.data is not None and bool((v.data > 0).all())
            return isinstance(e, (int, float)) and e > 0
        if kind in ("masked_fill", "masked_fill_"):
            return node.attrs.get("value") == 0
        return False

    def activation(self, node: Node) -> str | None:
        return ACTIVATIONS.get(op_kind(node))  # a parametric ReLU


def _representative(labelled: list, lab: Labels) -> tuple:
    """The operand whose field the output takes: the one labelled on most axes, unless
    that is a constant and a computed operand is labelled on an axis it lacks (ONNX
    initializers are all labelled: a pooling's divisor table [7, 7] must not displace the
    channels of the [b, c, 7, 7] data it divides); then the computed operand."""
    rep = max(labelled, key=lambda o: len(o[3].axes))
    if lab.graph.values[rep[0]].fixed:
        reach = {a + rep[2] for a in rep[3].axes}
        computed = [o for o in labelled if not lab.graph.values[o[0]].fixed
                    and not {a + o[2] for a in o[3].axes} <= reach]
        if computed:
            rep = max(computed, key=lambda o: len(o[3].axes))
    return rep


def _zero_operand(lab: Labels, name: str, out: str, broadcast: bool = False) -> bool:
    """Whether operand ``name`` is zero where removed and labelled on the output's
    labelled axes (with ``broadcast``, on some of them: it was coupled with every
    position it is broadcast to), so each removed output position reads a removed entry."""
    f, fo = lab.fields.get(name), lab.fields.get(out)
    if f is None or fo is None or not lab.is_zero(name):
        return False
    axes = {a + len(lab.shape(out)) - len(lab.shape(name)) for a in f.axes}
    return axes <= set(fo.axes) if broadcast else axes == set(fo.axes)


def _collapse(lab: Labels, f: Field, axes: tuple[int, ...], keep: tuple[int, ...]) -> tuple[Field | None, tuple[int, ...]]:
    """``f`` (on output ``axes``) reduced to the axes it shares with ``keep``: its atoms
    along the other axes are coupled, one atom per index of the shared axes, so it can
    only lose whole slabs.  (None, ()) when it shares no axis."""
    shared = [k for k, a in enumerate(axes) if a in keep]
    if not shared:
        return None, ()
    other = [k for k in range(len(axes)) if k not in shared]
    t = f.labels.permute(*shared, *other)
    rows = t.reshape(*t.shape[:len(shared)], -1)
    lab.union(rows[..., :1].expand_as(rows).reshape(-1), rows.reshape(-1))
    return Field(tuple(f.axes[k] for k in shared), rows[..., 0].contiguous()), tuple(axes[k] for k in shared)


ADDITIVE = ("add", "add_", "sub", "sub_", "maximum", "minimum", "Add", "Sub", "Sum", "Mean", "Max", "Min")
PRODUCT = ("mul", "mul_", "Mul")
ARITHMETIC = ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "Add", "Sub", "Mul", "Div")


def is_arithmetic(node: Node) -> bool:
    """Whether ``node`` is a plain binary broadcasting add/sub/mul/div, so an operand may be
    replaced by any tensor that broadcasts to the same values (operator erasure swaps an
    erased residual branch for its constant output this way)."""
    return op_kind(node) in ARITHMETIC and len(node.inputs) == 2


def _zero_preserving(node: Node, rep: str) -> bool:
    """Whether a zero entry of ``rep`` stays zero whatever the other operand holds
    (``rep * other``, ``rep / other``): only then may ``rep`` lose entries alone."""
    kind = op_kind(node)
    if kind in ("mul", "mul_", "Mul"):
        return True
    return kind in ("div", "div_", "Div") and node.inputs[0] == rep


def _expand_to(labels: torch.Tensor, axes: tuple[int, ...], target: tuple[int, ...],
               out_shape: tuple[int, ...]) -> torch.Tensor:
    """Broadcast a field over ``axes`` onto the grid of ``target`` axes (axes ⊆ target)."""
    view = [labels.shape[axes.index(a)] if a in axes else 1 for a in target]
    full = [out_shape[a] for a in target]
    return labels.reshape(view).expand(full)


@register("triangular", aten=("triu", "tril", "triu_", "tril_"),
          onnx={"Trilu": OnnxOp(lambda x, k=None, *, upper=1, **_:
                                (torch.triu if upper else torch.tril)(x, 0 if k is None else int(k)))})
class Triangular(Rule):
    """Keeps entries by their (row, column) position: removing rows or columns would move
    the diagonal, so atoms on the last two axes are pinned; other atoms pass."""

    def propagate(self, node: Node, lab: Labels) -> None:
        x, out = node.inputs[0], node.outputs[0]
        f = lab.field(x)
        if f is not None and any(a >= len(lab.shape(x)) - 2 for a in f.axes):
            lab.pin(f.labels)
            f = None
        lab.set_field(out, f)

    def keeps_zero(self, node: Node, lab: Labels) -> bool:
        return lab.is_zero(node.inputs[0])


def _constant(*_, **attrs) -> torch.Tensor:
    """ONNX Constant: whichever ``value*`` attribute it holds."""
    if "value" in attrs:
        return tensor_attr(attrs["value"])
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32), ("value_int", torch.int64),
                       ("value_ints", torch.int64)):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    raise NotImplementedError(f"Constant with {sorted(attrs)}")


def _constant_of_shape(shape: torch.Tensor, *_, value=None, **__) -> torch.Tensor:
    fill = tensor_attr(value).reshape(-1) if value is not None else torch.zeros(1)
    return torch.full(tuple(int(s) for s in shape.tolist()), fill[0].item(), dtype=fill.dtype)


def _like(x: torch.Tensor, dtype: int | None) -> torch.dtype:
    return x.dtype if dtype is None else torch_dtype(dtype)


def _eye_like(x: torch.Tensor, *_, dtype=None, k=0, **__) -> torch.Tensor:
    rows, cols = torch.arange(x.shape[0])[:, None], torch.arange(x.shape[1])[None, :]
    return (cols - rows == k).to(_like(x, dtype))


@register("creation", aten=CREATION, onnx={
    "ConstantOfShape": OnnxOp(_constant_of_shape), "Constant": OnnxOp(_constant),
    "Range": OnnxOp(lambda start, limit, delta, **_: torch.arange(start.item(), limit.item(), delta.item(),
                                                                  dtype=start.dtype)),
    "RandomNormalLike": OnnxOp(lambda x, *_, dtype=None, mean=0.0, scale=1.0, **__:
                               torch.randn(x.shape, dtype=_like(x, dtype)) * scale + mean),
    "RandomUniformLike": OnnxOp(lambda x, *_, dtype=None, low=0.0, high=1.0, **__:
                                torch.rand(x.shape, dtype=_like(x, dtype)) * (high - low) + low),
    "EyeLike": OnnxOp(_eye_like),
    "RandomNormal": OnnxOp(lambda *_, shape, dtype=1, mean=0.0, scale=1.0, **__:
                           torch.randn(tuple(shape), dtype=torch_dtype(dtype)) * scale + mean),
    "RandomUniform": OnnxOp(lambda *_, shape, dtype=1, low=0.0, high=1.0, **__:
                            torch.rand(tuple(shape), dtype=torch_dtype(dtype)) * (high - low) + low),
    "HannWindow": OnnxOp(lambda n, *_, periodic=1, output_datatype=1, **__: torch.hann_window(
        int(n), periodic=bool(periodic), dtype=torch_dtype(output_datatype))),
    "HammingWindow": OnnxOp(lambda n, *_, periodic=1, output_datatype=1, **__: torch.hamming_window(
        int(n), periodic=bool(periodic), alpha=25 / 46, beta=21 / 46, dtype=torch_dtype(output_datatype))),
    "BlackmanWindow": OnnxOp(lambda n, *_, periodic=1, output_datatype=1, **__: torch.blackman_window(
        int(n), periodic=bool(periodic), dtype=torch_dtype(output_datatype)))})
class Creation(Rule):
    """Tensors made from sizes or constants carry no channel identity, except a ``*_like``
    tensor: it takes its input's shape, compact shape included, so it takes its labels too
    (each entry is made alone: nothing couples), and ``zeros_like`` is zero where removed."""

    def propagate(self, node: Node, lab: Labels) -> None:
        like = op_kind(node) in LIKE and node.inputs and lab.shape(node.inputs[0]) == lab.shape(node.outputs[0])
        for o in node.outputs:
            lab.fields[o] = lab.field(node.inputs[0]) if like else None

    def keeps_zero(self, node: Node, lab: Labels) -> bool:
        kind = op_kind(node)
        return kind == "zeros_like" or (kind == "full_like" and node.attrs.get("fill_value") == 0)


LIKE = ("zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like")
