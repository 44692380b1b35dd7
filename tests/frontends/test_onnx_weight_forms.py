"""Weights in any form an exporter writes them (initializers, ``Constant`` nodes with a
``value`` or ``value_floats``, behind ``Identity`` chains, fp16 converted by a ``Cast``)
are parameters: the same groups as the initializer form, a compact model equal to the
zeroed model at two batch sizes and two sizes, and the compact file keeps the form."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphprune as gp
from graphprune.frontends.onnx_backend import run_onnx
from graphprune.frontends.onnx_weight_forms import constant_value, constant_weight, set_constant
from tests.helpers import zero_random_half

# a real exporter's file (torch's TorchScript exporter; dynamic batch, height and width)
SOURCE = Path(__file__).resolve().parents[1] / "data" / "exporters" / "torch_script_cnn.onnx"


def in_form(model: onnx.ModelProto, form: str) -> onnx.ModelProto:
    """``model`` with every float initializer of rank >= 1 moved into ``form``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g, made = out.graph, []
    for t in [t for t in g.initializer if t.data_type == TensorProto.FLOAT and len(t.dims)]:
        a = numpy_helper.to_array(t)
        g.initializer.remove(t)
        if form == "constant" or (form == "value_floats" and a.ndim > 1):
            made.append(helper.make_node("Constant", [], [t.name], value=numpy_helper.from_array(a)))
        elif form == "value_floats":
            made.append(helper.make_node("Constant", [], [t.name], value_floats=a.tolist()))
        elif form == "identity":  # Constant -> Identity -> Identity
            made += [helper.make_node("Constant", [], [f"{t.name}_c"], value=numpy_helper.from_array(a)),
                     helper.make_node("Identity", [f"{t.name}_c"], [f"{t.name}_i"]),
                     helper.make_node("Identity", [f"{t.name}_i"], [t.name])]
        elif form == "fp16_initializer":  # an fp16 weight converted for an op kept in fp32
            g.initializer.append(numpy_helper.from_array(a.astype(np.float16), f"{t.name}_h"))
            made.append(helper.make_node("Cast", [f"{t.name}_h"], [t.name], to=TensorProto.FLOAT))
        elif form == "fp16_constant":
            made += [helper.make_node("Constant", [], [f"{t.name}_h"],
                                      value=numpy_helper.from_array(a.astype(np.float16))),
                     helper.make_node("Cast", [f"{t.name}_h"], [t.name], to=TensorProto.FLOAT)]
    nodes = made + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(out)
    return out


def form_of(model: onnx.ModelProto) -> dict[str, int]:
    """Counts of each way the model holds its float weights."""
    weights = [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
               if a.name == "value" and a.t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and len(a.t.dims)]
    inits = [t for t in model.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
             and len(t.dims)]
    return {"initializers": len(inits), "constants": len(weights),
            "value_floats": sum(1 for n in model.graph.node for a in n.attribute if a.name == "value_floats"),
            "fp16": sum(1 for t in weights + inits if t.data_type == TensorProto.FLOAT16),
            "casts": sum(1 for n in model.graph.node if n.op_type == "Cast")}


@pytest.fixture(scope="module")
def base() -> tuple[onnx.ModelProto, int, int]:
    model = onnx.load(SOURCE)
    g = gp.trace(model, (np.zeros((1, 3, 32, 32), np.float32),), verify=False)
    return model, len(g.groups), g.total_params


@pytest.mark.parametrize("form", ["constant", "value_floats", "identity", "fp16_initializer", "fp16_constant"])
def test_weight_form_is_pruned_and_kept(form: str, base, tmp_path: Path) -> None:
    model, groups, params = base
    given = in_form(model, form)
    path = tmp_path / "m.onnx"
    onnx.save(given, path)
    g = gp.trace(str(path), (np.zeros((1, 3, 32, 32), np.float32),), verify=False)
    assert (len(g.groups), g.total_params) == (groups, params)  # each weight counted once, in its groups
    assert g.grouped_params > 0.95 * g.total_params
    zero_random_half(g)
    full, compact = g.backend.full(g, g.params), g.construct_subnet()
    before, after = form_of(given), form_of(compact)
    assert {k: v > 0 for k, v in after.items()} == {k: v > 0 for k, v in before.items()}, (before, after)
    for shape in ((1, 3, 32, 32), (3, 3, 40, 48)):
        x = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
        ref, out = run_onnx(full, x)[0], run_onnx(compact, x)[0]
        assert ref.shape == out.shape
        assert np.abs(ref - out).max() <= 1e-4 * np.abs(ref).max()
    weights = lambda m: sum(int(np.prod(t.dims)) for t in m.graph.initializer) + sum(  # noqa: E731
        int(np.prod(a.t.dims)) + len(a.floats) for n in m.graph.node if n.op_type == "Constant" for a in n.attribute)
    assert weights(compact) < 0.75 * weights(full)


