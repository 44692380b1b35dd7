"""Zero-invariance checks see through a final sigmoid/softmax (issue 18): saturated outputs
hide a broken group, so the check compares the logits that the activation took too."""
import pytest
import torch

import graphprune as gp
from graphprune.pre_activation import pre_activations
from graphprune.rel_error import max_rel_error


class _Saturated(torch.nn.Module):
    """Logits scaled so far into saturation that the softmax/sigmoid outputs are 0 or 1."""

    def __init__(self, final: str) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
        self.final = final

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc2(torch.relu(self.fc1(x))) * 1e4
        return torch.softmax(z, -1) if self.final == "softmax" else torch.sigmoid(z)


@pytest.mark.parametrize("final", ["softmax", "sigmoid"])
def test_final_activation_input_is_compared(final: str) -> None:
    g = gp.trace(_Saturated(final).eval(), torch.randn(3, 8), verify=False)
    (logits,) = pre_activations(g.ir)
    producer = {o: n for n in g.ir.nodes for o in n.outputs}
    assert producer[g.ir.outputs[0]].inputs[0] == logits


@pytest.mark.parametrize("final", ["softmax", "sigmoid"])
def test_broken_group_behind_saturated_output_is_caught(final: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compact model whose logits are off by 1e-2 (an unsound rewrite's size) while its
    saturated outputs are not: verification withdraws the groups."""
    torch.manual_seed(0)
    g = gp.trace(_Saturated(final).eval(), torch.randn(3, 8), verify=False)
    assert g.groups
    assert not g.verify()  # sound groups pass with the logits compared
    emit = type(g.backend).emit

    def broken(self, pg, tensors, removed=None, fold_bn=False, **kw):
        module = emit(self, pg, tensors, removed, fold_bn, **kw)
        if removed is None or removed.numel():  # the compact model, not the full reference (nothing removed)
            # a new tensor: the check's compact model shares uncut weights with the user's
            module.gm.fc2.bias = torch.nn.Parameter(module.gm.fc2.bias.detach() + 1e-2)
        return module
    monkeypatch.setattr(type(g.backend), "emit", broken)
    x = torch.randn(3, 8)
    with torch.no_grad():
        outputs_alone = max_rel_error(g.backend.full(g, g.params)(x), g.construct_subnet()(x))
    assert outputs_alone < 1e-4  # the outputs alone would pass it
    assert g.verify()


def test_onnx_logits_are_compared(tmp_path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "sat.onnx"
    torch.onnx.export(_Saturated("softmax").eval(), (torch.randn(3, 8),), str(path), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    g = gp.trace(str(path), verify=False)
    assert pre_activations(g.ir)
    assert not g.verify()


def test_onnx_broken_group_behind_saturated_output_is_caught(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ONNX check sees the logits too: a compact file whose last bias is off by 1e-2."""
    from onnx import numpy_helper

    torch.manual_seed(0)
    path = tmp_path / "sat.onnx"
    torch.onnx.export(_Saturated("softmax").eval(), (torch.randn(3, 8),), str(path), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    g = gp.trace(str(path), verify=False)
    emit = type(g.backend).emit

    def broken(self, pg, tensors, removed=None, weights=None, fold_bn=False, **kw):
        model = emit(self, pg, tensors, removed, weights, fold_bn, **kw)
        if removed is None or removed.numel():  # the compact model, not the full reference (nothing removed)
            if weights is not None and "fc2.bias" in weights:
                weights["fc2.bias"] = weights["fc2.bias"] + 1e-2
            else:
                init = next(i for i in model.graph.initializer if i.name == "fc2.bias")
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 1e-2, "fc2.bias"))
        return model
    monkeypatch.setattr(type(g.backend), "emit", broken)
    assert g.verify()
