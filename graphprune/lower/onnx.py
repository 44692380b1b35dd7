"""Lower a compact plan to an ONNX model: sliced initializers, each node's
:class:`~graphprune.ops.rewrite.Rewrite` applied (an attribute or a constant input set,
a phantom op's model-local function called and then inlined), erased operators replaced
by constant initializers, folded batch norms dropped, biases the plan adds to layers
without one set (a Conv's or Gemm's bias input, an Add after a MatMul), dead nodes removed, fresh shape
inference and ``onnx.checker`` passed.  Graph inputs, outputs and their dynamic axes are
untouched (their channels are never pruned).

The weights are written last, and once: until then the big ones are stubs (type and
dims, see :func:`graphprune.frontends.onnx_skeleton.stub`), so copying the traced
structure, dropping dead initializers, inlining functions, shape inference and the
checker never copy or serialise them.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx.inliner
from onnx import helper, numpy_helper

from graphprune.errors import BadOnnxError, ZeroInvarianceError
from graphprune.frontends.onnx_scopes import reads, rename_reads
from graphprune.frontends.onnx_skeleton import check_model, fill, infer_shapes, put_weight
from graphprune.frontends.onnx_weight_forms import cast_target, constant_value, is_view, set_constant
from graphprune.ir.graph import Graph, Node
from graphprune.ops.catalog import onnx_op, rule_for
from graphprune.ops.rewrite import Call, Entries, OnnxArg, OnnxContext, Rewrite
from graphprune.passes.add_bias import AddedBias
from graphprune.passes.fold_bn import Fold
from graphprune.passes.plan import CompactPlan


def lower_onnx(ir: Graph, proto: onnx.ModelProto, plan: CompactPlan, tensors: dict[str, Any],
               weights: dict[str, np.ndarray] | None = None, check: bool = True) -> onnx.ModelProto:
    """The compact model of ``proto`` (the traced structure, its fed weights stubs) with
    ``tensors`` (the IR's data where absent) sliced into it.  With ``weights`` (a dict)
    the fed weights stay stubs and their arrays, views of ``tensors`` where nothing is
    sliced, go into it: what ``run_onnx(model, feeds, weights)`` runs without any copy.
    ``check``: shape-infer and check the result (False for a model over 2 GiB that
    nothing is removed from: its structure is the traced one)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    fed: dict[str, np.ndarray] = {}
    _write_tensors(model, ir, plan, tensors, fed)
    editor = _Editor(model)
    ctx = OnnxContext(opset=editor.opset, shape=plan.shape, dtype=lambda v: ir.values[v].dtype)
    by_name = {n.name: n for n in model.graph.node}
    for node in ir.nodes:
        rw = plan.rewrites.get(node.name)
        if rw is not None:
            _apply(editor, node, by_name[node.name], rw, ctx)
    for fold in plan.folds:
        _fold(editor, by_name[fold.producer], by_name[fold.norm], fold, fed)
    for added in plan.biases:
        _add_bias(editor, by_name[added.node], added, fed)
    _erase(model.graph, plan)
    _drop_unused(model.graph)
    model = _inline_functions(model, proto)
    if check:
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


def _write_tensors(model: onnx.ModelProto, ir: Graph, plan: CompactPlan, tensors: dict[str, Any],
                   fed: dict[str, np.ndarray]) -> None:
    """Every weight the IR knows, sliced (folded norms' scale and shift applied), written
    in the form the input held it (:mod:`~graphprune.frontends.onnx_weight_forms`): an
    initializer stays one, a ``Constant`` node stays a ``Constant`` (an ``Identity`` of
    one becomes a ``Constant`` of its own), an fp16 weight stays fp16 (a ``Cast`` in front
    of an fp32 op keeps reading a weight of its own).  Weights the importer untied
    (Identity of a shared initializer) become initializers of their own."""
    weights = {f.weight: f for f in plan.folds}
    biases = {f.bias: f for f in plan.folds if f.bias is not None}

    def compact(name: str) -> Any:
        t = plan.slice(name, tensors.get(name, ir.values[name].data).detach().cpu())
        if name in weights:
            return weights[name].scaled(t)
        return biases[name].shift if name in biases else t

    inits = {i.name: i for i in model.graph.initializer}
    for init in model.graph.initializer:
        if init.name in ir.values:
            arr = compact(init.name).numpy().astype(helper.tensor_dtype_to_np_dtype(init.data_type), copy=False)
            put_weight(init, init.name, arr, fed)
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in list(model.graph.node):
        name = n.output[0] if n.output else ""
        v = ir.values.get(name)
        if v is None or name in inits or not (n.op_type == "Constant" or is_view(n)):
            continue
        if not (v.kind == "param" or (v.kind == "const" and name in plan.params)):
            continue
        arr = compact(name).numpy()
        from_constant, dtype = _weight_source(n, producer, inits)
        if n.op_type == "Cast":  # an fp16 weight converted for an fp32 op: the weight stays fp16
            source = f"{name}__weight"
            arr = arr.astype(dtype, copy=False)
            if from_constant:
                held = helper.make_node("Constant", [], [source], name=source)
                set_constant(held, arr)
                model.graph.node.insert(list(model.graph.node).index(n), held)
            else:
                put_weight(model.graph.initializer.add(), source, arr, fed)
            n.input[0] = source
        elif from_constant:  # a Constant, or an Identity of one: a Constant, shrunk
            set_constant(n, arr)
        else:
            put_weight(model.graph.initializer.add(), name, arr, fed)
            model.graph.node.remove(n)


def _weight_source(node: onnx.NodeProto, producer: dict[str, onnx.NodeProto],
                   inits: dict[str, onnx.TensorProto]) -> tuple[bool, np.dtype]:
    """Where the weight ``node`` outputs comes from, through its chain of Identity and
    float Cast nodes (:func:`is_view`; the importer makes a weight of nothing else):
    ``(whether a Constant node holds it rather than an initializer, the element type
    ``node`` reads)`` (for a Constant, the type it holds)."""
    if node.op_type == "Constant":
        return True, constant_value(node).dtype
    name = node.input[0]
    if name in inits:
        return False, np.dtype(helper.tensor_dtype_to_np_dtype(inits[name].data_type))
    up = producer[name]
    from_constant, dtype = _weight_source(up, producer, inits)
    to = cast_target(up)
    return from_constant, dtype if to is None else np.dtype(helper.tensor_dtype_to_np_dtype(to))


class _Editor:
    """Small edits of one ModelProto's nodes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        # every name in use: a compact model pruned again already holds ``*__pruned_in*`` names
        self.names = {i.name for i in [*g.input, *g.initializer]} | {o for n in g.node for o in n.output}

    def fresh(self, name: str) -> str:
        """``name``, or ``name__2``, ``name__3``... whichever no value of the model has yet."""
        out, k = name, 1
        while out in self.names:
            k += 1
            out = f"{name}__{k}"
        self.names.add(out)
        return out

    def opset(self, default: int) -> int:
        """The model's default-domain opset (``default`` if it declares none)."""
        return next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), default)

    def set_attr(self, node: onnx.NodeProto, name: str, value: Any) -> None:
        self.del_attr(node, name)
        node.attribute.append(helper.make_attribute(name, value))

    @staticmethod
    def del_attr(node: onnx.NodeProto, name: str) -> None:
        for i, a in enumerate(node.attribute):
            if a.name == name:
                del node.attribute[i]
                return

    def set_const_input(self, node: onnx.NodeProto, index: int, values: Any) -> None:
        """Point input ``index`` of the node at a new int64 initializer holding ``values``."""
        name = self.fresh(f"{node.name}__pruned_in{index}")
        self.model.graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name

    def make_constant(self, node: onnx.NodeProto, values: Any) -> None:
        """Make the node an Identity of a new int64 initializer holding ``values``: a size
        that is known when the model is written (TVM's ONNX frontend, for one, cannot
        do arithmetic on run-time shapes)."""
        del node.attribute[:]
        del node.input[:]
        node.op_type, node.domain = "Identity", ""
        self.set_const_input(node, 0, values)

    def call_function(self, node: onnx.NodeProto, fn: onnx.FunctionProto, inputs: list[str],
                      attrs: dict[str, Any]) -> None:
        """Turn the node into a call of the model-local function ``fn`` (added to the
        model once, its domain imported) on ``inputs`` with ``attrs``; trailing outputs
        beyond the function's are dropped.  The lowering inlines the call, so the written
        model holds standard ops only."""
        model = self.model
        if not any(f.domain == fn.domain and f.name == fn.name for f in model.functions):
            model.functions.append(fn)
        if not any(o.domain == fn.domain for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(fn.domain, 1))
        node.op_type, node.domain = fn.name, fn.domain
        del node.attribute[:]
        node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
        del node.input[:]
        node.input.extend(inputs)
        del node.output[len(fn.output):]


