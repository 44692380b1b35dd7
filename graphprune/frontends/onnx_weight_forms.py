"""Where an ONNX file keeps its weights, and how to write a shrunk weight back in that form.

Exporters disagree on where a weight lives.  torch's exporters and today's paddle2onnx
write initializers; paddle2onnx before 2.0 wrote every weight as a ``Constant`` node (the
PP-OCR files PyPI packages ship hold 236 to 420 of them and no initializer at all), in
``value`` or in ``value_floats`` form; exporters share one tensor between layers through
``Identity`` nodes; a mixed-precision file keeps an fp16 weight and converts it with a
``Cast`` for an op run in fp32.  The form says nothing about the role, so the importer
treats a weight the same whatever its form (:func:`constant_weight`, :func:`is_view`),
and the lowering writes each compact weight back in the form and type the input had
(:func:`set_constant`): a user who gave an fp16 file of ``Constant`` weights gets one
back.  It imports only the skeleton helpers (a leaf), so the importer and the lowering
can both use it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_skeleton import FLOAT_TYPES

if TYPE_CHECKING:
    import torch

def is_weight(arr: np.ndarray) -> bool:
    """Whether a float tensor held in a ``Constant`` node is a weight (a parameter that
    groups can slice) rather than a constant of the computation.

    The rule is the initializers' rule (float, rank >= 1), because the form is the
    exporter's choice, not the tensor's role; plus at least two elements: a
    single-element tensor can never lose an entry (every group keeps one unit), while as
    a constant its value stays readable by the rules that need one (a ``Pow`` exponent;
    optimum's BERT export divides by the attention scale held with shape ``[1]``).  Integer tensors (shapes,
    axes, pads, indices) are never weights."""
    return np.issubdtype(arr.dtype, np.floating) and arr.ndim >= 1 and arr.size > 1


def constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The float tensor a ``Constant`` node holds, in any of its float forms (``value``,
    ``value_float``, ``value_floats``); None for any other node or form (integers,
    strings, sparse tensors)."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for a in node.attribute:
        if a.name == "value" and a.t.data_type in FLOAT_TYPES:
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.asarray(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.asarray(list(a.floats), dtype=np.float32)
    return None


def constant_weight(node: onnx.NodeProto) -> np.ndarray | None:
    """The weight a ``Constant`` node holds (:func:`is_weight`) as a writeable array of
    its own, or None."""
    arr = constant_value(node)
    if arr is None or not is_weight(arr):
        return None
    return np.array(arr, order="C")


def set_constant(node: onnx.NodeProto, arr: np.ndarray) -> None:
    """Make ``node`` a ``Constant`` holding ``arr`` in the form and element type it held
    before (``value_floats`` stays ``value_floats``; an fp16 ``value`` stays fp16); a
    node that was no Constant (an ``Identity`` of one) gets a ``value`` of ``arr``'s type."""
    form = next((a for a in node.attribute if a.name in ("value", "value_float", "value_floats")), None) \
        if node.op_type == "Constant" else None
    del node.attribute[:]
    del node.input[:]
    node.op_type, node.domain = "Constant", ""
    if form is not None and form.name == "value_floats":
        node.attribute.append(helper.make_attribute("value_floats", [float(x) for x in arr.reshape(-1)]))
        return
    if form is not None and form.name == "value":
        arr = arr.astype(helper.tensor_dtype_to_np_dtype(form.t.data_type), copy=False)
    node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.require(arr, requirements="C"))))


def cast_target(node: onnx.NodeProto) -> int | None:
    """The float element type a ``Cast`` node converts to, or None (not a Cast, or to a
    non-float type: an integer cast of a weight is no weight any more)."""
    if node.op_type != "Cast":
        return None
    to = next((a.i for a in node.attribute if a.name == "to"), None)
    return to if to in FLOAT_TYPES else None


def is_view(node: onnx.NodeProto) -> bool:
    """Whether the node hands its first input on as the same weight: an ``Identity``, or a
    ``Cast`` to a float type (an fp16 weight converted for an fp32 op)."""
    return node.op_type == "Identity" or cast_target(node) is not None


def with_params(proto: onnx.ModelProto, params: dict[str, torch.Tensor]) -> onnx.ModelProto:
    """A copy of ``proto`` whose weights hold ``params`` (the zeroed input model, a recovered
    compact one), each in
    the form the file keeps it: an initializer, a ``Constant`` node, or a view of one (an
    ``Identity`` sharing a weight between layers, a ``Cast`` of an fp16 weight), which is
    one weight per use in the IR (the optimizers may write each differently) and so
    becomes a ``Constant`` of its own."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    stored = {i.name: i.data_type for i in out.graph.initializer}  # the type a weight is stored in
    stored.update((n.output[0], a.t.data_type) for n in out.graph.node if n.op_type == "Constant"
                  for a in n.attribute if a.name == "value")
    for node in out.graph.node:
        if node.output and node.output[0] in params and (node.op_type == "Constant" or is_view(node)):
            array = params[node.output[0]].detach().cpu().numpy()
            if is_view(node) and node.input[0] in stored:  # rounded as the file stores it (fp16), then viewed
                array = array.astype(helper.tensor_dtype_to_np_dtype(stored[node.input[0]])).astype(array.dtype)
            set_constant(node, array)
    for init in out.graph.initializer:
        if init.name in params:
            dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
            array = params[init.name].detach().cpu().numpy().astype(dtype)
            init.CopyFrom(numpy_helper.from_array(array, init.name))
    return out
