"""The analysis does work linear in the graph, never in a tensor's element count.

Work is counted, not timed: the atoms the labels create and the (atom, atom) pairs the
rules hand to :meth:`Labels.union` and the pins (every coupling passes through them).
Issue 22's cases: a one-hot matmul against a position table (timm's gemma4 ViT spent
404 s coupling it element by element) and a parameter expanded before a bmm (it got no
labels, so its model had 0 groups).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune as gp
from graphprune.analysis.labels import Labels

from ..helpers import check_zero_invariance


class OneHotPositions(nn.Module):
    """Gemma4's patch embedding: ``one_hot(positions) @ table[2, P, D]`` summed over the
    two coordinates and added to the projected patches."""

    def __init__(self, positions: int = 1024, dim: int = 64) -> None:
        super().__init__()
        self.positions = positions
        self.proj = nn.Linear(12, dim)
        self.table = nn.Parameter(torch.randn(2, positions, dim) * 0.02)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        one_hot = F.one_hot(pos, num_classes=self.positions).permute(0, 2, 1, 3).to(self.table)
        h = self.proj(x) + (one_hot @ self.table).sum(1)
        return self.head(h.relu()).mean(1)


class ExpandedTables(nn.Module):
    """Parameters broadcast over the batch before a bmm (``table.unsqueeze(0).expand(B, ...)``)
    as the second operand and, for learned queries, as the first; ``depth`` such blocks."""

    def __init__(self, dim: int = 8, depth: int = 1) -> None:
        super().__init__()
        self.proj = nn.Linear(5, dim)
        self.tables = nn.ParameterList(nn.Parameter(torch.randn(dim, dim + 2)) for _ in range(depth))
        self.backs = nn.ModuleList(nn.Linear(dim + 2, dim) for _ in range(depth))
        self.query = nn.Parameter(torch.randn(3, dim))
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)                                                   # [B, T, D]
        for table, back in zip(self.tables, self.backs):
            t = table.unsqueeze(0).expand(x.shape[0], -1, -1)              # [B, D, E]
            h = h + back(torch.bmm(h, t).relu())
        q = self.query.unsqueeze(0).expand(x.shape[0], -1, -1)             # [B, 3, D]
        scores = torch.matmul(q, h.transpose(1, 2))                        # [B, 3, T]
        return self.head(h).mean(1) + scores.mean((1, 2)).unsqueeze(-1)


def _counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the elements every coupling and pin hands to the labels."""
    seen = {"pairs": 0}
    union, pin = Labels.union, Labels._pin_np

    def counted_union(self: Labels, a: torch.Tensor, b: torch.Tensor) -> None:
        seen["pairs"] += torch.broadcast_shapes(a.shape, b.shape).numel()
        union(self, a, b)

    def counted_pin(self: Labels, a) -> None:
        seen["pairs"] += a.size
        pin(self, a)
    monkeypatch.setattr(Labels, "union", counted_union)
    monkeypatch.setattr(Labels, "_pin_np", counted_pin)
    return seen


def test_a_one_hot_matmul_against_a_table_is_labelled_per_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _counting(monkeypatch)
    model, positions, dim = OneHotPositions(1024, 64), 1024, 64
    x, pos = torch.randn(2, 48, 12), torch.randint(0, positions, (2, 48, 2))
    g = check_zero_invariance(model, (x, pos))
    lab = g.analysis.labels
    table = 2 * positions * dim
    # per channel: the table's columns join the hidden units, its rows stay (one-hot input)
    assert lab.n_atoms < table // 20, lab.n_atoms
    assert seen["pairs"] < table // 20, seen["pairs"]
    (hidden,) = [grp for grp in g.groups if "table" in grp.param_names]
    assert hidden.size == dim and {s.dim for s in hidden.slices if s.param == "table"} == {2}


def test_a_parameter_expanded_before_a_bmm_gets_its_groups() -> None:
    g = check_zero_invariance(ExpandedTables(), torch.randn(2, 7, 5))
    sliced = {(s.param, s.dim) for grp in g.groups for s in grp.slices}
    # the table's rows go with the hidden units, its columns are a layer's outputs, and
    # the learned queries' rows are the score rows they produce
    assert {("tables.0", 0), ("tables.0", 1), ("query", 0), ("query", 1)} <= sliced
    assert g.why_no_groups is None


def test_analysis_work_grows_linearly_with_depth(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _counting(monkeypatch)
    work = []
    for depth in (4, 8):
        seen["pairs"] = 0
        g = gp.trace(ExpandedTables(dim=16, depth=depth), torch.randn(2, 64, 5), verify=False)
        work.append((len(g.ir.nodes), g.analysis.labels.n_atoms, seen["pairs"]))
    (n4, atoms4, pairs4), (n8, atoms8, pairs8) = work
    assert n8 < 2.2 * n4
    assert atoms8 < 2.2 * atoms4, work
    assert pairs8 < 2.2 * pairs4, work


def test_an_expanded_parameter_in_onnx_gets_its_groups(tmp_path) -> None:
    """The same through ONNX's Unsqueeze/Expand (a batch computed at run time), checked
    at another batch size than the traced one."""
    from ..frontends.test_onnx import check_onnx, export
    x = torch.randn(2, 7, 5)
    g = check_onnx(export(ExpandedTables(), x, tmp_path / "expanded.onnx"), x)
    assert len(g.groups) == 3


class NothingPrunable(nn.Module):
    """Two parameters whose channels something other than the output keeps: no output
    carries channels (the sums reduce them away)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))
        self.t = nn.Parameter(torch.randn(6, 4))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        rows = F.one_hot(pos, 6).float() @ self.t
        return ((x * self.w) @ rows.transpose(1, 2)).sum((1, 2))


def test_no_groups_is_explained_by_what_the_analysis_found() -> None:
    g = gp.trace(NothingPrunable(), (torch.randn(2, 3, 4), torch.randint(0, 6, (2, 5))), verify=False)
    assert not g.groups and not g.barriers
    why = g.why_no_groups
    assert "(w, t)" in why and "no model output carries channels" in why, why
    assert "model input" not in why
