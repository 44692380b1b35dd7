"""Which sizes of a recording are the batch: a recording made batch-general.

A recording (:mod:`.torch_record`) holds the example's sizes as plain integers:
``view(x, [2, 2048])`` at a batch of 2.  ``torch.export`` with a dynamic batch learns
which sizes are the batch by tracing with symbolic sizes, which is most of what a trace
at batch > 1 cost (8.9 s median over the coverage models against 1.7 s at a batch of
one).  Here the model is recorded again on meta tensors at two other batch sizes (a
recording costs tens of milliseconds) and the recordings are compared: they must be the
same ops with the same names and arguments, except integers, each of which must be the
same at every batch or one affine function ``k * batch + c`` of it at all three (a
``view`` to ``[batch, 2048]``, a ``reshape`` to ``[batch * 197, 768]``).  Those become
:class:`BatchSize` leaves, which the replayed program computes from its input's first
dimension at run time, so it takes any batch as export's program does; a value's axes
whose size differs between recordings are its dynamic axes.

Three points do not prove a size affine in the batch, but they refuse every size that is
not affine over them (``batch // 2``, ``max(batch, 4)``) and anything that changes the
op sequence with the batch; what is refused raises :class:`NotBatchGeneral` with the
reason, and the caller exports the model with a dynamic batch instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from ..ir.graph import Ref
from .torch_record import Recording, RecordingFailed


class NotBatchGeneral(RuntimeError):
    """The recordings at other batch sizes do not show how the graph follows the batch."""


@dataclass(frozen=True)
class BatchSize:
    """An integer argument that is ``k * batch + c`` (the batch: the first dimension of
    the program's input ``source``)."""

    k: int
    c: int

    def at(self, batch: int) -> int:
        return self.k * batch + self.c


@dataclass(frozen=True)
class BatchGeneral:
    """A recording's batch-dependent parts: ``source``, the input whose first dimension is
    the batch; ``args``, for each node with a batch-dependent integer, its
    ``(args, kwargs)`` with :class:`BatchSize` leaves there; ``dynamic``, each value's
    axes whose size follows the batch."""

    source: str
    args: dict[str, tuple[tuple, dict]]
    dynamic: dict[str, frozenset[int]]

    def axes(self, name: str) -> set[int]:
        return set(self.dynamic.get(name, ()))


def example_batch(args: tuple, kwargs: dict) -> int | None:
    """The first dimension every tensor input of a dimension or more shares (as export's
    dynamic batch marks them, :func:`.torch_export.batch_dynamic_shapes`); None where
    they do not share one or there is none."""
    firsts = {t.shape[0] for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0}
    return firsts.pop() if len(firsts) == 1 else None


def other_batches(batch: int) -> tuple[int, int]:
    """The two batch sizes recorded besides the example's: neither 1 (models and torch
    special-case a batch of one) nor the example's."""
    return batch + 1, batch + 3


def batch_general(rec: Recording, batch: int,
                  record_at: Callable[[int], Recording]) -> BatchGeneral:
    """Compare ``rec`` (at ``batch``) with ``record_at(b)`` at the :func:`other_batches`;
    raises :class:`NotBatchGeneral` where they differ other than by affine sizes."""
    batches = (batch, *other_batches(batch))
    recs = [rec]
    for b in batches[1:]:
        try:
            recs.append(record_at(b))
        except RecordingFailed as exc:
            raise NotBatchGeneral(f"the recording at batch {b} failed: {exc}") from exc
    return _compare(recs, batches)


def program_difference(first: Recording, other: Recording) -> str | None:
    """Why two recordings of one model at two input sizes are not one program but for their
    sizes, or None: other ops (names, targets, outputs), other values, inputs, outputs or call
    structure, other non-tensor outputs, a value of another dtype, rank or kind, a weight
    of another shape, a constant of other contents.  Their integer arguments may differ."""
    ir, g = first.graph, other.graph
    if [n.name for n in g.nodes] != [n.name for n in ir.nodes]:
        return f"the model runs other ops ({_first_other(ir.nodes, g.nodes)})"
    if g.values.keys() != ir.values.keys() or g.inputs != ir.inputs or g.outputs != ir.outputs:
        return "the graph has other values, inputs or outputs"
    if other.call.in_leaves != first.call.in_leaves or other.call.out_leaves != first.call.out_leaves:
        return "the call has another structure"
    if not same_value(other.call.out_consts, first.call.out_consts):
        return f"the model returns other non-tensor outputs ({other.call.out_consts} against {first.call.out_consts})"
    for name, v in ir.values.items():
        w = g.values[name]
        if w.dtype != v.dtype or len(w.shape) != len(v.shape) or w.kind != v.kind:
            return f"value {name} changes dtype, rank or kind"
        if v.fixed and w.shape != v.shape:
            return f"{v.kind} {v.source_name or name} changes shape"
        if v.kind == "const" and not same_value(w.data, v.data):
            return f"constant {name} changes contents"
    for m, n in zip(ir.nodes, g.nodes):
        if n.target is not m.target or n.outputs != m.outputs:
            return f"node {m.name} ({m.source_op}) is another op"
    return None


def _compare(recs: list[Recording], batches: tuple[int, ...]) -> BatchGeneral:
    first = recs[0]
    ir = first.graph
    for other, b in zip(recs[1:], batches[1:]):
        why = program_difference(first, other)
        if why is not None:
            raise NotBatchGeneral(f"at batch {b} {why}")
    source = next((n for n in ir.inputs if ir.values[n].shape), None)
    if source is None:
        raise NotBatchGeneral("no input has a dimension to take the batch from")

    dynamic: dict[str, frozenset[int]] = {}
    for name, v in ir.values.items():
        others = [r.graph.values[name] for r in recs[1:]]
        axes = frozenset(i for i in range(len(v.shape)) if any(w.shape[i] != v.shape[i] for w in others))
        if axes:
            dynamic[name] = axes

    general: dict[str, tuple[tuple, dict]] = {}
    for k, node in enumerate(ir.nodes):
        seen = [r.graph.nodes[k] for r in recs]
        where = f"node {node.name} ({node.source_op}, module {node.module or '<root>'})"
        args = _general([(n.args, n.kwargs) for n in seen], batches, where)
        if args is not None:
            general[node.name] = args
    return BatchGeneral(source, general, dynamic)


def _first_other(a: list, b: list) -> str:
    for m, n in zip(a, b):
        if m.name != n.name:
            return f"{n.name} where the example has {m.name}"
    return f"{len(b)} ops against {len(a)}"


def same_value(a: Any, b: Any) -> bool:
    """Whether two recorded arguments or constants are equal: tensors of the same shape,
    dtype and contents, sequences of equal items, NaN equal to NaN, else ``==`` on one type."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True  # NaN
    return type(a) is type(b) and a == b


def _general(seen: list[Any], batches: tuple[int, ...], where: str) -> Any:
    """The arguments ``seen`` at ``batches`` with each integer that follows the batch
    replaced by its :class:`BatchSize`; None where nothing follows it."""
    changed = False

    def merge(vals: list[Any]) -> Any:
        nonlocal changed
        a = vals[0]
        if isinstance(a, (tuple, list)):
            if any(type(v) is not type(a) or len(v) != len(a) for v in vals):
                raise NotBatchGeneral(f"{where}: an argument's length changes with the batch")
            return type(a)(merge([v[i] for v in vals]) for i in range(len(a)))
        if isinstance(a, dict):
            if any(not isinstance(v, dict) or v.keys() != a.keys() for v in vals):
                raise NotBatchGeneral(f"{where}: its keyword arguments change with the batch")
            return {key: merge([v[key] for v in vals]) for key in a}
        if all(same_value(v, a) for v in vals):
            return a
        if all(type(v) is int for v in vals):
            size = _affine(vals, batches)
            if size is None:
                raise NotBatchGeneral(f"{where}: the size {vals[0]} is {vals[1:]} at batches {batches[1:]}, "
                                      f"not k * batch + c")
            changed = True
            return size
        if isinstance(a, Ref):
            raise NotBatchGeneral(f"{where}: reads other tensors at another batch")
        raise NotBatchGeneral(f"{where}: the argument {a!r} is {[v for v in vals[1:]]!r} at batches {batches[1:]}")

    out = merge(seen)
    return out if changed else None


def _affine(vals: list[int], batches: tuple[int, ...]) -> BatchSize | None:
    (a0, a1), (b0, b1) = vals[:2], batches[:2]
    if (a1 - a0) % (b1 - b0):
        return None
    k = (a1 - a0) // (b1 - b0)
    size = BatchSize(k, a0 - k * b0)
    return size if all(size.at(b) == v for b, v in zip(batches, vals)) else None
