"""Operator erasure: whole residual branches are H2SPG candidates, the skip path stays."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision

import graphprune as gp


def test_hierarchy_is_the_residual_branches():
    g = gp.trace(torchvision.models.resnet18(num_classes=4), torch.randn(2, 3, 32, 32), verify=False)
    names = [g.groups[i].name for i in g.hierarchy]
    assert names == [f"layer{s}.{b}.conv1" for s in (1, 2, 3, 4) for b in (0, 1)]
    stem = next(i for i, grp in enumerate(g.groups) if grp.name == "conv1")
    masks = [torch.zeros(grp.size, dtype=torch.bool) for grp in g.groups]
    masks[stem][:] = True
    assert not g.stays_connected(masks)  # the residual stream itself cannot go


def test_h2spg_erases_branches_and_keeps_the_skip_path():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    g = gp.trace(model, x[:2], verify=False)
    opt = gp.H2SPG(g, lr=0.01, target=gp.Target(flops=0.15), candidates=g.hierarchy, warmup_steps=1,
                   pruning_steps=4)
    for _ in range(8):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    erased = [grp.name for grp, m in zip(g.groups, g.zero_masks()) if bool(m.all())]
    assert erased and all(n.endswith("conv1") and n.startswith("layer") for n in erased)
    compact = g.construct_subnet()
    convs = lambda m: sum(n.target is torch.ops.aten.conv2d.default for n in m.gm.graph.nodes)  # noqa: E731
    assert convs(compact) == convs(g.backend.full(g, g.params)) - 2 * len(erased)  # both convs of each branch
    model.eval()
    with torch.no_grad():
        assert torch.allclose(compact(x), model(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(compact(x), compact(torch.randn_like(x)))
