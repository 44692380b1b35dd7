"""Zero-invariant groups (ZIGs): the unit of structured pruning.

A :class:`Group` has ``size`` units.  Every unit owns the same *kinds* of parameter
slices (one :class:`Slice` per (parameter, dim)), so a group is stored as dense
index tables of shape ``[size, count]``: optimizers can gather a whole group into one
``[size, n]`` matrix with ``index_select`` instead of looping over units.

Contract (checked by the property tests): if every slice of a unit is zero, removing
the unit from the model (the compact model) leaves the output unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Slice:
    """Rows ``index[u]`` along ``dim`` of parameter ``param`` belong to unit ``u``."""

    param: str
    dim: int
    index: torch.Tensor  # LongTensor [size, count]


@dataclass
class Group:
    """A zero-invariant group of ``size`` units.

    ``kind`` says what a unit is ("channel", "head", "feature", ...), ``name`` where it
    lives (the producing layer, in the user's module names).  ``params_per_unit`` and
    ``flops_per_unit`` are what removing one unit saves (FLOPs as multiply-accumulates
    at the example input's shape), for parameter- and FLOPs-targeted budgets.
    """

    id: int
    name: str
    kind: str
    size: int
    slices: list[Slice]
    params_per_unit: int = 0
    flops_per_unit: float = 0.0
    atoms: torch.Tensor | None = field(default=None, repr=False)  # analysis-internal unit ids

    def param_slices(self, unit: int) -> list[tuple[str, int, list[int]]]:
        """``[(param_name, dim, indices)]`` of one unit, in the user's parameter names."""
        if not 0 <= unit < self.size:
            raise IndexError(f"unit {unit} out of range for group {self.id} of size {self.size}")
        return [(s.param, s.dim, s.index[unit].tolist()) for s in self.slices]

    @property
    def param_names(self) -> list[str]:
        return sorted({s.param for s in self.slices})

    def gather(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """All slices of every unit as one ``[size, n]`` matrix (a view-free copy)."""
        cols = []
        for s in self.slices:
            p = params[s.param]
            rows = p.movedim(s.dim, 0)[s.index.to(p.device).reshape(-1)]
            cols.append(rows.reshape(self.size, -1))
        return torch.cat(cols, dim=1)

    def norms(self, params: dict[str, torch.Tensor], p: int = 2) -> torch.Tensor:
        """Per-unit norm of all its slices, shape ``[size]``."""
        return self.gather(params).norm(p=p, dim=1)

    def scatter_(self, params: dict[str, torch.Tensor], mask: torch.Tensor, value: float = 0.0) -> None:
        """Set every slice of the units where ``mask`` is True to ``value`` (in place)."""
        units = mask.nonzero().flatten().cpu()
        if units.numel() == 0:
            return
        for s in self.slices:
            p = params[s.param]
            idx = s.index[units].reshape(-1).to(p.device)
            with torch.no_grad():
                p.index_fill_(s.dim, idx, value)

    def __repr__(self) -> str:
        names = ", ".join(f"{s.param}[{s.dim}]" for s in self.slices[:4])
        more = f", +{len(self.slices) - 4}" if len(self.slices) > 4 else ""
        return f"Group#{self.id}({self.name!r}, {self.kind} x{self.size}: {names}{more})"
