"""Emit a compact ONNX model: sliced initializers, rewritten shape constants, fresh
shape inference, ``onnx.checker`` passed; operators that removed groups leave without
input are erased (:mod:`.erase`) and dead nodes dropped.  Graph inputs, outputs and
their dynamic axes are untouched (their channels are never pruned).

The weights are written last: until then the big ones are stubs (type and dims, see
:func:`graphprune.frontends.onnx_import.stub`), so copying the traced structure, dropping
dead initializers, inlining functions, shape inference and the checker never copy or
serialise them."""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import onnx.inliner
import torch
from onnx import helper, numpy_helper

from graphprune.errors import BadOnnxError
from graphprune.frontends.onnx_import import check_model, fill, infer_shapes, put_weight
from graphprune.ir.graph import Graph
from graphprune.ops.catalog import rule_for

from .erase import Erasure, Evaluate, erase
from .shrink import Shrink


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Dead-code elimination: remove nodes none of whose outputs is read (repeatedly),
    then initializers nothing reads any more."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        keep = [n for n in graph.node if set(n.output) & used]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _erase(graph: onnx.GraphProto, er: Erasure) -> None:
    """Feed each frontier consumer its constant (an initializer ``<value>__erased``) and
    drop the erased nodes; :func:`_drop_unused` then takes what only they used."""
    for name, c in er.constants.items():
        graph.initializer.append(numpy_helper.from_array(np.array(c.detach().cpu().numpy(), order="C"),
                                                         f"{name}__erased"))
    for n in [n for n in graph.node if any(n.output) and all(o in er.dead for o in n.output if o)]:
        graph.node.remove(n)
    for n in graph.node:
        for k, i in enumerate(n.input):
            if i in er.constants:
                n.input[k] = f"{i}__erased"


def _inline_functions(model: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """Inline the model-local functions the rules called (:meth:`Shrink.call_onnx_function`,
    e.g. a layer norm over pruned columns) and drop them with their domains: the compact
    model holds standard ops only, for onnxruntime and TVM's frontend alike."""
    ours = {(f.domain, f.name) for f in model.functions} - {(f.domain, f.name) for f in original.functions}
    if not ours:
        return model
    model = onnx.inliner.inline_selected_functions(model, sorted(ours))
    kept = [f for f in model.functions if (f.domain, f.name) not in ours]
    del model.functions[:]
    model.functions.extend(kept)
    gone = {d for d, _ in ours} - {f.domain for f in kept} - {n.domain for n in model.graph.node}
    opsets = [o for o in model.opset_import if o.domain not in gone]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    return model


def _evaluator(ir: Graph, proto: onnx.ModelProto, tensors: dict[str, torch.Tensor]) -> Evaluate:
    """Compute input-independent values with onnxruntime: the nodes they depend on, in a
    model of their own whose initializers are the current weights and zeros for the
    empty values (the model's inputs are never reached)."""
    from graphprune.frontends.onnx_backend import run_onnx  # the backend imports this module

    producer = {o: n for n in proto.graph.node for o in n.output}
    initial = {i.name: i for i in proto.graph.initializer}

    def evaluate(wanted: set[str], empty: set[str]) -> dict[str, torch.Tensor]:
        graph = onnx.GraphProto(name="erased")
        nodes, seen, stack = set(), set(), list(wanted)
        while stack:
            name = stack.pop()
            if name in seen or not name:
                continue
            seen.add(name)
            v = ir.values.get(name)
            if name in empty:
                arr = np.zeros(v.shape, dtype=torch.empty(0, dtype=v.dtype).numpy().dtype)
                graph.initializer.append(numpy_helper.from_array(arr, name))
            elif v is not None and v.kind == "param":
                arr = tensors.get(name, v.data).detach().cpu().numpy()
                graph.initializer.append(numpy_helper.from_array(np.array(arr, order="C"), name))
            elif name in initial:
                graph.initializer.append(initial[name])
            else:
                nodes.add(id(producer[name]))
                stack.extend(producer[name].input)
        graph.node.extend(n for n in proto.graph.node if id(n) in nodes)
        names = sorted(wanted)
        graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
        model = onnx.helper.make_model(graph, opset_imports=proto.opset_import, ir_version=proto.ir_version)
        return {n: torch.from_numpy(a) for n, a in zip(names, run_onnx(model, {}))}
    return evaluate


def _dynamic_axes(ir: Graph) -> Callable[[str], set[int]]:
    """Axes whose size changed when the importer ran a second batch size."""
    return lambda name: ir.values[name].dynamic_axes


def emit_onnx(ir: Graph, proto: onnx.ModelProto, shrink: Shrink, tensors: dict[str, torch.Tensor],
              weights: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """The compact model of ``proto`` (the traced structure, its fed weights stubs) with
    ``tensors`` (the IR's data where absent) sliced into it.  With ``weights`` (a dict)
    the fed weights stay stubs and their arrays, views of ``tensors`` where nothing is
    sliced, go into it: what ``run_onnx(model, feeds, weights)`` runs without any copy."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    er = erase(shrink, tensors, _dynamic_axes(ir), _evaluator(ir, proto, tensors))
    shrink = er.shrink
    shrink.onnx = model
    fed: dict[str, np.ndarray] = {}
    inits = {i.name: k for k, i in enumerate(model.graph.initializer)}
    for name, k in inits.items():
        v = ir.values.get(name)
        if v is None:
            continue
        src = tensors.get(name, v.data)
        t = shrink.slice_tensor(name, src.detach().cpu())
        arr = t.numpy().astype(helper.tensor_dtype_to_np_dtype(model.graph.initializer[k].data_type), copy=False)
        put_weight(model.graph.initializer[k], name, arr, fed)
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
        put_weight(model.graph.initializer.add(), name, t.numpy(), fed)
        model.graph.node.remove(n)
    by_name = {n.name: n for n in model.graph.node}
    for node in ir.nodes:
        if not er.removes(node):
            rule_for(node.op).rewrite_onnx(node, by_name[node.name], shrink)
    _erase(model.graph, er)
    _drop_unused(model.graph)
    model = _inline_functions(model, proto)
    del model.graph.value_info[:]
    try:
        model = infer_shapes(model, inplace=True, strict_mode=False)  # any size: weights are not serialised
        check_model(model)
    except Exception as exc:
        raise BadOnnxError(f"compact ONNX model is invalid: {str(exc)[:300]}", source=ir.source,
                           hint="this is a graphprune bug; please report it with the model") from exc
    if weights is None:
        fill(model, fed)
    else:
        kept = {i.name for i in model.graph.initializer}
        weights.update((k, a) for k, a in fed.items() if k in kept)
    return model
