"""The compact plan: everything that changes between the full and the compact model,
computed from the IR, the analysis and the op registry alone.

:func:`plan_compact` is a pure function: IR in, :class:`CompactPlan` out.  It decides
which operators are erased (:mod:`.erase`), which indices of every parameter survive,
each value's compact shape, and, by asking each node's registry entry, every node's
:class:`~graphprune.ops.rewrite.Rewrite`; with ``fold_bn`` it also folds inference
batch norms into the convolution or linear layer before them (:mod:`.fold_bn`); with
``biases`` it gives layers without a bias the one compensation computed for them
(:mod:`.add_bias`).  The
lowerings (:mod:`graphprune.lower.torch`, :mod:`graphprune.lower.onnx`) only apply a
plan to an fx graph or an ONNX proto; neither decides anything.

>>> plan = plan_compact(ir, labels, comp, removed, tensors, dynamic=lambda v: {0})
>>> plan.rewrites["conv2d_3"].args         # {"groups": 12}
>>> plan.params["p_conv1_weight"]          # {0: tensor([0, 2, 3, ...])}
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from graphprune.analysis.labels import Labels
from graphprune.errors import GraphPruneError, ZeroInvarianceError
from graphprune.ir.graph import Graph, Node
from graphprune.ops.catalog import rule_for
from graphprune.ops.rewrite import Rewrite

from .add_bias import AddedBias, plan_biases
from .erase import Evaluate, erase
from .fold_bn import Fold, fold_batch_norms
from .shrink import Shrink


@dataclass(frozen=True)
class CompactPlan:
    """What the compact model is, in IR terms.

    ``shapes``: compact shape of every activation whose shape changes.  ``params``: for each
    fixed value (parameter, buffer, constant) that shrinks, dim -> kept indices.
    ``rewrites``: node name -> its rewrite (nodes that do not change are absent).
    ``erased``: names of the nodes dropped; ``dead``: the values no longer computed;
    ``constants``: frontier value -> the constant (compact, broadcastable) that replaces
    it; ``unerased``: dead values whose operators had to stay, with the reason (their
    groups keep one zero unit instead).  ``folds``: batch norms folded into their producer (only with ``fold_bn``).
    ``biases``: biases added to layers that have none (compensated means, :mod:`.add_bias`).
    ``shrink``: the kept-index queries the plan was made from (fallback units of
    operators that could not be erased are kept in it).
    """

    shrink: Shrink
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    params: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    rewrites: dict[str, Rewrite] = field(default_factory=dict)
    erased: frozenset[str] = frozenset()
    dead: frozenset[str] = frozenset()
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    unerased: dict[str, str] = field(default_factory=dict)
    folds: tuple[Fold, ...] = ()
    biases: tuple[AddedBias, ...] = ()

    def __repr__(self) -> str:
        return (f"CompactPlan({len(self.shapes)} shapes, {len(self.params)} params sliced, "
                f"{len(self.rewrites)} rewrites, {len(self.erased)} erased, {len(self.constants)} constants, "
                f"{len(self.unerased)} unerased, {len(self.folds)} folds, {len(self.biases)} added biases)")

    def removes(self, node: Node) -> bool:
        """Whether ``node`` is erased."""
        return node.name in self.erased

    def shape(self, value: str) -> tuple[int, ...]:
        """The compact shape of the activation ``value``."""
        return self.shapes.get(value, self.shrink.old_shape(value))

    def slice(self, value: str, t: torch.Tensor) -> torch.Tensor:
        """``t``, the full tensor of the fixed value ``value``, cut to its kept indices."""
        for d, idx in self.params.get(value, {}).items():
            t = t.index_select(d, idx.to(t.device))
        return t


def plan_compact(ir: Graph, lab: Labels, comp: torch.Tensor, removed: torch.Tensor,
                 tensors: dict[str, torch.Tensor], *, dynamic: Callable[[str], set[int]],
                 evaluate: Evaluate | None = None, fold_bn: bool = False,
                 biases: dict[str, torch.Tensor] | None = None) -> CompactPlan:
    """The plan for removing the components ``removed``.

    ``tensors``: current parameters and buffers (the IR's data where absent), read for
    the erased operators' constants and for batch-norm folding; ``dynamic``/``evaluate``:
    as for :func:`.erase.erase` (the batch axes of a value, and how to compute
    input-independent values when the IR's callables cannot); ``biases``: full-size biases
    to add to layers that have none, by their weight's user-facing name (:mod:`.add_bias`).
    """
    er = erase(Shrink(lab, comp, removed), tensors, dynamic, evaluate, source=ir.source)
    shrink = er.shrink
    erased = frozenset(n.name for n in ir.nodes if er.removes(n))
    shapes = {}
    for name, v in ir.values.items():
        if (name in lab.fields or name in lab.views) and not v.fixed and name not in er.dead:
            new = shrink.new_shape(name)
            if new != v.shape:
                shapes[name] = new
    params = shrink.param_indices()
    rewrites = {}
    for node in ir.nodes:
        if node.name in erased:
            continue
        rw = _rewrite(node, shrink, ir.source)
        if rw is not None:
            rewrites[node.name] = rw
    plan = CompactPlan(shrink, shapes, params, rewrites, erased, frozenset(er.dead), er.constants, er.kept)
    if fold_bn:
        plan = replace(plan, folds=fold_batch_norms(ir, plan, tensors))
    return replace(plan, biases=plan_biases(ir, plan, biases)) if biases else plan


def _rewrite(node: Node, shrink: Shrink, source: str | None) -> Rewrite | None:
    """The node's rule's rewrite; a rule that raises has a bug, reported as one."""
    try:
        return rule_for(node.op).rewrite(node, shrink)
    except GraphPruneError:
        raise
    except Exception as exc:
        raise ZeroInvarianceError(f"the rule for {node.op} failed to rewrite the node: {exc!r}", node=node.name,
                                  op=node.source_op or node.op, source=source,
                                  hint="this is a graphprune bug; please report it") from exc
