"""Label-free recovery: distilling the compact model from the dense one on unlabeled inputs
raises held-out task accuracy, for a PyTorch model and for an ONNX file written back as ONNX."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import graphprune as gp
from graphprune.errors import GraphPruneError

from .conftest import accuracy


def _calib(x: torch.Tensor) -> list[torch.Tensor]:
    return [x[i:i + 64] for i in range(0, 256, 64)]  # unlabeled training images


def test_recovery_raises_held_out_accuracy_of_a_pruned_convnet(trained, digits):
    x, y = digits
    dense = trained["conv"]
    before_dense = {k: v.clone() for k, v in dense.state_dict().items()}
    g = gp.trace(copy.deepcopy(dense), (x[:32],))
    gp.prune(g, "l2", gp.Target(flops=0.5))
    compact = g.construct_subnet()
    pruned = accuracy(compact, x[1200:], y[1200:])
    result = gp.recover(compact, dense, _calib(x), steps=60, lr=3e-3)
    assert result.model is compact and result.improved and result.loss_after < 0.5 * result.loss_before
    assert accuracy(compact, x[1200:], y[1200:]) > pruned + 0.01
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before_dense.items())  # the teacher is untouched


def _outputs(proto: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _interface(proto: onnx.ModelProto) -> list:
    return [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in [*proto.graph.input, *proto.graph.output]]


@pytest.mark.slow  # ~7 s on 2 busy cores; the shell test covers ONNX recovery's loss and file in the default run
def test_recovery_of_an_onnx_model_writes_a_valid_onnx_back(trained, digits, tmp_path):
    """The compact ONNX trains as its own graph in torch and comes back with the same names,
    dynamic batch and structure, only the weights changed, and more accurate."""
    x, y = digits
    path = tmp_path / "mlp.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(trained["mlp"], (x[:64],), str(path), dynamo=False, input_names=["digits"],
                          output_names=["logits"], dynamic_axes={"digits": {0: "n"}, "logits": {0: "n"}})
    g = gp.trace(str(path), (x[:64].numpy(),))
    gp.prune(g, "l2", gp.Target(flops=0.5))
    compact = g.construct_subnet()
    result = gp.recover(compact, str(path), _calib(x), steps=60, lr=3e-3)
    assert result.improved and isinstance(result.model, onnx.ModelProto)
    onnx.checker.check_model(result.model, full_check=True)
    assert _interface(result.model) == _interface(compact) == _interface(onnx.load(str(path)))
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in compact.graph.node]

    def acc(proto):
        return float((_outputs(proto, x[1200:]).argmax(1) == y[1200:].numpy()).mean())
    assert acc(result.model) > acc(compact) + 0.01


def test_recovery_needs_batches_and_a_known_dense_model(digits):
    x, _ = digits
    model = torch.nn.Linear(64, 10)
    with pytest.raises(GraphPruneError, match="no batches"):
        gp.recover(model, model, [], steps=1)
    with pytest.raises(GraphPruneError, match="dense model must be"):
        gp.recover(model, 3, [x[:4].flatten(1)], steps=1)


def test_recovery_backs_off_a_learning_rate_that_does_not_lower_the_loss():
    """At lr 3 Adam throws a small student far off; recovery retries from the pruned weights
    at a tenth of the rate, twice, and keeps the first run that lowers the loss."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[0].weight.mul_(0.5)  # a damaged copy: distillation can repair it
    data = [torch.randn(32, 8) for _ in range(4)]
    result = gp.recover(student, teacher, data, steps=40, lr=3.0)
    assert result.improved and result.lr < 3.0
    assert gp.recover(copy.deepcopy(teacher), teacher, data, steps=5).improved is False  # nothing to lower
