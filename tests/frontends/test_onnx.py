"""ONNX in, ONNX out: the same property as for PyTorch, checked with onnxruntime, on
models exported from PyTorch and on a model written by hand with onnx.helper."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper

import graphprune as gp
from graphprune.errors import BadOnnxError
from graphprune.frontends.onnx_backend import run_onnx
from tests.analysis import blocks
from tests.helpers import zero_random_half


def export(model: torch.nn.Module, x: torch.Tensor, path) -> str:
    model.eval()
    with torch.no_grad():
        for p in model.parameters():  # no all-zero heads (ViT-style init) hiding differences
            if p.abs().max() == 0:
                p.normal_(0, 0.1)
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
    return str(path)


def n_weights(m: onnx.ModelProto) -> int:
    return sum(int(np.prod(i.dims)) for i in m.graph.initializer if i.data_type == TensorProto.FLOAT)


def check_onnx(path: str, x: torch.Tensor) -> gp.PrunableGraph:
    g = gp.trace(path, verify=False)
    assert g.groups
    zero_random_half(g)
    full, compact = g.backend.full(g, g.params), g.construct_subnet()
    onnx.checker.check_model(compact)
    assert [i.name for i in compact.graph.input] == [i.name for i in full.graph.input]
    assert compact.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    bigger = torch.cat([x, torch.randn_like(x)], 0).numpy()  # another batch size than traced
    ref, out = run_onnx(full, {"x": bigger})[0], run_onnx(compact, {"x": bigger})[0]
    assert ref.shape == out.shape
    assert np.abs(ref - out).max() <= 1e-4 * (np.abs(ref).max() + 1e-12)
    assert n_weights(compact) < n_weights(full)
    return g


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5"])
def test_torchvision_onnx(name, tmp_path):
    x = torch.randn(1, 3, 64, 64)
    check_onnx(export(torchvision.models.get_model(name, num_classes=10), x, tmp_path / "m.onnx"), x)


ONNX_BLOCKS = {
    "se": (blocks.SEBlock, (1, 3, 8, 8)), "channel_shuffle": (blocks.ChannelShuffle, (1, 3, 8, 8)),
    "unet_skip": (blocks.UNetSkip, (1, 3, 8, 8)), "dense_concat": (blocks.DenseConcat, (1, 3, 8, 8)),
    "gated_chunk": (blocks.GatedChunk, (1, 5, 12)), "pixel_shuffle": (blocks.PixelShuffleNet, (1, 3, 8, 8)),
    "flatten_linear": (blocks.FlattenLinear, (1, 3, 6, 6)), "group_norm": (blocks.GroupNormNet, (1, 3, 8, 8)),
    "mha": (blocks.Attention, (1, 6, 32)), "gqa": (blocks.GroupedQueryAttention, (1, 6, 32)),
}


@pytest.mark.parametrize("name", sorted(ONNX_BLOCKS))
def test_blocks_onnx(name, tmp_path):
    cls, shape = ONNX_BLOCKS[name]
    x = torch.randn(*shape)
    check_onnx(export(cls(), x, tmp_path / "m.onnx"), x)


def hand_written() -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> GlobalAveragePool -> Flatten -> Gemm, built with onnx.helper."""
    rng = np.random.default_rng(0)
    w = lambda *s: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    inits = [w(8, 3, 3, 3), w(8), w(6, 8, 1, 1), w(6), w(4, 6), w(4)]
    for init, name in zip(inits, ["w1", "b1", "w2", "b2", "fc_w", "fc_b"]):
        init.name = name
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_hand_written_onnx(tmp_path):
    path = tmp_path / "hand.onnx"
    onnx.save(hand_written(), str(path))
    g = check_onnx(str(path), torch.randn(1, 3, 8, 8))
    assert {s.param for grp in g.groups for s in grp.slices} >= {"w1", "b1", "w2", "b2", "fc_w"}
    assert len(g.groups) == 2


def test_modelproto_input_and_verify():
    g = gp.trace(hand_written())  # verify=True checks every group with onnxruntime
    assert len(g.groups) == 2 and not g.withdrawn


def test_bad_onnx_inputs(tmp_path):
    with pytest.raises(BadOnnxError, match="no such ONNX file"):
        gp.trace(str(tmp_path / "missing.onnx"))
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(BadOnnxError) as err:
        gp.trace(str(corrupt))
    assert "corrupt.onnx" in str(err.value)
    model = hand_written()
    model.graph.node[1].input[0] = "nowhere"
    with pytest.raises(BadOnnxError, match="nowhere"):
        gp.trace(model)
