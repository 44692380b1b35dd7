"""Rewrites into fusible Relax ops (codegen/fusible.py): clips as maximum/minimum, so CPU
convolutions stay NHWC; constant-index takes as slices."""
import pytest
import torch
import tvm
from torch import nn
from tvm import relax, te

import graphprune.codegen as codegen
from graphprune.codegen.fusible import fusible_forms

from .models import fused_kernels, rel_err


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
    kernels = fused_kernels(source, _inputs())
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
    assert "R.maximum" in fusible_forms(_call_tir_module("max"))["main"].script()
    for body in ("max_plus_one", "permuted"):
        rewritten = fusible_forms(_call_tir_module(body))["main"].script()
        assert "call_tir" in rewritten and "R.maximum" not in rewritten, body


class SplitHeads(nn.Module):
    """Attention's ``q, k, v = qkv[0], qkv[1], qkv[-1]`` (ONNX: Gather with a constant index,
    negative for the last), followed by the reshapes a slice fuses with."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x).reshape(x.shape[0], 3, 2, 8).permute(1, 0, 2, 3)
        q, k, v = qkv[0], qkv[1], qkv[-1]
        return (q * k).sum(-1, keepdim=True) * v.transpose(1, 2).transpose(1, 2)


@pytest.mark.parametrize("form", ["torch", "onnx"])
def test_constant_index_takes_become_slices(form, tmp_path):
    """No take kernel is left; each slice fuses with what follows it; the outputs still match."""
    torch.manual_seed(0)
    model, x = SplitHeads().eval(), torch.randn(5, 16)
    source = model
    if form == "onnx":
        source = tmp_path / "split.onnx"
        torch.onnx.export(model, (x,), str(source), dynamo=False, opset_version=17)
    kernels = fused_kernels(source, (x,))
    assert not [k for k in kernels if "take" in k], kernels
    compiled = codegen.build(source, (x,), target="x86")
    assert rel_err(compiled.run(x), model(x)) < 1e-5


def test_takes_out_of_range_or_by_tensor_stay():
    """Only a 0-d constant index inside the axis becomes a slice: an index tensor stays a take,
    and so does an index past the end, whose meaning depends on the take's mode (wrap, clip)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((3, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            rows = bb.emit(relax.op.take(x, relax.const([0, 2], "int64"), axis=0))
            column = bb.emit(relax.op.take(x, relax.const(1, "int64"), axis=1))
            wrapped = bb.emit(relax.op.take(x, relax.const(7, "int64"), axis=0, mode="wrap"))
            out = bb.emit_output(relax.Tuple([rows, column, wrapped]))
        bb.emit_func_output(out)
    script = fusible_forms(bb.get())["main"].script()
    assert script.count("R.take") == 2 and script.count("R.strided_slice") == 1, script


class PrefixRope(nn.Module):
    """timm's rotary ViTs with no prefix tokens: ``cat([q[:, :0], rotate(q[:, 0:])])``."""

    def __init__(self, prefix: int) -> None:
        super().__init__()
        self.fc, self.prefix = nn.Linear(16, 16), prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.fc(x)
        return torch.cat([q[:, :self.prefix], torch.sin(q[:, self.prefix:])], dim=1)


@pytest.mark.parametrize("prefix", [0, 1])
def test_empty_concat_operands_are_dropped(prefix):
    """TVM cannot build a slice of extent 0 (it vectorises a loop of extent 0); the concat
    without it builds and matches, and a non-empty prefix stays."""
    torch.manual_seed(0)
    model, x = PrefixRope(prefix).eval(), torch.randn(2, 8, 16)
    program = codegen.import_model(model, (x,))
    script = fusible_forms(program.bound())["main"].script()
    # export writes q[:, 0:] as q itself: with no prefix no slice is left at all
    assert script.count("R.strided_slice") == (0 if prefix == 0 else 2), script
    assert rel_err(codegen.build(model, (x,), target="x86").run(x), model(x)) < 1e-5


class StridedTokens(nn.Module):
    """A patch embedding transposed to tokens and shifted by a position table: torch keeps the
    transposed strides through the elementwise ops, so ``linear`` decomposes to a batched
    matmul by the weight broadcast over the batch, not to ``addmm`` on the rows."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 24, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 16, 24))
        self.fc1, self.fc2 = nn.Linear(24, 40), nn.Linear(40, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return h + self.fc2(nn.functional.gelu(self.fc1(h * 2.0)))


def _matmul_ranks(mod: tvm.IRModule) -> list[int]:
    """The output rank of every matmul block in the fused program's PrimFuncs."""
    from tvm.s_tir import Schedule

    ranks = []
    for _, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            sch = Schedule(func)
            blocks = [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))]
            ranks += [len(b.iter_vars) - 1 for b in blocks if b.name_hint == "matmul"]
    return ranks


def test_linear_layers_on_strided_tokens_are_2d_matmuls_with_their_epilogues():
    """Every linear layer compiles to one 2-d matmul of the token rows, its bias, GELU and the
    residual add in its kernel, and no constant holds the weight once per image (the broadcast
    folded: 8 copies here, 32 for a batch of 32); the result is unchanged."""
    from graphprune.codegen.pipeline import fuse
    from graphprune.codegen.targets import resolve_target

    torch.manual_seed(0)
    model, x = StridedTokens().eval(), torch.randn(8, 3, 16, 16)
    program = codegen.import_model(model, (x,))
    target = resolve_target("x86").target
    fused = fuse(program.bound(), target)
    assert _matmul_ranks(fused) == [2, 2], _matmul_ranks(fused)
    largest = max(p.size for p in program.params)
    consts: list[int] = []
    relax.analysis.post_order_visit(fused["main"], lambda e: consts.append(int(e.value.numpy().size))
                                    if isinstance(e, tvm.ir.expr.GenericConst) else None)
    assert max(consts) <= largest
    kernels = fused_kernels(model, (x,))
    assert any("matmul" in k and "gelu" in k for k in kernels), kernels
    assert any("matmul" in k and k.count("add") >= 2 for k in kernels), kernels   # bias and residual
    compiled = codegen.build(model, (x,), target="x86")
    assert rel_err(compiled.run(x), model(x)) < 1e-5


class ViewedRows(nn.Module):
    """Rows of tokens through a linear layer, viewed as (batch, tokens, channels) and back before
    the residual add (as graphprune's compact modules write a transformer block), after an
    ``expand`` of the input to its own shape."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(24, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.expand(128, 24)).view(8, 16, 24).reshape(128, 24)
        return x + y


def test_views_that_undo_each_other_leave_no_copy_kernels():
    """The residual add lands in the matmul's kernel and nothing is left to copy rows: no
    kernel of reshapes or broadcasts alone; the result is unchanged."""
    torch.manual_seed(0)
    model, x = ViewedRows().eval(), torch.randn(128, 24)
    kernels = fused_kernels(model, (x,))
    assert len(kernels) == 1 and "matmul" in kernels[0] and kernels[0].count("add") == 2, kernels
    compiled = codegen.build(model, (x,), target="x86")
    assert rel_err(compiled.run(x), model(x)) < 1e-5
