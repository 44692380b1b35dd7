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
    """Vectorised over all parameter indices (numpy): one Python step per unit at most,
    never one per (unit, slice), so models with 10^5 units group in well under a second."""
    graph = lab.graph
    comp_np = comp.numpy()
    pinned = int(comp_np[PIN])
    by_dim = {k: v for k, v in param_dim_labels(lab, comp).items() if graph.values[k[0]].kind == "param"}
    keys = sorted(by_dim)  # buffers (running statistics) are sliced by the emitters, not trained
    parts = []
    for k, pd in enumerate(keys):
        labels = by_dim[pd].numpy()
        c = np.where(labels >= 0, comp_np[np.clip(labels, 0, None)], pinned)
        pos = np.flatnonzero(c != pinned)
        parts.append((c[pos], np.full(len(pos), k), pos))
    if not parts or not sum(len(p[0]) for p in parts):
        return []
    c, k, ix = (np.concatenate(col) for col in zip(*parts))
    order = np.lexsort((ix, k, c))
    c, k, ix = c[order], k[order], ix[order]
    # one run per (unit, parameter dim): its indices are ix[start:start + count]
    run = np.flatnonzero(np.r_[True, (c[1:] != c[:-1]) | (k[1:] != k[:-1])])
    run_comp, run_key, run_count = c[run], k[run], np.diff(np.r_[run, len(c)])
    unit_start = np.flatnonzero(np.r_[True, run_comp[1:] != run_comp[:-1]])
    unit_end = np.r_[unit_start[1:], len(run)]
    unit_comp = run_comp[unit_start]
    unit_first = np.minimum.reduceat(ix[run], unit_start)  # orders units inside a group

    # a unit must hold an atom some layer produces; free parameter elements alone
    # (a weight no rule understood) are no unit
    produced = np.zeros(int(comp_np.max()) + 1, dtype=bool)
    for start, n, _, role in lab.origins:
        if role != "free":
            produced[comp_np[start:start + n]] = True
    by_sig: dict[bytes, list[int]] = defaultdict(list)
    for u in np.flatnonzero(produced[unit_comp]).tolist():
        s, e = unit_start[u], unit_end[u]
        by_sig[run_key[s:e].tobytes() + b"|" + run_count[s:e].tobytes()].append(u)

    flops = _flops_per_comp(lab, comp)
    origin = _origin_lookup(lab)
    heads = set()
    for h in lab.head_atoms:
        heads.update(comp[h[h >= 0]].tolist())

    _, first_atom = np.unique(comp_np, return_index=True)  # comp ids are 0..n-1
    groups = []
    for members in by_sig.values():
        units = np.asarray(members)
        units = units[np.lexsort((unit_comp[units], unit_first[units]))]
        slices, ppu = [], 0
        for j in range(unit_end[units[0]] - unit_start[units[0]]):
            r0 = unit_start[units[0]] + j
            p, d = keys[run_key[r0]]
            cnt = int(run_count[r0])
            starts = run[unit_start[units] + j]
            rows = ix[starts[:, None] + np.arange(cnt)]
            slices.append(Slice(graph.values[p].source_name or p, d, torch.from_numpy(rows)))
            v = graph.values[p]
            if v.data is not None:
                ppu += cnt * v.data.numel() // max(1, v.shape[d])
        comps = torch.from_numpy(unit_comp[units])
        name, role = origin(int(first_atom[comps[0]]))
        kind = "head" if int(comps[0]) in heads else ("channel" if role == "out" else "slice")
        groups.append(Group(len(groups), name, kind, len(units), slices, int(ppu),
                            float(flops[comps].mean()), comps))
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
