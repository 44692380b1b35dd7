"""The ONNX lowering applies a rewrite to an ONNX node, whatever the op: an argument
becomes an attribute or a constant input (by opset, as the registry entry says), a call
a model-local function, a run-time shape filtered through a call inserted before its
reader, a constant an initializer."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune.frontends.onnx_skeleton import run_onnx
from graphprune.ir.graph import Node, Ref
from graphprune.lower.onnx import _apply, _Editor, _inline_functions
from graphprune.ops.movement import shape_shrunk
from graphprune.ops.rewrite import OnnxContext, Rewrite


def _model(node: onnx.NodeProto, opset: int) -> onnx.ModelProto:
    graph = helper.make_graph([node], "g", [], [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _ctx(ed: _Editor) -> OnnxContext:
    return OnnxContext(opset=ed.opset, shape=lambda v: (), dtype=lambda v: None)


def _init(model: onnx.ModelProto, name: str) -> list[int]:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name)).tolist()


def _split(opset: int) -> tuple[onnx.ModelProto, onnx.NodeProto, Node]:
    attrs = {"axis": 1, "num_outputs": 2} if opset >= 18 else {"axis": 1}
    model = _model(helper.make_node("Split", ["x"], ["a", "b"], name="sp", **attrs), opset)
    return model, model.graph.node[0], Node("sp", "split", None, (Ref("x"),), source_op="onnx::Split")


def test_split_sizes_are_an_input_from_opset_13() -> None:
    for opset in (13, 18):
        model, proto, node = _split(opset)
        ed = _Editor(model)
        _apply(ed, node, proto, Rewrite(args={"split": [2, 3]}), _ctx(ed))
        assert _init(model, proto.input[1]) == [2, 3]
        assert [a.name for a in proto.attribute] == ["axis"]  # num_outputs would contradict the input


def test_split_sizes_are_an_attribute_before_opset_13() -> None:
    model, proto, node = _split(11)
    ed = _Editor(model)
    _apply(ed, node, proto, Rewrite(args={"split": [2, 3]}), _ctx(ed))
    assert list(proto.input) == ["x"] and helper.get_attribute_value(proto.attribute[-1]) == [2, 3]


def test_conv_groups_are_its_group_attribute() -> None:
    model = _model(helper.make_node("Conv", ["x", "w"], ["y"], name="c", group=4), 17)
    proto = model.graph.node[0]
    ed = _Editor(model)
    _apply(ed, Node("c", "conv", None, (Ref("x"), Ref("w")), source_op="onnx::Conv"), proto,
           Rewrite(args={"groups": 3}), _ctx(ed))
    assert {a.name: a.i for a in proto.attribute} == {"group": 3}


def test_a_known_shape_becomes_a_constant() -> None:
    model = _model(helper.make_node("Shape", ["x"], ["s"], name="sh"), 17)
    proto = model.graph.node[0]
    ed = _Editor(model)
    _apply(ed, Node("sh", "shape", None, (Ref("x"),), source_op="onnx::Shape"), proto,
           Rewrite(constant=[2, 8, 4]), _ctx(ed))
    assert proto.op_type == "Identity" and _init(model, proto.input[0]) == [2, 8, 4]


def test_a_runtime_shape_is_filtered_before_its_reader() -> None:
    """Reshape(x, t) with t computed: entry 1 of t is replaced by 5, the rest read at run time."""
    nodes = [helper.make_node("Shape", ["x"], ["t"], name="sh"),
             helper.make_node("Reshape", ["x", "t"], ["y"], name="r")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ed = _Editor(model)
    reshape = Node("r", "reshape", None, (Ref("x"), Ref("t")), source_op="onnx::Reshape")
    _apply(ed, reshape, model.graph.node[1], Rewrite(feeds={"t": shape_shrunk("t", [1, 0, 1], [2, 5, 4])}), _ctx(ed))
    assert [n.name for n in model.graph.node] == ["sh", "r__pruned_in1", "r"]
    assert model.graph.node[2].input[1] == "r__pruned_in1"
    model = _inline_functions(model, onnx.ModelProto())
    assert not model.functions and all(n.domain == "" for n in model.graph.node)  # standard ops only
    model.graph.node.remove(next(n for n in model.graph.node if n.name == "r"))  # x is not 2x5x4: read the target
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("r__pruned_in1", onnx.TensorProto.INT64, [3]))
    onnx.checker.check_model(model)
    out = run_onnx(model, {"x": np.zeros((2, 8, 4), np.float32)})[0]
    assert out.tolist() == [2, 5, 4]
