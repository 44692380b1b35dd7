"""An ONNX graph as a differentiable torch program.

Gradient criteria (Taylor, Hessian) need a function of the weights they can
differentiate; for a model traced from ONNX that is the traced graph itself, run with
torch ops.  Compute ops live in :data:`COMPUTE`; data-movement ops reuse the callables
the importer already keeps (:mod:`.onnx_ops`).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..errors import GraphPruneError
from ..ir.graph import Ref

def _pads(attrs: dict[str, Any], spatial: int) -> tuple[list[int], list[int]]:
    pads = list(attrs.get("pads", [0] * 2 * spatial))
    return pads[:spatial], pads[spatial:]


def _conv(x, w, b=None, *, strides=None, dilations=None, groups=1, auto_pad="NOTSET", **attrs):
    spatial = w.dim() - 2
    if auto_pad not in ("NOTSET", "VALID"):
        raise GraphPruneError(f"Conv auto_pad={auto_pad} is not supported by the torch program of an ONNX graph")
    begin, end = _pads(attrs, spatial)
    if begin != end:
        x = torch.nn.functional.pad(x, [p for be in zip(reversed(begin), reversed(end)) for p in be])
        begin = [0] * spatial
    conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)[spatial - 1]
    return conv(x, w, b, stride=strides or 1, padding=begin, dilation=dilations or 1, groups=groups)


def _pool(kind: str):
    def run(x, *, kernel_shape, strides=None, count_include_pad=0, ceil_mode=0, **attrs):
        spatial = len(kernel_shape)
        begin, end = _pads(attrs, spatial)
        if begin != end:
            raise GraphPruneError(f"{kind} pool with asymmetric pads is not supported by the torch program")
        fn = getattr(torch.nn.functional, f"{kind}_pool{spatial}d")
        extra = {"count_include_pad": bool(count_include_pad)} if kind == "avg" else {}
        return fn(x, kernel_shape, strides or kernel_shape, begin, ceil_mode=bool(ceil_mode), **extra)
    return run


def _gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0, **_):
    out = alpha * ((a.T if transA else a) @ (b.T if transB else b))
    return out if c is None else out + beta * c


def _batch_norm(x, scale, bias, mean, var, *, epsilon=1e-5, **_):
    return torch.nn.functional.batch_norm(x, mean.detach(), var.detach(), scale, bias, False, 0.0, epsilon)


def _layer_norm(x, scale, bias=None, *, axis=-1, epsilon=1e-5, **_):
    axis %= x.dim()
    return torch.nn.functional.layer_norm(x, x.shape[axis:], scale, bias, epsilon)


def _reduce_mean(x, *_, axes=None, keepdims=1, **__):
    return x.mean(dim=axes, keepdim=bool(keepdims)) if axes else x.mean()


def _clip(x, lo=None, hi=None, *, min=None, max=None, **_):  # noqa: A002 - ONNX attribute names
    lo = lo if lo is not None else min
    hi = hi if hi is not None else max
    return x.clamp(None if lo is None else float(lo), None if hi is None else float(hi))


_F = torch.nn.functional
COMPUTE: dict[str, Callable[..., Any]] = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": lambda a, b, **_: a @ b,
    "Add": lambda a, b, **_: a + b, "Sub": lambda a, b, **_: a - b, "Mul": lambda a, b, **_: a * b,
    "Div": lambda a, b, **_: a / b, "Pow": lambda a, b, **_: a ** b, "Sqrt": lambda x, **_: x.sqrt(),
    "Neg": lambda x, **_: -x, "Relu": lambda x, **_: _F.relu(x), "Sigmoid": lambda x, **_: torch.sigmoid(x),
    "Tanh": lambda x, **_: torch.tanh(x), "Erf": lambda x, **_: torch.erf(x), "Clip": _clip,
    "Gelu": lambda x, approximate="none", **_: _F.gelu(x, approximate=approximate),
    "LeakyRelu": lambda x, alpha=0.01, **_: _F.leaky_relu(x, alpha),
    "HardSigmoid": lambda x, alpha=0.2, beta=0.5, **_: (alpha * x + beta).clamp(0, 1),
    "HardSwish": lambda x, **_: _F.hardswish(x),
    "Softmax": lambda x, axis=-1, **_: torch.softmax(x, axis),
    "BatchNormalization": _batch_norm, "LayerNormalization": _layer_norm,
    "AveragePool": _pool("avg"), "MaxPool": _pool("max"),
    "GlobalAveragePool": lambda x, **_: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda x, **_: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
    "ReduceMean": _reduce_mean, "Identity": lambda x, **_: x, "Dropout": lambda x, *_, **__: x,
}


class GraphProgram(nn.Module):
    """The traced ONNX graph as a differentiable torch function of ``params`` (the graph's
    editable initializers), so gradient criteria work on ONNX input as on PyTorch.

    Compute ops run through :data:`COMPUTE`; data-movement ops through the callables the
    IR already keeps.  Integer shape arithmetic is read from the values captured at
    tracing (so reshapes keep the traced sizes where the exporter baked them in).
    """

    def __init__(self, ir: Any, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.ir, self.tensors = ir, params

    def forward(self, *inputs: torch.Tensor) -> Any:
        ir = self.ir
        env: dict[str, Any] = dict(zip(ir.inputs, inputs))

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
            kind = n.source_op.split("::", 1)[-1]
            fn = COMPUTE.get(kind)
            if fn is None and n.target is None:
                raise GraphPruneError(f"ONNX op {kind} has no torch implementation for gradient criteria",
                                      node=n.name, hint="use a data-free criterion (obspa, l1, l2, bn_scale)")
            args = [look(a.name) if a is not None else None for a in n.args]
            if fn is not None:
                attrs = {k: v for k, v in n.attrs.items() if not isinstance(v, Ref)}
                out = fn(*args, **attrs)
            else:
                out = n.call({a.name: look(a.name) for a in n.args if a is not None})
            outs = out if isinstance(out, (list, tuple)) else [out]
            env.update(zip(n.outputs, outs))
        results = [look(o) for o in ir.outputs]
        return results[0] if len(results) == 1 else tuple(results)
