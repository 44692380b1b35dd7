"""Clips (ReLU6, Hardtanh, clamp) become Relax maximum/minimum, so CPU convolutions stay NHWC (codegen/clip.py)."""
import pytest
import torch
import tvm
from torch import nn
from tvm import relax, te

import graphprune.codegen as codegen
from graphprune.codegen.clip import clips_as_max_min
from graphprune.codegen.pipeline import fuse
from graphprune.codegen.targets import resolve_target

from .models import rel_err


class Clipped(nn.Module):
    """MobileNet-style blocks with every kind of clip torch and ONNX have: ReLU6, Hardtanh with
    other bounds, and a one-sided clamp."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(8, 32, 1)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.project = nn.Conv2d(32, 16, 1)
        self.relu6, self.hardtanh = nn.ReLU6(), nn.Hardtanh(-0.5, 0.75)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hardtanh(self.depthwise(self.relu6(self.expand(x))))
        return self.project(x).clamp(min=0.1)


def _inputs() -> tuple[torch.Tensor]:
    torch.manual_seed(0)
    return (torch.randn(1, 8, 12, 12) * 4,)   # wide enough that every bound is hit


def _source(form: str, tmp_path):
    torch.manual_seed(0)
    model = Clipped().eval()
    if form == "onnx":
        path = tmp_path / "clipped.onnx"
        torch.onnx.export(model, _inputs(), str(path), dynamo=False, opset_version=17)
        return model, path
    return model, model


@pytest.mark.parametrize("form", ["torch", "onnx"])
def test_clips_fuse_into_nhwc_convolutions(form, tmp_path):
    """No transposes inside the network (only NCHW -> NHWC at the input and back at the output),
    and every clip lands in its convolution's kernel. Before, each clip was wrapped in two
    transposes: 7 kernels instead of 3."""
    model, source = _source(form, tmp_path)
    fused = fuse(codegen.import_model(source, _inputs()).bound(), resolve_target("x86").target)
    kernels = [gv.name_hint for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    convs = [k for k in kernels if "conv2d" in k]
    assert len(convs) == 3 and all("maximum" in k for k in convs), kernels
    assert sum("minimum" in k for k in convs) == 2, kernels          # clamp(min=0.1) has no upper bound
    assert sum("transpose" in k for k in kernels) <= 2, kernels
    compiled = codegen.build(source, _inputs(), target="x86")
    assert rel_err(compiled.run(*_inputs()), model(*_inputs())) < 1e-5


_BODIES = {
    "max": lambda x, b: lambda i, j: te.max(x[i, j], b[()]),
    "max_plus_one": lambda x, b: lambda i, j: te.max(x[i, j], b[()]) + 1.0,
    "permuted": lambda x, b: lambda i, j: te.max(x[j // 2, i * 2 + j % 2], b[()]),  # not elementwise
}


def _call_tir_module(body: str) -> tvm.IRModule:
    """A Relax main that calls one TE-made PrimFunc (block "T_maximum", like TOPI's) on (x, 0-d bound)."""
    bb = relax.BlockBuilder()
    x, b = relax.Var("x", relax.TensorType((4, 8), "float32")), relax.Var("b", relax.TensorType((), "float32"))
    with bb.function("main", [x, b]):
        with bb.dataflow():
            y = bb.emit_output(bb.call_te(lambda xt, bt: te.compute((4, 8), _BODIES[body](xt, bt), name="T_maximum"), x, b))
        bb.emit_func_output(y)
    return bb.get()


def test_only_true_elementwise_bounds_are_replaced():
    """The check is on the PrimFunc's body, not its block's name: a max that also adds, or reads
    x at other indices, stays a call_tir."""
    assert "R.maximum" in clips_as_max_min(_call_tir_module("max"))["main"].script()
    for body in ("max_plus_one", "permuted"):
        rewritten = clips_as_max_min(_call_tir_module(body))["main"].script()
        assert "call_tir" in rewritten and "R.maximum" not in rewritten, body
