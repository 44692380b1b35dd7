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
from graphprune.frontends.onnx_program import GraphProgram
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
    """Each group's size, slice count, and the biases and norm parameters in it (the
    ONNX files hold the Linear weights as transposed ``onnx::MatMul_<n>`` copies, numbered
    differently at each opset)."""
    named = lambda name: name.endswith(".bias") or name.startswith("n")  # noqa: E731
    return sorted((grp.size, len(grp.param_slices(0)),
                   tuple(sorted({s[0] for s in grp.param_slices(0) if named(s[0])}))) for grp in g.groups)


@pytest.mark.parametrize("norm,opset", [(nn.LayerNorm, 11), (nn.LayerNorm, 13), (RMSNorm, 11), (RMSNorm, 13),
                                        (RMSNorm, 18)])  # 18: ReduceMean takes its axes as an input
def test_decomposed_norm_is_one_node(norm, opset, tmp_path):
    path = _export(norm, opset, tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "ReduceMean" in ops and "LayerNormalization" not in ops  # the exporter decomposed it
    g = gp.trace(path, (np.random.default_rng(0).standard_normal((1, SEQ, 6)).astype(np.float32),), verify=False)
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
        assert _groups(g) == _groups(gp.trace(_export(norm, 17, tmp_path / "m17.onnx"),
                                              (np.random.default_rng(0).standard_normal((1, SEQ, 6)).astype(np.float32),), verify=False))
    else:  # no ONNX op to compare with before opset 23: the same groups as the PyTorch module
        torch.manual_seed(0)
        assert _groups(g) == _groups(gp.trace(Block(norm).eval(), (torch.randn(1, SEQ, 6),), verify=False))
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


def _paddle_style(bias: bool, opset: int) -> onnx.ModelProto:
    """A decomposed layer norm as paddle2onnx writes it (``Identity`` and same-type
    ``Cast`` steps between the ops, the statistics' constants as scalar initializers),
    between two MatMuls; ``bias``: with a beta (else gamma only)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = lambda name, *shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)  # noqa
    scalar = lambda name, v: numpy_helper.from_array(np.array(v, np.float32), name)  # noqa
    inits = [w("w_in", 6, 8), w("w_out", 8, 3), scalar("two", 2.0), scalar("eps", 1e-5),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "gamma")]
    node = helper.make_node
    nodes = [node("MatMul", ["x", "w_in"], ["h"]), node("Identity", ["h"], ["h1"]),
             node("ReduceMean", ["h1"], ["m"], axes=[-1]), node("Identity", ["m"], ["m1"]),
             node("Sub", ["h1", "m1"], ["d"]), node("Pow", ["d", "two"], ["d2"]),
             node("Cast", ["d2"], ["d2c"], to=TensorProto.FLOAT), node("ReduceMean", ["d2c"], ["v"], axes=[-1]),
             node("Add", ["v", "eps"], ["ve"]), node("Sqrt", ["ve"], ["s"]), node("Div", ["d", "s"], ["n"]),
             node("Mul", ["n", "gamma"], ["g"])]
    last = "g"
    if bias:
        inits.append(w("beta", 8))
        nodes.append(node("Add", ["g", "beta"], ["gb"]))
        last = "gb"
    nodes += [node("Identity", [last], ["ln"]), node("MatMul", ["ln", "w_out"], ["y"])]
    graph = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("bias", [True, False])
def test_paddle_style_steps(bias):
    model = _paddle_style(bias, 11)
    onnx.checker.check_model(model)
    g = gp.trace(model, (np.random.default_rng(2).standard_normal((1, 4, 6)).astype(np.float32),))
    assert [n.source_op for n in g.ir.nodes if n.op == "layer_norm"] == ["onnx::LayerNormalization(decomposed)"]
    assert not g.barriers and not g.withdrawn
    (hidden,) = g.groups
    assert hidden.size == 8 and {s[0] for s in hidden.param_slices(0)} == {"w_in", "w_out", "gamma"} | (
        {"beta"} if bias else set())
    x = np.random.default_rng(4).standard_normal((2, 5, 6)).astype(np.float32)
    program = GraphProgram(g.ir, g.params)(torch.from_numpy(x))  # what gradient criteria differentiate
    np.testing.assert_allclose(program.detach().numpy(), run_onnx(model, {"x": x})[0], rtol=1e-4, atol=1e-5)
    zero_random_half(g)
    full, compact = g.backend.full(g, g.params), g.construct_subnet()
    assert "Pow" not in {n.op_type for n in compact.graph.node}  # the shrunk norm is the phantom norm's body
    for shape in ((1, 4, 6), (2, 7, 6)):
        x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
        ref, out = run_onnx(full, {"x": x})[0], run_onnx(compact, {"x": x})[0]
        assert np.abs(ref - out).max() <= 1e-4 * np.abs(ref).max()


def test_tf2onnx_batch_norm_like_layer_norms_are_recognised() -> None:
    """tf2onnx writes Keras' ``LayerNormalization`` as ``x * k + (Neg(mean) * k [+ beta])``,
    ``k = gamma / sqrt(var + eps)``, means by ``GlobalAveragePool``, gamma and beta shaped
    [1, 1, C] (tests/data/exporters/tf2onnx_tokens.onnx: one norm with beta, one without):
    both are layer norms, no barrier, and the hidden columns are one group across them."""
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "data" / "exporters" / "tf2onnx_tokens.onnx"
    g = gp.trace(str(path), (np.random.default_rng(0).standard_normal((1, 6, 16)).astype(np.float32),))
    norms = [n for n in g.ir.nodes if n.source_op == "onnx::LayerNormalization(decomposed)"]
    assert len(norms) == 2 and not g.barriers
    assert [n.attrs.get("B") is not None for n in norms] == [True, False]
    assert sorted(grp.size for grp in g.groups) == [32, 64]
