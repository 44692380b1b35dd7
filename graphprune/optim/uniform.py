"""Uniform selection: the same number of units removed from every group of one role.

A transformer's layers each have a head group and an MLP group; a global ranking keeps
different widths per layer, which a standard model class (one ``num_key_value_heads``
and one ``intermediate_size`` in its config) cannot hold.  With ``uniform=True`` the
groups that play one role in different layers (same kind, size and cost per unit, and
the same name once layer numbers are masked: ``model.layers.#.mlp.gate_proj``) are
selected as one: a *role group* whose unit ``r`` is every member's ``r``-th
lowest-scoring unit, scored by the mean of those.  The shared selection
(:func:`~graphprune.target.select_units`) then decides how many ranks go, with its
usual target, guards and overlap accounting, and each member removes its own
lowest-scoring units of that count.

>>> masks = select_uniform(g.groups, scores, Target(params=0.2), **totals)
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from graphprune.analysis.groups import Group, Slice
from graphprune.target import Target, select_units

_LAYER_NUMBER = re.compile(r"(?<![^._])(\w*?_)?\d+(?=[._]|$)")


def role(group: Group) -> tuple[str, int, int, float, str]:
    """What makes groups of different layers interchangeable: kind, size, per-unit costs
    and the name with its layer numbers masked (``layers.3`` and ``encoder_layer_3``)."""
    name = _LAYER_NUMBER.sub(lambda m: (m.group(1) or "") + "#", group.name)
    return group.kind, group.size, group.params_per_unit, round(group.flops_per_unit, 3), name


def _role_group(members: list[Group], orders: list[torch.Tensor], key: tuple) -> Group:
    """One group whose unit ``r`` is every member's ``r``-th unit in ``orders``."""
    slices = []
    for g, order in zip(members, orders):
        for s in g.slices:
            slices.append(Slice(s.param, s.dim, s.index[order], s.dim2,
                                None if s.index2 is None else s.index2[order], s.role, s.bias))
    return Group(-1, key[4], key[0], key[1], slices, sum(g.params_per_unit for g in members),
                 sum(g.flops_per_unit for g in members))


def select_uniform(groups: Sequence[Group], scores: Sequence[torch.Tensor], target: Target | float,
                   **totals: Any) -> list[torch.Tensor]:
    """Removal masks under ``target`` (as :func:`select_units`, with its ``totals``) that
    remove the same number of units from every group of one :func:`role`."""
    roles: dict[tuple, list[int]] = {}
    for i, g in enumerate(groups):
        roles.setdefault(role(g), []).append(i)
    merged, merged_scores, orders = [], [], []
    for key, members in roles.items():
        ranked = [torch.sort(scores[i].detach().to("cpu", torch.float64).flatten(), stable=True) for i in members]
        order = [r.indices for r in ranked]
        orders.append(order)
        merged.append(_role_group([groups[i] for i in members], order, key) if len(members) > 1 else groups[members[0]])
        merged_scores.append(torch.stack([r.values for r in ranked]).mean(0) if len(members) > 1
                             else scores[members[0]])
    chosen = select_units(merged, merged_scores, target, **totals)
    masks = [torch.zeros(g.size, dtype=torch.bool) for g in groups]
    for (key, members), order, mask in zip(roles.items(), orders, chosen):
        if len(members) == 1:
            masks[members[0]] = mask
            continue
        count = int(mask.sum())
        for i, o in zip(members, order):
            masks[i][o[:count]] = True
    return masks
