"""PyTorch compact model -> ONNX file (atomic), equal under onnxruntime at any batch size."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import onnxruntime as ort
import torch
import torchvision

import graphprune as gp
from tests.helpers import zero_random_half


def test_export_compact_to_onnx(tmp_path):
    model = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    g = gp.trace(model, torch.randn(2, 3, 32, 32), verify=False)
    zero_random_half(g)
    compact = g.construct_subnet()
    copy.deepcopy(compact)  # compact modules are ordinary, copyable modules
    path = tmp_path / "compact.onnx"
    gp.export_onnx(compact, torch.randn(2, 3, 32, 32), path)
    assert [p.name for p in tmp_path.iterdir()] == ["compact.onnx"]  # no temp file left behind
    x = torch.randn(3, 3, 32, 32)
    out = ort.InferenceSession(str(path)).run(None, {"input_0": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_compact_module_trains_and_evals():
    model = torchvision.models.resnet18(num_classes=10)
    g = gp.trace(model, torch.randn(2, 3, 32, 32), verify=False)
    compact = g.construct_subnet()
    x = torch.randn(4, 3, 32, 32)
    compact.train()
    before = compact.gm.bn1.running_mean.clone()
    compact(x).sum().backward()
    assert not torch.equal(before, compact.gm.bn1.running_mean)  # batch statistics in train mode
    compact.eval()
    with torch.no_grad():
        assert torch.equal(compact(x), compact(x))


def test_export_warns_only_about_the_users_own_conditions(tmp_path):
    """The compact module's shape assertions raise no TracerWarning on export; a condition on
    tensor values in the user's own module still does (the trace really may not generalise)."""
    import warnings

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.LazyLinear(4)).eval()
    x = torch.randn(2, 1, 8, 8)
    model(x)
    compact = gp.trace(model, x).construct_subnet()

    class ValueBranch(torch.nn.Module):
        def forward(self, t):
            return t * 2 if t.sum() > 0 else t

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        gp.export_onnx(compact, (x,), tmp_path / "compact.onnx")
        assert not [w for w in seen if issubclass(w.category, torch.jit.TracerWarning)]
        gp.export_onnx(ValueBranch(), (x,), tmp_path / "branch.onnx")
        assert [w for w in seen if issubclass(w.category, torch.jit.TracerWarning)]


class SizeRead(torch.nn.Module):
    """Reads the batch at run time (``h.view(h.size(0) * 2, -1)``, then back): export writes
    ``sym_size`` and arithmetic on it, which the compact module must keep reading."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.size(0) * 2, -1).view(h.size(0), -1))


def test_compact_module_keeps_a_run_time_batch_in_onnx(tmp_path):
    model = SizeRead().eval()
    g = gp.trace(model, torch.randn(2, 3, 4, 4), verify=False)
    zero_random_half(g)
    path = tmp_path / "compact.onnx"
    gp.export_onnx(g.construct_subnet(), torch.randn(2, 3, 4, 4), path)
    x = torch.randn(3, 3, 4, 4)  # another batch than the export's
    out = ort.InferenceSession(str(path)).run(None, {"input_0": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


class PoolAfterBatchReshape(torch.nn.Module):
    """An adaptive pool after a reshape of the batch (timm's csatv2): the TorchScript exporter
    cannot see the pool's input size and refuses it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        b, c, height, width = h.shape
        return torch.nn.functional.adaptive_avg_pool2d(h.reshape(b * 2, c // 2, height, width), 3).flatten(1)


@pytest.mark.parametrize("compact", [False, True])
def test_the_dynamo_exporter_writes_what_torchscript_cannot(tmp_path, compact):
    """Also from a compact module, whose ``forward(*args)`` torch.export reads as one tuple
    argument (its batch dim given as for one input, it refused every compact module)."""
    model, x = PoolAfterBatchReshape().eval(), torch.randn(2, 3, 8, 8)
    if compact:
        model = gp.trace(model, (x,)).construct_subnet().eval()
    with pytest.raises(torch.onnx.errors.SymbolicValueError, match="adaptive_avg_pool2d"):
        torch.onnx.export(model, (x,), str(tmp_path / "ts.onnx"), dynamo=False, dynamic_axes={"x": {0: "b"}},
                          input_names=["x"])
    path = tmp_path / "model.onnx"
    proto = gp.export_onnx(model, (x,), path)
    assert [i.name for i in proto.graph.input] == ["input_0"] and [o.name for o in proto.graph.output] == ["output_0"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch stays dynamic
    x = torch.randn(3, 3, 8, 8)  # another batch than the export's
    out = ort.InferenceSession(str(path)).run(None, {"input_0": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # the failed attempt left nothing


def test_a_module_no_exporter_takes_names_both_failures(tmp_path):
    class Bad(torch.nn.Module):
        def forward(self, t):
            return torch.linalg.eig(t)[0].real  # complex intermediates: neither exporter writes them

    with pytest.raises(gp.errors.UnsupportedModelError, match="ONNX export failed: torchscript: .*; dynamo: "):
        gp.export_onnx(Bad(), (torch.randn(2, 3, 3),), tmp_path / "bad.onnx")
    assert not list(tmp_path.iterdir())
