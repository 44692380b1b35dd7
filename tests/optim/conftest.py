"""Fixtures for the optimizer tests: the hand-built stand-in graph and digits data."""
from __future__ import annotations

import pytest
import torch

from tests.optim.optim_standin import Net, digits, graph

torch.set_num_threads(1)  # 2 small cores: one thread is several times faster than two here


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.fixture
def g(net: Net):
    return graph(net)


@pytest.fixture(scope="session")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return digits()
