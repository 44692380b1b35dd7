"""Binding an ONNX model's input shapes and folding its shape arithmetic (``codegen/static_shapes.py``):
what TVM's importer gets must compute what the dynamic model computes at those shapes."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.cli.dynamic_models import export_fpn

static_shapes = pytest.importorskip("graphprune.codegen.static_shapes")


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x})[0]


@pytest.mark.parametrize("shape", [(1, 3, 40, 56), (2, 3, 37, 61)])
def test_bound_model_is_static_and_computes_the_same(tmp_path, shape):
    model = onnx.load(export_fpn(tmp_path / "fpn.onnx"))
    assert {"Shape", "Pad", "Resize"} <= {n.op_type for n in model.graph.node}
    bound = static_shapes.bind_input_shapes(model, {"images": shape})
    onnx.checker.check_model(bound)
    ops = {n.op_type for n in bound.graph.node}
    assert not ops & {"Shape", "Gather", "Concat", "Mod", "Sub"}, ops  # all the shape arithmetic is folded
    assert [d.dim_value for d in bound.graph.input[0].type.tensor_type.shape.dim] == list(shape)
    assert all(d.HasField("dim_value") for d in bound.graph.output[0].type.tensor_type.shape.dim)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(_run(bound, x), _run(model, x), rtol=1e-5, atol=1e-5)
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim][2:] == ["height", "width"]
