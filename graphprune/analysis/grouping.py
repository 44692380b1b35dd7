"""Turn solved components into :class:`Group` s with their parameter slices.

A unit is a component that is not pinned and owns at least one parameter slice.  Units
whose slices have the same shape (same parameters, dims and counts) form one group: the
filters of one conv and everything coupled to them, the heads of one attention layer.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from .dependency import uniform_axis
from .groups import Group, Slice
from .labels import PIN, Labels


def param_dim_labels(lab: Labels, comp: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
    """(param value, dim) -> one atom label per index, from rule-given axes or free fields."""
    out: dict[tuple[str, int], torch.Tensor] = {}
    for p, dims in lab.param_axes.items():
        for d, labels in dims.items():
            out[(p, d)] = labels
    for name, v in lab.graph.values.items():
        f = lab.fields.get(name)
        if v.kind not in ("param", "buffer", "const") or f is None or name in lab.param_axes:
            continue
        j = uniform_axis(f.labels, comp) if len(f.axes) > 1 else 0
        if j is None:
            continue
        out[(name, f.axes[j])] = f.labels.movedim(j, 0).reshape(f.labels.shape[j], -1)[:, 0]
    return out


def build_groups(lab: Labels, comp: torch.Tensor) -> list[Group]:
    graph = lab.graph
    pinned = int(comp[PIN])
    per_comp: dict[int, list[tuple[str, int, torch.Tensor]]] = defaultdict(list)
    for (p, d), labels in param_dim_labels(lab, comp).items():
        if graph.values[p].kind != "param":
            continue  # buffers (running statistics) are sliced by the emitters, not trained
        c = torch.where(labels >= 0, comp[labels.clamp(min=0)], torch.full_like(labels, pinned))
        pos = torch.nonzero(c != pinned).flatten()
        if pos.numel() == 0:
            continue
        cs = c[pos]
        order = torch.argsort(cs, stable=True)
        cs, pos = cs[order], pos[order]
        uniq, counts = torch.unique_consecutive(cs, return_counts=True)
        for u, idx in zip(uniq.tolist(), torch.split(pos, counts.tolist())):
            per_comp[u].append((p, d, idx))

    # a unit must hold an atom some layer produces; free parameter elements alone
    # (a weight no rule understood) are no unit
    produced = torch.zeros(int(comp.max()) + 1, dtype=torch.bool)
    for start, n, _, role in lab.origins:
        if role != "free":
            produced[comp[start:start + n]] = True
    by_sig: dict[tuple, list[int]] = defaultdict(list)
    for u, slices in per_comp.items():
        if not produced[u]:
            continue
        sig = tuple(sorted((p, d, len(i)) for p, d, i in slices))
        by_sig[sig].append(u)

    flops = _flops_per_comp(lab, comp)
    origin = _origin_lookup(lab)
    heads = set()
    for h in lab.head_atoms:
        heads.update(comp[h[h >= 0]].tolist())

    _, first_atom = np.unique(comp.numpy(), return_index=True)  # comp ids are 0..n-1
    groups = []
    for sig, units in by_sig.items():
        units.sort(key=lambda u: min(i[0].item() if i.numel() else 0 for _, _, i in per_comp[u]))
        slices = []
        for p, d, _ in sig:
            rows = [next(i for q, e, i in per_comp[u] if q == p and e == d) for u in units]
            slices.append(Slice(graph.values[p].source_name or p, d, torch.stack(rows)))
        ppu = sum(cnt * graph.values[p].data.numel() // max(1, graph.values[p].shape[d])
                  for p, d, cnt in sig if graph.values[p].data is not None)
        comps = torch.tensor(units)
        name, role = origin(int(first_atom[units[0]]))
        kind = "head" if units[0] in heads else ("channel" if role == "out" else "slice")
        groups.append(Group(len(groups), name, kind, len(units), slices, int(ppu),
                            float(flops[comps].mean()) if len(units) else 0.0, comps))
    groups.sort(key=lambda g: int(first_atom[g.atoms].min()))
    for i, g in enumerate(groups):
        g.id = i
    return groups


def _flops_per_comp(lab: Labels, comp: torch.Tensor) -> torch.Tensor:
    total = torch.zeros(int(comp.max()) + 1, dtype=torch.float64)
    for atoms, macs in lab.costs:
        a = atoms[atoms >= 0]
        total.index_add_(0, comp[a], torch.full((a.numel(),), macs, dtype=torch.float64))
    return total


def _origin_lookup(lab: Labels):
    starts = np.array([o[0] for o in lab.origins] or [0])

    def find(atom: int) -> tuple[str, str]:
        if not lab.origins:
            return "?", "out"
        k = int(np.searchsorted(starts, atom, side="right")) - 1
        _, _, name, role = lab.origins[max(k, 0)]
        return name, role
    return find
