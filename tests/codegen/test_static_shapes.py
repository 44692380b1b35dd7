"""Binding an ONNX model's input shapes and folding its shape arithmetic (``codegen/static_shapes.py``):
what TVM's importer gets must compute what the dynamic model computes at those shapes."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

import graphprune as gp

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


class Normalized(torch.nn.Module):
    """``F.normalize`` (EdgeNeXt's cross-covariance attention): the TorchScript export expands the
    clamped norm to ``Shape(x)``, which folds to a constant shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).flatten(2)
        return F.normalize(h, dim=-1) @ F.normalize(h, dim=-1).transpose(1, 2)


def test_folded_shapes_reach_tvm_as_constants(tmp_path):
    """An ``Expand`` to a folded shape builds: the shape is a Constant node, not an initializer,
    which TVM's importer would keep as a parameter (a symbolic shape, refused by legalisation)."""
    import graphprune.codegen as codegen

    torch.manual_seed(0)
    model, x = Normalized().eval(), torch.randn(2, 3, 8, 8)
    model_path = tmp_path / "normalized.onnx"
    gp.export_onnx(model, (x,), model_path)
    source = onnx.load(model_path)
    assert "Expand" in {n.op_type for n in source.graph.node}
    bound = static_shapes.bind_input_shapes(source, {"input_0": list(x.shape)})
    expand = next(n for n in bound.graph.node if n.op_type == "Expand")
    assert expand.input[1] not in {i.name for i in bound.graph.initializer}
    assert expand.input[1] in {o for n in bound.graph.node if n.op_type == "Constant" for o in n.output}
    compiled = codegen.build(model_path, (x,), target="x86")
    with torch.no_grad():
        ref = model(x)
    assert float((torch.as_tensor(compiled.run(x)) - ref).abs().max() / ref.abs().max()) < 1e-5
