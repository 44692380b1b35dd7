"""The traced, analysed model that users and optimizers work with."""
from __future__ import annotations

import gc
import logging
from typing import TYPE_CHECKING, Any, Iterable, Literal

import torch

from .analysis import Analysis, same_groups
from .analysis.groups import Group
from .analysis.labels import Barrier, Labels
from .analysis.liveness import Liveness
from .errors import GraphPruneError, NotInPlace, VerificationError, ZeroInvarianceError
from .frontends.backend import CheckExample, NotConclusive
from .in_place import ZeroedInPlace
from .ir.graph import Graph
from .memory import available_bytes, release
from .pretrained import fit_config
from .rel_error import check_tolerance

if TYPE_CHECKING:
    from .frontends.backend import Backend, CompactModel

#: what :meth:`PrunableGraph.construct_subnet` builds (see there)
SubnetMode = Literal["graph", "module", "auto"]


log = logging.getLogger(__name__)


class PrunableGraph:
    """Groups of a traced model plus everything needed to build its compact form.

    ``params`` are the user's live tensors (parameters of the ``nn.Module``, or the
    ONNX initializers as torch tensors): optimizers update them in place and
    :meth:`construct_subnet` reads them, removing every unit whose slices are all zero.

    The graph, labels and units come from one immutable :class:`~.analysis.Analysis`;
    ``groups`` are the groups still offered (those :meth:`verify` withdrew are gone).

    ``added_biases`` holds, by weight name, the bias that calibrated compensation gave a
    layer without one (the removed units' mean contribution, ``prune(...,
    add_biases=True)``): there is no tensor of the user's to hold it, so it is kept here,
    :meth:`construct_subnet` adds it to the compact model, and the model the compact one
    must reproduce is the zeroed one with those biases.  It accumulates over calls to
    ``prune``; clear it when restoring the weights to prune again from the dense model.
    """

    def __init__(self, analysis: Analysis, *, params: dict[str, torch.Tensor],
                 model: torch.nn.Module | None, example: tuple[tuple, dict], backend: Backend) -> None:
        self.analysis = analysis
        self.groups: list[Group] = list(analysis.groups)
        self.params = params
        self.model = model
        self.example = example
        self.backend = backend          # frontend-specific emitter (see frontends)
        self.withdrawn: list[tuple[Group, str]] = []
        self.notes: list[str] = []      # how the model was captured, where the summary should say
        self.compact_form: str | None = None  # what the last construct_subnet built, and why
        self.added_biases: dict[str, torch.Tensor] = {}

    # ---- the analysis -----------------------------------------------------------------
    @property
    def ir(self) -> Graph:
        return self.analysis.ir

    @property
    def labels(self) -> Labels:
        return self.analysis.labels

    @property
    def comp(self) -> torch.Tensor:
        return self.analysis.comp

    @property
    def liveness(self) -> Liveness:
        return self.analysis.liveness

    def adopt(self, analysis: Analysis) -> None:
        """Work on ``analysis`` (another analysis of the same model) from now on: the one
        place the analysis changes, in one assignment, so what is derived from the old one
        goes with it.  The groups held stay when ``analysis`` finds the same ones (users and
        optimizers may hold them); otherwise its groups replace them, which the caller has
        decided is allowed (see :meth:`.frontends.torch_backend.TorchBackend.settle`)."""
        if analysis is self.analysis:
            return
        if not same_groups(self.groups, analysis.groups, self.comp, analysis.comp):
            self.groups = list(analysis.groups)
        self.analysis = analysis

    # ---- facts ----------------------------------------------------------------------
    @property
    def barriers(self) -> list[Barrier]:
        return self.labels.barriers

    @property
    def total_params(self) -> int:
        return sum(v.data.numel() for v in self.ir.values.values() if v.kind == "param" and v.data is not None)

    @property
    def total_flops(self) -> float:
        """Multiply-accumulates of the layers with weights or contractions, at the example shape."""
        return float(self.labels.total_macs)

    @property
    def param_macs(self) -> dict[str, float]:
        """MACs each weight takes part in (user's names), for exact FLOPs accounting when a
        weight is pruned along both its input and output dims."""
        return {self.ir.values[v].source_name or v: m for v, m in self.labels.param_macs.items()}

    @property
    def grouped_params(self) -> int:
        """Parameters with at least one element inside some group (each counted once)."""
        covered: dict[str, dict[int, set[int]]] = {}
        for g in self.groups:
            for s in g.slices:
                covered.setdefault(s.param, {}).setdefault(s.dim, set()).update(s.index.flatten().tolist())
        total = 0
        for name, dims in covered.items():
            shape = self.params[name].shape
            outside = 1
            for d, size in enumerate(shape):
                outside *= size - len(dims.get(d, ()))
            total += self.params[name].numel() - outside
        return total

    @property
    def why_no_groups(self) -> str | None:
        """Why no group is offered (None while some is): no parameters at all, every
        parameter behind barriers (the first ones named), or every group withdrawn by
        :meth:`verify` (the first reasons given).  A model that cannot be pruned says so
        instead of reporting "0 groups" as if that were a result."""
        if self.groups:
            return None
        if self.total_params == 0:
            where = "float initializers" if self.ir.frontend == "onnx" else "parameters"
            return (f"no parameters found: the model has no {where} for groups to slice "
                    f"(weights held as constants in the graph are not parameters)")
        if self.withdrawn:
            first = "; ".join(f"{g.name}: {r}" for g, r in self.withdrawn[:3])
            return (f"every group ({len(self.withdrawn)}) failed the zero-invariance check and was withdrawn; "
                    f"first reasons: {first}")
        if self.barriers:
            named = "; ".join(f"{b.node} [{b.op}]: {b.reason}" for b in self.barriers[:5])
            more = f" (+{len(self.barriers) - 5} more)" if len(self.barriers) > 5 else ""
            return f"the parameters' channels are all held by barriers ({len(self.barriers)}): {named}{more}"
        return self._why_all_kept()

    def _why_all_kept(self) -> str:
        """Why no parameter channel forms a unit when no barrier kept them, from what the
        analysis actually found: the outputs are named only when one carries labels (the
        message once blamed them for a parameter expanded before a bmm, which no output
        touched: its elements were coupled to unlabelled entries)."""
        pin = int(self.comp[0])
        pinned, free = [], []
        for name, v in self.ir.values.items():
            if v.kind != "param":
                continue
            labels = list(self.labels.param_axes.get(name, {}).values())
            f = self.labels.fields.get(name)
            if f is not None:
                labels.append(f.labels)
            atoms = torch.cat([t.reshape(-1) for t in labels]) if labels else torch.zeros(0, dtype=torch.long)
            atoms = atoms[atoms >= 0]
            if atoms.numel() and bool((self.comp[atoms] == pin).all()):
                pinned.append(v.source_name or name)
            elif not self.labels.param_axes.get(name):
                free.append(v.source_name or name)
        outputs = any(self.labels.fields.get(o) is not None for o in self.ir.outputs)
        ties = ("a model output, or an entry that must stay" if outputs else
                "entries that must stay (no model output carries channels)")
        parts = []
        if pinned:
            parts.append(f"the channels of {len(pinned)} parameter(s) ({', '.join(pinned[:3])}"
                         f"{', ...' if len(pinned) > 3 else ''}) are coupled to {ties}: an operand "
                         "computed without labels (a one-hot, a mask) or a value pruned as one unit")
        if free:
            parts.append(f"{len(free)} parameter(s) ({', '.join(free[:3])}{', ...' if len(free) > 3 else ''}) "
                         "are read by no layer that produces channels (no rule slices them by dim)")
        return "no channel of any parameter can be removed: " + ("; ".join(parts) or "no unit holds a parameter slice")

    # ---- pruning state --------------------------------------------------------------
    def zero_masks(self, tensors: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per group, which units are entirely zero now."""
        tensors = self.params if tensors is None else tensors
        rows: dict = {}  # each weight's per-row reduction, shared by the groups that cut it
        with torch.no_grad():
            return [g.zero_mask(tensors, rows) for g in self.groups]

    def removed_units(self, tensors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Unit ids to remove: every all-zero unit, whole groups included.  The emitters
        erase the operators that a whole group's removal leaves without input (see
        ``graphprune.passes.erase``) and keep one zero unit where that is impossible."""
        parts = [g.atoms[m.cpu()] for g, m in zip(self.groups, self.zero_masks(tensors)) if bool(m.any())]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    # ---- hierarchy (operator erasure) --------------------------------------------------
    def stays_connected(self, masks: list[torch.Tensor]) -> bool:
        """Whether every output still depends on the inputs once the units in ``masks``
        (one bool tensor per group) are removed, i.e. no output is dead (see
        :mod:`graphprune.analysis.liveness`, which the erasure pass shares)."""
        if not any(bool(m.any()) for m in masks):
            return True
        removed = torch.zeros(int(self.comp.max()) + 1, dtype=torch.bool)
        for g, m in zip(self.groups, masks):
            removed[g.atoms[m.cpu()]] = True
        empty = self.liveness.empty(removed)
        return not empty or not set(self.ir.outputs) & self.liveness.dead(empty)

    @property
    def hierarchy(self) -> list[int]:
        """Groups that can go entirely (erasing the operators they feed, e.g. a residual
        branch) while the network stays connected: H2SPG's candidates."""
        out = []
        for i, g in enumerate(self.groups):
            masks = [torch.zeros(h.size, dtype=torch.bool) for h in self.groups]
            masks[i][:] = True
            if self.stays_connected(masks):
                out.append(i)
        return out

    def construct_subnet(self, fold_bn: bool = False, mode: SubnetMode = "graph") -> CompactModel:
        """The compact model: every all-zero unit removed.  Never changes the user's model.

        ``mode="graph"``: the exported graph, rewritten (any model; ONNX in, ONNX out).
        ``mode="module"``: a copy of the user's own module with its standard layers
        shrunk in place and its width attributes updated, so its class, methods and
        attributes stay (``generate()``, ``save_pretrained()``); it must reproduce the
        zeroed model on the example, else :class:`~graphprune.lower.module.NotInPlace`
        says why.  ``mode="auto"``: the module where that works, else the graph;
        :attr:`compact_form` says which was built and why.
        ``fold_bn``: fold inference batch norms into the convolution or linear layer
        before them (graph only: for inference and code generation; a folded module has
        no batch norm left to switch to training mode).  Layers named in
        :attr:`added_biases` get those biases."""
        if mode not in ("graph", "module", "auto"):
            raise GraphPruneError(f"unknown construct_subnet mode {mode!r}", hint="use 'graph', 'module' or 'auto'")
        if mode != "graph":
            reason = "fold_bn=True: folded batch norms are no longer the user's layers" if fold_bn else None
            emit_module = getattr(self.backend, "emit_module", None)
            if reason is None and emit_module is None:
                reason = "there is no user module (the model was traced from ONNX)"
            if reason is None:
                built = emit_module(self, self.params, biases=self.added_biases)
                if built.module is not None:
                    self.compact_form = "module" + (f" (width attributes set: {built.widths})" if built.widths else "")
                    if _is_pretrained(built.module):
                        why = fit_config(built.module, built.read)
                        self.compact_form += ("; config rewritten" if why is None else
                                              f"; widths recorded in the config ({why}): load with "
                                              f"graphprune.load_pretrained")
                    return built.module
                reason = built.reason
            if mode == "module":
                raise NotInPlace(f"the compact model cannot be the user's own module: {reason}", source=self.ir.source,
                                 hint="use construct_subnet(mode='graph') (or 'auto') for the exported-graph form")
            self.compact_form = f"graph (module mode failed: {reason})"
        else:
            self.compact_form = "graph"
        return self.backend.emit(self, self.params, fold_bn=fold_bn, biases=self.added_biases)

    # ---- self-check -------------------------------------------------------------------
    def zeroed_copy(self, masks: Iterable[tuple[Group, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The weights with each group's masked units zeroed, ``params`` untouched: only the
        weights those groups slice are copied (a copy of every weight would be a second
        model; vit_h_14 is 2.5 GB)."""
        masks = [(g, m) for g, m in masks if m.any()]
        touched = {s.param for g, _ in masks for s in g.slices}
        tensors = {k: v.detach().clone() if k in touched else v.detach() for k, v in self.params.items()}
        for g, m in masks:
            g.scatter_(tensors, m)
        return tensors

    def verify(self, fraction: float = 0.5, seed: int = 0, rtol: float = 1e-4,
               spill_above: int | None = None) -> list[tuple[Group, str]]:
        """Zero a random ``fraction`` of every group's units (rounded down, so a group's
        last unit is never taken) and
        require the compact model without those units to reproduce the zeroed full model.
        The units are zeroed in the weights themselves and put back bit for bit after each
        forward (:class:`~.in_place.ZeroedInPlace`; the saved weights go to a temporary
        folder past ``spill_above`` bytes), so the check needs the weights plus one compact
        model: a copy of what it zeroes would be most of a transformer's weights again.
        By default they spill only past the machine's available memory less twice the
        weights (room left for a compact model and a forward), and never before 1 GiB:
        writing a 1.2 GB ViT-L's weights out and back was 0.4 s of its check.
        All groups are checked in one forward (they are checked together as a user prunes
        them); only a failure bisects, so each failing group is found and withdrawn alone,
        with the reason; returns them.  A compact model
        that cannot be built or run is a bug, raised as :class:`VerificationError`.
        Where the backend has cheaper examples (:meth:`~.frontends.backend.Backend.check_examples`,
        :mod:`~.frontends.small_check`: a 224x224 picture cropped to 64x64 where the model
        runs the same ops there, then a batch of 32's first two samples), groups are checked
        on those first, cheapest first; only a pass counts there, anything else goes on to
        the next and at last to the example itself, which alone withdraws groups.

        ``rtol`` holds for float32 weights; half-precision weights round every product
        and the compact model sums in another order, so the tolerance is raised to a few
        units of their rounding (:func:`~.rel_error.check_tolerance`)."""
        rtol = check_tolerance(rtol, self.params.values())
        weights = sum(t.numel() * t.element_size() for t in self.params.values())
        if spill_above is None:
            spill_above = max(1 << 30, available_bytes() - 2 * weights)
        gen = torch.Generator().manual_seed(seed)
        picks = {}
        for g in self.groups:
            mask = torch.zeros(g.size, dtype=torch.bool)
            mask[torch.randperm(g.size, generator=gen)[: int(g.size * fraction)]] = True
            picks[g.id] = mask
        large = weights > 1 << 30

        def ok(groups: list[Group], example: CheckExample | None = None) -> str | None:
            # the units zeroed here are the ones to remove: no pass over every weight to
            # find the all-zero ones (0.25 s of vit_b_16's check)
            removed = torch.cat([g.atoms[picks[g.id]] for g in groups])
            try:
                with ZeroedInPlace(self.params, [(g, picks[g.id]) for g in groups], spill_above) as tensors:
                    err = self.backend.compare(self, tensors, removed, example)
            except (GraphPruneError, NotConclusive):
                raise  # names its node, op and file already; or no verdict on a cheaper example
            except Exception as exc:
                # a rewrite or emitter that raises has a bug: withdrawing the groups would
                # hide it as less pruning
                names = ", ".join(g.name for g in groups[:4]) + (f" (+{len(groups) - 4})" if len(groups) > 4 else "")
                raise VerificationError(f"emitting or running the compact model raised {type(exc).__name__}: "
                                        f"{exc} (checking groups {names})", source=self.ir.source,
                                        hint="this is a graphprune bug: please report it with the model") from exc
            reason = None if err < rtol else f"compact output differs (rel. error {err:.2e})"
            if reason is not None or large:  # the compact model's modules hold each other: 3 GiB
                gc.collect()  # per bisection step on Phi-3 until collected (0.25 s with the analysis alive)
            release()  # the runs' buffers stay resident otherwise
            return reason

        bad: list[tuple[Group, str]] = []

        def bisect(groups: list[Group]) -> None:
            reason = ok(groups)
            if reason is None:
                return
            if len(groups) == 1:
                bad.append((groups[0], reason))
                return
            mid = len(groups) // 2
            bisect(groups[:mid])
            bisect(groups[mid:])

        if not self.groups:
            return bad
        for small in self.backend.check_examples(self):
            # a pass on a cheaper example is the verdict; anything else is judged on the
            # next one, and at last on the example itself, so a cheaper one never withdraws a group
            try:
                found = ok(self.groups, small)
                if found is None:
                    return bad
            except NotConclusive:
                found = None  # the plan rewrites sizes the cheaper example changes: no verdict there
            except VerificationError as exc:
                found = str(exc)[:200]
            if found is not None and small.program is None:  # the model's own program, which takes any batch
                self.notes.append(f"verification on the first samples of the example failed ({found}): "
                                  f"checked again on the whole batch")
            elif found is not None:  # a model may not run on a crop (a position table of the example's size)
                log.info("%s: the check on a crop of the example failed (%s): checked on the next example",
                         self.ir.source, found)
        bisect(list(self.groups))
        if bad:
            ids = {g.id for g, _ in bad}
            self.groups = [g for g in self.groups if g.id not in ids]
            self.withdrawn.extend(bad)
        return bad

    def assert_zero_invariant(self, **kw: Any) -> None:
        bad = self.verify(**kw)
        if bad:
            raise ZeroInvarianceError("; ".join(f"{g.name}: {r}" for g, r in bad))

    # ---- reporting ----------------------------------------------------------------------
    def summary(self) -> str:
        """A table of groups, barriers and withdrawn groups (with their reasons), and why
        nothing can be pruned when no group is left."""
        lines = [f"{type(self).__name__}: {len(self.groups)} groups, {self.grouped_params:,} of "
                 f"{self.total_params:,} params in groups ({100 * self.grouped_params / max(1, self.total_params):.1f}%), "
                 f"{self.total_flops / 1e6:,.1f} MMACs"]
        why = self.why_no_groups
        if why is not None:
            lines.append(f"nothing to prune: {why}")
        lines += [f"{'id':>4} {'kind':8} {'units':>6} {'params/unit':>11} {'MMACs/unit':>10}  name / slices"]
        for g in self.groups:
            names = ", ".join(sorted({s.param for s in g.slices}))
            lines.append(f"{g.id:>4} {g.kind:8} {g.size:>6} {g.params_per_unit:>11,} "
                         f"{g.flops_per_unit / 1e6:>10.3f}  {g.name}: {names[:90]}")
        if self.barriers:
            lines.append("barriers (channels kept):")
            lines += [f"  {b.node} [{b.op}] {b.module}: {b.reason}" for b in self.barriers]
        if self.compact_form is not None:
            lines.append(f"compact model: {self.compact_form}")
        if self.notes:
            lines.append("capture:")
            lines += [f"  {n}" for n in self.notes]
        if self.withdrawn:
            lines.append("withdrawn groups:")
            lines += [f"  {g.name}: {r}" for g, r in self.withdrawn]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"<PrunableGraph {self.ir.frontend} {self.ir.source}: {len(self.groups)} groups, "
                f"{len(self.barriers)} barriers>")


def _is_pretrained(module: torch.nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (checked by duck type: importing transformers is
    not graphprune's to do for every model)."""
    return hasattr(module, "config") and hasattr(module, "save_pretrained") and hasattr(module.config, "to_dict")
