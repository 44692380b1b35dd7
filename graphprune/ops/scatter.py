"""Scatters: write ``updates`` into a copy of ``data`` at positions an index tensor gives.

Positions come from data, so the axes they address (a scatter's ``dim``, the leading
``k`` axes a ScatterND index tuple addresses) can never lose entries.  Every other axis
is addressed one-to-one: entry ``c`` of the output on it is entry ``c`` of data, of the
updates and of the index, so a channel there passes through as one unit across all three
(the index too: it has that axis and must shrink with it, which only a computed index
labelled with the same atoms can).  A tensor spanning such an axis without its labels (a
``zeros`` buffer, a constant index) cannot shrink: the op is then a barrier that says so.
"""
from __future__ import annotations

import torch

from ..analysis.labels import Field, Labels
from ..ir.graph import Node
from .common import ref_name
from .registry import OnnxOp, Rule, register

_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _scatter_elements(data, indices, updates, *_, axis=0, reduction="none", **__):
    if reduction == "none":
        return data.scatter(axis, indices, updates)
    return data.scatter_reduce(axis, indices, updates, _REDUCE[reduction])


def _scatter_nd(data, indices, updates, *_, reduction="none", **__):
    out = data.clone()
    k = indices.shape[-1]
    idx = tuple(indices.reshape(-1, k).T)
    upd = updates.reshape(-1, *data.shape[k:])
    if reduction == "none":
        out[idx] = upd
    elif reduction == "add":
        out.index_put_(idx, upd, accumulate=True)
    else:
        for j in range(upd.shape[0]):
            pos = tuple(int(i[j]) for i in idx)
            out[pos] = {"mul": torch.mul, "max": torch.maximum, "min": torch.minimum}[reduction](out[pos], upd[j])
    return out


@register("scatter", aten=("scatter", "scatter_add", "scatter_reduce", "scatter_", "scatter_add_"),
          onnx={"ScatterElements": OnnxOp(_scatter_elements, ("data", "indices", "updates")),
                "Scatter": OnnxOp(_scatter_elements, ("data", "indices", "updates")),
                "ScatterND": OnnxOp(_scatter_nd, ("data", "indices", "updates"))})
class Scatter(Rule):
    """Data, updates and index are coupled entry by entry on the axes the positions do
    not address (see the module docstring); the output takes data's labels there."""

    def propagate(self, node: Node, lab: Labels) -> None:
        a = node.attrs
        data, out = ref_name(a.get("input", a.get("data"))), node.outputs[0]
        index = ref_name(a.get("index", a.get("indices")))
        updates = ref_name(a.get("src", a.get("updates")))
        shape = lab.shape(data)
        if node.source_op == "onnx::ScatterND":
            k = len(shape) if index is None else lab.shape(index)[-1]
            addressed = set(range(k))
            lead = 0 if index is None else len(lab.shape(index)) - 1  # updates: index.shape[:-1] + data.shape[k:]
            # data axis each tensor's axis is (None: addresses positions; the index tuple axis)
            axis_maps = {data: list(range(len(shape))), index: [None] * (lead + 1),
                         updates: [None] * lead + list(range(k, len(shape)))}
        else:
            addressed = {int(a.get("dim", a.get("axis", 0))) % len(shape)}
            axis_maps = {n: list(range(len(shape))) for n in (data, index, updates)}
        axis_maps.pop(None, None)
        labelled = set()
        for name, to_data in axis_maps.items():
            if lab.graph.values[name].fixed and lab.field(name) is not None:
                return lab.barrier(node, f"scatters into or from {name}, a parameter, buffer or constant: its "
                                         f"entries would be coupled with computed positions; not analysed")
            f = lab.field(name)
            if f is not None:
                mapped = {to_data[u] for u in f.axes}
                if None in mapped or mapped & addressed:
                    return lab.barrier(node, "scatters along a labelled axis: its positions come from data")
                labelled |= mapped
        if not labelled:
            lab.fields[out] = None
            return
        axes = tuple(sorted(labelled))
        fields = []
        for name, to_data in axis_maps.items():
            mine = [u for u, d in enumerate(to_data) if d in labelled]
            if not mine:
                continue
            if any(lab.shape(name)[u] != shape[to_data[u]] for u in mine):
                return lab.barrier(node, f"{name} covers only part of the channel axis")
            f = lab.field(name)
            if f is None or tuple(to_data[u] for u in f.axes) != axes:
                return lab.barrier(node, f"{name} spans the channel axis without its channels (a constant, a "
                                         f"buffer or a computed index cannot shrink with it)")
            fields.append(f.labels)
        for labels in fields[1:]:
            lab.union(fields[0], labels)
        lab.set_field(out, Field(axes, fields[0]))

    def keeps_zero(self, node: Node, lab: Labels) -> bool:
        """Zero data with zero updates scatter (add, multiply, max or min) to zero."""
        a = node.attrs
        names = [ref_name(a.get(k)) for k in ("input", "data", "src", "updates")]
        return all(lab.is_zero(n) for n in names if n is not None) and "value" not in a
