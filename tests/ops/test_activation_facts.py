"""The activation an op applies is a fact of its registry entry (:meth:`Rule.activation`),
read by OBSPA's routes on PyTorch and ONNX graphs alike."""
from __future__ import annotations

import pytest

from graphprune.ir.graph import Node
from graphprune.ops.catalog import canonical_aten, canonical_onnx, rule_for


def _aten(packet: str, overload: str = "default") -> Node:
    return Node(packet, canonical_aten(packet), None, source_op=f"aten.{packet}.{overload}")


def _onnx(op_type: str) -> Node:
    return Node(op_type, canonical_onnx(op_type), None, source_op=f"onnx::{op_type}")


@pytest.mark.parametrize("node,expected", [
    (_aten("relu"), "relu"), (_aten("relu_"), "relu"), (_onnx("Relu"), "relu"), (_aten("leaky_relu"), "relu"),
    (_aten("prelu"), "relu"), (_onnx("PRelu"), "relu"),
    (_aten("hardtanh"), "relu6"), (_aten("relu6"), "relu6"), (_aten("clamp"), "relu6"), (_onnx("Clip"), "relu6"),
    (_aten("gelu"), "gelu"), (_onnx("Gelu"), "gelu"), (_onnx("Erf"), "gelu"), (_aten("silu_"), "silu"),
    (_aten("sigmoid"), None), (_aten("tanh"), None), (_aten("add", "Tensor"), None), (_onnx("Add"), None),
    (_aten("linear"), None), (_onnx("Conv"), None), (_aten("erfinv"), None),
])
def test_activation_of(node: Node, expected: str | None) -> None:
    assert rule_for(node.op).activation(node) == expected
