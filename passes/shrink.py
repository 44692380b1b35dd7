"""Shapes and indices of the compact model once a set of units is removed.

:class:`Shrink` answers, for every value and parameter, which indices survive; the
op rules use it to rewrite their constant arguments (reshape sizes, split sizes,
slice bounds, conv groups) and the emitters to slice parameters.  Kept sets are
checked to be rectangles: anything else is a bug and raises instead of emitting a
wrong model.
"""
from __future__ import annotations

from typing import Any

import numpy as np

import torch

from graphprune.analysis.grouping import param_dim_labels
from graphprune.analysis.labels import Labels
from graphprune.errors import UnprunableTargetError, ZeroInvarianceError


class Shrink:
    def __init__(self, lab: Labels, comp: torch.Tensor, removed_units: torch.Tensor) -> None:
        """``removed_units``: component ids to remove."""
        self.lab, self.graph, self.comp = lab, lab.graph, comp
        self.removed = torch.zeros(int(comp.max()) + 1, dtype=torch.bool)  # per component
        self.removed[removed_units] = True
        self.removed_atom = self.removed[comp]
        self._param_labels = param_dim_labels(lab, comp)
        self._shapes: dict[str, tuple[int, ...]] = {}

    def restoring(self, units: torch.Tensor) -> "Shrink":
        """The same removal with ``units`` (component ids) kept after all: how the erasure
        pass keeps one zero unit of a group whose operators cannot be erased."""
        removed = self.removed.clone()
        removed[units] = False
        return Shrink(self.lab, self.comp, torch.nonzero(removed).flatten())

    # ---- values --------------------------------------------------------------------
    def kept_mask(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels < 0) | ~self.removed_atom[labels.clamp(min=0)]

    def old_shape(self, name: str) -> tuple[int, ...]:
        return self.graph.values[name].shape

    def kept(self, name: str, axis: int) -> torch.Tensor | None:
        """Boolean mask of surviving indices along ``axis`` (None: all survive)."""
        f = self.lab.fields.get(name)
        axis = axis % max(1, len(self.old_shape(name)))
        if f is None or axis not in f.axes:
            return None
        k = self.kept_mask(f.labels)
        j = f.axes.index(axis)
        mask = k.movedim(j, 0).reshape(k.shape[j], -1).any(dim=1)
        return None if bool(mask.all()) else mask

    def new_shape(self, name: str) -> tuple[int, ...]:
        if name in self._shapes:
            return self._shapes[name]
        shape = list(self.old_shape(name))
        f = self.lab.fields.get(name)
        if f is not None:
            k = self.kept_mask(f.labels)
            masks = []
            for j, a in enumerate(f.axes):
                m = k.movedim(j, 0).reshape(k.shape[j], -1).any(dim=1)
                masks.append(m)
                shape[a] = int(m.sum())
                if shape[a] == 0:
                    raise UnprunableTargetError(
                        f"removing these units empties axis {a} of {name}", node=name,
                        hint="keep at least one unit of the groups feeding this value")
            prod = masks[0]
            for m in masks[1:]:
                prod = prod.unsqueeze(-1) & m
            if not torch.equal(prod.reshape(k.shape), k):
                raise ZeroInvarianceError(f"surviving entries of {name} are not a rectangle",
                                          node=name, hint="this is a graphprune bug; please report it")
        self._shapes[name] = tuple(shape)
        return self._shapes[name]

    # ---- parameters ------------------------------------------------------------------
    def param_index(self, name: str) -> dict[int, torch.Tensor]:
        """dim -> LongTensor of surviving indices, for the dims of ``name`` that shrink."""
        out = {}
        for (p, d), labels in self._param_labels.items():
            if p != name:
                continue
            keep = self.kept_mask(labels)
            if not bool(keep.all()):
                out[d] = torch.nonzero(keep).flatten()
        return out

    def slice_tensor(self, name: str, t: torch.Tensor) -> torch.Tensor:
        for d, idx in self.param_index(name).items():
            t = t.index_select(d, idx.to(t.device))
        return t

    # ---- argument rewriting helpers used by the op rules ------------------------------
    @staticmethod
    def get_fx_arg(fx_node: Any, name: str) -> Any:
        if name in fx_node.kwargs:
            return fx_node.kwargs[name]
        pos = [a.name for a in fx_node.target._schema.arguments].index(name)
        return fx_node.args[pos]

    @staticmethod
    def set_fx_arg(fx_node: Any, name: str, value: Any) -> None:
        """Set a schema argument of an fx node by name, positional or keyword."""
        if name in fx_node.kwargs:
            kw = dict(fx_node.kwargs)
            kw[name] = value
            fx_node.kwargs = kw
            return
        schema = fx_node.target._schema
        pos = [a.name for a in schema.arguments].index(name)
        if pos < len(fx_node.args):
            args = list(fx_node.args)
            args[pos] = value
            fx_node.args = tuple(args)
        else:
            kw = dict(fx_node.kwargs)
            kw[name] = value
            fx_node.kwargs = kw

    # ONNX: the emitter sets ``self.onnx`` to the model being rewritten
    onnx: Any = None

    def set_onnx_attr(self, proto_node: Any, name: str, value: Any) -> None:
        from onnx import helper
        for i, a in enumerate(proto_node.attribute):
            if a.name == name:
                del proto_node.attribute[i]
                break
        proto_node.attribute.append(helper.make_attribute(name, value))

    def set_onnx_const_input(self, proto_node: Any, index: int, values: list[int]) -> None:
        """Point input ``index`` of the node at a new int64 initializer holding ``values``."""
        from onnx import numpy_helper
        name = f"{proto_node.name}__pruned_in{index}"
        self.onnx.graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        while len(proto_node.input) <= index:
            proto_node.input.append("")
        proto_node.input[index] = name

    def set_onnx_constant(self, proto_node: Any, values: list[int] | int) -> None:
        """Make the node an Identity of a new int64 initializer holding ``values``: a size
        that is known when the model is written (TVM's ONNX frontend, for one, cannot
        do arithmetic on run-time shapes)."""
        del proto_node.attribute[:]
        del proto_node.input[:]
        proto_node.op_type, proto_node.domain = "Identity", ""
        self.set_onnx_const_input(proto_node, 0, values)

    def call_onnx_function(self, proto_node: Any, fn: Any, **attrs: Any) -> None:
        """Turn the node into a call of the model-local function ``fn`` (a FunctionProto,
        added to the model once, its domain imported) with ``attrs``; inputs and outputs
        stay, trailing ones beyond the function's are dropped.  The emitter inlines the
        call, so the written model holds standard ops only."""
        from onnx import helper
        if not any(f.domain == fn.domain and f.name == fn.name for f in self.onnx.functions):
            self.onnx.functions.append(fn)
        if not any(o.domain == fn.domain for o in self.onnx.opset_import):
            self.onnx.opset_import.append(helper.make_opsetid(fn.domain, 1))
        proto_node.op_type, proto_node.domain = fn.name, fn.domain
        del proto_node.attribute[:]
        proto_node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
        del proto_node.input[len(fn.input):]
        del proto_node.output[len(fn.output):]

    def onnx_opset(self, default: int = 13) -> int:
        """The model's default-domain opset (``default`` if it declares none)."""
        return next((o.version for o in self.onnx.opset_import if o.domain in ("", "ai.onnx")), default)

    def set_onnx_split(self, proto_node: Any, sizes: list[int]) -> None:
        """Split sizes live in an input from opset 13 on, in an attribute before."""
        if self.onnx_opset() >= 13:
            for i, a in enumerate(proto_node.attribute):
                if a.name == "num_outputs":
                    del proto_node.attribute[i]
                    break
            self.set_onnx_const_input(proto_node, 1, sizes)
        else:
            self.set_onnx_attr(proto_node, "split", sizes)
