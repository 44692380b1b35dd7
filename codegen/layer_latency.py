"""Time single layers and whole models as the codegen target runs them, for latency targets.

A :class:`~graphprune.ops.registry.Layer` is rebuilt as a one-layer PyTorch module at the
asked widths and compiled exactly as a model would be (same import, fusion, schedules and
tuning database), so its time is the compiled layer's, not an estimate from its FLOPs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphprune.ops.registry import Layer

from .compile import build


def layer_module(layer: Layer, cin: int, cout: int) -> tuple[nn.Module, torch.Tensor]:
    """The layer alone at input width ``cin`` and output width ``cout``, with an input for it."""
    torch.manual_seed(0)
    if layer.kind == "conv2d":
        groups = cin if layer.depthwise else layer.groups
        module = nn.Conv2d(cin, cout, layer.kernel, layer.stride, layer.padding, layer.dilation, groups=groups)
        x = torch.randn(layer.rows, cin, *layer.size)
    elif layer.kind == "dense":
        module, x = nn.Linear(cin, cout), torch.randn(layer.rows, cin)
    else:
        raise ValueError(f"no layer module for kind {layer.kind!r}")
    return module.eval(), x


def measure_layer(layer: Layer, cin: int, cout: int, target: str = "x86",
                  tuning_db: str | os.PathLike | None = None, repeat: int = 5) -> float:
    """Median milliseconds of the compiled layer at widths ``cin`` x ``cout`` on ``target``."""
    module, x = layer_module(layer, cin, cout)
    return measure_model(module, (x,), target, tuning_db, repeat)


def measure_model(model: Any, example_inputs: Any, target: str = "x86",
                  tuning_db: str | os.PathLike | None = None, repeat: int = 7) -> float:
    """Median milliseconds of ``model`` (a module or ONNX model) compiled for ``target``."""
    compiled = build(model, example_inputs, target=target, tuning_db=tuning_db)
    return float(compiled.benchmark(repeat=repeat)["median_ms"])


def table_path(target: str = "x86", tuning_db: str | os.PathLike | None = None) -> Path:
    """Where the layer latency table for ``target`` is cached: next to the tuning records it
    was measured with (the given database, else the machine's shared one)."""
    from .targets import resolve_target
    from .tuning import shared_database_dir

    folder = Path(tuning_db) if tuning_db is not None else shared_database_dir(resolve_target(target))
    return folder / "layer_latency.json"
