"""Batch-norm folding: with ``fold_bn=True`` the compact model has no inference batch
norm left after a convolution, and still equals the zeroed full model, on real
torchvision CNNs (PyTorch and ONNX) with non-trivial statistics."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import graphprune as gp
from graphprune.frontends.onnx_skeleton import run_onnx
from graphprune.passes.fold_bn import Fold
from tests.helpers import zero_random_half

torch.set_num_threads(1)


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=gen) * 2 - 1)
    return model.eval()


def _norms(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target))


def test_fold_scales_the_output_axis() -> None:
    """The folded weight is the weight times the scale per output channel, in the
    weight's dtype (computed in float64)."""
    fold = Fold("conv", "bn", "w", None, torch.tensor([2.0, -0.5]), torch.zeros(2))
    w = torch.randn(2, 3, 1, 1)
    out = fold.scaled(w)
    assert out.dtype == w.dtype
    torch.testing.assert_close(out, torch.stack([w[0] * 2, w[1] * -0.5]))


def test_conv_without_bias_gets_one() -> None:
    torch.manual_seed(0)
    model = _randomise_norms(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                           nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 8, 8)
    g = gp.trace(model, x)
    zero_random_half(g)
    plain, folded = g.construct_subnet(), g.construct_subnet(fold_bn=True)
    assert _norms(plain.gm) == 2 and _norms(folded.gm) == 0
    with torch.no_grad():
        torch.testing.assert_close(folded(x), plain(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_folded_equals_zeroed(name: str) -> None:
    """compact(fold_bn=True) == zeroed full model, every conv's norm folded; the default
    stays unfolded (its batch norms follow .train())."""
    torch.manual_seed(0)
    model = _randomise_norms(torchvision.models.get_model(name, num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    g = gp.trace(model, x, verify=False)
    zero_random_half(g)
    folded = g.construct_subnet(fold_bn=True)
    assert _norms(folded.gm) == 0
    assert _norms(g.construct_subnet().gm) > 0
    ref = torch.func.functional_call(model, {**dict(model.named_buffers()), **g.params}, (x,))
    with torch.no_grad():
        out = folded(x)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4
    n_params = sum(p.numel() for p in folded.parameters())
    assert n_params < sum(p.numel() for p in model.parameters())


def test_onnx_resnet18_folded_equals_zeroed(tmp_path) -> None:
    torch.manual_seed(0)
    model = _randomise_norms(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "r18.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      opset_version=17, do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL)
    g = gp.trace(str(path), (x,), verify=False)
    assert any(n.op_type == "BatchNormalization" for n in g.backend.proto.graph.node)
    zero_random_half(g)
    full, folded = g.backend.full(g, g.params), g.backend.emit(g, g.params, fold_bn=True)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    ref, out = run_onnx(full, {"x": x.numpy()})[0], run_onnx(folded, {"x": x.numpy()})[0]
    assert np.abs(ref - out).max() / np.abs(ref).max() < 1e-4
