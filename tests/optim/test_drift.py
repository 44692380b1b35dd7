"""OutputDrift: how far a pruned model's outputs move from the dense model's, for a PyTorch
graph and for the same model traced from ONNX."""
from __future__ import annotations

import pytest
import torch
import torchvision

import graphprune as gp
from graphprune.optim.drift import OutputDrift


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path_factory.mktemp("drift") / "resnet18.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    return gp.trace(model, (x,), verify=False), gp.trace(str(path), (x.numpy(),), verify=False)


def test_the_dense_model_does_not_drift_and_a_pruned_one_does_by_the_same_amount_in_both_frontends(resnet):
    """Nothing removed: the compact model is the dense one (drift at rounding).  Half of one
    convolution's filters zeroed: the same drift whether the model came as PyTorch or ONNX,
    since both judge the model each backend emits on the same batches."""
    data = [torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    drifts = []
    for g in resnet:
        drift = OutputDrift(g, data)
        assert drift(g.zeroed_copy([])) < 1e-10
        group = next(grp for grp in g.groups if "layer3.0.conv1" in grp.name.replace("/", "."))
        mask = torch.arange(group.size) % 2 == 0
        drifts.append(drift(g.zeroed_copy([(group, mask)])))
    assert drifts[0] > 1e-3
    assert drifts[1] == pytest.approx(drifts[0], rel=1e-3)


def test_only_the_first_batches_are_read():
    """The judge runs every candidate on its batches: a long calibration set is cut to ``batches``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    g = gp.trace(model, (torch.randn(2, 8),), verify=False)
    data = (torch.randn(2, 8) for _ in range(100))
    assert len(OutputDrift(g, data, batches=3).inputs) == 3
    with pytest.raises(gp.GraphPruneError, match="no batches"):
        OutputDrift(g, [])
