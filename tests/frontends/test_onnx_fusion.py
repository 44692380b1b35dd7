"""Layer and RMS norms written out op by op (TorchScript below opset 17, paddle2onnx,
tf2onnx) are one ``layer_norm`` IR node: the hidden-column group forms as for a file
with ``LayerNormalization``, the compact file keeps the input's opset, and it computes
what the zeroed file computes at other batch sizes and sequence lengths."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.frontends.onnx_backend import run_onnx
from tests.helpers import zero_random_half

HIDDEN, SEQ = 24, 5


class RMSNorm(nn.Module):
    """An RMS norm as model code writes it by hand (torch's exporter decomposes it)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Block(nn.Module):
    """A pre-norm transformer block on a token stream: embed, attention-free mixer, MLP,
    final norm and a classifier; the hidden columns run through every norm."""

    def __init__(self, norm: type[nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Linear(6, HIDDEN)
        self.n1, self.mix = norm(HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.n2, self.up, self.down = norm(HIDDEN), nn.Linear(HIDDEN, 48), nn.Linear(48, HIDDEN)
        self.n3, self.head = norm(HIDDEN), nn.Linear(HIDDEN, 7)
        with torch.no_grad():  # trained-looking affine entries, so removed columns are not trivially equal
            for n in (self.n1, self.n2, self.n3):
                n.weight.uniform_(0.5, 1.5)
                if getattr(n, "bias", None) is not None:
                    n.bias.normal_(0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.mix(self.n1(h))
        h = h + self.down(torch.relu(self.up(self.n2(h))))
        return self.head(self.n3(h))


def _export(norm: type[nn.Module], opset: int, path) -> str:
    torch.manual_seed(0)
    torch.onnx.export(Block(norm).eval(), (torch.randn(1, SEQ, 6),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b", 1: "t"}, "y": {0: "b", 1: "t"}},
                      opset_version=opset)
    return str(path)


def _groups(g: gp.PrunableGraph) -> list[tuple[int, int, tuple[str, ...]]]:
    """Each group's size, slice count and named parameters (the exporter numbers the
    transposed MatMul weights differently at each opset)."""
    return sorted((grp.size, len(grp.param_slices(0)),
                   tuple(sorted({s[0] for s in grp.param_slices(0) if not s[0].startswith("onnx::")})))
                  for grp in g.groups)


@pytest.mark.parametrize("norm,opset", [(nn.LayerNorm, 11), (nn.LayerNorm, 13), (RMSNorm, 11), (RMSNorm, 13)])
def test_decomposed_norm_is_one_node(norm, opset, tmp_path):
    path = _export(norm, opset, tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "ReduceMean" in ops and "LayerNormalization" not in ops  # the exporter decomposed it
    g = gp.trace(path, verify=False)
    norms = [n for n in g.ir.nodes if n.op == "layer_norm"]
    assert len(norms) == 3 and all(n.source_op.endswith("(decomposed)") for n in norms)
    assert not g.barriers
    hidden = [grp for grp in g.groups if grp.size == HIDDEN and any("n1.weight" in s[0] for s in grp.param_slices(0))]
    assert hidden, "the hidden-column group (residual stream + norms + consumers' columns) did not form"
    slices = hidden[0].param_slices(0)
    names = {s[0] for s in slices}
    assert {"embed.bias", "mix.bias", "down.bias", "n2.weight", "n3.weight"} <= names
    assert len(slices) >= 3 + 3 + 6  # biases, norm scales, MatMul weights: embed/mix/down rows, mix/up/head columns
    if norm is nn.LayerNorm:  # the same groups as the file with LayerNormalization ops
        assert _groups(g) == _groups(gp.trace(_export(norm, 17, tmp_path / "m17.onnx"), verify=False))
    zero_random_half(g)
    full, compact = g.backend.full(g, g.params), g.construct_subnet()
    onnx.checker.check_model(compact)
    assert [o.version for o in compact.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    assert {o.domain for o in compact.opset_import} <= {"", "ai.onnx"}
    rng = np.random.default_rng(1)
    for shape in ((1, SEQ, 6), (3, 9, 6)):  # other batch sizes and sequence lengths than traced
        x = rng.standard_normal(shape).astype(np.float32)
        ref, out = run_onnx(full, {"x": x})[0], run_onnx(compact, {"x": x})[0]
        assert ref.shape == out.shape
        assert np.abs(ref - out).max() <= 1e-4 * np.abs(ref).max()
    assert sum(int(np.prod(i.dims)) for i in compact.graph.initializer) < \
        sum(int(np.prod(i.dims)) for i in full.graph.initializer)


class ChannelMean(nn.Module):
    """A mean over the channels that is no norm: it changes when a channel goes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, HIDDEN), nn.Linear(HIDDEN, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x)) + 1.0
        return self.b(h) * h.mean(-1, keepdim=True)


def test_channel_mean_is_a_named_barrier(tmp_path):
    path = tmp_path / "m.onnx"
    torch.onnx.export(ChannelMean().eval(), (torch.randn(2, 6),), str(path), dynamo=False, input_names=["x"],
                      opset_version=13)
    g = gp.trace(str(path), verify=False)
    means = [b for b in g.barriers if b.op == "onnx::ReduceMean"]
    assert len(means) == 1 and "over the channel axis" in means[0].reason
    assert means[0].node in g.summary() and "ReduceMean" in g.summary()
    assert not any(any("a.weight" in s[0] for s in grp.param_slices(0)) for grp in g.groups)
