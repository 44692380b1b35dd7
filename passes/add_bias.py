"""Biases the compact model adds to layers that have none.

Calibrated compensation (:func:`graphprune.optim.obspa.compensate`) moves the removed
units' mean contribution ``W[:, removed] @ E[x_removed]`` into the consuming layer's bias
(FLAP's bias compensation).  Llama's ``o_proj`` and ``down_proj``, like most LLM
projections, have no bias to take it; the shift is then kept apart from the weights
(:attr:`graphprune.PrunableGraph.added_biases`, by the weight's name) and the plan
gives it to the layer as data: an :class:`AddedBias` per layer node, with the value cut
to the compact output channels.  The lowerings apply it (a bias argument set, ONNX
Gemm's ``C``, or an add after a matmul); the module mode gives the ``nn.Linear`` or
convolution a bias parameter.  Where each op takes a bias is its registry entry's
:meth:`~graphprune.ops.registry.Rule.bias_site`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from graphprune.errors import GraphPruneError
from graphprune.ir.graph import Graph
from graphprune.ops.catalog import rule_for
from graphprune.ops.registry import BiasSite

if TYPE_CHECKING:
    from .plan import CompactPlan


@dataclass(frozen=True)
class AddedBias:
    """The layer node ``node`` gets the bias ``value`` (compact output channels, the
    weight's dtype) where ``site`` says; ``weight`` is the weight's user-facing name,
    ``rank`` the number of dims of the node's output."""

    node: str
    weight: str
    site: BiasSite
    value: torch.Tensor
    rank: int

    def shaped(self) -> torch.Tensor:
        """What the lowering stores: for the op's own bias argument ``value`` divided by
        the op's bias scale (Gemm's ``beta``), else ``value`` shaped to broadcast along
        ``site.axis`` of the output."""
        if self.site.arg is not None:
            return self.value / self.site.scale if self.site.scale != 1.0 else self.value
        axis = self.site.axis % self.rank
        return self.value.reshape((-1,) + (1,) * (self.rank - 1 - axis))


def plan_biases(ir: Graph, plan: "CompactPlan", biases: dict[str, torch.Tensor]) -> tuple[AddedBias, ...]:
    """One :class:`AddedBias` per node that reads a weight named in ``biases`` (full-size
    ``[out]`` tensors by the weights' user-facing names), cut to the plan's kept outputs.

    A weight that no kept layer node without a bias reads is an error naming it: its
    bias would be dropped silently."""
    if not biases:
        return ()
    out, placed = [], set()
    for node in ir.nodes:
        site = rule_for(node.op).bias_site(node, ir)
        if site is None:
            continue
        v = ir.values[site.weight]
        name = v.source_name or site.weight
        if name not in biases:
            continue
        placed.add(name)
        if plan.removes(node):
            continue  # the layer is erased with its output: nothing reads the bias
        if any(f.producer == node.name for f in plan.folds):
            raise GraphPruneError(f"{name}: a batch norm is folded into the layer that gets an added bias",
                                  node=node.name, op=node.source_op or node.op, source=ir.source,
                                  hint="construct_subnet(fold_bn=False)")
        full = biases[name]
        if full.dim() != 1 or full.numel() != v.shape[site.out_dim]:
            raise GraphPruneError(f"added bias for {name} has shape {tuple(full.shape)}, the layer has "
                                  f"{v.shape[site.out_dim]} outputs", node=node.name, op=node.source_op or node.op,
                                  source=ir.source)
        keep = plan.params.get(site.weight, {}).get(site.out_dim)
        value = full.detach().cpu() if keep is None else full.detach().cpu().index_select(0, keep.cpu())
        out.append(AddedBias(node.name, name, site, value.to(v.dtype or full.dtype),
                             len(ir.values[node.outputs[0]].shape)))
    missing = sorted(set(biases) - placed)
    if missing:
        raise GraphPruneError(f"no layer without a bias reads {missing[0]} (+{len(missing) - 1} more): its added "
                              f"bias has nowhere to go", source=ir.source,
                              hint="added_biases name weights of linear, convolution, Gemm or MatMul layers")
    return tuple(out)
