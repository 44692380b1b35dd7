"""Bias compensation into layers without a bias (``prune(..., add_biases=True)``).

The exact property: when the removed units' activations are constant over the
calibration inputs (their producer's filter is zero, its bias positive, a ReLU after),
their whole contribution to the consumer is the constant ``W[:, removed] @ c``, which
the added bias carries.  The compact model then equals the *dense* model, not only the
zeroed one, on any input; without the added bias it does not.  Checked in the graph
lowering, the ONNX lowering (an Add after the consumer's MatMul) and the module mode
(``nn.Linear(bias=False)`` gets a bias), and through transformers' ``save_pretrained``.
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import graphprune as gp
from graphprune.frontends.onnx_skeleton import run_onnx
from graphprune.rel_error import max_rel_error

CONSTANT = [1, 4, 6, 11]  # hidden units made constant; the target removes exactly this many


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 16), nn.Linear(16, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class _Cnn(nn.Module):
    """The consumer is an unpadded bias-free convolution: every output reads a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 5, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


def _constant_units(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    producer = model.fc1 if isinstance(model, _Mlp) else model.conv1
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
        producer.weight[CONSTANT] = 0
        producer.bias[CONSTANT] = torch.tensor([0.5, 1.0, 1.5, 2.0])
    return model.eval()


def _inputs(model: nn.Module, n: int, seed: int) -> torch.Tensor:
    shape = (n, 12) if isinstance(model, _Mlp) else (n, 3, 6, 6)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _prune(g: gp.PrunableGraph, data: list, add_biases: bool) -> gp.PruneReport:
    report = gp.prune(g, "obspa", gp.Target(groups=len(CONSTANT) / 16), data=data, damping=1e-6,
                      add_biases=add_biases)
    assert report.masks[0].nonzero().flatten().tolist() == CONSTANT  # the constant units, no others
    return report


@pytest.mark.parametrize("kind", [_Mlp, _Cnn])
def test_added_bias_makes_the_compact_model_the_dense_one(kind) -> None:
    dense = _constant_units(kind())
    model = copy.deepcopy(dense)
    g = gp.trace(model, (_inputs(dense, 4, 0),), verify=False)
    report = _prune(g, [_inputs(dense, 32, s) for s in (1, 2)], add_biases=True)
    consumer = "fc2.weight" if kind is _Mlp else "conv2.weight"
    assert list(g.added_biases) == report.added_biases == [consumer]
    assert "a bias added to 1 layer" in repr(report)
    x = _inputs(dense, 8, 3)  # inputs calibration never saw
    with torch.no_grad():
        expected = dense(x)
        torch.testing.assert_close(g.construct_subnet()(x), expected, rtol=1e-5, atol=1e-5)
        mine = g.construct_subnet(mode="module")
        assert type(mine) is kind and g.compact_form.startswith("module")
        layer = mine.fc2 if kind is _Mlp else mine.conv2
        assert layer.bias is not None and layer.weight.shape[1] == 16 - len(CONSTANT)
        torch.testing.assert_close(mine(x), expected, rtol=1e-5, atol=1e-5)
        assert model.fc2.bias is None if kind is _Mlp else model.conv2.bias is None  # the user's model untouched


def test_without_the_added_bias_the_mean_is_lost() -> None:
    """The same pruning with ``add_biases=False``: nowhere for the mean, the compact model
    is the zeroed one and far from the dense one (the property above can fail)."""
    dense = _constant_units(_Mlp())
    g = gp.trace(copy.deepcopy(dense), (_inputs(dense, 4, 0),), verify=False)
    _prune(g, [_inputs(dense, 32, s) for s in (1, 2)], add_biases=False)
    assert not g.added_biases
    x = _inputs(dense, 8, 3)
    with torch.no_grad():
        assert max_rel_error(dense(x), g.construct_subnet()(x)) > 0.05


def _gemm_file(dense: _Mlp, path) -> None:
    """The MLP as two ONNX Gemms (``transB``), the second without ``C`` and with ``beta`` 2."""
    w = {k: v.detach().numpy() for k, v in dense.state_dict().items()}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2", transB=1, beta=2.0)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
                              [numpy_helper.from_array(w["fc1.weight"], "w1"), numpy_helper.from_array(w["fc1.bias"], "b1"),
                               numpy_helper.from_array(w["fc2.weight"], "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("form", ["MatMul", "Gemm"])
def test_onnx_consumer_gets_the_bias(form: str, tmp_path) -> None:
    """A MatMul consumer (torch's export of a bias-free Linear) gets an Add after it; a Gemm
    without ``C`` gets one (divided by its ``beta``)."""
    dense = _constant_units(_Mlp())
    path = tmp_path / "mlp.onnx"
    x0 = _inputs(dense, 4, 0)
    if form == "Gemm":
        _gemm_file(dense, path)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(dense, (x0,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    g = gp.trace(str(path), (x0.numpy(),))
    _prune(g, [_inputs(dense, 32, s) for s in (1, 2)], add_biases=True)
    assert len(g.added_biases) == 1
    compact = g.construct_subnet()
    if form == "Gemm":
        assert [len(n.input) for n in compact.graph.node if n.op_type == "Gemm"] == [3, 3]
    else:
        assert "Add" in [n.op_type for n in compact.graph.node]
    x = _inputs(dense, 8, 3)
    with torch.no_grad():
        expected = dense(x).numpy()
    np.testing.assert_allclose(run_onnx(compact, {"x": x.numpy()})[0], expected, rtol=1e-5, atol=1e-5)


def test_an_added_bias_nothing_reads_is_an_error() -> None:
    dense = _constant_units(_Mlp())
    g = gp.trace(copy.deepcopy(dense), (_inputs(dense, 4, 0),), verify=False)
    g.added_biases["fc1.weight"] = torch.zeros(16)  # fc1 has a bias of its own: no site for another
    with pytest.raises(gp.GraphPruneError, match="fc1.weight"):
        g.construct_subnet()


class _MatmulHead(nn.Module):
    """The consumer is ``@`` with a bare parameter: no layer to hold a bias in module form."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.w2 = nn.Linear(12, 16), nn.Parameter(torch.randn(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc1(x)) @ self.w2


@pytest.mark.parametrize("kind", [_Mlp, _MatmulHead])
def test_compile_checks_against_the_model_with_its_added_biases(kind) -> None:
    """gp.compile verifies the compact model against the zeroed input model plus the added
    biases (through the user's layer, or for a bare parameter's matmul through the graph);
    against the zeroed model alone it would fail, the biases being far from zero."""
    torch.manual_seed(0)
    dense = kind().eval()
    with torch.no_grad():
        dense.fc1.weight[CONSTANT] = 0
        dense.fc1.bias[CONSTANT] = 1.0
    x0 = _inputs(_Mlp(), 4, 0)
    result = gp.compile(dense, (x0,), method="obspa", target=gp.Target(groups=len(CONSTANT) / 16, multiple=1),
                        calibration=[_inputs(_Mlp(), 32, s) for s in (1, 2)], recover_steps=0)
    (bias,) = result.graph.added_biases.values()
    assert result.report.verify_error < 1e-4 and bias.abs().max() > 0.1
