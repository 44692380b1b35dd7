"""Uniform selection: the groups of one role lose the same number of units, each its own
lowest-scoring ones, and the target is still met."""
from __future__ import annotations

import pytest
import torch

import graphprune as gp
from graphprune.optim.uniform import role, select_uniform
from graphprune.target import achieved


class Stack(torch.nn.Module):
    """Three layers of the same MLP block between a fixed-width stem and head."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.ReLU(),
                                                              torch.nn.Linear(24, 8)) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_role_masks_layer_numbers_only() -> None:
    torch.manual_seed(0)
    g = gp.trace(Stack(), (torch.randn(2, 8),))
    mlp = [grp for grp in g.groups if grp.size == 24]
    assert len(mlp) == 3 and len({role(grp) for grp in mlp}) == 1
    assert role(mlp[0])[4] == "layers.#.#"  # every number: a Sequential's index too


@pytest.mark.parametrize("seed", range(3))
def test_same_count_per_role_lowest_scores_and_target_met(seed: int) -> None:
    torch.manual_seed(seed)
    g = gp.trace(Stack(), (torch.randn(2, 8),))
    gen = torch.Generator().manual_seed(seed)
    scores = [torch.rand(grp.size, generator=gen) for grp in g.groups]
    totals = dict(total_params=g.total_params, params=g.params)
    masks = select_uniform(g.groups, scores, gp.Target(params=0.3), **totals)
    by_role: dict[tuple, set[int]] = {}
    for grp, s, m in zip(g.groups, scores, masks):
        by_role.setdefault(role(grp), set()).add(int(m.sum()))
        if m.any() and not m.all():
            assert s[m].max() <= s[~m].min()  # each group drops its own lowest-scoring units
    assert all(len(c) == 1 for c in by_role.values())
    assert achieved(g.groups, masks, **totals)["params"] >= 0.3
