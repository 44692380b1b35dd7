"""Cheaper examples to verify groups on: the picture cropped, and a batch's first samples.

Verification (:meth:`graphprune.prunable.PrunableGraph.verify`) runs the zeroed full
model and a compact one on the example.  On an image model at 224x224 those two forwards
are most of the check, and the check was 40% of ResNet-50's trace, prune and compact
model.  Which channels feed which does not depend on the picture's size, so where the
model runs the very same ops on a smaller picture the check can run there: the example
cropped to about a quarter of its height and width (a multiple of 32, so the usual
strides still divide it), and to its first :data:`CHECK_BATCH` samples; where it cannot, a
batch is still checked on its first samples, on the model's own any-batch program.

A pass there is a pass at the example's size when two things hold, and this module
holds the checker to them:

- the model is recorded again on meta tensors at the small size (tens of milliseconds)
  and the two recordings are the same program but for integers: the same ops under the
  same names, reading the same tensors, with weights and constants of the same shapes and
  contents (:func:`varying_nodes`, else no small check);
- the compact plan rewrites no node whose integers differ between the sizes (a flatten
  of channels times height times width): the compact model at the small size is then the
  full-size one with only integers the recording itself chose changed.  A plan that does
  is not judged small (:class:`.backend.NotConclusive`).

Only a pass counts on a cheaper example: anything else goes on to the next one, and at
last to the example itself, which alone withdraws groups.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils import _pytree as pytree

from ..ir.graph import Ref
from .backend import CheckExample

if TYPE_CHECKING:  # the recorder's imports set warning filters: imported on first use
    from .torch_record import Recording

#: the batch verification may pass groups at: two, not one, since models and torch
#: special-case a batch of one, and an op that mixes the batch axis (attention run over
#: it by a layout mistake) still mixes two samples
CHECK_BATCH = 2
#: the smallest height or width a picture is cropped to, and the multiple it is cropped at
MIN_SIDE = 32


def small_side(n: int) -> int:
    """About a quarter of ``n`` rounded up to a multiple of :data:`MIN_SIDE`, or ``n``
    where that would not halve it (a small picture is checked as it is)."""
    side = max(MIN_SIDE, -(-(n // 4) // MIN_SIDE) * MIN_SIDE)
    return side if 2 * side <= n else n


def cropped(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The example with each floating 4-d input (NCHW) cropped to :func:`small_side` in
    its last two dimensions; None where none gets smaller."""
    changed = False

    def crop(t: Any) -> Any:
        nonlocal changed
        if not (isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point()):
            return t
        h, w = small_side(t.shape[2]), small_side(t.shape[3])
        if (h, w) == tuple(t.shape[2:]):
            return t
        changed = True
        return t[:, :, :h, :w].clone(memory_format=torch.preserve_format)  # dense: the recording's layout

    out = pytree.tree_map(crop, (tuple(args), dict(kwargs)))
    return out if changed else None


def first_samples(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The example's first :data:`CHECK_BATCH` samples, where every tensor input shares a
    larger first dimension (the batch); else None."""
    from .batch_general import example_batch

    batch = example_batch(args, kwargs)
    if batch is None or batch <= CHECK_BATCH:
        return None
    return pytree.tree_map(lambda t: t[:CHECK_BATCH] if isinstance(t, torch.Tensor) and t.dim() > 0 else t,
                           (tuple(args), dict(kwargs)))


def varying_nodes(full: Recording, small: Recording) -> frozenset[str] | None:
    """The nodes whose integer arguments differ between two recordings of one model at
    two sizes, where the recordings are otherwise the same program
    (:func:`.batch_general.program_difference`); None where they are not, or where an
    argument other than an integer differs."""
    from .batch_general import program_difference

    if program_difference(full, small) is not None:
        return None
    varying = set()
    for m, n in zip(full.graph.nodes, small.graph.nodes):
        same = _same_but_ints((m.args, m.kwargs), (n.args, n.kwargs))
        if same is None:
            return None
        if not same:
            varying.add(m.name)
    return frozenset(varying)


def _same_but_ints(x: Any, y: Any) -> bool | None:
    """True where equal, False where they differ only in integers, None otherwise."""
    from .batch_general import same_value

    if isinstance(x, Ref) or isinstance(y, Ref):
        return (x == y) if isinstance(x, Ref) and isinstance(y, Ref) else None
    if isinstance(x, (tuple, list)):
        if type(x) is not type(y) or len(x) != len(y):
            return None
        parts = [_same_but_ints(p, q) for p, q in zip(x, y)]
        return None if None in parts else all(parts)
    if isinstance(x, dict):
        if not isinstance(y, dict) or x.keys() != y.keys():
            return None
        return _same_but_ints(tuple(x.values()), tuple(y[k] for k in x))
    if same_value(x, y):
        return True
    return False if type(x) is int and type(y) is int else None


def small_check(full: Recording, args: tuple, kwargs: dict, any_batch: bool,
                record: Callable[[tuple, dict, int | None], Recording],
                program: Callable[[Recording, Any], Any]) -> tuple[list[CheckExample], list[str]]:
    """The cheaper examples to verify on, cheapest first, and why others are not.  Where
    the example crops (:func:`cropped`), ``record(args, kwargs, batch)`` records the model
    at the crop and ``program(recording, general)`` makes what the crop's compact models
    are lowered from: with ``any_batch`` (the model's own program takes any batch) that
    program is made batch-general too (:mod:`.batch_general`) and runs the crop's first
    samples.  Then, where ``any_batch``, the example's first samples on the model's own
    program (what is checked where the model does not run on the crop)."""
    found, why = [], []
    crop = cropped(args, kwargs)
    if crop is not None:
        on_crop, reason = _on_crop(full, crop, any_batch, record, program)
        found += [on_crop] if on_crop is not None else []
        why += [reason] if reason is not None else []
    few = first_samples(args, kwargs) if any_batch else None
    if few is not None:
        found.append(CheckExample(*few))
    if not found:
        why.append("the example is as small as a check")
    return found, why


def _on_crop(full: Recording, crop: tuple[tuple, dict], any_batch: bool,
             record: Callable[[tuple, dict, int | None], Recording],
             program: Callable[[Recording, Any], Any]) -> tuple[CheckExample | None, str | None]:
    """:func:`small_check` on the cropped example ``crop``."""
    from .batch_general import NotBatchGeneral, batch_general, example_batch
    from .torch_record import RecordingFailed
    from .torch_replay import ReplayFailed

    try:
        rec = record(*crop, None)
        varying = varying_nodes(full, rec)
        if varying is None:
            return None, "the model runs other ops on the cropped example"
        batch = example_batch(*crop)
        general = None
        if any_batch and batch is not None and batch > 1:
            general = batch_general(rec, batch, lambda b: record(*crop, b))
        few = first_samples(*crop) if general is not None else None
        return CheckExample(*(few or crop), program=program(rec, general), varying=varying), None
    except (RecordingFailed, ReplayFailed, NotBatchGeneral) as exc:
        return None, f"the model does not replay on the cropped example: {exc}"
