"""Every core ATen op and every ai.onnx op up to opset 23 has a rule or a declared barrier
with its reason (:mod:`graphprune.ops.opsets`): an op graphprune meets in any exported
program or file is never an unknown op.  ``python benchmarks/opset_coverage.py`` prints
the same counts."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune as gp
from graphprune.ops.catalog import ATEN, ONNX, canonical_onnx, rule_for
from graphprune.ops.opsets import ONNX_OPSET, core_aten_ops, coverage, onnx_ops
from graphprune.ops.registry import BARRIERS, RULES, DeclaredBarrier, declare_barrier


def test_every_core_aten_and_onnx_op_has_a_rule_or_a_declared_barrier() -> None:
    aten, onnx = coverage(ONNX_OPSET)
    print(f"\n{aten}\n{onnx}")  # the counts the closing note quotes
    assert not aten.unknown, f"core ATen ops with neither a rule nor a declared barrier: {aten.unknown}"
    assert not onnx.unknown, f"ai.onnx ops with neither a rule nor a declared barrier: {onnx.unknown}"
    # the enumerations are the real op sets, not an empty list that passes trivially
    assert len(aten.rules) + len(aten.barriers) >= 150 and {"convolution", "addmm", "topk"} <= set(aten.rules)
    assert len(onnx.rules) + len(onnx.barriers) >= 190 and {"LSTM", "TopK", "Attention"} <= {*onnx.rules,
                                                                                             *onnx.barriers}


def test_enumerations_follow_the_opset_and_the_core_tag() -> None:
    assert "RMSNormalization" in onnx_ops(23) and "RMSNormalization" not in onnx_ops(22)
    assert "Gelu" in onnx_ops(20) and "Gelu" not in onnx_ops(19)
    core = core_aten_ops()
    assert "convolution" in core and "conv2d" not in core  # conv2d decomposes: not core


@pytest.mark.parametrize("op_type", ["NonZero", "Unique", "NonMaxSuppression", "Loop", "Attention"])
def test_declared_barrier_reports_its_reason(op_type: str) -> None:
    rule = rule_for(canonical_onnx(op_type))
    assert isinstance(rule, DeclaredBarrier) and rule.reason == BARRIERS[ONNX[op_type]]
    assert len(rule.reason) > 20


def test_data_dependent_shapes_say_so() -> None:
    for op in ("NonZero", "Unique", "NonMaxSuppression"):
        assert "depends on the values" in BARRIERS[ONNX[op]]
    assert "depends on the values" in BARRIERS[ATEN["nonzero"]]


def test_an_op_has_one_entry() -> None:
    """A second entry for a name is refused before anything is registered."""
    before = (dict(ATEN), dict(ONNX), dict(BARRIERS))
    with pytest.raises(ValueError, match="already registered"):
        declare_barrier("a_new_barrier", "a reason", aten=("relu",))
    with pytest.raises(ValueError, match="needs a reason"):
        declare_barrier("another_barrier", "", onnx=("NotAnOp",))
    assert (dict(ATEN), dict(ONNX), dict(BARRIERS)) == before
    assert "a_new_barrier" not in RULES and "another_barrier" not in RULES


def test_a_declared_barrier_in_a_file_reports_its_reason() -> None:
    """Conv -> LpNormalization -> Conv: the first conv's filters stay, and the report gives
    the entry's reason (not "no channel rule")."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (8, 3, 3, 3)), ("w2", (4, 8, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["y"], name="c1"),
             helper.make_node("LpNormalization", ["y"], ["n"], axis=1, name="lp"),
             helper.make_node("Conv", ["n", "w2"], ["out"], name="c2")]
    graph = helper.make_graph(nodes, "lp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 4, 4])], inits)
    g = gp.trace(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert not g.groups
    assert [(b.node, b.reason) for b in g.barriers] == [("lp", BARRIERS[ONNX["LpNormalization"]])]
