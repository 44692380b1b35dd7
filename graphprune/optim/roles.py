"""Which role a slice of a group plays in its layer: producer, consumer, norm or other.

A *producer* writes the units (rows of a conv/linear weight, ``dim == 0``), a *consumer*
reads them (input columns, ``dim == 1``), a *norm* scales them (BatchNorm/LayerNorm/
GroupNorm gamma).  With a PyTorch model the module type decides; for ONNX (no modules)
the shape does: a weight with two or more dims is a producer along dim 0 and a consumer
along dim 1, a depthwise weight ``[C, 1, ...]`` is neither, and a 1-D ``*weight`` whose
sibling ``*running_var`` is an initializer is a norm.  Both the one-shot criteria and
OBSPA read groups through these roles.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from graphprune.analysis.groups import Slice

Role = Literal["producer", "consumer", "norm", "other"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_DECONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _owner(model: nn.Module | None, param: str) -> nn.Module | None:
    """The module that registers ``param`` (``"layer1.conv.weight"`` -> ``layer1.conv``), if known."""
    if model is None or "." not in param:
        return None
    try:
        return model.get_submodule(param.rsplit(".", 1)[0])
    except AttributeError:
        return None


def _module_role(mod: nn.Module, leaf: str, dim: int) -> Role | None:
    """Role from the module type; ``None`` when the type says nothing (fall back to shapes)."""
    if isinstance(mod, _NORMS):
        return "norm" if leaf == "weight" else "other"
    if isinstance(mod, nn.Embedding):
        return "other"  # its columns are outputs, not inputs: never a consumer
    if isinstance(mod, _CONVS + _DECONVS) and mod.groups > 1:
        return "other"  # grouped/depthwise: its rows do not read a shared input
    if isinstance(mod, _DECONVS) and leaf == "weight":
        return "consumer" if dim == 0 else "producer"  # weight is [in, out, k...]
    if isinstance(mod, (nn.Linear,) + _CONVS) and leaf == "weight":
        return "consumer" if dim == 1 else "producer"
    return None


def slice_role(s: Slice, params: dict[str, torch.Tensor], model: nn.Module | None = None) -> Role:
    """How slice ``s`` touches its group's units (see the module docstring for the rules)."""
    mod = _owner(model, s.param)
    if mod is not None:
        role = _module_role(mod, s.param.rsplit(".", 1)[1], s.dim)
        if role is not None:
            return role
    p = params[s.param]
    if p.dim() == 1:
        stem = s.param[: -len("weight")] if s.param.endswith("weight") else None
        return "norm" if stem is not None and stem + "running_var" in params else "other"
    if p.dim() > 2 and p.shape[1] == 1:
        return "other"  # depthwise conv weight [C, 1, k...]
    return {0: "producer", 1: "consumer"}.get(s.dim, "other")


def bias_of(weight: str, params: dict[str, torch.Tensor], out: int) -> str | None:
    """Name of the bias that goes with ``weight`` (``conv.weight`` -> ``conv.bias``), if any."""
    if not weight.endswith("weight"):
        return None
    name = weight[: -len("weight")] + "bias"
    b = params.get(name)
    return name if b is not None and b.dim() == 1 and b.numel() == out else None


def norm_bias(weight: str, params: dict[str, torch.Tensor]) -> str | None:
    name = weight[: -len("weight")] + "bias" if weight.endswith("weight") else None
    return name if name in params else None
