"""One analysis of a graph, as a value: :func:`analyse` computes it, nothing changes it.

A :class:`PrunableGraph` works on one :class:`Analysis` at a time and swaps in another as
a whole (:meth:`PrunableGraph.adopt`), so no reader ever sees the graph of one analysis
with the labels of another, and what is derived from an analysis (its liveness) is cached
on the analysis itself and goes with it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..ir.graph import Graph
from .dependency import propagate, solve
from .grouping import build_groups
from .groups import Group
from .labels import Labels
from .liveness import Liveness


@dataclass(frozen=True, eq=False)
class Analysis:
    """A graph's channel labels, the unit (component) of every atom, and the groups found."""

    ir: Graph
    labels: Labels
    comp: torch.Tensor
    groups: tuple[Group, ...]

    @functools.cached_property
    def liveness(self) -> Liveness:
        """Which activations die once units go (built once per analysis: H2SPG asks often)."""
        return Liveness(self.ir, self.labels, self.comp)


def analyse(ir: Graph) -> Analysis:
    """The whole dependency analysis of ``ir``: rules -> labels -> units -> groups."""
    labels = propagate(ir)
    comp = solve(labels)
    return Analysis(ir, labels, comp, tuple(build_groups(labels, comp)))


def unit_map(a: list[Group] | tuple[Group, ...], b: list[Group] | tuple[Group, ...]) -> torch.Tensor | None:
    """Unit id in ``a``'s numbering -> the same unit's id in ``b``'s, when ``b`` holds ``a``'s
    groups (same ids, sizes, kinds and parameter slices, unit by unit) over another
    numbering; None when the groups differ.  Two graphs of one model number their units
    differently when one holds extra ops on unlabelled tensors (an index table the
    recorder computes and export holds as a constant)."""
    if len(a) != len(b):
        return None
    for g, h in zip(a, b):
        if (g.id, g.size, g.kind) != (h.id, h.size, h.kind) or not _same_slices(g, h):
            return None
    top = max((int(g.atoms.max()) for g in a if g.atoms is not None and g.atoms.numel()), default=-1)
    out = torch.full((top + 1,), -1, dtype=torch.long)
    for g, h in zip(a, b):
        out[g.atoms] = h.atoms
    return out


def _same_slices(g: Group, h: Group) -> bool:
    mine = {(s.param, s.dim, s.dim2): s for s in g.slices}  # slice order follows value names
    theirs = {(s.param, s.dim, s.dim2): s for s in h.slices}
    return mine.keys() == theirs.keys() and all(torch.equal(s.index, theirs[k].index) for k, s in mine.items())


def same_groups(a: list[Group] | tuple[Group, ...], b: list[Group] | tuple[Group, ...],
                comp_a: torch.Tensor, comp_b: torch.Tensor) -> bool:
    """Whether two analyses found the same groups over the same unit numbering."""
    if len(a) != len(b) or not torch.equal(comp_a, comp_b):
        return False
    for g, h in zip(a, b):
        if (g.size, g.kind) != (h.size, h.kind) or not torch.equal(g.atoms, h.atoms) or not _same_slices(g, h):
            return False
    return True
