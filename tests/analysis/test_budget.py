"""The per-phase time budget: a phase past it stops with an error naming the phase, the
node it was at and the slowest step, instead of running for minutes."""
from __future__ import annotations

import time

import pytest
import torch

import graphprune as gp
from graphprune.analysis.budget import PhaseBudget, budget_seconds
from graphprune.errors import TimeBudgetError
from graphprune.ops.catalog import canonical_aten, rule_for

from .test_failures import Mlp  # the same two-layer MLP the failure tests break


def test_a_slow_rule_stops_the_analysis_with_its_node_named(monkeypatch: pytest.MonkeyPatch) -> None:
    relu = rule_for(canonical_aten("relu"))
    slow = type(relu).propagate

    def crawl(self: object, node: object, lab: object) -> None:
        time.sleep(0.3)
        slow(self, node, lab)
    monkeypatch.setattr(type(relu), "propagate", crawl)
    monkeypatch.setenv("GRAPHPRUNE_PHASE_BUDGET_S", "0.2")
    with pytest.raises(TimeBudgetError, match="'propagate' ran past its budget") as info:
        gp.trace(Mlp(), torch.randn(1, 6), verify=False)
    assert "relu" in str(info.value) and info.value.source.endswith("Mlp")
    monkeypatch.setenv("GRAPHPRUNE_PHASE_BUDGET_S", "0")  # off: the same slow rule finishes
    assert gp.trace(Mlp(), torch.randn(1, 6), verify=False).groups


def test_the_budget_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHPRUNE_PHASE_BUDGET_S", "soon")
    with pytest.raises(TimeBudgetError, match="not a number"):
        budget_seconds()
    monkeypatch.delenv("GRAPHPRUNE_PHASE_BUDGET_S")
    assert budget_seconds() == 120.0
    budget = PhaseBudget("solve", seconds=10.0)
    with budget.step("round 0", "couplings"):
        pass
    assert budget.slowest[1] == "round 0"
