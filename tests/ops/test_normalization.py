"""The phantom norms and means: what the compact graph computes where a normalised or
reduced axis lost entries that were exactly zero, in PyTorch and as the ONNX functions
the emitter inlines, checked against the full op on the zero-padded input."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

import graphprune as gp
from graphprune.frontends.onnx_backend import run_onnx
from graphprune.ops.normalization import phantom_layer_norm, phantom_onnx_function, phantom_rms_norm
from graphprune.ops.reduction import mean_of_original, mean_onnx_function

N, KEPT = 12, 7


def _padded(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.zeros(*x.shape[:-1], N - KEPT)], -1)


@pytest.mark.parametrize("affine", ["none", "weight", "both"])
def test_phantom_layer_norm_is_the_full_norm(affine: str) -> None:
    x = torch.randn(3, 4, KEPT) * 3 + 1
    w = torch.randn(N) if affine != "none" else None
    b = torch.randn(N) if affine == "both" else None
    full = F.layer_norm(_padded(x), (N,), w, b, 1e-5)[..., :KEPT]
    got = phantom_layer_norm(x, None if w is None else w[:KEPT], None if b is None else b[:KEPT], 1e-5, N)
    torch.testing.assert_close(got, full)
    out, mean, rstd = phantom_layer_norm(x, None, None, 1e-5, N, stats=True)
    _, ref_mean, ref_rstd = torch.ops.aten.native_layer_norm(_padded(x), [N], None, None, 1e-5)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(rstd, ref_rstd)


def test_phantom_rms_norm_is_the_full_norm() -> None:
    x, w = torch.randn(2, 5, KEPT), torch.randn(N)
    full = F.rms_norm(_padded(x), (N,), w, 1e-6)[..., :KEPT]
    torch.testing.assert_close(phantom_rms_norm(x, w[:KEPT], 1e-6, N), full)
    half = phantom_rms_norm(x.half(), w[:KEPT].half(), 1e-6, N, upcast=True)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), full, rtol=1e-2, atol=1e-2)


def test_phantom_norms_trace_with_fx_and_pickle() -> None:
    """Unpickling a GraphModule traces its code again: the phantom ops have no tensor control flow."""
    import pickle

    g = torch.fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    y = g.call_function(phantom_layer_norm, (x, w, None, 1e-5, N))
    g.output(g.call_function(mean_of_original, (g.call_function(phantom_rms_norm, (y, w, 1e-6, N)), [-1], True, N)))
    gm = pickle.loads(pickle.dumps(torch.fx.GraphModule(torch.nn.Module(), g)))
    xs, ws = torch.randn(2, KEPT), torch.randn(KEPT)
    ref = mean_of_original(phantom_rms_norm(phantom_layer_norm(xs, ws, None, 1e-5, N), ws, 1e-6, N), [-1], True, N)
    torch.testing.assert_close(gm(xs, ws), ref)


def test_mean_of_original() -> None:
    x = torch.randn(2, 3, KEPT)
    torch.testing.assert_close(mean_of_original(x, [-1], True, N), _padded(x).mean(-1, keepdim=True))
    torch.testing.assert_close(mean_of_original(x, None, False, 2 * 3 * N), _padded(x).mean())


def _call(fn: onnx.FunctionProto, inputs: dict[str, np.ndarray], out_shape: tuple, opset: int, extra_inits=(),
          **attrs) -> np.ndarray:
    """Run one call of ``fn`` in a model of its own, inlined as the emitter does."""
    node = helper.make_node(fn.name, list(inputs) + [i.name for i in extra_inits], ["y"], domain=fn.domain, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape)
                                            for k, v in inputs.items()],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], list(extra_inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(fn.domain, 1)],
                              functions=[fn])
    model = onnx.inliner.inline_local_functions(model)
    del model.functions[:]
    onnx.checker.check_model(model)
    return run_onnx(model, inputs)[0]


@pytest.mark.parametrize("rms,bias", [(False, True), (False, False), (True, False)])
def test_phantom_onnx_function_is_the_full_norm(rms: bool, bias: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, KEPT)).astype(np.float32) + 1
    w, b = rng.standard_normal(N).astype(np.float32), rng.standard_normal(N).astype(np.float32)
    inputs = {"X": x, "Scale": w[:KEPT]} | ({"B": b[:KEPT]} if bias else {})
    scalar = lambda v: onnx.numpy_helper.from_array(np.array(v, dtype=np.float32))  # noqa: E731
    got = _call(phantom_onnx_function(rms, bias, 17), inputs, x.shape, 17, N=scalar(N), missing=scalar(N - KEPT),
                epsilon=scalar(1e-5),
                to=TensorProto.FLOAT)
    xt = _padded(torch.from_numpy(x))
    if rms:
        ref = F.rms_norm(xt, (N,), torch.from_numpy(w), 1e-5)
    else:
        ref = F.layer_norm(xt, (N,), torch.from_numpy(w), torch.from_numpy(b) if bias else None, 1e-5)
    np.testing.assert_allclose(got, ref[..., :KEPT].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset", [11, 17, 18])
def test_mean_onnx_function(opset: int) -> None:
    x = np.random.default_rng(1).standard_normal((2, 3, KEPT)).astype(np.float32)
    fn = mean_onnx_function(opset)
    attrs = dict(count=onnx.numpy_helper.from_array(np.array(N, dtype=np.float32)), keepdims=1)
    if opset >= 13:
        axes = onnx.numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes")
        got = _call(fn, {"data": x}, (2, 3, 1), opset, [axes], **attrs)
    else:
        got = _call(fn, {"data": x}, (2, 3, 1), opset, axes=[-1], **attrs)
    np.testing.assert_allclose(got, _padded(torch.from_numpy(x)).mean(-1, keepdim=True).numpy(), rtol=1e-6)


def test_zero_where_removed_follows_the_registry() -> None:
    """Producers and zero-preserving ops give zero-where-removed values; a sigmoid, an added
    constant and a layer norm without a scale do not (see ``Rule.keeps_zero``)."""
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.out = torch.nn.Linear(4, 6), torch.nn.Linear(6, 2)

        def forward(self, x):
            h = self.fc(x)
            a, s, c = torch.relu(h), torch.sigmoid(h), h + 1.0
            n = F.layer_norm(h, (6,))
            return self.out(a * 2 + s + c + n)

    g = gp.trace(Net().eval(), (torch.randn(2, 4),), verify=False)
    kind = {n.source_op.split(".")[1]: n.outputs[0] for n in g.ir.nodes}
    zero = g.labels.is_zero
    assert zero(kind["linear"]) and zero(kind["relu"]) and zero(kind["mul"])
    assert not zero(kind["sigmoid"]) and not zero(kind["layer_norm"])
    assert not any(zero(n.outputs[0]) for n in g.ir.nodes if n.source_op == "aten.add.Tensor")
