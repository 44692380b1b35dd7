"""Tiny models for the codegen tests (small enough to compile and tune in seconds) and the checks they share."""
from __future__ import annotations

import re

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Conv-BN-ReLU, a strided conv, global pooling and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class TinyTransformerBlock(nn.Module):
    """Pre-norm self-attention and a GELU feed-forward, with residuals (transformer-ish MLP)."""

    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 64) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ffn(self.norm2(x))


def mlp(hidden: int = 32) -> nn.Module:
    """Three linear layers; changing ``hidden`` changes the last two layers only (a 'pruned' model)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, hidden), nn.ReLU(),
                         nn.Linear(hidden, 8)).eval()


def seeded(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, 0.5)
    for b in model.buffers():
        if b.dtype.is_floating_point:
            b.data.uniform_(0.5, 1.5)
    return model.eval()


def rel_err(actual, expected) -> float:
    expected = expected.detach().numpy() if isinstance(expected, torch.Tensor) else expected
    return float(abs(actual - expected).max() / max(abs(expected).max(), 1e-12))


def fused_calls(source, inputs, target: str = "x86") -> list[tuple[str, str]]:
    """(kernel, arguments) of each call_tir in the fused program's main, in order, repeats included."""
    import graphprune.codegen as codegen
    from graphprune.codegen.pipeline import fuse
    from graphprune.codegen.targets import resolve_target

    fused = fuse(codegen.import_model(source, inputs).bound(), resolve_target(target).target)
    return re.findall(r"R\.call_tir\((\w+), \(([^)]*)\)", fused["main"].script())


def fused_kernels(source, inputs, target: str = "x86") -> list[str]:
    """The kernel of each call_tir in the fused program's main, in order, repeats included."""
    return [kernel for kernel, _ in fused_calls(source, inputs, target)]