def _apply(ed: _Editor, node: Node, proto: onnx.NodeProto, rw: Rewrite, ctx: OnnxContext) -> None:
    """Apply ``rw`` to ``proto``, the ONNX node of the IR node ``node``."""
    if node.source_op == f"onnx::{proto.op_type}":
        held = {a.name: p for a, p in zip(node.args, proto.input) if a is not None}  # IR value -> proto input
    else:  # the last node of a subgraph the importer fused (onnx_fusion): the IR reads the file's own names
        held = {a.name: a.name for a in node.args if a is not None}
    places = rule_for(node.op).onnx_args
    for name, value in rw.args.items():
        if isinstance(value, Entries):
            value = value.apply(list(node.attrs[name]))
        place = places.get((proto.op_type, name), OnnxArg())
        if place.input is not None and ed.opset(13) >= place.since:
            ed.set_const_input(proto, place.input, value)
            if place.replaces:
                ed.del_attr(proto, place.replaces)
        else:
            ed.set_attr(proto, place.name or name, value)
    for value, call in rw.feeds.items():
        source = held[value]
        slots = [k for k, i in enumerate(proto.input) if i == source]  # one state can be both h0 and c0
        name = ed.fresh(f"{proto.name}__pruned_in{slots[0]}")
        feed = helper.make_node("Identity", [source], [name], name=name)
        _call(ed, node, feed, call, ctx, {value: source})
        graph = ed.model.graph
        graph.node.insert(list(graph.node).index(proto), feed)  # a copy goes in: ``feed`` is complete first
        for k in slots:
            proto.input[k] = name
    if rw.call is not None:
        _call(ed, node, proto, rw.call, ctx, held)
    if rw.constant is not None:
        ed.make_constant(proto, rw.constant)


