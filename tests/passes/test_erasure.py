"""Operator erasure: a whole zeroed group takes the operators it leaves without input
with it (a residual branch leaves the skip path, plus its constant output), in the
compact nn.Module and in the compact ONNX model; where that is impossible (a concat,
the only path) the group keeps one zero unit and the compact model still matches."""
from __future__ import annotations

import numpy as np
import onnx
import torch
import torchvision
from torch import nn

import graphprune as gp
from graphprune.frontends.onnx_backend import run_onnx
from tests.helpers import randomise_batch_norms

torch.set_num_threads(1)


class ResBlock(nn.Module):
    """stem -> [conv-bn-relu-conv-bn] + identity -> head."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.head(torch.relu(x + y).mean((2, 3)))


class ConcatBranch(ResBlock):
    """The branch is concatenated, not added: erasing it would need an empty tensor."""

    def __init__(self, c: int = 8) -> None:
        super().__init__(c)
        self.head = nn.Linear(2 * c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.head(torch.cat([x, y], 1).mean((2, 3)))


class PreNormMLP(nn.Module):
    """x + fc2(gelu(fc1(ln(x)))) -> head: a transformer's MLP sub-block."""

    def __init__(self, d: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.embed, self.ln = nn.Linear(5, d), nn.LayerNorm(d)
        self.fc1, self.fc2, self.head = nn.Linear(d, hidden), nn.Linear(hidden, d), nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.ln(x))))
        return self.head(x)


def _zero_group(g: gp.PrunableGraph, name: str) -> None:
    grp = next(grp for grp in g.groups if grp.name == name)
    grp.scatter_(g.params, torch.ones(grp.size, dtype=torch.bool))


def _ops(gm: torch.fx.GraphModule, packet: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function"
               and getattr(n.target, "overloadpacket", None) is getattr(torch.ops.aten, packet))


def _assert_same(model: nn.Module, compact: nn.Module, shape: tuple[int, ...]) -> None:
    with torch.no_grad():
        for batch in (2, 5, 1):
            x = torch.randn(batch, *shape)
            ref, out = model(x), compact(x)
            assert out.shape == ref.shape
            assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4


def test_residual_branch_is_erased():
    model = randomise_batch_norms(ResBlock())
    g = gp.trace(model, torch.randn(2, 3, 8, 8))
    _zero_group(g, "conv1")
    compact = g.construct_subnet()
    _assert_same(model, compact, (3, 8, 8))
    assert _ops(compact.gm, "conv2d") == 1 and _ops(compact.gm, "batch_norm") == 1
    names = {n for n, _ in compact.named_parameters()}
    assert not {n for n in names if any(k in n for k in ("conv1", "conv2", "bn1", "bn2"))}
    erased = compact.gm._erased_0  # bn2 of a zero input, per channel
    expected = model.bn2(torch.zeros(1, 8, 1, 1))
    assert erased.shape == (1, 8, 1, 1) and torch.allclose(erased, expected, atol=1e-6)


def test_resnet18_branches_are_erased():
    torch.manual_seed(0)
    model = randomise_batch_norms(torchvision.models.resnet18(num_classes=4))
    g = gp.trace(model, torch.randn(2, 3, 32, 32), verify=False)
    full = g.backend.full(g, g.params)
    for name in ("layer1.0.conv1", "layer3.1.conv1"):
        _zero_group(g, name)
    compact = g.construct_subnet()
    _assert_same(model, compact, (3, 32, 32))
    assert _ops(compact.gm, "conv2d") == _ops(full.gm, "conv2d") - 4
    names = {n for n, _ in compact.named_parameters()}
    assert not {n for n in names if n.startswith(("gm.layer1.0.conv", "gm.layer3.1.conv", "gm.layer1.0.bn"))}


def test_transformer_mlp_leaves_fc2_bias():
    torch.manual_seed(0)
    model = PreNormMLP().eval()
    g = gp.trace(model, torch.randn(2, 6, 5))
    _zero_group(g, "fc1")
    compact = g.construct_subnet()
    _assert_same(model, compact, (6, 5))
    assert _ops(compact.gm, "linear") == 2 and _ops(compact.gm, "layer_norm") == 0  # embed, head
    assert torch.equal(compact.gm._erased_0.reshape(-1), model.fc2.bias)


def test_concat_keeps_one_zero_unit():
    model = randomise_batch_norms(ConcatBranch())
    g = gp.trace(model, torch.randn(2, 3, 8, 8))
    _zero_group(g, "conv1")
    compact = g.construct_subnet()
    _assert_same(model, compact, (3, 8, 8))
    assert _ops(compact.gm, "conv2d") == 3
    assert compact.gm.conv1.weight.shape[0] == 1  # the pre-erasure behaviour


def test_only_path_keeps_one_zero_unit():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 8, 8))
    model.eval()
    g = gp.trace(model, torch.randn(2, 3, 8, 8))
    assert not g.stays_connected([torch.ones(grp.size, dtype=torch.bool) if grp.name == "0"
                                  else torch.zeros(grp.size, dtype=torch.bool) for grp in g.groups])
    _zero_group(g, "0")
    compact = g.construct_subnet()
    _assert_same(model, compact, (3, 8, 8))
    assert compact.gm.get_submodule("0").weight.shape[0] == 1


def _onnx(model: nn.Module, x: torch.Tensor, path) -> str:
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
    return str(path)


def _check_onnx(path: str, group: str, op: str, shape: tuple[int, ...],
                erased: bool = True) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    g = gp.trace(path)
    grp = next(grp for grp in g.groups if grp.name.startswith(group))
    grp.scatter_(g.params, torch.ones(grp.size, dtype=torch.bool))
    full, compact = g.backend.full(g, g.params), g.construct_subnet()
    onnx.checker.check_model(compact)
    assert [i.name for i in compact.graph.input] == [i.name for i in full.graph.input]
    assert compact.graph.input[0].type == full.graph.input[0].type  # dynamic batch kept
    for batch in (2, 5):
        x = np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)
        ref, out = run_onnx(full, {"x": x})[0], run_onnx(compact, {"x": x})[0]
        assert np.abs(ref - out).max() / np.abs(ref).max() < 1e-4
    count = lambda m: sum(n.op_type == op for n in m.graph.node)  # noqa: E731
    assert (count(compact) < count(full)) == erased
    return full, compact


def test_onnx_residual_branch_is_erased(tmp_path):
    model = randomise_batch_norms(ResBlock())
    full, compact = _check_onnx(_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "res.onnx"), "/conv1", "Conv",
                                (3, 8, 8))
    assert sum(n.op_type == "Conv" for n in compact.graph.node) == 1


def test_onnx_transformer_mlp_is_erased(tmp_path):
    torch.manual_seed(0)
    full, compact = _check_onnx(_onnx(PreNormMLP().eval(), torch.randn(2, 6, 5), tmp_path / "mlp.onnx"), "/fc1",
                                "MatMul", (6, 5))
    assert not any(n.op_type == "LayerNormalization" for n in compact.graph.node)


def test_onnx_concat_keeps_one_zero_unit(tmp_path):
    model = randomise_batch_norms(ConcatBranch())
    _, compact = _check_onnx(_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "cat.onnx"), "/conv1", "Conv",
                             (3, 8, 8), erased=False)
    conv1 = next(n for n in compact.graph.node if n.name == "/conv1/Conv")
    weight = next(i for i in compact.graph.initializer if i.name == conv1.input[1])
    assert weight.dims[0] == 1
