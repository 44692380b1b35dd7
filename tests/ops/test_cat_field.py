"""``cat`` of inputs labelled along the concatenated axis alone takes its output field
from the inputs' fields (:func:`graphprune.ops.movement._cat_field`) instead of running
on label tensors: the groups must be those the run finds, whatever mix of labelled,
unlabelled, repeated and otherwise-labelled inputs the concatenation has."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from graphprune.analysis import analyse, same_groups
from graphprune.frontends.torch_record import record
from graphprune.ops import movement
from tests.helpers import check_zero_invariance


class Mixed(nn.Module):
    """Channel concatenations of convolutions, of the input (no atoms), of one tensor twice,
    and a concatenation along the width of a tensor labelled along channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(7, 5, 1)
        self.c = nn.Conv2d(15, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.relu(self.a(x)), x], 1)             # labelled + unlabelled
        g = torch.relu(self.b(h))
        h = torch.cat([g, h, g.flip(1)[:, :3]], 1)               # repeated producer, a slice
        out = self.c(h)
        return torch.cat([out, out], 3).mean((2, 3))             # along the width


def _both(model: nn.Module, x: torch.Tensor, monkeypatch) -> tuple:
    ir = record(model.eval(), (x,), {})
    fast = analyse(ir)
    monkeypatch.setattr(movement, "_cat_field", lambda *a: None)
    slow = analyse(ir)
    monkeypatch.undo()
    return fast, slow


@pytest.mark.parametrize("make", [lambda: (Mixed(), torch.randn(2, 3, 6, 6)),
                                  lambda: (torchvision.models.densenet121(num_classes=5), torch.randn(2, 3, 32, 32))],
                         ids=["mixed", "densenet121"])
def test_cat_fields_are_what_running_cat_on_labels_gives(make, monkeypatch) -> None:
    model, x = make()
    fast, slow = _both(model, x, monkeypatch)
    assert fast.groups and same_groups(fast.groups, slow.groups, fast.comp, slow.comp)
    assert sorted(b.op for b in fast.labels.barriers) == sorted(b.op for b in slow.labels.barriers)


def test_cat_fields_keep_zero_invariance() -> None:
    check_zero_invariance(Mixed(), torch.randn(2, 3, 6, 6))
