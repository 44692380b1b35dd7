"""A hand-built stand-in for a traced graph: conv-bn-relu-conv-bn-linear on 8x8 digits.

Until ``graphprune.trace`` lands, the optimizer tests run on this net with its two
channel groups written out by hand.  ``live_flops`` counts the MACs of the compact
model that removing the all-zero units would give, so targets are checked against the
real network, not against the optimizer's own accounting.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from graphprune.analysis.groups import Group, Slice

SIDE = 8  # digits are 8x8


class Net(nn.Module):
    def __init__(self, c1: int = 64, c2: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.fc = nn.Linear(c2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _rows(n: int) -> torch.Tensor:
    return torch.arange(n).reshape(n, 1)


def graph(model: Net) -> types.SimpleNamespace:
    """The groups ``gp.trace`` would find: conv1's and conv2's output channels."""
    c1, c2, hw = model.conv1.out_channels, model.conv2.out_channels, SIDE * SIDE
    classes = model.fc.out_features
    g1 = Group(0, "conv1", "channel", c1,
               [Slice("conv1.weight", 0, _rows(c1), role="producer", bias="conv1.bias"),
                Slice("conv1.bias", 0, _rows(c1)),
                Slice("bn1.weight", 0, _rows(c1), role="norm", bias="bn1.bias"), Slice("bn1.bias", 0, _rows(c1)),
                Slice("conv2.weight", 1, _rows(c1), role="consumer", bias="conv2.bias")],
               params_per_unit=9 + 1 + 2 + c2 * 9, flops_per_unit=float(9 * hw + c2 * 9 * hw))
    g2 = Group(1, "conv2", "channel", c2,
               [Slice("conv2.weight", 0, _rows(c2), role="producer", bias="conv2.bias"),
                Slice("conv2.bias", 0, _rows(c2)),
                Slice("bn2.weight", 0, _rows(c2), role="norm", bias="bn2.bias"), Slice("bn2.bias", 0, _rows(c2)),
                Slice("fc.weight", 1, _rows(c2), role="consumer", bias="fc.bias")],
               params_per_unit=c1 * 9 + 1 + 2 + classes, flops_per_unit=float(c1 * 9 * hw + classes))
    params = dict(model.named_parameters())
    return types.SimpleNamespace(
        groups=[g1, g2], params=params, model=model,
        total_params=sum(p.numel() for p in params.values()),
        total_flops=live_flops(model, [torch.zeros(c1, dtype=torch.bool), torch.zeros(c2, dtype=torch.bool)]),
        param_macs={"conv1.weight": float(c1 * 9 * hw), "conv2.weight": float(c2 * c1 * 9 * hw),
                    "fc.weight": float(classes * c2)})


def live_flops(model: Net, removed: list[torch.Tensor]) -> float:
    """MACs of the compact net once the ``removed`` channels of conv1/conv2 are gone."""
    k1 = model.conv1.out_channels - int(removed[0].sum())
    k2 = model.conv2.out_channels - int(removed[1].sum())
    hw = SIDE * SIDE
    return float(k1 * 9 * hw + k2 * k1 * 9 * hw + model.fc.out_features * k2)


def zero_units(g: types.SimpleNamespace) -> list[torch.Tensor]:
    """Units whose every slice is exactly zero (what ``construct_subnet`` would remove)."""
    with torch.no_grad():
        return [grp.gather(g.params).abs().amax(dim=1) == 0 for grp in g.groups]


def digits(n_train: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_train`` sklearn digits as ``[n, 1, 8, 8]`` floats in [0, 1] and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images[:n_train], dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target[:n_train], dtype=torch.long)
    return x, y


def batches(x: torch.Tensor, y: torch.Tensor, steps: int, batch: int = 64):
    """A fixed, RNG-free cycle of mini-batches."""
    n = x.shape[0]
    for t in range(steps):
        start = (t * batch) % (n - batch + 1)
        yield x[start:start + batch], y[start:start + batch]


def traced_or_standin(model: Net):
    """``gp.trace`` of the net when the core provides it, else the hand-built stand-in."""
    try:
        from graphprune import trace
    except ImportError:
        return graph(model)
    return trace(model, torch.zeros(1, 1, SIDE, SIDE))
