"""Zero-invariant groups (ZIGs): the unit of structured pruning.

A :class:`Group` has ``size`` units.  Every unit owns the same *kinds* of parameter
slices (one :class:`Slice` per (parameter, dim)), so a group is stored as dense
index tables of shape ``[size, count]``: optimizers can gather a whole group into one
``[size, n]`` matrix with ``index_select`` instead of looping over units.

Contract (checked by the property tests): if every slice of a unit is zero, removing
the unit from the model (the compact model) leaves the output unchanged.

Block groups (``kind == "block"``, :mod:`graphprune.analysis.block_groups`) are the one
exception: their units are weight blocks inside a layer, which zero out but remove
nothing, so they are never among ``g.groups`` and ``construct_subnet`` ignores them.
Their slices span two dims (``dim2``/``index2``, see :class:`Slice`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Slice:
    """Rows ``index[u]`` along ``dim`` of parameter ``param`` belong to unit ``u``.

    A *block* slice also sets ``dim2``/``index2``: unit ``u`` then owns only the elements
    at ``index[u]`` along ``dim`` crossed with ``index2[u]`` along ``dim2`` (a weight block),
    not whole rows. Channels need one dim, blocks need two; nothing needs more.

    ``role`` is what ``dim`` is to the layer, as its op rule labelled it: ``producer``
    (the layer writes the units: output rows), ``consumer`` (it reads them: input columns),
    ``norm`` (a normalisation's scale) or ``other``; ``bias`` names the layer's bias (a
    norm's shift) that goes with this weight, if it has one.
    """

    param: str
    dim: int
    index: torch.Tensor  # LongTensor [size, count]
    dim2: int | None = None
    index2: torch.Tensor | None = None  # LongTensor [size, count2], block slices only
    role: str = "other"
    bias: str | None = None

    @property
    def is_block(self) -> bool:
        return self.dim2 is not None

    def share(self, shape: tuple[int, ...] | torch.Size) -> float:
        """Fraction of the parameter one unit owns (what its removal saves of it)."""
        fraction = self.index.shape[1] / shape[self.dim]
        return fraction * self.index2.shape[1] / shape[self.dim2] if self.is_block else fraction

    def _block_view(self, tensor: torch.Tensor, units: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        view = tensor.movedim((self.dim, self.dim2), (0, 1))
        rows = self.index[units].to(tensor.device)[:, :, None]
        cols = self.index2[units].to(tensor.device)[:, None, :]
        return view, (rows, cols)

    def gather_block(self, tensor: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """A block slice's elements for ``units`` as ``[len(units), n]`` (a copy)."""
        view, where = self._block_view(tensor, units)
        return view[where].reshape(len(units), -1)

    def put_block_(self, tensor: torch.Tensor, units: torch.Tensor, values: torch.Tensor | float) -> None:
        """Write ``values`` (``[len(units), n]`` or one number) into a block slice's elements, in place."""
        view, where = self._block_view(tensor, units)
        if isinstance(values, torch.Tensor):
            values = values.reshape(len(units), self.index.shape[1], self.index2.shape[1],
                                    *view.shape[2:]).to(view.dtype)
        with torch.no_grad():
            view[where] = values


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

    def param_slices(self, unit: int) -> list[tuple]:
        """``[(param_name, dim, indices)]`` of one unit, in the user's parameter names; a block
        slice is ``(param_name, dim, indices, dim2, indices2)`` (the product of the two)."""
        if not 0 <= unit < self.size:
            raise IndexError(f"unit {unit} out of range for group {self.id} of size {self.size}")
        return [(s.param, s.dim, s.index[unit].tolist()) if not s.is_block else
                (s.param, s.dim, s.index[unit].tolist(), s.dim2, s.index2[unit].tolist()) for s in self.slices]

    @property
    def param_names(self) -> list[str]:
        return sorted({s.param for s in self.slices})

    def gather(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """All slices of every unit as one ``[size, n]`` matrix (a view-free copy)."""
        cols = []
        for s in self.slices:
            p = params[s.param]
            if s.is_block:
                cols.append(s.gather_block(p, torch.arange(self.size)))
                continue
            rows = p.movedim(s.dim, 0)[s.index.to(p.device).reshape(-1)]
            cols.append(rows.reshape(self.size, -1))
        return torch.cat(cols, dim=1)

    def zero_mask(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Which units are entirely zero, shape ``[size]``: reduced one slice at a time,
        not via :meth:`gather` (a hidden-column group spans nearly every weight, and its
        gathered matrix with ``abs`` would take three times the model: 1 GB more on vit_b_16)."""
        zero = None  # combined on the parameters' device: no slice is copied elsewhere to be reduced
        for s in self.slices:
            p = params[s.param]
            if s.is_block:
                z = s.gather_block(p, torch.arange(self.size)).abs().amax(dim=1) == 0
            else:
                rows = p.index_select(s.dim, s.index.to(p.device).reshape(-1))
                rest = [d for d in range(rows.dim()) if d != s.dim]
                hi, lo = (rows.amax(dim=rest), rows.amin(dim=rest)) if rest else (rows, rows)
                z = ((hi == 0) & (lo == 0)).reshape(self.size, -1).all(dim=1)  # NaN is not zero
            zero = z if zero is None else zero & z.to(zero.device)
        return torch.ones(self.size, dtype=torch.bool) if zero is None else zero

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
            if s.is_block:
                s.put_block_(p, units, value)
                continue
            idx = s.index[units].reshape(-1).to(p.device)
            with torch.no_grad():
                p.index_fill_(s.dim, idx, value)

    def __repr__(self) -> str:
        names = ", ".join(f"{s.param}[{s.dim}]" for s in self.slices[:4])
        more = f", +{len(self.slices) - 4}" if len(self.slices) > 4 else ""
        return f"Group#{self.id}({self.name!r}, {self.kind} x{self.size}: {names}{more})"
