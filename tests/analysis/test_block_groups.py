"""Which layers block groups cover comes from the op entries (:meth:`Rule.block_sparse_weight`):
linear layers and pointwise convolutions, the layers a BSR matmul computes exactly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.analysis.block_groups import block_groups
from graphprune.errors import UnsupportedModelError


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(16, 32, 1)
        self.spatial = nn.Conv2d(32, 32, 3, padding=1)
        self.strided = nn.Conv2d(32, 32, 1, stride=2)
        self.grouped = nn.Conv2d(32, 32, 1, groups=2)
        self.padded = nn.Conv2d(32, 32, 1, padding=1)
        self.fc = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.padded(self.grouped(self.strided(self.spatial(self.pw(x)))))
        return self.fc(x.mean((2, 3)))


def test_block_groups_cover_linear_and_pointwise_layers_only(tmp_path) -> None:
    model, x = Mixed().eval(), torch.randn(1, 16, 8, 8)
    g = gp.trace(model, (x,))
    blocks = block_groups(g, block=(16, 1))
    assert [b.name for b in blocks] == ["pw", "fc"]
    assert [s.param for b in blocks for s in b.slices] == ["pw.weight", "fc.weight"]
    with pytest.raises(ValueError, match="not a linear"):
        block_groups(g, layers=["spatial"])
    path = tmp_path / "mixed.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False)
    with pytest.raises(UnsupportedModelError):
        block_groups(gp.trace(str(path)))
