"""Both frontends' backends implement the Backend protocol a PrunableGraph is typed on."""
from __future__ import annotations

import torch

import graphprune as gp
from graphprune.frontends.backend import Backend
from graphprune.frontends.onnx_backend import OnnxBackend
from graphprune.frontends.torch_backend import TorchBackend
from tests.analysis.test_failures import Mlp
from tests.frontends.test_onnx import hand_written


def test_torch_and_onnx_backends_are_backends() -> None:
    torch_graph = gp.trace(Mlp(), torch.randn(3, 6))
    onnx_graph = gp.trace(hand_written())
    assert isinstance(torch_graph.backend, TorchBackend) and isinstance(torch_graph.backend, Backend)
    assert isinstance(onnx_graph.backend, OnnxBackend) and isinstance(onnx_graph.backend, Backend)
    for g in (torch_graph, onnx_graph):
        assert g.backend.compare(g, g.params) < 1e-5  # nothing zeroed: the compact model is the full one
