"""Bind an ONNX model's input shapes and fold its shape arithmetic before TVM imports it.

Exporters write dynamic models: ``Shape -> Gather -> Concat -> Resize`` to upsample to a
feature map's size, ``Shape -> Mod -> Pad`` to pad to a multiple of the stride.  TVM's
Relax ONNX importer folds some of that at fixed input sizes but not all of it: a ``Pad``
whose amounts come from ``Shape`` leaves a tensor of unknown shape, and the next op fails
(``Reshape expects the input tensor to have known shape``, ``emit_te now only supports
Tensor that has ShapeExpr shape``); with a symbolic batch even a ``Resize`` to a computed
size fails.  So the model is made static first: the graph inputs get the concrete shapes
the build is for, and every value that then depends only on shapes and constants is
computed once by onnxruntime and written in as a ``Constant`` node: an initializer would
reach TVM as a parameter (the importer keeps them as inputs, to bind the weights later),
and an ``Expand`` to a parameter's shape leaves a tensor of symbolic shape, which the
next op's legalisation refuses (``F.normalize`` in timm's EdgeNeXt).  The batch is bound too:
TVM 0.27 fails on ``Resize`` with sizes computed from a symbolic batch, so a compiled
model takes the batch it was built for (``graphprune compile``'s report says which).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune.frontends.onnx_skeleton import infer_shapes, run_onnx

#: Outputs larger than this are not folded into initializers (shape arithmetic is small;
#: a folded activation-sized constant would only grow the model).
_FOLD_MAX = 1 << 16
#: Ops whose outputs are not functions of their inputs, or hold subgraphs: never folded.
_NEVER = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial",
          "If", "Loop", "Scan", "SequenceMap"}


def bind_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph inputs have the concrete ``shapes`` (by name) and whose
    shape-only computations are folded into initializers (:func:`fold_shape_arithmetic`).
    ``model`` is not changed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in out.graph.input:
        if vi.name not in shapes:
            continue
        shape = vi.type.tensor_type.shape
        del shape.dim[:]
        for d in shapes[vi.name]:
            shape.dim.add().dim_value = int(d)
    # folding the pads of a Pad makes its output's shape known, which makes the Shape of a
    # later feature map foldable: repeat until nothing is folded (a fold removes computed nodes)
    while True:
        computed = _computed(out)
        out = fold_shape_arithmetic(out, shapes)
        if _computed(out) == computed:
            return out


def _computed(model: onnx.ModelProto) -> int:
    """How many nodes compute something (every node but ``Constant``)."""
    return sum(n.op_type != "Constant" for n in model.graph.node)


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Every value whose shape inference found all dims static, with that shape."""
    inferred = infer_shapes(model, strict_mode=False, data_prop=True)
    out = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.HasField("shape") \
                and all(d.HasField("dim_value") for d in t.shape.dim):
            out[vi.name] = tuple(d.dim_value for d in t.shape.dim)
    return out


def _foldable(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> list[onnx.NodeProto]:
    """The nodes whose outputs are known once the input shapes are: ``Shape``/``Size`` of a
    value of static shape, and any node fed only by constants and such outputs, whose
    outputs are small (in graph order)."""
    known = {i.name for i in model.graph.initializer}
    known |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    picked = []
    for n in model.graph.node:
        if n.op_type == "Constant" or n.op_type in _NEVER or n.domain not in ("", "ai.onnx"):
            continue
        if n.op_type in ("Shape", "Size"):
            ok = n.input[0] in shapes
        else:
            ok = all(not i or i in known for i in n.input) and bool(n.input)
            ok = ok and all(o in shapes and int(np.prod(shapes[o])) <= _FOLD_MAX for o in n.output if o)
        if ok:
            picked.append(n)
            known.update(o for o in n.output if o)
    return picked


def fold_shape_arithmetic(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """``model`` (its inputs static) with the values that depend only on shapes and
    constants replaced by ``Constant`` nodes, computed by one onnxruntime run on zeros of
    the input ``shapes``; nodes nothing reads any more are dropped.  Changes ``model``."""
    static = _static_shapes(model)
    folded = _foldable(model, static)
    if not folded:
        return model
    graph = model.graph
    wanted = [o for n in folded for o in n.output if o]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.ValueInfoProto(name=o) for o in wanted)
    inits = {i.name for i in graph.initializer}
    feeds = {vi.name: np.zeros(tuple(shapes[vi.name]),
                               helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
             for vi in graph.input if vi.name not in inits}
    values = dict(zip(wanted, run_onnx(probe, feeds)))
    drop = {id(n) for n in folded}
    constants = [helper.make_node("Constant", [], [o], value=numpy_helper.from_array(np.asarray(values[o]), o))
                 for o in wanted]
    keep = constants + [n for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(keep)
    _drop_dead(graph)
    del graph.value_info[:]
    return infer_shapes(model, inplace=True, strict_mode=False)


def _drop_dead(graph: onnx.GraphProto) -> None:
    """Remove nodes and initializers that no node or graph output reads."""
    used = {o.name for o in graph.output}
    keep = []
    for n in reversed(graph.node):
        if any(o in used for o in n.output):
            keep.append(n)
            used.update(i for i in n.input if i)
            for a in n.attribute:  # values a subgraph reads from this scope
                for g in [a.g, *a.graphs]:
                    used.update(i for sub in g.node for i in sub.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    used |= {i.name for i in graph.input}  # an initializer declared as an input stays (IR version < 4)
    live = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
