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


#: per-(parameter, dim, statistic) row statistics, shared by the groups of one pass
RowCache = dict[tuple[str, int, object], torch.Tensor]


def row_stat(params: dict[str, torch.Tensor], param: str, dim: int, stat: str | float,
             cache: RowCache | None = None) -> torch.Tensor:
    """A statistic of each row of ``params[param]`` along ``dim`` (``"nonzero"``: whether
    any entry is nonzero, NaN included; a number ``p``: the row's ``p``-norm in float32),
    cached in ``cache`` (a producer's rows and its consumers' columns are read by two
    groups each: resnet50's masks and norms took 0.3 s each, index-copying every weight).
    With a cache, dims 0 and 1 of a layer's weight (its outputs and its inputs, which two
    groups cut) come from one elementwise pass (:func:`_rows_and_columns`)."""
    key = (param, dim, stat)
    if cache is not None and key in cache:
        return cache[key]
    t = params[param].detach()
    p = float("inf") if stat == "nonzero" else float(stat)
    if cache is not None and t.dim() >= 2 and dim <= 1 and p > 0 and t.numel():
        for d, r in enumerate(_rows_and_columns(t, p)):
            cache[(param, d, stat)] = r != 0 if stat == "nonzero" else r  # NaN is not zero
        return cache[key]
    rest = [d for d in range(t.dim()) if d != dim]
    out = _norm(t, p, rest) if rest else t.abs().to(torch.float32)
    if stat == "nonzero":
        out = out != 0  # NaN is not zero
    if cache is not None:
        cache[key] = out
    return out


def _rows_and_columns(t: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``p``-norms (``p > 0``, float32) of ``t``'s slices along dim 0 and along dim 1.
    ``t`` is read as the matrix ``[out, in * kernel]``: one elementwise pass (``|t|`` or
    ``|t|^p``), reduced along its rows and along its columns, then each input's kernel
    columns together.  Reducing a convolution's kernel dims first, as trailing dims of 1
    or 9 entries, ran 5-10x slower per element than these long reductions (most of
    resnet50's l2 scoring and zero masks)."""
    m = t.reshape(t.shape[0], -1)
    if p == float("inf"):
        a = m.abs()
        rows, cols = a.amax(dim=1), a.amax(dim=0).reshape(t.shape[1], -1).amax(dim=1)
        return rows.to(torch.float32), cols.to(torch.float32)
    a = m.to(torch.float32)
    a = a.square() if p == 2 else a.abs() if p == 1 else a.abs().pow(p)
    rows, cols = a.sum(dim=1), a.sum(dim=0).reshape(t.shape[1], -1).sum(dim=1)
    return (rows.sqrt(), cols.sqrt()) if p == 2 else (rows, cols) if p == 1 else (rows.pow(1 / p), cols.pow(1 / p))


def _norm(t: torch.Tensor, p: float, dims: list[int]) -> torch.Tensor:
    """The ``p``-norm over ``dims`` in float32 (the max of ``|t|`` for ``inf``, NaN kept)."""
    if p == float("inf"):
        return t.abs().amax(dim=dims).to(torch.float32)
    if p == 2 and t.is_floating_point():
        # squares summed: a contiguous pass whichever dims go, where ``vector_norm`` over a
        # weight's dim 0 strides through it (4x slower on one thread: half of vit_b_16's l2 scoring)
        x = t.to(torch.float32)
        return (x * x).sum(dim=dims).sqrt()
    return torch.linalg.vector_norm(t, p, dim=dims, dtype=torch.float32)


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

    def zero_mask(self, params: dict[str, torch.Tensor], rows: RowCache | None = None) -> torch.Tensor:
        """Which units are entirely zero, shape ``[size]``: from each (parameter, dim)'s
        per-row "any nonzero" (:func:`row_stat`), which copies no slice (a hidden-column
        group spans nearly every weight: gathering it took three times the model) and is
        shared through ``rows`` by the groups that cut the same weight."""
        zero = None  # combined on the parameters' device: no slice is copied elsewhere to be reduced
        for s in self.slices:
            p = params[s.param]
            if s.is_block:
                z = s.gather_block(p, torch.arange(self.size)).abs().amax(dim=1) == 0
            else:
                nonzero = row_stat(params, s.param, s.dim, "nonzero", rows)
                z = ~nonzero[s.index.to(p.device)].any(dim=1)
            zero = z if zero is None else zero & z.to(zero.device)
        return torch.ones(self.size, dtype=torch.bool) if zero is None else zero

    def norms(self, params: dict[str, torch.Tensor], p: float = 2, rows: RowCache | None = None) -> torch.Tensor:
        """Per-unit ``p``-norm of all its slices, shape ``[size]``: the norm of the
        :meth:`gather` ed matrix's rows, combined from each (parameter, dim)'s per-row
        norms (shared through ``rows``) without copying the slices."""
        if p <= 0 or any(s.is_block for s in self.slices):
            return self.gather(params).norm(p=p, dim=1)
        total = None
        for s in self.slices:
            r = row_stat(params, s.param, s.dim, float(p), rows)[s.index.to(params[s.param].device)]
            part = r.amax(dim=1) if p == float("inf") else r.pow(p).sum(dim=1)
            part = part.to(total.device) if total is not None else part
            total = part if total is None else (torch.maximum(total, part) if p == float("inf") else total + part)
        if total is None:
            return torch.zeros(self.size)
        return total if p == float("inf") else total.pow(1.0 / p)

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
                fill_rows_(p, s.dim, idx, value)

    def __repr__(self) -> str:
        names = ", ".join(f"{s.param}[{s.dim}]" for s in self.slices[:4])
        more = f", +{len(self.slices) - 4}" if len(self.slices) > 4 else ""
        return f"Group#{self.id}({self.name!r}, {self.kind} x{self.size}: {names}{more})"


#: below this many elements ``index_fill_`` is as fast as a masked multiply (whose finiteness
#: check is a second pass)
_FILL_BY_MULTIPLY = 1 << 14


def fill_rows_(t: torch.Tensor, dim: int, index: torch.Tensor, value: float = 0.0) -> None:
    """``t.index_fill_(dim, index, value)``.  Zeros go in as a multiply by a 0/1 mask along
    ``dim`` (a contiguous pass; ``index_fill_`` took 5-10x longer on a large weight, most
    along dim 1: zeroing a hidden-column group, which cuts every matrix of a transformer,
    was a sixth of vit_b_16's check); where anything non-finite is left after it (a NaN
    or inf times 0 is NaN), ``index_fill_`` writes the exact zeros as well."""
    if value != 0 or t.numel() < _FILL_BY_MULTIPLY or not t.is_floating_point() or not t.is_contiguous():
        t.index_fill_(dim, index, value)
        return
    n = t.shape[dim]
    outer, inner = t.shape[:dim].numel(), t.shape[dim + 1:].numel()
    keep = torch.ones(n, dtype=t.dtype, device=t.device).index_fill_(0, index, 0)
    if inner >= 64:  # broadcast along long rows
        t.view(outer, n, inner).mul_(keep.view(1, n, 1))
    else:  # a kernel's few entries per row: broadcast a whole [n * inner] row of the mask instead
        t.view(outer, n * inner).mul_(keep.view(n, 1).expand(n, inner).reshape(1, -1))
    if not bool(t.sum().isfinite()):
        t.index_fill_(dim, index, value)
