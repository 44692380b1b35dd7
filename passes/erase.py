"""Operator erasure: drop the operators that removed groups leave without input.

When a whole group goes (every filter of a residual branch's first conv), the values
it labels are *empty* and everything computed only from them and constants is *dead*
(:mod:`graphprune.analysis.liveness`): no longer a function of the input.  At the
*frontier*, where a dead value meets a live one, the dead value is replaced by a
constant and every dead operator disappears, so an erased residual branch leaves just
the skip path plus, where the branch ends in a bias or a batch norm, a constant added.

The constant is what the zeroed full model computes there.  It is evaluated with every
empty value set to zero (no input needed: kept entries never depend on removed ones),
by the IR's own callables or by the backend's evaluator (onnxruntime for ONNX), then reduced to its
smallest broadcastable shape (batch and any axis along which it is uniform become 1; a
dynamic axis that is not uniform forbids erasure) and sliced to the compact channels.
A frontier is accepted only where the consumer is a binary add/sub/mul/div whose other
operand already has the output's shape, so broadcasting the constant reproduces the
output exactly.  Anywhere else (a dead value feeding a concat, a graph output, an
operator without a runnable implementation, a constant that varies along the batch)
the groups that emptied it keep one zero unit, so the operators after it stay, the
reason is recorded in :attr:`Erasure.kept`, and the analysis runs again.  Those are the
only situations handled quietly: an operator that raises while its constant is
computed is a bug, raised as a :class:`~graphprune.errors.ZeroInvarianceError` naming
the node, its op and the model.

Constants are evaluated with batch norm in inference mode (the traced graph's mode):
in a compact model switched to ``.train()`` an erased branch still adds its eval-mode
constant.

>>> er = erase(shrink, tensors, dynamic=lambda name: {0})
>>> er.shrink            # use this Shrink from here on (fallback units restored)
>>> er.removes(node), er.constants   # operators to drop; frontier value -> constant
>>> er.kept              # dead value -> why its operators were kept after all
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from graphprune.analysis.liveness import Liveness
from graphprune.errors import ZeroInvarianceError
from graphprune.ir.graph import Graph, Node
from graphprune.ops.elementwise import is_arithmetic

from .shrink import Shrink


@dataclass
class Erasure:
    """What the plan takes: ``shrink`` for kept indices, drop the operators of ``dead``
    values, feed ``constants`` (compact shapes) to the frontier consumers; ``kept``: the
    dead values that could not be erased, with the reason (their groups keep a unit)."""

    shrink: Shrink
    dead: set[str] = field(default_factory=set)
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)

    def removes(self, node: Node) -> bool:
        """Whether ``node`` is erased (every output dead)."""
        return bool(node.outputs) and all(o in self.dead for o in node.outputs)


Evaluate = Callable[[set[str], set[str]], dict[str, torch.Tensor]]
"""``(wanted, empty) -> {value: tensor}``: input-independent values of the zeroed full
model, computed with every ``empty`` value set to zeros.  Raises :class:`NotRunnable`
for an operator it cannot run (which keeps the branch), anything else for a bug."""


class NotRunnable(Exception):
    """An operator on the way to a frontier value has no implementation to run on
    constants: a known reason to keep its branch, not an error."""

    def __init__(self, node: str, op: str) -> None:
        super().__init__(f"{op} ({node}) cannot be run on constants")


def erase(shrink: Shrink, tensors: dict[str, torch.Tensor], dynamic: Callable[[str], set[int]],
          evaluate: Evaluate | None = None, source: str | None = None) -> Erasure:
    """Plan the erasure for ``shrink``'s removed units.

    ``tensors``: current parameters and buffers by the user's names (falls back to the
    IR's own data); ``dynamic(value)``: the axes of a value whose size varies between
    calls (the batch), along which a constant must be uniform; ``evaluate``: how to
    compute the frontier's values (default: run the IR nodes' callables); ``source``:
    the model, named in errors.
    """
    graph = shrink.graph
    if not bool(shrink.removed.any()):
        return Erasure(shrink)  # nothing removed, nothing empty (the full model)
    evaluate = evaluate or (lambda wanted, empty: _evaluate(graph, wanted, empty, tensors, source))
    live = Liveness(graph, shrink.lab, shrink.comp)
    kept: dict[str, str] = {}
    while True:
        empty = live.empty(shrink.removed)
        if not empty:
            return Erasure(shrink, kept=kept)
        dead = live.dead(empty)
        frontier, bad = _frontier(graph, dead)
        constants, why = _constants(graph, shrink, frontier, dead, empty, evaluate, dynamic)
        bad |= {v for v in frontier if v not in constants}
        if not bad:
            return Erasure(shrink, dead, constants, kept)
        kept.update({v: why.get(v, "read by an operator that cannot take a constant") for v in bad})
        shrink = shrink.restoring(_one_unit_per_seed(graph, shrink, bad, dead, empty))


def _frontier(graph: Graph, dead: set[str]) -> tuple[set[str], set[str]]:
    """Dead values that live operators read: those an arithmetic consumer can take as a
    broadcast constant, and those that cannot be erased (``bad``)."""
    frontier, bad = set(), {o for o in graph.outputs if o in dead}
    for node in graph.nodes:
        outs = [o for o in node.outputs if o in dead]
        if outs and len(outs) == len(node.outputs):
            continue  # erased with its outputs
        bad.update(outs)  # a live operator would still produce an empty tensor
        ins = [i for i in node.inputs if i in dead]
        if not ins:
            continue
        other = [i for i in node.inputs if i not in dead]
        out = node.outputs[0] if node.outputs else None
        if is_arithmetic(node) and len(ins) == 1 and len(other) == 1 and out is not None \
                and graph.values[other[0]].shape == graph.values[out].shape:
            frontier.add(ins[0])
        else:
            bad.update(ins)
    return frontier - bad, bad


def _constants(graph: Graph, shrink: Shrink, frontier: set[str], dead: set[str], empty: set[str],
               evaluate: Evaluate, dynamic: Callable[[str], set[int]]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Frontier value -> its constant in compact, broadcastable form, and for the values
    left out (the caller falls back for them) why."""
    if not frontier:
        return {}, {}
    try:
        full = evaluate(frontier, empty)
    except NotRunnable as exc:
        return {}, dict.fromkeys(frontier, str(exc))
    out, why = {}, {}
    for name in frontier:
        c = _reduce(full[name], dynamic(name))
        if c is None:
            why[name] = "its constant varies along the batch"
            continue
        for a in range(c.dim()):
            mask = shrink.kept(name, a) if c.shape[a] > 1 else None
            if mask is not None:
                c = c[(slice(None),) * a + (mask.to(c.device),)]
        if c.numel() and _broadcasts(graph, shrink, name, c, dead):
            out[name] = c.contiguous()
        else:
            why[name] = "its constant does not broadcast to the consumer's output"
    return out, why


