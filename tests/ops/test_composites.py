"""Composite ATen ops (``reshape_as``, ``view_as``, ``expand_as``, ``type_as``, ``flatten``,
``unflatten``...) reach the registry as the core ops they are made of, through the recorder
and through ``torch.export`` alike (:func:`graphprune.ops.catalog.decomposes`,
:mod:`graphprune.frontends.composites`).  As unknown ops each was a barrier that kept every
channel of the block around it (library code writes ``x.reshape_as(shortcut)``)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.ops.catalog import decomposes
from tests.helpers import check_zero_invariance

SUGAR = {"reshape_as", "view_as", "expand_as", "type_as", "flatten", "unflatten"}


def packets(g: gp.PrunableGraph) -> set[str]:
    return {n.source_op.split(".")[1] for n in g.ir.nodes}


class LinearBlock(nn.Module):
    """Two branches meet through ``reshape_as`` (or ``view_as``): [b, 16] to the other's [b, 1, 16]."""

    def __init__(self, view: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 4)
        self.view = view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, h = self.fc2(x).unsqueeze(1), torch.relu(self.fc1(x))
        return self.fc3((h.view_as(y) if self.view else h.reshape_as(y)) + y)


class ConvBlock(nn.Module):
    """A residual block whose branch is flattened and brought back with ``reshape_as``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.norm, self.head = nn.LayerNorm(8 * 6 * 6), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        h = self.norm(self.conv(s).flatten(1))
        return self.head(torch.relu(h.reshape_as(s)) + s)


class MergedHeads(nn.Module):
    """``reshape_as`` merging the heads of [b, t, 2, 8] into the hidden axis of another
    projection's [b, t, 16]."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.out = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.q(x).reshape(*x.shape[:2], 2, 8), self.k(x)
        return self.out((q * 2).reshape_as(k) + k)


@pytest.mark.parametrize("model,x", [(LinearBlock(), torch.randn(3, 8)), (LinearBlock(view=True), torch.randn(3, 8)),
                                     (MergedHeads(), torch.randn(2, 5, 16)), (ConvBlock(), torch.randn(2, 3, 6, 6))],
                         ids=["linear", "view_as", "heads", "conv"])
def test_reshape_as_is_no_barrier_and_compact_equals_zeroed(model: nn.Module, x: torch.Tensor) -> None:
    torch.manual_seed(0)
    g = check_zero_invariance(model.eval(), (x,))
    assert not g.barriers
    assert not packets(g) & SUGAR


def test_reshape_as_onto_a_fixed_shape_keeps_its_channels() -> None:
    """``other`` that cannot shrink (the model's input) keeps the output's axes whole."""
    class OntoInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).reshape(*x.shape[:2], 2, 8).reshape_as(x) + x

    g = gp.trace(OntoInput().eval(), (torch.randn(2, 5, 16),))
    assert not g.groups and not g.barriers


def test_reshape_as_couples_the_output_with_the_shape_giver() -> None:
    """The output and ``other`` lose the same hidden entries: fc1's and fc2's units are one."""
    g = gp.trace(LinearBlock().eval(), (torch.randn(3, 8),))
    (group,) = g.groups
    assert {"fc1.weight", "fc2.weight", "fc3.weight"} <= set(group.param_names) and group.size == 16


class Broadcast(nn.Module):
    """``expand_as``: a per-channel gate [b, 16, 1] broadcast to the tokens of [b, 16, 5]."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.value, self.out = nn.Linear(8, 16), nn.Conv1d(8, 16, 1), nn.Conv1d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.value(x)                                   # [b, 16, 5]
        g = torch.relu(self.gate(x.mean(-1))).unsqueeze(-1)  # [b, 16, 1]
        return self.out(g.expand_as(v) + v)


def test_expand_as_is_no_barrier_and_compact_equals_zeroed() -> None:
    torch.manual_seed(0)
    g = check_zero_invariance(Broadcast().eval(), (torch.randn(2, 8, 5),))
    assert not g.barriers and "expand" in packets(g) and not packets(g) & SUGAR
    (group,) = g.groups
    assert {"gate.weight", "value.weight", "out.weight"} <= set(group.param_names) and group.size == 16


class Sugar(nn.Module):
    """Every composite the issue names, in one block: ``type_as``, ``flatten``, ``unflatten``,
    ``expand_as``, ``reshape_as``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 16, 10)
        self.scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = (h * self.scale.expand_as(h)).type_as(x).flatten(2).unflatten(2, (4, 4))
        return self.fc(torch.relu(h.reshape_as(h.clone())).flatten(1))


@pytest.mark.parametrize("recorder", [True, False], ids=["recorder", "export"])
@pytest.mark.parametrize("batch", [1, 2])
def test_both_frontends_record_the_same_core_ops(recorder: bool, batch: int) -> None:
    """The recorder and ``torch.export`` (static at batch 1, dynamic batch at 2) give the
    same op sequence with no composite left, one group of the conv's 8 filters, and a
    compact model equal to the zeroed one at another batch size."""
    model, x = Sugar().eval(), torch.randn(batch, 3, 4, 4)
    g = gp.trace(model, (x,), recorder=recorder)
    assert [n.source_op.split(".")[1] for n in g.ir.nodes] == \
        ["conv2d", "expand", "mul", "to", "view", "view", "clone", "reshape", "relu", "view", "linear"]
    assert not g.barriers and [grp.size for grp in g.groups] == [8]
    check_zero_invariance(model, (torch.randn(batch, 3, 4, 4),))


def test_the_registry_keeps_whole_only_the_composites_it_names() -> None:
    aten = torch.ops.aten
    assert all(decomposes(op) for op in (aten.reshape_as.default, aten.view_as.default, aten.expand_as.default,
                                         aten.type_as.default, aten.flatten.using_ints, aten.unflatten.int))
    assert not any(decomposes(op) for op in (aten.conv2d.default, aten.linear.default, aten.layer_norm.default,
                                             aten.scaled_dot_product_attention.default, aten.view.default))


class FlattenBatch(nn.Module):
    """``flatten(0, 1)`` folds the batch into another axis: with a dynamic batch its view
    size is ``batch * 4``, which export's graph must compute from the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)).flatten(0, 1))


def test_a_flatten_of_the_dynamic_batch_decomposes_in_export_too() -> None:
    model, x = FlattenBatch().eval(), torch.randn(2, 4, 6)
    recorded, exported = gp.trace(model, (x,)), gp.trace(model, (x,), recorder=False)
    assert packets(recorded) == packets(exported) and not packets(exported) & SUGAR
    g = check_zero_invariance(model, (torch.randn(3, 4, 6),))
    assert [grp.size for grp in g.groups] == [16]
