"""The PyTorch side of a PrunableGraph: emitting (a :class:`~graphprune.passes.plan.CompactPlan`
lowered by :mod:`graphprune.lower.torch`) and checking compact modules."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Callable

import torch

from ..analysis import Analysis, analyse, same_groups
from ..errors import RecorderMismatchWarning, UnsupportedModelError
from ..lower.torch import CompactModule, lower_torch
from ..passes.plan import CompactPlan, plan_compact
from ..pre_activation import pre_activations, run_capturing
from ..rel_error import max_rel_error
from .module_slots import one_name_per_slot

if TYPE_CHECKING:
    from ..ir.graph import Graph
    from ..prunable import PrunableGraph


class TorchBackend:
    """Emits compact modules from the model's ExportedProgram, exported on first need.

    The analysis a PrunableGraph starts with may come from the fast recorder
    (:mod:`.torch_record`), whose node names are not export's.  Before the first emission
    :meth:`settle` exports the model and analyses export's graph the same way, and the
    PrunableGraph adopts that analysis, so the emitter matches export's nodes.  The two
    must find the same groups: they differ only if the recorder saw other ops than export,
    and then the groups a user or an optimizer already holds would be wrong, which is an
    error (before anyone holds them, during ``gp.trace``'s own verification, export's
    groups are simply taken).  ``settled`` says the analysis already is export's.

    ``runner`` gives the module that is exported and that verification runs as the
    reference (a warmed copy of the user's model, see :mod:`.model_copy`): its weights
    are the user's, and nothing it runs changes the user's model.
    """

    def __init__(self, export: Callable[[], torch.export.ExportedProgram], runner: Callable[[], torch.nn.Module],
                 *, settled: bool = False) -> None:
        self._export = export
        self._runner = runner
        self._exported: torch.export.ExportedProgram | None = None
        self.settled = settled

    @property
    def runner(self) -> torch.nn.Module:
        return self._runner()

    @property
    def exported(self) -> torch.export.ExportedProgram:
        if self._exported is None:
            self._exported = self._export()
        return self._exported

    def settle(self, pg: PrunableGraph, adopt_groups: bool = False) -> Analysis:
        """Export's analysis of ``pg``'s model (see the class docstring), for ``pg`` to
        adopt; ``pg`` itself is not changed.  Once settled that is ``pg``'s own analysis.
        Raises if it finds other groups than ``pg`` holds, unless ``adopt_groups``."""
        if self.settled:
            return pg.analysis
        from .torch_export import from_exported

        analysis = analyse(from_exported(self.exported, self.runner))
        if not same_groups(pg.groups, analysis.groups, pg.comp, analysis.comp):
            if not adopt_groups:
                raise UnsupportedModelError(
                    "the recorded graph and torch.export's graph give different groups; trace again "
                    "with gp.trace(..., recorder=False)", source=pg.ir.source)
            warnings.warn(f"{pg.ir.source}: the recorder found {len(pg.groups)} groups, torch.export "
                          f"{len(analysis.groups)}; using export's", RecorderMismatchWarning, stacklevel=3)
        self.settled = True
        return analysis

    def plan(self, pg: PrunableGraph, state: dict[str, torch.Tensor], removed: torch.Tensor,
             fold_bn: bool = False) -> CompactPlan:
        """The compact plan for removing the components ``removed`` (export's analysis)."""
        pg.adopt(self.settle(pg))
        return plan_compact(pg.ir, pg.labels, pg.comp, removed, state, fold_bn=fold_bn,
                            dynamic=_dynamic_axes(pg.ir, self.exported))

    def emit(self, pg: PrunableGraph, tensors: dict[str, torch.Tensor], removed: torch.Tensor | None = None,
             fold_bn: bool = False) -> CompactModule:
        """The compact module for ``tensors`` (buffers from the user's model); ``removed``
        overrides which units go (default: every all-zero unit); ``fold_bn`` folds
        inference batch norms into the layers before them (the module then no longer
        switches them to training mode)."""
        pg.adopt(self.settle(pg))
        units = pg.removed_units(tensors) if removed is None else removed
        state = dict(tensors)
        for k, v in self.runner.named_buffers(remove_duplicate=False):
            state.setdefault(k, v)
        return lower_torch(pg.ir, self.exported, self.plan(pg, state, units, fold_bn), state)

    def full(self, pg: PrunableGraph, tensors: dict[str, torch.Tensor]) -> CompactModule:
        """The full model with ``tensors`` as weights (nothing removed)."""
        return self.emit(pg, tensors, torch.zeros(0, dtype=torch.long))

    def compare(self, pg: PrunableGraph, tensors: dict[str, torch.Tensor]) -> float:
        """Relative error between the compact and the zeroed full model on the example, on
        the outputs and on the inputs of a final sigmoid/softmax (:mod:`..pre_activation`).
        The reference is :attr:`runner` (the user's weights) run on ``tensors`` in eval
        mode: no second full-size module is built."""
        args, kwargs = pg.example
        runner = self.runner
        was_training = runner.training  # the user's own model where it could not be copied
        runner.eval()
        try:
            with torch.no_grad():
                ref = torch.func.functional_call(runner, one_name_per_slot(runner, tensors), args, kwargs,
                                                 tie_weights=False, strict=False)
                compact = self.emit(pg, tensors)
                out = compact(*args, **kwargs)
                logits = pre_activations(pg.ir)
                if logits:  # saturated outputs hide differences: compare what the final activation took
                    ref_logits = run_capturing(self.full(pg, tensors).gm, logits, args, kwargs)
                    out_logits = run_capturing(compact.gm, logits, args, kwargs)
        finally:
            runner.train(was_training)
        err = max_rel_error(ref, out)
        return max(err, max_rel_error(ref_logits, out_logits)) if logits else err


def _dynamic_axes(ir: Graph, exported: torch.export.ExportedProgram) -> Callable[[str], set[int]]:
    """A value's symbolic (batch) axes, from export's fake tensors; every axis if unknown."""
    fx_nodes = {n.name: n for n in exported.graph.nodes}

    def axes(name: str) -> set[int]:
        base, _, index = name.rpartition(".")
        val = fx_nodes[name].meta.get("val") if name in fx_nodes else None
        if val is None and base in fx_nodes and index.isdigit():  # "<node>.<i>": a tuple output
            vals = fx_nodes[base].meta.get("val")
            val = vals[int(index)] if isinstance(vals, (list, tuple)) else None
        if not isinstance(val, torch.Tensor):
            return set(range(len(ir.values[name].shape)))
        return {i for i, s in enumerate(val.shape) if not isinstance(s, int)}
    return axes

