"""CUDA code generation without a GPU: the build must contain a real CUDA kernel."""
import torch

import graphprune.codegen as codegen

from .models import SmallCNN


def _modules(module):
    yield module
    for imported in module.imports:
        yield from _modules(imported)


def test_cuda_build_contains_global_kernel():
    compiled = codegen.build(SmallCNN().eval(), (torch.randn(1, 3, 16, 16),), target="cuda")
    sources = [m.inspect_source("") for m in _modules(compiled.executable.mod) if m.kind == "cuda"]
    assert sources and any("__global__" in s for s in sources)
