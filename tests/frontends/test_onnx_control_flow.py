"""Control-flow nodes read the enclosing graph by name from inside their branches.

Exporters write ``If`` nodes for shape-dependent code (timm's HieraDet tiles its window
position embedding under one): a branch reads a shape computed outside and a weight.
Those reads are edges like any input: the lowering keeps the producers the branches
need, the analysis sees the weight a branch reads (the ``If`` is a barrier on its
channels, reported), and the compact file equals the zeroed one.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphprune as gp
from graphprune.frontends.onnx_backend import run_onnx
from graphprune.frontends.onnx_scopes import outer_reads, reads, rename_reads
from tests.helpers import zero_random_half


def _conv(rng: np.random.Generator, name: str, cout: int, cin: int) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal((cout, cin, 3, 3)) * 0.3).astype(np.float32), name)


def branchy_model() -> onnx.ModelProto:
    """conv -> relu -> + If(H > 0: 2*pos, else: pos) -> conv -> relu -> conv; ``2*pos``
    is computed outside the ``If`` and read only by its then-branch."""
    rng = np.random.default_rng(0)
    inits = [_conv(rng, "w1", 8, 3), _conv(rng, "w2", 16, 8), _conv(rng, "w3", 4, 16),
             numpy_helper.from_array(rng.standard_normal((1, 8, 1, 1)).astype(np.float32), "pos"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array([2], np.int64), "axis_h"),
             numpy_helper.from_array(np.array([0], np.int64), "zero")]
    pe = helper.make_tensor_value_info("pe", TensorProto.FLOAT, None)
    then = helper.make_graph([helper.make_node("Identity", ["pos2"], ["pe"])], "then", [], [pe])
    other = helper.make_graph([helper.make_node("Identity", ["pos"], ["pe"])], "else", [], [pe])
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["h1"], name="relu1"),
             helper.make_node("Mul", ["pos", "two"], ["pos2"], name="double"),
             helper.make_node("Shape", ["h1"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "axis_h"], ["hdim"], name="height"),
             helper.make_node("Greater", ["hdim", "zero"], ["cond1"], name="positive"),
             helper.make_node("Squeeze", ["cond1"], ["cond"], name="scalar"),
             helper.make_node("If", ["cond"], ["pe_out"], then_branch=then, else_branch=other, name="branch"),
             helper.make_node("Add", ["h1", "pe_out"], ["a1"], name="add"),
             helper.make_node("Conv", ["a1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Relu", ["c2"], ["h2"], name="relu2"),
             helper.make_node("Conv", ["h2", "w3"], ["y"], pads=[1, 1, 1, 1], name="conv3")]
    graph = helper.make_graph(nodes, "branchy", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_branch_reads_are_edges_and_the_compact_file_equals_the_zeroed_one() -> None:
    model = branchy_model()
    g = gp.trace(model, (np.zeros((1, 3, 12, 12), np.float32),))
    assert [b.op for b in g.barriers] == ["onnx::If"]  # it touches the embedding's channels: reported
    assert len(g.groups) == 1 and g.groups[0].size == 16  # conv2's filters; conv1's meet the If
    zero_random_half(g)
    full, compact = g.backend.full(g, g.params), g.construct_subnet()
    onnx.checker.check_model(compact, full_check=True)
    assert "double" in {n.name for n in compact.graph.node}  # read only inside a branch, still produced
    for shape in ((1, 3, 12, 12), (2, 3, 9, 7)):
        x = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
        ref, out = run_onnx(full, x)[0], run_onnx(compact, x)[0]
        assert np.abs(ref - out).max() <= 1e-5 * np.abs(ref).max()
    assert sum(int(np.prod(t.dims)) for t in compact.graph.initializer) < \
        sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def test_outer_reads_respect_shadowing_and_renames_reach_inside() -> None:
    inner_out = helper.make_tensor_value_info("r", TensorProto.FLOAT, None)
    # the body defines ``t`` itself (not an outer read), reads ``u`` and returns ``v`` as it is
    body = helper.make_graph([helper.make_node("Relu", ["u"], ["t"]), helper.make_node("Add", ["t", "t"], ["r"])],
                             "then", [], [inner_out, helper.make_tensor_value_info("v", TensorProto.FLOAT, None)])
    node = helper.make_node("If", ["c"], ["o", "p"], then_branch=body, else_branch=body)
    assert outer_reads(node) == ["u", "v"]
    assert reads(node) == ["c", "u", "v"]
    rename_reads(node, "u", "u2")
    rename_reads(node, "v", "v2")
    rename_reads(node, "t", "t2")  # defined inside: untouched
    assert outer_reads(node) == ["u2", "v2"]
    assert node.attribute[0].g.node[1].input[:] == ["t", "t"]