def _call(ed: _Editor, node: Node, proto: onnx.NodeProto, call: Call, ctx: OnnxContext, held: dict[str, str]) -> None:
    if call.op.onnx is None:
        raise ZeroInvarianceError(f"{call.op.name} has no ONNX form", node=node.name, op=node.source_op,
                                  hint="this is a graphprune bug; please report it")
    oc = call.op.onnx(call, ctx)
    ed.call_function(proto, oc.function, [held[v] for v in call.inputs if v is not None], dict(oc.attrs))
    for index, values in oc.inputs.items():
        ed.set_const_input(proto, index, values)


def _fold(ed: _Editor, layer: onnx.NodeProto, norm: onnx.NodeProto, fold: Fold, fed: dict[str, np.ndarray]) -> None:
    """The layer takes over the norm's output (its weight and bias already hold the
    fold; a layer without a bias gets one now); the norm goes."""
    if fold.bias is None:
        name = ed.fresh(f"{layer.name}__folded_bias")
        put_weight(ed.model.graph.initializer.add(), name, fold.shift.numpy(), fed)
        while len(layer.input) < 3:
            layer.input.append("")
        layer.input[2] = name
    layer.output[0] = norm.output[0]
    ed.model.graph.node.remove(norm)


def _add_bias(ed: _Editor, layer: onnx.NodeProto, added: AddedBias, fed: dict[str, np.ndarray]) -> None:
    """Give ``layer`` the initializer ``<layer>__added_bias``: as its bias input where its op
    has one, else through an ``Add`` right after it that takes over its output's name."""
    name = ed.fresh(f"{layer.name}__added_bias")
    put_weight(ed.model.graph.initializer.add(), name, added.shaped().numpy(), fed)
    if added.site.arg is not None:
        index = onnx_op(layer.op_type).inputs.index(added.site.arg)
        while len(layer.input) <= index:
            layer.input.append("")
        layer.input[index] = name
        return
    out = layer.output[0]
    layer.output[0] = ed.fresh(f"{out}__without_bias")
    nodes = ed.model.graph.node
    add = helper.make_node("Add", [layer.output[0], name], [out], name=ed.fresh(f"{layer.name}__add_bias"))
    nodes.insert(list(nodes).index(layer) + 1, add)


def _erase(graph: onnx.GraphProto, plan: CompactPlan) -> None:
    """Feed each frontier consumer its constant (an initializer ``<value>__erased``) and
    drop the erased nodes; :func:`_drop_unused` then takes what only they used."""
    for name, c in plan.constants.items():
        graph.initializer.append(numpy_helper.from_array(np.array(c.detach().cpu().numpy(), order="C"),
                                                         f"{name}__erased"))
    for n in [n for n in graph.node if any(n.output) and all(o in plan.dead for o in n.output if o)]:
        graph.node.remove(n)
    for n in graph.node:
        for i in reads(n):
            if i in plan.constants:
                rename_reads(n, i, f"{i}__erased")


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Dead-code elimination: remove nodes none of whose outputs is read (repeatedly),
    then initializers nothing reads any more (a control-flow branch's reads count)."""
    while True:
        used = {i for n in graph.node for i in reads(n)} | {o.name for o in graph.output}
        keep = [n for n in graph.node if set(n.output) & used]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _inline_functions(model: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """Inline the model-local functions the phantom calls added (e.g. a layer norm over
    pruned columns) and drop them with their domains: the compact model holds standard
    ops only, for onnxruntime and TVM's frontend alike."""
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
