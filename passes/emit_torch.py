"""Emit a compact ``nn.Module`` from a traced program and a set of removed units.

The exported program's own graph is the template: parameters are replaced by sliced
copies (the user's model is never touched) and every node's rule rewrites the
constants that encode shapes.  The result has the original call signature and also
works in training mode (batch norm and dropout flags follow ``.train()``/``.eval()``).
"""
from __future__ import annotations

from typing import Any

import torch

from graphprune.ir.graph import Graph
from graphprune.ops.registry import rule_for

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
    for name, v in graph.values.items():
        if v.kind not in ("param", "buffer", "const") or v.source_name is None:
            continue
        src = tensors.get(v.source_name, v.data)
        if src is None:
            continue
        t = shrink.slice_tensor(name, src.detach()).clone()
        try:
            _set_tensor(gm, v.source_name, t, v.kind == "param")
        except AttributeError:
            continue  # lifted constants that the unlifted module inlines
    fx_nodes = {n.name: n for n in gm.graph.nodes}
    for node in graph.nodes:
        fx = fx_nodes.get(node.name)
        if fx is not None:
            rule_for(node.op).rewrite_fx(node, fx, shrink)
    for n in gm.graph.nodes:  # full-model shapes are stale now; fake tensors and provenance chains block deepcopy
        n.meta.clear()
    gm.recompile()
    return CompactModule(gm)
