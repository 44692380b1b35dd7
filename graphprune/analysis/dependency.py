"""Run every node's registry rule over the graph and solve the couplings into units.

Units are the connected components of the atom graph (scipy's sparse connected
components: millions of atoms in milliseconds).  Fields spanning several axes must be
pruned as products; a component structure that violates that is repaired by coupling
hyperplanes along the axis with the most entries (heads, channel-shuffle pairs) until
every such field is consistent.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

from ..errors import GraphPruneError, RuleError
from ..ir.graph import Graph, Node
from ..memory import Trimmer
from ..ops.catalog import rule_for
from .budget import PhaseBudget
from .labels import PIN, Labels


def propagate(graph: Graph) -> Labels:
    """Apply each node's rule in topological order (recording the values that are zero
    where removed, for the rules after it); pin graph inputs and outputs."""
    lab = Labels(graph)
    for name in graph.inputs:
        lab.fields[name] = None
    trim = Trimmer()  # the label tensors' freed heap stays resident otherwise (370 MiB on vit_b_16)
    budget = PhaseBudget("propagate", source=graph.source)
    for node in graph.nodes:
        trim.tick()
        rule = rule_for(node.op)
        try:
            with budget.step(node.name, node.source_op or node.op):
                _fold(node, lab)
                rule.propagate(node, lab)
                if rule.keeps_zero(node, lab):  # only labelled outputs: an unlabelled one has nothing removed
                    lab.zero.update(o for o in node.outputs if lab.fields.get(o) is not None)
        except GraphPruneError:
            raise
        except Exception as exc:
            # a rule that raises has a bug: keeping the node's channels instead would hide
            # it as less pruning (an input form a rule cannot handle is its lab.barrier)
            raise RuleError(f"the {type(rule).__name__} rule raised {type(exc).__name__}: {exc}",
                            node=node.name, op=node.source_op or node.op, source=graph.source,
                            hint=f"fix the rule in {_rule_file(rule)}: handle this input or declare it "
                                 "with lab.barrier(node, reason)") from exc
        for o in node.outputs:
            lab.fields.setdefault(o, None)
    for name in graph.outputs:
        f = lab.field(name)
        if f is not None:
            lab.pin(f.labels)
    return lab


def _rule_file(rule: object) -> str:
    """Where a rule is defined, relative to the package root (``graphprune/ops/movement.py``)."""
    path = Path(inspect.getsourcefile(type(rule)) or type(rule).__module__)
    root = Path(__file__).resolve().parents[2]
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


_FOLD_MAX = 1 << 16  # elements: indices and masks, never activations


def _fold(node: Node, lab: Labels) -> None:
    """Record (in ``lab.folded``, see :meth:`Labels.data`) the contents of ``node``'s small
    integer or boolean outputs when every input's is known (constants, or outputs folded
    before): an index copied from a constant (Falcon's ``qkv[..., [-2]]`` reads
    ``lift_fresh_copy`` of one) is then a constant index for the rules, not one computed
    from data.  Weights are never inputs here, so nothing big is computed."""
    if node.target is None or not node.inputs:
        return
    graph = lab.graph
    ins = {}
    for i in node.inputs:
        data = lab.data(i)
        if data is None or graph.values[i].kind == "param" or data.device.type == "meta":
            return  # the common case, decided at the first input: an activation
        ins[i] = data
    outs = [graph.values[o] for o in node.outputs]
    if not outs or any(lab.data(v.name) is not None or v.dtype.is_floating_point or v.dtype.is_complex
                       or int(np.prod(v.shape)) > _FOLD_MAX for v in outs):
        return
    try:
        out = node.call(ins)
    except Exception:  # an op that needs more than its inputs (a random op, a device): left unknown
        return
    res = list(out) if isinstance(out, (list, tuple)) else [out]
    if len(res) == len(outs) and all(isinstance(t, torch.Tensor) and tuple(t.shape) == v.shape
                                     and t.device.type != "meta" for t, v in zip(res, outs)):
        lab.folded.update((v.name, t) for t, v in zip(res, outs))


def _components(n: int, e: np.ndarray) -> torch.Tensor:
    m = sp.coo_matrix((np.ones(len(e), dtype=np.int8), (e[:, 0], e[:, 1])), shape=(n, n)) if len(e) else \
        sp.coo_matrix((n, n), dtype=np.int8)
    _, comp = connected_components(m, directed=False)
    return torch.from_numpy(comp.astype(np.int64))


def solve(lab: Labels, max_rounds: int = 8) -> torch.Tensor:
    """Component id of every atom, with every multi-axis field made rectangular and every
    deferred coupling settled (each settles at most twice, so rounds are added for them)."""
    # a field that is rectangular stays so when later rounds merge more components, so
    # each (distinct) field is checked until it is, not in every round
    rects = list({id(r): r for r in lab.rects}.values())
    budget = PhaseBudget("solve", source=lab.graph.source)
    for k in range(max_rounds + 2 * len(lab.deferred)):
        with budget.step(f"round {k}", "couplings"):
            comp = _components(lab.n_atoms, lab.edges())
            pinned = comp[PIN]
            changed = False
            pending = []
            for labels in rects:
                c = torch.where(labels >= 0, comp[labels.clamp(min=0)], pinned)
                if _uniform_axis(c) is not None:
                    continue
                pending.append(labels)
                j = int(np.argmax(labels.shape))
                rows = labels.movedim(j, 0).reshape(labels.shape[j], -1)
                lab.union(rows[:, :1], rows)
                changed = True
            rects = pending
            changed |= _settle_deferred(lab, comp)
        if not changed:
            return comp
    for d in lab.deferred:  # out of rounds: the safe choice
        lab.union(d.a, d.b)
    lab.deferred.clear()
    return _components(lab.n_atoms, lab.edges())


def _settle_deferred(lab: Labels, comp: torch.Tensor) -> bool:
    """Pin the shared operand of each deferred coupling whose units are whole hyperplanes
    along a broadcast axis; couple the others for good.  True if anything changed."""
    changed = False
    for d in list(lab.deferred):
        c = torch.where(d.a >= 0, comp[d.a.clamp(min=0)], comp[PIN])
        if any(_uniform_along(c, j) for j in d.axes):
            if not d.pinned:
                lab.pin(d.b)
                d.pinned = changed = True
        else:
            lab.union(d.a, d.b)
            lab.deferred.remove(d)
            changed = True
    return changed


def _uniform_along(c: torch.Tensor, j: int) -> bool:
    rows = c.movedim(j, 0).reshape(c.shape[j], -1)
    return bool((rows == rows[:, :1]).all())


def _uniform_axis(c: torch.Tensor) -> int | None:
    for j in range(c.dim()):
        if _uniform_along(c, j):
            return j
    return None


def uniform_axis(labels: torch.Tensor, comp: torch.Tensor) -> int | None:
    """The axis of a (solved) multi-axis field along which each hyperplane is one unit."""
    c = torch.where(labels >= 0, comp[labels.clamp(min=0)], comp[PIN])
    return _uniform_axis(c)
