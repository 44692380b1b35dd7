"""Awkward matmul axes (37 tokens) are padded before the CPU search tiles them (codegen/padding.py)."""
import pytest
import torch
import tvm
from tvm import te
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms

import graphprune.codegen as codegen
from graphprune.codegen.padding import awkward, cpu_schedule_rules, einsum_padding
from graphprune.codegen.targets import resolve_target
from graphprune.codegen.tuning import open_database

from .models import rel_err


def _matmul(m: int, k: int, n: int, weight: bool = True) -> tvm.IRModule:
    """C = A @ B; B marked as a weight (layout-free) like a Linear layer's, or not (attention)."""
    a, b = te.placeholder((m, k), name="a"), te.placeholder((k, n), name="b")
    r = te.reduce_axis((0, k), name="r")
    c = te.compute((m, n), lambda i, j: te.sum(a[i, r] * b[r, j], axis=r), name="matmul")
    func = te.create_prim_func([a, b, c])
    return tvm.IRModule({"main": func.with_attr("layout_free_buffers", [1] if weight else [])})


def _conv(size: int) -> tvm.IRModule:
    data, weight = te.placeholder((1, size, size, 8), name="data"), te.placeholder((3, 3, 8, 8), name="weight")
    out = tvm.topi.nn.conv2d_nhwc(data, weight, 1, 1, 1)
    return tvm.IRModule({"main": te.create_prim_func([data, weight, out]).with_attr("layout_free_buffers", [1])})


def _design_spaces(mod: tvm.IRModule) -> list[str]:
    space = ms.space_generator.PostOrderApply(sch_rules=cpu_schedule_rules(), postprocs="llvm", mutator_probs="llvm")
    context = ms.TuneContext(mod=mod, target=resolve_target("x86").target, space_generator=space, num_threads=1)
    return [str(s.mod["main"].script()) for s in context.generate_design_space()]


@pytest.mark.parametrize("extent", [37, 74, 197, 101])
def test_awkward_extents_have_no_tile_factor(extent):
    assert awkward(extent)


@pytest.mark.parametrize("extent", [1, 7, 16, 40, 49, 50, 128, 196])
def test_tileable_extents_are_left_alone(extent):
    assert not awkward(extent)


def _padding(mod: tvm.IRModule) -> list[int] | None:
    func = mod["main"]
    layout_free = {func.params[int(i)] for i in func.attrs["layout_free_buffers"]}
    sch = Schedule(mod)
    return einsum_padding(sch.get(sch.get_sblock("matmul")), layout_free)


def test_only_activation_axes_are_padded():
    """Rows of a Linear layer's input are padded; its weight's columns are not (that would copy
    the weights on every call); both sides of an attention product are activations."""
    assert _padding(_matmul(37, 64, 37)) == [40, 37, 64]
    assert _padding(_matmul(37, 64, 37, weight=False)) == [40, 40, 64]
    assert _padding(_matmul(40, 64, 37)) is None


def test_design_space_tiles_the_padded_matmul():
    padded = _design_spaces(_matmul(37, 64, 48))
    assert padded and all("a_pad = T.sblock_alloc_buffer((40, 64))" in s for s in padded)
    assert all("a_pad" not in s for s in _design_spaces(_matmul(40, 64, 48)))


def test_convolution_passes_through_unpadded():
    """A convolution reads shifted windows, which pad_einsum cannot pad: the rule leaves it be."""
    spaces = _design_spaces(_conv(37))
    assert spaces and all("_pad" not in s.replace("pad_temp", "") for s in spaces)


def test_norm_reductions_are_not_padded():
    """A layer norm over 37 tokens reduces x*x and (x-mean)*(x-mean), no contraction: padded,
    its tuned kernel was 40x slower."""
    x = te.placeholder((1, 37, 192), name="x")
    gamma, beta = te.placeholder((192,), name="gamma"), te.placeholder((192,), name="beta")
    out = tvm.topi.nn.layer_norm(x, gamma, beta, axis=[2])
    mod = tvm.IRModule({"main": te.create_prim_func([x, gamma, beta, out]).with_attr("layout_free_buffers", [1, 2])})
    spaces = _design_spaces(mod)
    assert spaces and all("_pad" not in s for s in spaces)


def test_tuned_padded_linear_matches_torch(tmp_path):
    """The padded kernel's records apply at build time and compute the unpadded result."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.GELU(), torch.nn.Linear(48, 16)).eval()
    x = torch.randn(1, 37, 24)
    codegen.tune(model, (x,), "x86", tmp_path, trials_per_task=2)
    traces = [str(r.trace) for r in open_database(tmp_path).get_all_tuning_records()]
    assert any("pad_einsum" in t for t in traces)
    compiled = codegen.build(model, (x,), "x86", tuning_db=tmp_path)
    assert compiled.tuned_functions == compiled.total_functions
    assert rel_err(compiled.run(x), model(x)) < 1e-5
