"""The PyTorch side of a PrunableGraph: emitting (a :class:`~graphprune.passes.plan.CompactPlan`
lowered by :mod:`graphprune.lower.torch`) and checking compact modules."""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from ..analysis import Analysis, analyse, unit_map
from ..errors import NotInPlace, RecorderMismatchWarning, UnsupportedModelError
from ..lower.call_binding import CallBinding
from ..lower.module import is_standard, module_biases, shrunk_copy
from ..lower.torch import CompactModule, TorchProgram, lower_torch, program_of_export
from ..lower.widths import candidates, record_reads, settle
from ..passes.plan import CompactPlan, plan_compact
from ..pre_activation import pre_activations, run_capturing
from ..rel_error import check_tolerance, max_rel_error
from .backend import CheckExample, NotConclusive
from .module_slots import one_name_per_slot

if TYPE_CHECKING:
    from ..ir.graph import Graph
    from ..prunable import PrunableGraph

@dataclass
class InPlace:
    """The outcome of :meth:`TorchBackend.emit_module`: the user's own module shrunk in
    place (``module``), or None and ``reason``; ``widths``: the width attributes it
    changed, ``"path.attr" -> (old, new)``; ``read``: every integer attribute the
    forward reads (``"path.attr"``), which a saved config must reproduce."""

    module: torch.nn.Module | None
    reason: str | None = None
    widths: dict[str, tuple[int, int]] = field(default_factory=dict)
    read: set[str] = field(default_factory=set)


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

    With a ``replay`` (the recording as a program, :mod:`.torch_replay`) nothing is
    exported: compact modules are lowered from the recording itself, whose analysis is
    already the PrunableGraph's, and ``reference`` (a plain copy of the user's model,
    with no warm-up call: export is what needs one) is what verification runs against.
    :meth:`stop_replay` goes back to export, where the replayed program turned out not
    to reproduce the model.  ``binding`` lets compact modules be called as the user's
    model is (:mod:`..lower.call_binding`); ``small`` makes the replay's cheaper examples
    to verify on (:mod:`.small_check`), called once, on first need.
    """

    def __init__(self, export: Callable[[], torch.export.ExportedProgram], runner: Callable[[], torch.nn.Module],
                 *, settled: bool = False, replay: TorchProgram | None = None,
                 reference: Callable[[], torch.nn.Module] | None = None,
                 binding: CallBinding | None = None,
                 small: Callable[[], list[CheckExample]] | None = None) -> None:
        self._export = export
        self._small = functools.cache(small) if small is not None else None
        self.binding = binding
        self._runner = runner
        self._exported: torch.export.ExportedProgram | None = None
        self._program: TorchProgram | None = None
        self.replay = replay
        self._reference = reference or runner
        self.settled = settled or replay is not None

    @property
    def runner(self) -> torch.nn.Module:
        return self._reference() if self.replay is not None else self._runner()

    def stop_replay(self) -> None:
        """Emit from ``torch.export`` from now on; the next :meth:`settle` analyses export's graph."""
        if self.replay is not None:
            self.replay, self.settled = None, False

    def program(self, pg: PrunableGraph) -> TorchProgram:
        """What compact modules are lowered from: the replayed recording, or the export of
        the model (made once, on first need)."""
        if self.replay is not None:
            return self.replay
        if self._program is None:
            self._program = program_of_export(self.exported, _dynamic_axes(pg.ir, self.exported))
        return self._program

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

        ir = from_exported(self.exported, self.runner)
        if same_graph(pg.ir, ir):  # export saw the recorder's ops under the same names: nothing to redo
            self.settled = True
            return pg.analysis
        analysis = analyse(ir)
        if unit_map(pg.groups, analysis.groups) is None:  # same groups, whatever the unit numbering
            if not adopt_groups:
                raise UnsupportedModelError(
                    "the recorded graph and torch.export's graph give different groups; trace again "
                    "with gp.trace(..., recorder=False)", source=pg.ir.source)
            warnings.warn(f"{pg.ir.source}: the recorder found {len(pg.groups)} groups, torch.export "
                          f"{len(analysis.groups)}; using export's", RecorderMismatchWarning, stacklevel=3)
        self.settled = True
        return analysis

    def _adopt(self, pg: PrunableGraph, removed: torch.Tensor | None) -> torch.Tensor | None:
        """Settle, and adopt export's analysis; ``removed`` (units numbered by the analysis
        held before) in the adopted numbering, which may differ (:func:`unit_map`)."""
        held = pg.groups
        pg.adopt(self.settle(pg))
        if removed is None or pg.groups is held:
            return removed
        return unit_map(held, pg.groups)[removed]

    def plan(self, pg: PrunableGraph, state: dict[str, torch.Tensor], removed: torch.Tensor,
             fold_bn: bool = False, biases: dict[str, torch.Tensor] | None = None) -> CompactPlan:
        """The compact plan for removing the components ``removed`` (export's analysis),
        adding ``biases``."""
        removed = self._adopt(pg, removed)
        return plan_compact(pg.ir, pg.labels, pg.comp, removed, state, fold_bn=fold_bn, biases=biases,
                            dynamic=self.program(pg).dynamic)

    def emit(self, pg: PrunableGraph, tensors: dict[str, torch.Tensor], removed: torch.Tensor | None = None,
             fold_bn: bool = False, biases: dict[str, torch.Tensor] | None = None,
             copy_uncut: bool = True, program: TorchProgram | None = None,
             fixed: frozenset[str] = frozenset()) -> CompactModule:
        """The compact module for ``tensors`` (buffers from the user's model); ``removed``
        overrides which units go (default: every all-zero unit); ``fold_bn`` folds
        inference batch norms into the layers before them (the module then no longer
        switches them to training mode); ``biases``: biases added to layers without one
        (:attr:`PrunableGraph.added_biases`); ``copy_uncut``: see :func:`..lower.torch.lower_torch`.
        ``program``: lowered instead of the model's own (a check's smaller example's, with
        the plan made for the model's), where the plan must not rewrite or erase the
        nodes in ``fixed`` (else :class:`.backend.NotConclusive`)."""
        removed = self._adopt(pg, removed)
        units = pg.removed_units(tensors) if removed is None else removed
        state = dict(tensors)
        for k, v in self.runner.named_buffers(remove_duplicate=False):
            state.setdefault(k, v)
        plan = self.plan(pg, state, units, fold_bn, biases)
        touched = fixed & (plan.rewrites.keys() | plan.erased)
        if touched:
            raise NotConclusive(f"the compact plan rewrites {sorted(touched)[0]}, whose sizes the smaller "
                                f"example changes")
        return lower_torch(pg.ir, program or self.program(pg), plan, state, copy_uncut, self.binding)

    def emit_module(self, pg: PrunableGraph, tensors: dict[str, torch.Tensor], rtol: float = 1e-4,
                    biases: dict[str, torch.Tensor] | None = None) -> InPlace:
        """The compact model as a copy of the user's own module, its standard layers
        shrunk in place (:mod:`..lower.module`) and its width attributes found
        (:mod:`..lower.widths`), checked against the zeroed full model on the example
        like every compact model (``rtol``, raised to four rounding units of the model's
        least precise float type); where that cannot be done, why not.  ``biases`` (by
        weight name) become bias parameters of the layers that have none, in the copy and
        in the reference it is checked against."""
        if pg.model is None:
            return InPlace(None, "there is no user module (the model was traced from ONNX)")
        units = pg.removed_units(tensors)
        state = dict(tensors)
        for k, v in self.runner.named_buffers(remove_duplicate=False):
            state.setdefault(k, v)
        if self.settled:
            plan = self.plan(pg, state, units, biases=biases)
        else:
            # no torch.export needed (an LLM's export is minutes): the recorder's analysis names
            # the same parameters, the plan is only read for kept indices, and a plan that
            # erases operators (where dynamic axes would matter) is refused below anyway
            plan = plan_compact(pg.ir, pg.labels, pg.comp, units, state, biases=biases,
                                dynamic=lambda name: set(range(len(pg.ir.values[name].shape))))
        args, kwargs = pg.example
        runner = self.runner  # the user's weights, shared: its full-size forward shows what is read
        was_training = runner.training
        runner.eval()
        try:
            with torch.no_grad():
                reads = record_reads(runner, lambda: runner(*args, **kwargs))
        finally:
            runner.train(was_training)
        try:
            model, shrunk = shrunk_copy(pg.model, pg.ir, plan, tensors)
        except NotInPlace as exc:
            return InPlace(None, str(exc))
        model.eval()
        try:
            ref = self._zeroed_output(pg, tensors, module_biases(runner, biases or {}))
        except NotInPlace as exc:
            return InPlace(None, str(exc))
        rtol = check_tolerance(rtol, tensors.values())  # a half-precision model's rounding

        def check() -> str | None:
            try:
                with torch.no_grad():
                    out = model(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001  (a wrong width guess fails to run: try the next)
                return f"the shrunk module raised {type(exc).__name__}: {str(exc)[:200]}"
            err = max_rel_error(ref, out)
            return None if err < rtol else f"the shrunk module differs from the zeroed model (rel. error {err:.2e})"

        changed, reason = settle(model, candidates(model, reads, shrunk.widths, shrunk.layers), check)
        if changed is None:
            norms = sorted(p for p in shrunk.layers if _normalises_channels(model.get_submodule(p)))
            if norms:
                reason += (f" (the norm at {norms[0]}{f' and {len(norms) - 1} more' if len(norms) > 1 else ''} "
                           f"normalises over a pruned axis: it takes its statistics over fewer entries than the "
                           f"zeroed model's, which only the graph form rewrites)")
            return InPlace(None, reason)
        return InPlace(model, None, changed, {f"{p}.{a}" if p else a for p, attrs in reads.items() for a in attrs})

    def _zeroed_output(self, pg: PrunableGraph, tensors: dict[str, torch.Tensor],
                       extra: dict[str, torch.Tensor] | None = None) -> object:
        """The full model's output on the example with ``tensors`` as weights (eval mode);
        ``extra``: module tensors to set that the model holds as None (added biases)."""
        args, kwargs = pg.example
        runner = self.runner
        was_training = runner.training
        runner.eval()
        try:
            with torch.no_grad():
                return torch.func.functional_call(runner, {**one_name_per_slot(runner, tensors), **(extra or {})},
                                                  args, kwargs, tie_weights=False, strict=False)
        finally:
            runner.train(was_training)

    def full(self, pg: PrunableGraph, tensors: dict[str, torch.Tensor],
             program: TorchProgram | None = None) -> CompactModule:
        """The full model with ``tensors`` as weights (nothing removed); ``program`` as for :meth:`emit`."""
        return self.emit(pg, tensors, torch.zeros(0, dtype=torch.long), program=program)

    def check_examples(self, pg: PrunableGraph) -> list[CheckExample]:
        """The replayed recording's cheaper examples (:mod:`.small_check`), made on first
        need; none when emitting from an export."""
        if self.replay is None or self._small is None:
            return []
        return self._small()

    def compare(self, pg: PrunableGraph, tensors: dict[str, torch.Tensor],
                removed: torch.Tensor | None = None, example: CheckExample | None = None) -> float:
        """Relative error between the compact and the zeroed full model on ``example``
        (default: the model's; ``removed`` as for :meth:`emit`), on the outputs and on the
        inputs of a final sigmoid/softmax (:mod:`..pre_activation`).  The reference is
        :attr:`runner` (the user's weights) run on ``tensors`` in eval mode: no second
        full-size module is built.  Raises :class:`.backend.NotConclusive` where the
        compact plan rewrites a node whose integers ``example`` changes."""
        args, kwargs = (example.args, example.kwargs) if example is not None else pg.example
        program = example.program if example is not None else None
        fixed = example.varying if example is not None else frozenset()
        runner = self.runner
        was_training = runner.training  # the user's own model where it could not be copied
        runner.eval()
        try:
            with torch.no_grad():
                # the reference first: a model that does not run on a cheaper example fails
                # before anything is emitted for it
                ref = torch.func.functional_call(runner, one_name_per_slot(runner, tensors), args, kwargs,
                                                 tie_weights=False, strict=False)
                compact = self.emit(pg, tensors, removed, copy_uncut=False, program=program, fixed=fixed)
                out = compact(*args, **kwargs)  # the compact model is dropped after this comparison
                logits = pre_activations(pg.ir)
                if logits:  # saturated outputs hide differences: compare what the final activation took
                    ref_logits = run_capturing(self.full(pg, tensors, program).gm, logits, args, kwargs)
                    out_logits = run_capturing(compact.gm, logits, args, kwargs)
        finally:
            runner.train(was_training)
        err = max_rel_error(ref, out)
        return max(err, max_rel_error(ref_logits, out_logits)) if logits else err


def _normalises_channels(mod: torch.nn.Module) -> bool:
    """A layer or RMS norm (statistics across its sliced axis), not a per-channel one."""
    per_channel = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.Linear, torch.nn.Embedding,
                   torch.nn.modules.conv._ConvNd, torch.nn.MultiheadAttention)
    return not isinstance(mod, per_channel) and is_standard(mod)


#: arguments that pick a kernel, not what is computed (export records batch norm's
#: ``cudnn_enabled`` as False, the eager call as True)
_BACKEND_FLAGS = frozenset({"cudnn_enabled"})


def same_graph(a: Graph, b: Graph) -> bool:
    """Whether two captures of a model are the same graph: the same nodes (name, op,
    arguments, outputs) over values of the same names, kinds and shapes, so an analysis
    of one is an analysis of the other."""
    if len(a.nodes) != len(b.nodes) or a.values.keys() != b.values.keys() or a.outputs != b.outputs:
        return False
    for m, n in zip(a.nodes, b.nodes):
        if (m.name, m.target, m.outputs, m.inputs) != (n.name, n.target, n.outputs, n.inputs):
            return False
        if {k: v for k, v in m.attrs.items() if k not in _BACKEND_FLAGS} != \
                {k: v for k, v in n.attrs.items() if k not in _BACKEND_FLAGS}:
            return False
    return all((v.kind, v.shape, v.source_name) == (w.kind, w.shape, w.source_name)
               for v, w in ((a.values[k], b.values[k]) for k in a.values))


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

