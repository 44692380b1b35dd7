"""Stand-in traced graphs for the one-shot tests, and digits data.

The tests run on two small models twice: traced by ``gp.trace`` and as stand-ins whose
groups (slices with the roles the op rules would give them) are written out by hand: a conv-bn-relu-conv-bn-linear net (the second group's consumer
is a linear layer after a flatten, so each unit owns 16 columns) and a 2-hidden-layer
MLP.  ``construct_subnet`` slices the kept units out and loads them into a fresh model
of the compact widths, as the real one will.
"""
from __future__ import annotations

import types
from typing import Callable

import pytest
import torch
from torch import nn

from graphprune.analysis.groups import Group, Slice

SIDE = 8  # sklearn digits are 8x8


class ConvNet(nn.Module):
    def __init__(self, c1: int = 8, c2: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.fc = nn.Linear(c2 * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(nn.functional.avg_pool2d(x, 2).flatten(1))

    def widths(self) -> tuple[int, int]:
        return self.conv1.out_channels, self.conv2.out_channels


class MLP(nn.Module):
    def __init__(self, h1: int = 64, h2: int = 48, inputs: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(inputs, h1), nn.Linear(h1, h2), nn.Linear(h2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))

    def widths(self) -> tuple[int, int]:
        return self.fc1.out_features, self.fc2.out_features


def _rows(n: int) -> torch.Tensor:
    return torch.arange(n).reshape(n, 1)


def conv_groups(m: ConvNet) -> list[Group]:
    c1, c2 = m.widths()
    hw, classes = SIDE * SIDE, m.fc.out_features
    return [
        Group(0, "conv1", "channel", c1,
              [Slice("conv1.weight", 0, _rows(c1), role="producer", bias="conv1.bias"),
               Slice("conv1.bias", 0, _rows(c1)),
               Slice("bn1.weight", 0, _rows(c1), role="norm", bias="bn1.bias"), Slice("bn1.bias", 0, _rows(c1)),
               Slice("conv2.weight", 1, _rows(c1), role="consumer", bias="conv2.bias")],
              params_per_unit=9 + 1 + 2 + 9 * c2, flops_per_unit=float(hw * (9 + 9 * c2))),
        Group(1, "conv2", "channel", c2,
              [Slice("conv2.weight", 0, _rows(c2), role="producer", bias="conv2.bias"),
               Slice("conv2.bias", 0, _rows(c2)),
               Slice("bn2.weight", 0, _rows(c2), role="norm", bias="bn2.bias"), Slice("bn2.bias", 0, _rows(c2)),
               Slice("fc.weight", 1, torch.arange(c2 * 16).reshape(c2, 16), role="consumer", bias="fc.bias")],
              params_per_unit=9 * c1 + 3 + 16 * classes, flops_per_unit=float(hw * 9 * c1 + 16 * classes)),
    ]


def mlp_groups(m: MLP) -> list[Group]:
    h1, h2 = m.widths()
    n_in, classes = m.fc1.in_features, m.fc3.out_features
    return [
        Group(0, "fc1", "feature", h1,
              [Slice("fc1.weight", 0, _rows(h1), role="producer", bias="fc1.bias"), Slice("fc1.bias", 0, _rows(h1)),
               Slice("fc2.weight", 1, _rows(h1), role="consumer", bias="fc2.bias")],
              params_per_unit=n_in + 1 + h2, flops_per_unit=float(n_in + h2)),
        Group(1, "fc2", "feature", h2,
              [Slice("fc2.weight", 0, _rows(h2), role="producer", bias="fc2.bias"), Slice("fc2.bias", 0, _rows(h2)),
               Slice("fc3.weight", 1, _rows(h2), role="consumer", bias="fc3.bias")],
              params_per_unit=h1 + 1 + classes, flops_per_unit=float(h1 + classes)),
    ]


def conv_flops(c1: int, c2: int, classes: int = 10) -> float:
    return float(SIDE * SIDE * (9 * c1 + 9 * c1 * c2) + 16 * c2 * classes)


def mlp_flops(h1: int, h2: int, n_in: int = 64, classes: int = 10) -> float:
    return float(n_in * h1 + h1 * h2 + h2 * classes)


def zero_units(groups: list[Group], params: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Units whose every slice is exactly zero: what ``construct_subnet`` removes."""
    with torch.no_grad():
        return [g.gather(params).abs().amax(dim=1) == 0 for g in groups]


def _compact_state(model: nn.Module, groups: list[Group], keep: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state with removed units sliced out (norm buffers follow their weight)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for g, kept in zip(groups, keep):
        for s in g.slices:
            idx = s.index[kept].reshape(-1)
            names = [s.param]
            if isinstance(model.get_submodule(s.param.rsplit(".", 1)[0]), nn.BatchNorm2d) and s.param.endswith("weight"):
                stem = s.param[: -len("weight")]
                names += [stem + "running_mean", stem + "running_var"]
            for n in names:
                state[n] = state[n].index_select(s.dim, idx)
    return state


def standin(model: nn.Module, groups_of: Callable, flops_of: Callable) -> types.SimpleNamespace:
    """A graph-like namespace over ``model``: groups, live params, totals, construct_subnet, run."""
    groups = groups_of(model)
    params = dict(model.named_parameters())

    def construct_subnet() -> nn.Module:
        keep = [~z for z in zero_units(groups, params)]
        compact = type(model)(*[int(k.sum()) for k in keep])
        compact.load_state_dict(_compact_state(model, groups, keep))
        return compact.eval()

    return types.SimpleNamespace(
        groups=groups, params=params, model=model, construct_subnet=construct_subnet,
        total_params=sum(p.numel() for p in params.values()), total_flops=flops_of(*model.widths()),
        param_macs={},  # first-order FLOPs accounting: flops_of is the exact check here
        run=lambda *x: model(*x), flops_of=flops_of)


def randomize_norms(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.5)
                m.bias.normal_(0, 0.3)
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits as ``[n, 1, 8, 8]`` floats in [0, 1] and int labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target)


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 8, seed: int = 0) -> nn.Module:
    """A quick Adam fit, enough for ~95% on digits."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


EXAMPLE_BATCH = 32  # the compact module keeps the example's batch size


def traced(model: nn.Module):
    """The real thing: ``gp.trace`` on the same model."""
    import graphprune as gp

    return gp.trace(model, (torch.rand(EXAMPLE_BATCH, 1, SIDE, SIDE),))


MAKERS = {
    "conv": lambda: standin(randomize_norms(ConvNet()), conv_groups, conv_flops),
    "mlp": lambda: standin(MLP().eval(), mlp_groups, mlp_flops),
    "traced-conv": lambda: traced(randomize_norms(ConvNet())),
    "traced-mlp": lambda: traced(MLP().eval()),
}


@pytest.fixture(params=sorted(MAKERS))
def graph(request) -> types.SimpleNamespace:
    torch.manual_seed(0)
    return MAKERS[request.param]()


@pytest.fixture(scope="session")
def trained(digits) -> dict[str, nn.Module]:
    """Both stand-in models trained on the first 1200 digits (held-out: the rest)."""
    x, y = digits
    torch.manual_seed(0)
    return {"conv": train(ConvNet(), x[:1200], y[:1200]), "mlp": train(MLP(), x[:1200], y[:1200])}
