"""Per-unit norms and zero masks read from shared per-row statistics (``row_stat``) are
what gathering every slice of the unit gives: the statistics of a weight's rows and
columns are computed together and cached for the other groups that cut it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graphprune as gp


class ConvMlp(nn.Module):
    """Convolutions (4-D weights, cut along outputs and inputs) into linear layers (2-D
    weights cut along both dims by two groups each)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3)
        self.l1, self.l2, self.l3 = nn.Linear(6, 12), nn.Linear(12, 10), nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3))
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(h)))))


@pytest.fixture(scope="module")
def traced() -> gp.PrunableGraph:
    torch.manual_seed(0)
    g = gp.trace(ConvMlp().eval(), torch.randn(1, 3, 8, 8), verify=False)
    assert len(g.groups) >= 3
    return g


@pytest.mark.parametrize("p", [1.0, 2.0, float("inf")])
def test_norms_from_shared_rows_are_the_gathered_norms(traced: gp.PrunableGraph, p: float) -> None:
    rows: dict = {}  # one cache for every group, as the scorers share it
    for grp in traced.groups:
        want = grp.gather(traced.params).to(torch.float32).norm(p=p, dim=1)
        torch.testing.assert_close(grp.norms(traced.params, p=p, rows=rows), want, rtol=1e-5, atol=1e-6)


def test_zero_masks_from_shared_rows_are_the_gathered_ones(traced: gp.PrunableGraph) -> None:
    gen = torch.Generator().manual_seed(1)
    masks = [torch.rand(grp.size, generator=gen) < 0.5 for grp in traced.groups]
    tensors = traced.zeroed_copy(zip(traced.groups, masks))
    first = traced.groups[0]
    unit = int(masks[0].nonzero()[0]) if masks[0].any() else 0
    s = first.slices[-1]  # a NaN in a zeroed unit's slice makes the unit nonzero
    tensors[s.param] = tensors[s.param].clone().index_fill_(s.dim, s.index[unit, :1], float("nan"))
    got = traced.zero_masks(tensors)
    for grp, m in zip(traced.groups, got):
        gathered = grp.gather(tensors)
        assert torch.equal(m, ~(gathered != 0).any(dim=1)), grp.name
    assert not bool(got[0][unit])
