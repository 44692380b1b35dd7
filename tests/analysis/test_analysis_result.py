"""An analysis is a value computed from the graph: it never writes into the graph it reads."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from graphprune.analysis import Analysis, analyse
from graphprune.frontends.torch_export import export_model, from_exported
from graphprune.frontends.torch_record import record


class ConstantIndex(nn.Module):
    """An index built from a constant inside forward: its lift_fresh(_copy) is folded."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.tensor([3, 1, 0, 2, 7, 6, 5, 4])
        return self.b(self.a(x)[..., idx])


@pytest.mark.parametrize("frontend", ["record", "export"])
def test_analysis_folds_constants_without_writing_into_the_graph(frontend: str) -> None:
    model, x = ConstantIndex().eval(), torch.randn(2, 6)
    ir = record(model, (x,), {}) if frontend == "record" else from_exported(export_model(model, (x,), {}, None), model)
    before = {name: v.data for name, v in ir.values.items()}
    analysis = analyse(ir)
    assert analysis.labels.folded, "nothing folded: the model no longer exercises constant folding"
    assert all(ir.values[name].data is data for name, data in before.items())
    for name, t in analysis.labels.folded.items():
        assert ir.values[name].kind == "act" and torch.equal(analysis.labels.data(name), t)
    # a second analysis of the same graph finds the same
    again = analyse(ir)
    assert again.labels.folded.keys() == analysis.labels.folded.keys()
    assert torch.equal(again.comp, analysis.comp)


def test_an_analysis_cannot_be_changed_in_place() -> None:
    model, x = ConstantIndex().eval(), torch.randn(2, 6)
    analysis = analyse(record(model, (x,), {}))
    assert isinstance(analysis, Analysis) and isinstance(analysis.groups, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        analysis.comp = torch.zeros(1)
    assert analysis.liveness is analysis.liveness  # derived once, from this analysis


def test_producers_map_every_node_output_and_nothing_else() -> None:
    ir = record(ConstantIndex().eval(), (torch.randn(2, 6),), {})
    producers = ir.producers()
    assert {o for n in ir.nodes for o in n.outputs} == set(producers)
    assert all(o in producers[o].outputs for o in producers)
    assert not set(producers) & ({*ir.inputs} | {n for n, v in ir.values.items() if v.fixed})
    users = ir.users()
    assert all(producers[v] is not n for v, ns in users.items() if v in producers for n in ns)


def test_unit_map_translates_a_renumbering_and_refuses_other_groups() -> None:
    """Two captures of one model may number their units differently (one holds extra ops on
    unlabelled tensors); the same groups then map unit to unit, other groups do not map."""
    from graphprune.analysis import unit_map

    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    groups = analyse(record(model, (torch.randn(2, 6),), {})).groups
    assert [g.size for g in groups] == [8, 5]
    shifted = [dataclasses.replace(g, atoms=g.atoms + 100 * (k + 1)) for k, g in enumerate(groups)]
    table = unit_map(groups, shifted)
    for g, h in zip(groups, shifted):
        assert torch.equal(table[g.atoms], h.atoms)
    assert unit_map(groups, shifted[:1]) is None
    other = dataclasses.replace(shifted[0], slices=[dataclasses.replace(s, index=s.index.flip(0))
                                                    for s in shifted[0].slices])
    assert unit_map(groups, [other, shifted[1]]) is None
