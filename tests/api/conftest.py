"""A small CNN and labelled batches for the gp.compile tests (a few seconds per compile)."""
from __future__ import annotations

import pytest
import torch
from torch import nn


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


@pytest.fixture
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN().eval()


@pytest.fixture
def example() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),)


@pytest.fixture
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four labelled batches where the label is learnable (the channel with the largest mean)."""
    gen = torch.Generator().manual_seed(2)
    out = []
    for _ in range(4):
        x = torch.randn(16, 3, 8, 8, generator=gen)
        y = x.mean((2, 3)).argmax(1)
        out.append((x, y))
    return out
