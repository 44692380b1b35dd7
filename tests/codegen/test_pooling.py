"""Window max pooling on CPU gets its own schedule (:mod:`graphprune.codegen.pooling`): channels
vectorised inside the window loops, the padding read in place."""
from __future__ import annotations

import torch

import graphprune.codegen as codegen
from graphprune.codegen.frontend import import_model
from graphprune.codegen.pipeline import fuse
from graphprune.codegen.schedules import SampledSketch
from graphprune.codegen.targets import resolve_target

from .models import rel_err, seeded


def _pool_functions(model: torch.nn.Module, x: torch.Tensor) -> list:
    target = resolve_target("x86").target
    fused = fuse(import_model(model, (x,)).bound(), target)
    return [f for gv, f in fused.functions.items() if "pool" in gv.name_hint]


def test_the_channel_loop_is_vectorised_inside_the_window() -> None:
    model = seeded(torch.nn.Sequential(torch.nn.Conv2d(3, 48, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1)))
    functions = _pool_functions(model, torch.randn(1, 3, 32, 32))
    assert functions, "the pool was fused into another function"
    target = resolve_target("x86").target
    for func in functions:
        text = SampledSketch().apply(func, target, False).mod["main"].script()
        window = text.index("for rv0, rv1 in T.grid(T.int64(3), T.int64(3))")
        assert "T.vectorized(T.int64(16))" in text[window:], text  # 48 channels = 3 x 16, under the window
        assert "pad_temp" not in text  # the padding is read in place, not copied


def test_pools_compute_what_torch_computes() -> None:
    """Padded, strided and overlapping windows, channels that split by 16, 8 or not at all."""
    for channels in (48, 24, 5):
        model = seeded(torch.nn.Sequential(
            torch.nn.Conv2d(3, channels, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1),
            torch.nn.AvgPool2d(3, 1, 1, count_include_pad=False), torch.nn.AvgPool2d(2), torch.nn.MaxPool2d(2, 1)))
        x = torch.randn(2, 3, 23, 23)
        compiled = codegen.build(model, (x,), target="x86")
        assert rel_err(compiled.run(x), model(x)) < 1e-5, channels
