"""Emit a compact ONNX model: sliced initializers, rewritten shape constants, fresh
shape inference, ``onnx.checker`` passed.  Graph inputs, outputs and their dynamic
axes are untouched (their channels are never pruned)."""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from graphprune.errors import BadOnnxError
from graphprune.ir.graph import Graph
from graphprune.ops.registry import rule_for

from .shrink import Shrink


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove initializers and Constant nodes nothing reads any more."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [n for n in graph.node if not (n.op_type == "Constant" and not set(n.output) & used)]
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def emit_onnx(ir: Graph, proto: onnx.ModelProto, shrink: Shrink, tensors: dict[str, torch.Tensor]) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    shrink.onnx = model
    inits = {i.name: k for k, i in enumerate(model.graph.initializer)}
    for name, k in inits.items():
        v = ir.values.get(name)
        if v is None:
            continue
        src = tensors.get(name, v.data)
        t = shrink.slice_tensor(name, src.detach().cpu())
        arr = t.numpy().astype(numpy_helper.to_array(model.graph.initializer[k]).dtype, copy=False)
        model.graph.initializer[k].CopyFrom(numpy_helper.from_array(np.array(arr, order="C"), name))
    # weights the importer untied (Identity of a shared initializer) and constants that
    # shrink (Constant nodes feeding a norm's scale) become initializers of their own
    for n in list(model.graph.node):
        name = n.output[0] if n.output else ""
        v = ir.values.get(name)
        if v is None or name in inits or n.op_type not in ("Identity", "Constant"):
            continue
        if not (v.kind == "param" or (v.kind == "const" and shrink.param_index(name))):
            continue
        t = shrink.slice_tensor(name, tensors.get(name, v.data).detach().cpu())
        model.graph.initializer.append(numpy_helper.from_array(np.array(t.numpy(), order="C"), name))
        model.graph.node.remove(n)
    by_name = {n.name: n for n in model.graph.node}
    for node in ir.nodes:
        rule_for(node.op).rewrite_onnx(node, by_name[node.name], shrink)
    _drop_unused(model.graph)
    del model.graph.value_info[:]
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        onnx.checker.check_model(model)
    except Exception as exc:
        raise BadOnnxError(f"compact ONNX model is invalid: {str(exc)[:300]}", source=ir.source,
                           hint="this is a graphprune bug; please report it with the model") from exc
    return model
