"""Every model of the latency benchmark (``benchmarks/latency.py``: resnet18, mobilenet_v2, a
small ViT, a small BERT), dense and pruned to half its FLOPs the way the benchmark prunes it,
compiles for x86 and matches PyTorch, runs for aarch64 under qemu, and compiles to CUDA kernels.

The x86 check of the pruned transformers is in the default set. The pruned CNNs (30 s and
17 s on 2 cores; other CNNs compile in the default set), dense x86, the qemu runs (emulated:
seconds to a minute per inference) and the CUDA builds are marked slow; CI runs all of them
after the default set.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import graphprune as gp
import graphprune.codegen as codegen
from graphprune.codegen.qemu import run_under_qemu, toolchain_missing
from graphprune.codegen.targets import vector_lanes

from tests.helpers import load_benchmark

from .models import rel_err

latency = load_benchmark("latency")

FORMS: dict[str, tuple[dict[str, torch.nn.Module], tuple[torch.Tensor, ...]]] = {}


def forms(name: str) -> tuple[dict[str, torch.nn.Module], tuple[torch.Tensor, ...]]:
    """{"dense", "pruned"} modules and the example inputs, built once per test session."""
    if name not in FORMS:
        made = latency.make_model(name)
        if made is None:
            pytest.skip(f"{name}: transformers is not installed")
        model, inputs = made
        g = gp.trace(copy.deepcopy(model), inputs)
        gp.prune(g, "l2", gp.Target(flops=0.5, multiple=vector_lanes("x86")))  # as latency.py
        FORMS[name] = {"dense": model, "pruned": g.construct_subnet()}, inputs
    return FORMS[name]


def reference(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    with torch.no_grad():
        out = module(*inputs)
    return (out[0] if isinstance(out, (tuple, list)) else out).numpy()


def first(outputs) -> np.ndarray:
    return outputs[0] if isinstance(outputs, list) else outputs


def check_x86(name: str, form: str) -> None:
    modules, inputs = forms(name)
    compiled = codegen.build(modules[form], inputs, "x86")
    assert rel_err(first(compiled.run(*inputs)), reference(modules[form], inputs)) < 1e-4


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in ("resnet18", "mobilenet_v2")
                                  else name for name in latency.MODELS])
def test_pruned_model_matches_torch_on_x86(name):
    check_x86(name, "pruned")


@pytest.mark.slow
@pytest.mark.parametrize("name", latency.MODELS)
def test_dense_model_matches_torch_on_x86(name):
    check_x86(name, "dense")


@pytest.mark.slow
@pytest.mark.skipif(toolchain_missing() is not None, reason=str(toolchain_missing()))
@pytest.mark.parametrize("form", ["pruned", "dense"])
@pytest.mark.parametrize("name", latency.MODELS)
def test_model_runs_for_aarch64_under_qemu(name, form, tmp_path):
    modules, inputs = forms(name)
    library = codegen.build(modules[form], inputs, "arm").export(tmp_path / f"{name}-{form}.so")
    outputs = run_under_qemu(library, [x.numpy() for x in inputs])
    assert rel_err(outputs[0], reference(modules[form], inputs)) < 1e-4


def _modules(module):
    yield module
    for imported in module.imports:
        yield from _modules(imported)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["pruned", "dense"])
@pytest.mark.parametrize("name", latency.MODELS)
def test_model_compiles_to_cuda_kernels(name, form):
    modules, inputs = forms(name)
    compiled = codegen.build(modules[form], inputs, "cuda")
    sources = [m.inspect_source("") for m in _modules(compiled.executable.mod) if m.kind == "cuda"]
    assert sources and sum(s.count("__global__") for s in sources) >= 10
