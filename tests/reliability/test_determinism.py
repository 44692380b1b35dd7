"""The same seed gives the same groups, masks and compact model, bit for bit."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision

import graphprune as gp


def _run(seed: int) -> tuple[list, list[torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=4)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,))
    g = gp.trace(model, x[:2])
    opt = gp.HESSO(g, lr=0.01, target=gp.Target(flops=0.3), warmup_steps=2, pruning_steps=6, pruning_periods=2)
    for _ in range(10):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    groups = [(grp.name, grp.size, [(s.param, s.dim, s.index.tolist()) for s in grp.slices]) for grp in g.groups]
    return groups, g.zero_masks(), g.construct_subnet().state_dict()


def test_same_seed_same_everything():
    torch.set_num_threads(1)
    a, b = _run(0), _run(0)
    assert a[0] == b[0]
    assert all(torch.equal(m, n) for m, n in zip(a[1], b[1])) and any(m.any() for m in a[1])
    assert a[2].keys() == b[2].keys()
    assert all(torch.equal(a[2][k], b[2][k]) for k in a[2])