@pytest.mark.parametrize("form", ["constant", "value_floats", "identity", "fp16_initializer", "fp16_constant"])
def test_compile_checks_against_the_zeroed_file_in_its_own_form(form: str, base, tmp_path: Path) -> None:
    """gp.compile's check runs the input file with the pruned and compensated weights
    written in the form the file holds them: a reference that wrote initializers only
    would run a Constant-weight file with its original weights and fail the check (a
    paddle2onnx detector did, at error 1.0)."""
    path = tmp_path / "m.onnx"
    onnx.save(in_form(base[0], form), path)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    result = gp.compile(str(path), (x,), method="obspa", target=gp.Target(flops=0.5))
    assert result.report.params_after < result.report.params_before
    assert result.report.verify_error <= 1e-4


def test_constant_forms_read_and_written_back() -> None:
    floats = helper.make_node("Constant", [], ["w"], value_floats=[1.0, 2.0, 3.0])
    half = helper.make_node("Constant", [], ["h"], value=numpy_helper.from_array(np.ones((2, 2), np.float16)))
    assert constant_weight(floats).tolist() == [1.0, 2.0, 3.0]
    set_constant(floats, np.array([5.0, 6.0], np.float32))
    assert [a.name for a in floats.attribute] == ["value_floats"] and list(floats.attribute[0].floats) == [5, 6]
    set_constant(half, np.zeros((2, 1), np.float32))
    assert constant_value(half).dtype == np.float16 and constant_value(half).shape == (2, 1)


@pytest.mark.parametrize("node", [
    helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(np.array([2, 3], np.int64))),  # a shape
    helper.make_node("Constant", [], ["e"], value=numpy_helper.from_array(np.array([2.0], np.float32))),  # exponent
    helper.make_node("Constant", [], ["f"], value_float=0.5),
    helper.make_node("Constant", [], ["i"], value_ints=[1, 2])])
def test_constants_that_are_not_weights(node: onnx.NodeProto) -> None:
    """Integers and single values stay constants: rules read them, and no group could
    remove an entry of a one-element tensor."""
    assert constant_weight(node) is None


def test_single_value_constant_stays_a_constant_in_the_ir() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32))
    w2 = numpy_helper.from_array(np.random.default_rng(1).standard_normal((4, 2)).astype(np.float32))
    nodes = [helper.make_node("Constant", [], ["w"], value=w), helper.make_node("Constant", [], ["w2"], value=w2),
             helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array([2.0], np.float32))),
             helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Pow", ["h", "two"], ["p"]),
             helper.make_node("MatMul", ["p", "w2"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    g = gp.trace(model, (torch.zeros(1, 4),), verify=False)
    kinds = {k: v.kind for k, v in g.ir.values.items() if k in ("w", "w2", "two")}
    assert kinds == {"w": "param", "w2": "param", "two": "const"}
    assert len(g.groups) == 1 and g.groups[0].size == 4


def test_old_paddle2onnx_style_file(tmp_path: Path) -> None:
    """What paddle2onnx wrote before 2.0 (the files PyPI packages ship): every weight a
    Constant node, the batch written as ``dim_value: -1``, opset 11, the head's Reshape
    target computed from ``Shape``.  Built from the corpus's paddle2onnx file; the batch
    must be found dynamic (or the compact model bakes the traced batch into that target)."""
    given = in_form(onnx.load(SOURCE.with_name("paddle2onnx_cnn.onnx")), "constant")
    given.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    path = tmp_path / "old.onnx"
    onnx.save(given, path)
    g = gp.trace(str(path), (np.zeros((1, 3, 32, 32), np.float32),), verify=False)
    assert g.grouped_params > 0.95 * g.total_params
    zero_random_half(g)
    full, compact = g.backend.full(g, g.params), g.construct_subnet()
    assert form_of(compact)["constants"] > 0 and form_of(compact)["initializers"] == 0
    assert compact.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1
    for shape in ((1, 3, 32, 32), (3, 3, 40, 48)):
        x = {"x": np.random.default_rng(2).standard_normal(shape).astype(np.float32)}
        ref, out = run_onnx(full, x)[0], run_onnx(compact, x)[0]
        assert ref.shape == out.shape == (shape[0], 10)
        assert np.abs(ref - out).max() <= 1e-4 * np.abs(ref).max()
