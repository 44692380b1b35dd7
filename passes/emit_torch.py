"""Emit a compact ``nn.Module`` from a traced program and a set of removed units.

The exported program's own graph is the template: parameters are replaced by sliced
copies (the user's model is never touched) and every node's rule rewrites the
constants that encode shapes.  Operators that removed groups leave without input
are erased (:mod:`.erase`): the frontier reads a constant buffer instead.  The result
has the original call signature and also works in training mode (batch norm and
dropout flags follow ``.train()``/``.eval()``).
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch

from graphprune.ir.graph import Graph
from graphprune.ops.catalog import rule_for

from .erase import Erasure, erase
from .shrink import Shrink

_MODE_ARGS = {"batch_norm": "training", "dropout": "train", "feature_dropout": "train",
              "alpha_dropout": "train", "instance_norm": "use_input_stats"}


class CompactModule(torch.nn.Module):
    """A rewritten exported graph that honours train/eval like an ordinary module."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm
        self.train(False)

    def _mode_nodes(self) -> list[torch.fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "call_function"
                and isinstance(n.target, torch._ops.OpOverload) and n.target.overloadpacket.__name__ in _MODE_ARGS]

    def train(self, mode: bool = True) -> "CompactModule":
        self.training = mode
        for m in self.gm.modules():
            if m is not self.gm:
                m.training = mode
        changed = False
        for n in self._mode_nodes():
            name = _MODE_ARGS[n.target.overloadpacket.__name__]
            if name == "use_input_stats":
                continue
            Shrink.set_fx_arg(n, name, mode)
            changed = True
        if changed:
            self.gm.recompile()
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.gm(*args, **kwargs)


def _set_tensor(root: torch.nn.Module, fqn: str, t: torch.Tensor, as_param: bool) -> None:
    prefix, _, leaf = fqn.rpartition(".")
    mod = root.get_submodule(prefix) if prefix else root
    if as_param:
        setattr(mod, leaf, torch.nn.Parameter(t, requires_grad=t.is_floating_point()))
    elif leaf in getattr(mod, "_buffers", {}):
        mod._buffers[leaf] = t
    else:
        setattr(mod, leaf, t)


def emit_module(graph: Graph, exported: torch.export.ExportedProgram, shrink: Shrink,
                tensors: dict[str, torch.Tensor]) -> CompactModule:
    """``tensors``: current values by the user's names (parameters and buffers)."""
    gm = exported.module()
    for name in ("train", "eval"):  # export's guards against mode switches; CompactModule owns modes
        gm.__dict__.pop(name, None)
    fx_nodes = {n.name: n for n in gm.graph.nodes}
    er = erase(shrink, tensors, _dynamic_axes(graph, fx_nodes))
    shrink = er.shrink
    sig = exported.graph_signature
    paths = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}  # a tied weight's paths differ from its name
    for name, v in graph.values.items():
        if not v.fixed or v.source_name is None:
            continue
        src = tensors.get(v.source_name, v.data)
        if src is None:
            continue
        t = shrink.slice_tensor(name, src.detach()).clone()
        try:
            _set_tensor(gm, paths.get(name, v.source_name), t, v.kind == "param")
        except AttributeError:
            continue  # lifted constants that the unlifted module inlines
    for node in graph.nodes:
        fx = fx_nodes.get(node.name)
        if fx is not None and not er.removes(node):
            rule_for(node.op).rewrite_fx(node, fx, shrink)
    if er.dead:
        _erase(gm, er, {n.name for n in graph.nodes if er.removes(n)})
    for n in gm.graph.nodes:  # full-model shapes are stale now; fake tensors and provenance chains block deepcopy
        n.meta.clear()
    gm.recompile()
    return CompactModule(gm)


def _dynamic_axes(graph: Graph, fx_nodes: dict[str, torch.fx.Node]) -> Callable[[str], set[int]]:
    """A value's symbolic (batch) axes, from export's fake tensors; every axis if unknown."""
    def axes(name: str) -> set[int]:
        base, _, index = name.rpartition(".")
        val = fx_nodes[name].meta.get("val") if name in fx_nodes else None
        if val is None and base in fx_nodes and index.isdigit():  # "<node>.<i>": a tuple output
            vals = fx_nodes[base].meta.get("val")
            val = vals[int(index)] if isinstance(vals, (list, tuple)) else None
        if not isinstance(val, torch.Tensor):
            return set(range(len(graph.values[name].shape)))
        return {i for i, s in enumerate(val.shape) if not isinstance(s, int)}
    return axes


def _erase(gm: torch.fx.GraphModule, er: Erasure, removed: set[str]) -> None:
    """Feed each frontier consumer its constant (a buffer ``_erased_<k>``), then drop the
    erased operators, whatever only they used, and the weights nobody reads any more."""
    g = gm.graph
    fx_nodes = {n.name: n for n in g.nodes}
    for k, (name, c) in enumerate(sorted(er.constants.items())):
        old = _fx_value(fx_nodes, name)
        gm.register_buffer(f"_erased_{k}", c)
        with g.inserting_before(old):
            new = g.get_attr(f"_erased_{k}")
        for user in list(old.users):
            if user.name not in removed:
                user.replace_input_with(old, new)
                _out_of_place(user, new)
    read = {n.target for n in g.nodes if n.op == "get_attr" and n.users}

    def removable(n: torch.fx.Node) -> bool:
        return n.name in removed or (n.target is operator.getitem and n.args[0].name in removed)

    g.eliminate_dead_code(is_impure_node=lambda n: not removable(n) and (n.op == "call_module" or n.is_impure()))
    for target in read - {n.target for n in g.nodes if n.op == "get_attr"}:
        prefix, _, leaf = target.rpartition(".")
        delattr(gm.get_submodule(prefix) if prefix else gm, leaf)


def _out_of_place(node: torch.fx.Node, const: torch.fx.Node) -> None:
    """``const.add_(x)`` (torchvision's ``out += identity`` with the branch erased) cannot
    grow the constant to the output's shape: use ``add`` instead."""
    packet = getattr(node.target, "overloadpacket", None)
    if packet is not None and packet.__name__.endswith("_") and node.args and node.args[0] is const:
        node.target = getattr(getattr(torch.ops.aten, packet.__name__[:-1]), node.target._overloadname)


def _fx_value(fx_nodes: dict[str, torch.fx.Node], name: str) -> torch.fx.Node:
    """The fx node holding IR value ``name`` ("<node>.<i>" is a getitem of a tuple output)."""
    if name in fx_nodes:
        return fx_nodes[name]
    base, _, index = name.rpartition(".")
    return next(u for u in fx_nodes[base].users if u.target is operator.getitem and u.args[1] == int(index))
