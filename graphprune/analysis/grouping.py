"""Turn solved components into :class:`Group` s with their parameter slices.

A unit is a component that is not pinned and owns at least one parameter slice.  Units
whose slices have the same shape (same parameters, dims and counts) form one group: the
filters of one conv and everything coupled to them, the heads of one attention layer.
"""
from __future__ import annotations


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
        if not v.fixed or f is None or name in lab.param_axes:
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
    if not keys:
        return []
    # every (parameter dim, index) at once: its atom, which key it belongs to, its index
    sizes = np.array([by_dim[pd].numel() for pd in keys])
    labels = np.concatenate([by_dim[pd].numpy().reshape(-1) for pd in keys])
    k = np.repeat(np.arange(len(keys)), sizes)
    ix = np.arange(len(labels)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    c = np.where(labels >= 0, comp_np[np.clip(labels, 0, None)], pinned)
    pos = np.flatnonzero(c != pinned)
    if not len(pos):
        return []
    c, k, ix = c[pos], k[pos], ix[pos]
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
    by_sig = _units_by_signature(np.flatnonzero(produced[unit_comp]), unit_start, unit_end, run_key, run_count)

    flops = _flops_per_comp(lab, comp)
    origin = _origin_lookup(lab)
    heads = set()
    for h in lab.head_atoms:
        heads.update(comp[h[h >= 0]].tolist())

    _, first_atom = np.unique(comp_np, return_index=True)  # comp ids are 0..n-1
    groups = []
    for units in by_sig:
        units = units[np.lexsort((unit_comp[units], unit_first[units]))]
        slices, ppu = [], 0
        for j in range(unit_end[units[0]] - unit_start[units[0]]):
            r0 = unit_start[units[0]] + j
            p, d = keys[run_key[r0]]
            cnt = int(run_count[r0])
            starts = run[unit_start[units] + j]
            rows = ix[starts[:, None] + np.arange(cnt)]
            role, bias = lab.roles.get((p, d), ("other", None))
            if bias is not None:
                bias = graph.values[bias].source_name or bias
            slices.append(Slice(graph.values[p].source_name or p, d, torch.from_numpy(rows), role=role, bias=bias))
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


def _units_by_signature(units: np.ndarray, start: np.ndarray, end: np.ndarray, key: np.ndarray,
                        count: np.ndarray) -> list[np.ndarray]:
    """Units with the same (parameter dim, index count) runs, as arrays of unit ids.

    A hidden unit of a transformer has a run in every layer, so the runs are hashed per
    unit (position-dependent, vectorised) and the grouping by hash is then checked run by
    run against each bucket's first unit; a collision falls back to exact keys."""
    if not len(units):
        return []
    n = end[units] - start[units]
    owner = np.repeat(np.arange(len(units)), n)
    pos = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    runs = start[units][owner] + pos
    with np.errstate(over="ignore"):
        h = (key[runs].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             ^ count[runs].astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
             ^ (pos.astype(np.uint64) + np.uint64(1)) * np.uint64(0x165667B19E3779F9))
        h = (h ^ (h >> np.uint64(31))) * np.uint64(0x94D049BB133111EB)
        unit_hash = np.add.reduceat(h, np.cumsum(n) - n) ^ n.astype(np.uint64)
    _, first, inverse = np.unique(unit_hash, return_index=True, return_inverse=True)
    rep = first[inverse.reshape(-1)]
    rep_runs = start[units][rep][owner] + pos
    exact = bool((n == n[rep]).all() and (key[runs] == key[np.minimum(rep_runs, len(key) - 1)]).all()
                 and (count[runs] == count[np.minimum(rep_runs, len(count) - 1)]).all())
    if not exact:  # a hash collision: exact keys, one Python step per unit
        buckets: dict[bytes, list[int]] = {}
        for i, u in enumerate(units.tolist()):
            sig = key[start[u]:end[u]].tobytes() + b"|" + count[start[u]:end[u]].tobytes()
            buckets.setdefault(sig, []).append(i)
        return [units[np.asarray(b)] for b in buckets.values()]
    order = np.argsort(inverse.reshape(-1), kind="stable")
    bounds = np.flatnonzero(np.r_[True, np.diff(inverse.reshape(-1)[order]) != 0, True])
    return [units[order[a:b]] for a, b in zip(bounds[:-1], bounds[1:])]


def _flops_per_comp(lab: Labels, comp: torch.Tensor) -> torch.Tensor:
    total = torch.zeros(int(comp.max()) + 1, dtype=torch.float64)
    if lab.costs:  # one scatter for all layers
        atoms = torch.cat([a for a, _ in lab.costs])
        macs = torch.cat([torch.full((a.numel(),), m, dtype=torch.float64) for a, m in lab.costs])
        keep = atoms >= 0
        total.index_add_(0, comp[atoms[keep]], macs[keep])
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
