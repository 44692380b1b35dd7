"""QuantizeLinear / DequantizeLinear (:mod:`graphprune.ops.quantize`) between two convs:
per tensor they pass channels; per axis along the channels the scale joins the group (the
compact file keeps the kept channels' scales); with a per-axis zero-point they are a
barrier that says why."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune as gp
from graphprune.frontends.onnx_backend import run_onnx
from tests.helpers import zero_random_half

rng = np.random.default_rng(0)


def _qdq_model(scale: np.ndarray, zero_point: np.ndarray | None) -> onnx.ModelProto:
    inits = {"w1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
             "b1": rng.standard_normal(8).astype(np.float32),
             "w2": rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "s": scale}
    qdq = ["y", "s"] + (["zp"] if zero_point is not None else [])
    if zero_point is not None:
        inits["zp"] = zero_point
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["y"], pads=[1, 1, 1, 1], name="c1"),
             helper.make_node("QuantizeLinear", qdq, ["q"], axis=1, name="q"),
             helper.make_node("DequantizeLinear", ["q", *qdq[1:]], ["d"], axis=1, name="dq"),
             helper.make_node("Conv", ["d", "w2"], ["out"], name="c2")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 6, 6])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4, 6, 6])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("scale,zero_point", [
    (np.array(0.05, np.float32), np.array(3, np.int8)),                  # per tensor
    (rng.uniform(0.02, 0.1, 8).astype(np.float32), None),               # per channel, no zero-point
], ids=["per_tensor", "per_axis"])
def test_compact_equals_zeroed(scale: np.ndarray, zero_point: np.ndarray | None) -> None:
    g = gp.trace(_qdq_model(scale, zero_point), verify=False)
    assert not g.barriers and len(g.groups) == 1
    zero_random_half(g)
    full, compact = g.backend.full(g, g.params), g.construct_subnet()
    onnx.checker.check_model(compact)
    x = rng.standard_normal((3, 3, 6, 6)).astype(np.float32)
    ref, out = run_onnx(full, {"x": x})[0], run_onnx(compact, {"x": x})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    kept = {i.name: tuple(i.dims) for i in compact.graph.initializer}
    assert kept["w1"][0] == 4
    if scale.ndim:
        assert kept["s"] == (4,)


def test_per_axis_zero_point_is_a_barrier_that_says_why() -> None:
    g = gp.trace(_qdq_model(rng.uniform(0.02, 0.1, 8).astype(np.float32), np.zeros(8, np.int8)), verify=False)
    assert not g.groups
    assert any("zero-point" in b.reason for b in g.barriers)