def _evaluate(graph: Graph, wanted: set[str], empty: set[str], tensors: dict[str, torch.Tensor],
              source: str | None = None) -> dict[str, torch.Tensor]:
    """Run the operators that ``wanted`` (input-independent values) depend on, with every
    empty value as zeros and constants from ``tensors``."""
    producer = graph.producers()
    device = next((t.device for t in tensors.values() if isinstance(t, torch.Tensor)), torch.device("cpu"))
    env: dict[str, torch.Tensor] = {}
    need, stack = set(), list(wanted)
    while stack:
        name = stack.pop()
        v = graph.values[name]
        if name in env or name in need:
            continue
        if name in empty:
            env[name] = torch.zeros(v.shape, dtype=v.dtype, device=device)
        elif v.fixed:
            env[name] = tensors.get(v.source_name or name, v.data).detach().to(device)
        else:
            need.add(name)
            stack.extend(producer[name].inputs)
    with torch.no_grad():
        for node in graph.nodes:
            if not need.intersection(node.outputs):
                continue
            if node.target is None:
                raise NotRunnable(node.name, node.source_op or node.op)
            try:
                res = node.call(env)
            except Exception as exc:
                raise ZeroInvarianceError(f"computing an erased branch's constant failed: {exc!r}", node=node.name,
                                          op=node.source_op or node.op, source=source,
                                          hint="this is a graphprune bug; please report it") from exc
            res = list(res) if isinstance(res, (list, tuple)) else [res]
            if len(res) == len(node.outputs):
                env.update(zip(node.outputs, res))
            else:  # torch.export: tuple outputs named "<node>.<index>", non-tensors skipped
                env.update({o: res[int(o.rsplit(".", 1)[1])] for o in node.outputs})
    return {name: env[name] for name in wanted}


def _reduce(t: torch.Tensor, dynamic: set[int]) -> torch.Tensor | None:
    """``t`` with every axis along which it is uniform cut to size 1; None if a dynamic
    axis is not uniform (the constant would then depend on the batch)."""
    for a in range(t.dim()):
        if t.shape[a] > 1 and bool((t == t.narrow(a, 0, 1)).all()):
            t = t.narrow(a, 0, 1)
        elif t.shape[a] > 1 and a in dynamic:
            return None
    return t


def _broadcasts(graph: Graph, shrink: Shrink, name: str, c: torch.Tensor, dead: set[str]) -> bool:
    """Whether ``c`` broadcast against each consumer's live operand gives its compact output."""
    for node in graph.nodes:
        if name in node.inputs and not all(o in dead for o in node.outputs):
            other = next(i for i in node.inputs if i not in dead)
            try:
                shape = torch.broadcast_shapes(c.shape, shrink.new_shape(other))
            except RuntimeError:
                return False
            if tuple(shape) != shrink.new_shape(node.outputs[0]):
                return False
    return True


def _one_unit_per_seed(graph: Graph, shrink: Shrink, bad: set[str], dead: set[str], empty: set[str]) -> torch.Tensor:
    """One removed component per empty value upstream of ``bad``: keeping it leaves that
    value one zero channel, so the operators after it stay."""
    producer = graph.producers()
    seeds, seen, stack = set(), set(), list(bad)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in empty:
            seeds.add(name)
        elif name in producer:
            stack.extend(i for i in producer[name].inputs if i in dead)
    if not seeds:
        raise ZeroInvarianceError(f"dead values {sorted(bad)[:5]} have no empty source", node=sorted(bad)[0],
                                  hint="this is a graphprune bug; please report it")
    units = [shrink.comp[shrink.lab.fields[s].labels.reshape(-1)].min() for s in sorted(seeds)]
    return torch.stack(units)
