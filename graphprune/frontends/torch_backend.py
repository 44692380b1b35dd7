"""The PyTorch side of a PrunableGraph: emitting and checking compact modules."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..passes.emit_torch import CompactModule, emit_module
from ..passes.shrink import Shrink


class TorchBackend:
    def __init__(self, exported: torch.export.ExportedProgram) -> None:
        self.exported = exported

    def emit(self, pg: Any, tensors: dict[str, torch.Tensor], removed: torch.Tensor | None = None) -> CompactModule:
        """The compact module for ``tensors`` (buffers from the user's model); ``removed``
        overrides which units go (default: every all-zero unit)."""
        units = pg.removed_units(tensors) if removed is None else removed
        state = dict(tensors)
        for k, v in pg.model.named_buffers(remove_duplicate=False):
            state.setdefault(k, v)
        return emit_module(pg.ir, self.exported, Shrink(pg.labels, pg.comp, units), state)

    def full(self, pg: Any, tensors: dict[str, torch.Tensor]) -> CompactModule:
        """The full model with ``tensors`` as weights (nothing removed)."""
        return self.emit(pg, tensors, torch.zeros(0, dtype=torch.long))

    def compare(self, pg: Any, tensors: dict[str, torch.Tensor]) -> float:
        """Relative error between the compact and the zeroed full model on the example."""
        args, kwargs = pg.example
        with torch.no_grad():
            ref = self.full(pg, tensors)(*args, **kwargs)
            out = self.emit(pg, tensors)(*args, **kwargs)
        return max_rel_error(ref, out)


def max_rel_error(ref: Any, out: Any) -> float:
    worst = 0.0
    for a, b in zip(pytree.tree_leaves(ref), pytree.tree_leaves(out)):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            if a.shape != b.shape:
                return float("inf")
            worst = max(worst, float((a - b).abs().max() / (a.abs().max() + 1e-12)))
    return worst
