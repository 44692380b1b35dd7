"""Failures are typed: a rule or a check that raises is a bug surfaced as an error naming
node, op and file, distinct from an op that is knowingly a barrier and from a group that
fails the numeric check (withdrawn and reported)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.analysis.labels import Labels
from graphprune.errors import RuleError, VerificationError
from graphprune.ir.graph import Node
from graphprune.ops.catalog import canonical_aten, rule_for


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_a_rule_that_raises_is_an_error_naming_node_op_and_file(monkeypatch: pytest.MonkeyPatch) -> None:
    relu = rule_for(canonical_aten("relu"))

    def broken(self: object, node: Node, lab: Labels) -> None:
        raise IndexError("tuple index out of range")
    monkeypatch.setattr(type(relu), "propagate", broken)
    with pytest.raises(RuleError) as info:
        gp.trace(Mlp(), torch.randn(3, 6), verify=False)
    err = info.value
    assert err.node and "relu" in err.node and "relu" in err.op
    assert err.source.endswith("Mlp") and "IndexError: tuple index out of range" in str(err)
    assert "graphprune/ops/" in str(err)  # the file of the rule to fix
    assert isinstance(err.__cause__, IndexError)


def test_a_rule_that_declares_a_barrier_is_a_reported_barrier(monkeypatch: pytest.MonkeyPatch) -> None:
    relu = rule_for(canonical_aten("relu"))

    def keep(self: object, node: Node, lab: Labels) -> None:
        lab.barrier(node, "test: channels kept on purpose")
    monkeypatch.setattr(type(relu), "propagate", keep)
    g = gp.trace(Mlp(), torch.randn(3, 6))
    assert [b.reason for b in g.barriers] == ["test: channels kept on purpose"]
    assert "relu" in g.barriers[0].op and "channels kept on purpose" in g.summary()


def test_a_check_that_raises_is_an_error_not_a_withdrawn_group(monkeypatch: pytest.MonkeyPatch) -> None:
    g = gp.trace(Mlp(), torch.randn(3, 6), verify=False)
    assert g.groups

    def broken(pg: object, tensors: object) -> float:
        raise KeyError("fc.weight")
    monkeypatch.setattr(g.backend, "compare", broken)
    with pytest.raises(VerificationError, match="KeyError") as info:
        g.verify()
    assert info.value.source.endswith("Mlp") and g.groups and not g.withdrawn


def test_a_group_that_fails_the_numeric_check_is_withdrawn_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    g = gp.trace(Mlp(), torch.randn(3, 6), verify=False)
    bad = g.groups[0]

    def compare(pg: gp.PrunableGraph, tensors: dict[str, torch.Tensor]) -> float:
        touched = any(bool((tensors[s.param] == 0).any()) for s in bad.slices)
        return 1.0 if touched else 0.0
    monkeypatch.setattr(g.backend, "compare", compare)
    withdrawn = g.verify()
    assert [w.id for w, _ in withdrawn] == [bad.id] and bad not in g.groups
    assert "rel. error" in withdrawn[0][1] and bad.name in g.summary()
