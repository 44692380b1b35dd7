"""A layer norm over pruned hidden columns (statistics kept over the original width) compiles
to one kernel, from the compact PyTorch module and from its ONNX file (codegen/phantom_norm.py)."""

import pytest
import torch
import tvm
from torch import nn

import graphprune as gp
import graphprune.codegen as codegen
from graphprune.codegen.pipeline import fuse
from graphprune.codegen.targets import resolve_target
from graphprune.codegen.transfer import signature
from graphprune.ops.normalization import phantom_layer_norm

from tests.analysis.test_hidden_groups import PreNorm, _randomised
from tests.helpers import zero_random_half

from .models import fused_calls, fused_kernels, rel_err


@pytest.fixture(scope="module")
def compact():
    """PreNorm blocks with half of every group removed, the residual stream's columns too."""
    model, x = _randomised(PreNorm(norm=nn.LayerNorm)), torch.randn(2, 5, 12)
    g = gp.trace(model, (x,))
    zero_random_half(g)
    return model, g.construct_subnet(), x


@pytest.mark.parametrize("form", ["torch", "onnx"])
def test_pruned_layer_norms_are_one_kernel_each(compact, form, tmp_path):
    model, small, x = compact
    source = small if form == "torch" else str(gp.export_onnx(small, (x,), tmp_path / "c.onnx") and tmp_path / "c.onnx")
    calls = fused_calls(source, (x,))
    kernels = [kernel for kernel, _ in calls]
    norms = [k for k in kernels if "phantom_layer_norm" in k]
    assert len(norms) == 5, kernels  # two per block, the final one
    # the norm's input (a residual add) is computed once, not again for the norm
    assert len(set(calls)) == len(calls), calls
    assert not [k for k in kernels if k.startswith("sum") or "_sum" in k], kernels
    compiled = codegen.build(source, (x,), "x86")
    with torch.no_grad():
        assert rel_err(compiled.run(x), model(x)) < 1e-5


class _Shaped(nn.Module):
    """A look-alike that must not be rewritten: the variance over a different count than the mean."""

    def forward(self, x):
        mean = x.sum(-1, keepdim=True) / 24
        d = x - mean
        var = ((d * d).sum(-1, keepdim=True) + 8 * (mean * mean)) / 20
        return d * torch.rsqrt(var + 1e-5)


def test_look_alikes_are_left_alone():
    x = torch.randn(3, 16)
    assert not [k for k in fused_kernels(_Shaped(), (x,)) if "phantom" in k]
    compiled = codegen.build(_Shaped(), (x,), "x86")
    assert rel_err(compiled.run(x), _Shaped()(x)) < 1e-5


def test_te_kernel_matches_the_reference():
    """The TE kernel alone against graphprune's reference (no weight, no bias)."""
    class Norm(nn.Module):
        def forward(self, x):
            return phantom_layer_norm(x, None, None, 1e-5, 24)

    x = torch.randn(4, 7, 16) * 3 + 1
    assert [k for k in fused_kernels(Norm(), (x,)) if "phantom" in k]
    assert rel_err(codegen.build(Norm(), (x,), "x86").run(x), Norm()(x)) < 1e-5


@pytest.mark.parametrize("form", ["torch", "onnx"])
def test_dense_layer_norms_are_the_kernel_their_pruned_forms_carry_schedules_from(compact, form, tmp_path):
    """The dense model's norms compile to the same kernel structure as its pruned forms' (what
    :mod:`graphprune.codegen.transfer` matches a tuned schedule by), with their output unchanged."""
    model, small, x = compact

    def norm_structures(m: nn.Module, name: str) -> set:
        source = m if form == "torch" else str(gp.export_onnx(m, (x,), tmp_path / name) and tmp_path / name)
        mod = fuse(codegen.import_model(source, (x,)).bound(), resolve_target("x86").target)
        return {signature(tvm.IRModule({"main": f}))[0] for gv, f in mod.functions_items()
                if isinstance(f, tvm.tirx.PrimFunc) and "layer_norm" in gv.name_hint}

    dense = norm_structures(model, "d.onnx")
    assert dense and dense == norm_structures(small, "c.onnx")
    with torch.no_grad():
        assert rel_err(codegen.build(model, (x,), "x86").run(x), model(x)) < 1e-5


@pytest.mark.parametrize("norm", [nn.LayerNorm(16, elementwise_affine=False), nn.LayerNorm((7, 16))])
def test_plain_layer_norms_keep_their_output(norm):
    """Without scale and shift as the one kernel; over two axes left to TVM's own."""
    x = torch.randn(4, 7, 16) * 3 + 1
    kernels = fused_kernels(norm.eval(), (x,))
    assert bool([k for k in kernels if "phantom" in k]) == (len(norm.normalized_shape) == 1), kernels
    with torch.no_grad():
        assert rel_err(codegen.build(norm.eval(), (x,), "x86").run(x), norm(x)) < 1e-5
