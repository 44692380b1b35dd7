"""ONNX models for the CLI and API tests: exported from PyTorch (a small CNN, torchvision's
resnet18 at a small input) and written by hand with ``onnx.helper`` (an MLP).

``require_onnx_frontend`` skips a test until ``gp.trace`` accepts ONNX; once it does,
these tests must pass.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import graphprune as gp
from graphprune.errors import UnsupportedModelError


def mlp_proto(hidden: int = 16) -> onnx.ModelProto:
    """x[N, 8] -> Gemm -> Relu -> Gemm -> y[N, 4], written with onnx.helper (dynamic batch)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("W1", (hidden, 8)), ("b1", (hidden,)), ("W2", (4, hidden)), ("b2", (4,)))]
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def export(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """TorchScript ONNX export (no onnxscript needed), warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False)
    return path


def resnet18_onnx(path: Path) -> Path:
    import torchvision

    torch.manual_seed(0)
    return export(torchvision.models.resnet18(num_classes=10), torch.randn(1, 3, 32, 32), path)


def onnx_frontend_ready() -> bool:
    """True once ``gp.trace`` accepts an ONNX ModelProto."""
    try:
        gp.trace(mlp_proto(), verify=False)
    except UnsupportedModelError:
        return False
    return True


def require_onnx_frontend() -> None:
    if not onnx_frontend_ready():
        pytest.skip("gp.trace does not accept ONNX yet")


def n_params(proto: onnx.ModelProto) -> int:
    return sum(int(np.prod(i.dims)) for i in proto.graph.initializer)
