"""Ops that mix entries along some axes pass the channel axis through (values and indices):
top-k, sort, cumulative sums, grid sampling, scatters (:mod:`graphprune.ops.along_axis`,
:mod:`graphprune.ops.scatter`); along the channel axis they are barriers with a reason.
And the elementwise entries' zero facts (``keeps_zero``) agree with the functions."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graphprune as gp
from graphprune.ops.catalog import onnx_op
from graphprune.ops.elementwise import ONNX_UNARY, ZERO_PRESERVING
from tests.frontends.test_onnx import check_onnx, export
from tests.helpers import check_zero_invariance

F = nn.functional


class Block(nn.Module):
    """conv -> ``mix`` (over spatial positions) -> conv: the first conv's filters are one group
    only if ``mix`` passes channels."""

    def __init__(self, mix) -> None:
        super().__init__()
        self.a, self.b, self.mix = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), mix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.mix(torch.relu(self.a(x))))


def topk(y: torch.Tensor) -> torch.Tensor:  # k largest per channel, and where they are
    v, i = y.flatten(2).topk(6, dim=-1)
    return (v * (i.float() + 1)).reshape(y.shape[0], y.shape[1], 2, 3)


def sort(y: torch.Tensor) -> torch.Tensor:
    return y.sort(dim=-1, descending=True).values - y.sort(dim=2).values


def cumsum(y: torch.Tensor) -> torch.Tensor:
    return y.cumsum(dim=3)


def grid_sample(y: torch.Tensor) -> torch.Tensor:
    grid = torch.linspace(-1, 1, 2 * 5 * 2).reshape(1, 5, 2, 2).expand(y.shape[0], 5, 2, 2)
    return F.grid_sample(y, grid, align_corners=False)


def scatter(y: torch.Tensor) -> torch.Tensor:  # keep each channel's top positions, zero the rest
    flat = y.flatten(2)
    v, i = flat.topk(4, dim=-1)
    return torch.zeros_like(flat).scatter(2, i, v).reshape(y.shape)


MIXES = {"topk": topk, "sort": sort, "cumsum": cumsum, "grid_sample": grid_sample, "scatter": scatter}


@pytest.mark.parametrize("name", sorted(MIXES))
def test_pytorch_channels_pass(name: str) -> None:
    torch.manual_seed(0)
    g = check_zero_invariance(Block(MIXES[name]).eval(), (torch.randn(2, 3, 6, 6),))
    assert not g.barriers
    assert {s[0] for s in g.groups[0].param_slices(0)} == {"a.weight", "a.bias", "b.weight"}


@pytest.mark.parametrize("name", ["topk", "cumsum", "grid_sample"])  # scatter: into ConstantOfShape(Shape(x))
def test_onnx_channels_pass(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 6, 6)
    g = check_onnx(export(Block(MIXES[name]), x, tmp_path / "m.onnx"), x)
    assert not g.barriers


def test_topk_over_channels_is_a_barrier_with_its_reason() -> None:
    def over_channels(y: torch.Tensor) -> torch.Tensor:
        return y.topk(8, dim=1).values
    g = gp.trace(Block(over_channels).eval(), (torch.randn(2, 3, 6, 6),))
    assert not g.groups
    assert [b.reason for b in g.barriers] == ["selects/sorts along the channel axis: which entries it keeps "
                                              "depends on every channel's values"]


def test_scatter_into_a_buffer_is_a_barrier_that_says_so() -> None:
    class Into(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("canvas", torch.zeros(2, 8, 36))
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv1d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = self.a(x).flatten(2)
            v, i = flat.topk(4, dim=-1)
            return self.b(self.canvas.scatter(2, i, v))
    g = gp.trace(Into().eval(), (torch.randn(2, 3, 6, 6),))
    assert not g.groups
    assert any("parameter, buffer or constant" in b.reason for b in g.barriers)


# bounds or attributes decide these (in keeps_zero), or they are no float function of x alone
_DECIDED_ELSEWHERE = {"Clip", "Shrink", "Cast", "CastLike", "Not", "BitwiseNot", "IsNaN", "IsInf"}


@pytest.mark.parametrize("op", sorted(set(ONNX_UNARY) - _DECIDED_ELSEWHERE))
def test_onnx_unary_zero_facts_match_the_function(op: str) -> None:
    """A unary entry says f(0) = 0 exactly when its torch implementation gives 0 at 0
    (saying so wrongly would break zero-invariance; not saying so loses pruning)."""
    claimed = op in ZERO_PRESERVING
    out = onnx_op(op).torch(torch.zeros(3))
    out = out[0] if isinstance(out, tuple) else out
    maps_zero = bool((out == 0).all())
    assert claimed == maps_zero, f"{op}: f(0) = {out.tolist()}, entry says zero-preserving: {claimed}"


@pytest.mark.parametrize("name", ["acos", "acosh", "asin", "asinh", "atan", "atanh", "cosh", "sinh", "tan",
                                  "expm1", "log2", "log10", "log1p", "erf", "sign"])
def test_aten_unary_zero_facts_match_the_function(name: str) -> None:
    maps_zero = bool((getattr(torch, name)(torch.zeros(3)) == 0).all())
    assert (name in ZERO_PRESERVING) == maps_zero


class TopQueries(nn.Module):
    """A detector's decoder keeps its k best queries: scores -> top-k over the query axis ->
    the queries' hidden vectors indexed by those (computed) indices -> a head.  The hidden
    channels pass through the selection."""

    def __init__(self, gather: str) -> None:
        super().__init__()
        self.embed, self.score, self.head = nn.Linear(6, 16), nn.Linear(16, 1), nn.Linear(16, 4)
        self.gather = gather

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.embed(x))                           # [b, queries, hidden]
        idx = self.score(x @ torch.ones(6, 16)).squeeze(-1).topk(3, dim=1).indices  # [b, 3]
        if self.gather == "index":
            picked = h[torch.arange(h.shape[0])[:, None], idx]  # aten.index
        else:
            picked = h.index_select(1, idx[0])                  # aten.index_select
        return self.head(picked)


@pytest.mark.parametrize("gather", ["index", "index_select"])
def test_queries_selected_by_computed_indices_keep_their_channels(gather: str) -> None:
    torch.manual_seed(0)
    g = check_zero_invariance(TopQueries(gather).eval(), (torch.randn(2, 7, 6),))
    assert not g.barriers
    assert {"embed.weight", "head.weight"} <= {s[0] for grp in g.groups for s in grp.param_slices(0)}


def test_onnx_gather_by_computed_indices_keeps_channels(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 7, 6)
    g = check_onnx(export(TopQueries("index_select"), x, tmp_path / "m.onnx"), x)
    assert not g.barriers
