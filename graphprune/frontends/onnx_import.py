"""ONNX frontend: a ModelProto (or file) -> the IR.

The model is checked, shape-inferred and run once with onnxruntime on example inputs
while every intermediate is captured: concrete shapes for all values, and concrete
contents for the small integer tensors that shape computations produce (Shape ->
Gather -> Concat -> Reshape chains of exported models), which is what the analysis
needs to run Reshape, Slice or Gather on labels.  Node inputs that are integer
constants (shapes, axes, split sizes, pads) are resolved into normalised attributes
so one rule serves every opset.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

import numpy as np
import onnx
import torch
from onnx import external_data_helper, helper, numpy_helper

from ..errors import BadOnnxError
from ..ir.graph import Graph, Node, Ref, Value
from ..ops.catalog import canonical_onnx, onnx_op
from ..ops.registry import OnnxOp
from .onnx_fusion import DecomposedNorm, find_norms
from .onnx_inputs import feeds_from_example, second_feeds
from .onnx_mapped import map_tensor, read_structure, tensor_bytes
from .onnx_scopes import outer_reads
from .onnx_skeleton import FLOAT_TYPES, check_model, elem_dtype, infer_shapes, is_fed, skeleton, stub, without_weights
from .onnx_weight_forms import cast_target, constant_weight, is_view

log = logging.getLogger(__name__)
_BIG = 1 << 16  # integer intermediates larger than this are not kept
def _parse(model: Any, load: Callable[[str], onnx.ModelProto] = onnx.load) -> tuple[onnx.ModelProto, str]:
    """The ModelProto of a path (read by ``load``: by default with its external data) or
    of the caller."""
    source = "<ModelProto>"
    if isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
        if not os.path.isfile(source):
            raise BadOnnxError(f"no such ONNX file: {source}", source=source, hint="check the path")
        try:
            model = load(source)
        except Exception as exc:
            raise BadOnnxError(f"cannot parse ONNX file: {type(exc).__name__}: {str(exc)[:200]}", source=source,
                               hint="the file is truncated or not an ONNX model") from exc
    if not isinstance(model, onnx.ModelProto):
        raise BadOnnxError(f"expected an ONNX ModelProto or path, got {type(model).__name__}", source=source)
    return model, source


def _open(model: Any) -> tuple[onnx.ModelProto, str, dict[str, np.ndarray]]:
    """Like :func:`_parse`, but a file's fed weights (:func:`is_fed`), embedded or in external
    data, are memory-mapped, not read: ``(proto, source, mapped)`` with those initializers
    as stubs in ``proto`` and their arrays in ``mapped`` (:mod:`.onnx_mapped`).  The mapping is private
    (copy-on-write): writing to an array never changes the file, and a later atomic
    replacement of the file (emitters write a temp file, then rename) leaves it intact;
    only rewriting the same file in place while the graph is in use would show through."""
    mapped: dict[str, np.ndarray] = {}

    def load(source: str) -> onnx.ModelProto:
        try:
            proto, embedded = read_structure(source, is_fed)  # weights embedded in the file: mapped in place
        except Exception:  # a file the wire reader cannot walk: onnx.load reads it, or says what is wrong
            return onnx.load(source, load_external_data=False)
        mapped.update(embedded)
        return proto

    proto, source = _parse(model, load)
    if source == "<ModelProto>":
        return proto, source, mapped
    base = os.path.dirname(source)
    for t in proto.graph.initializer:
        if external_data_helper.uses_external_data(t) and is_fed(t):
            mapped[t.name] = _map_external(t, base, source)
            t.CopyFrom(stub(t))
    try:
        external_data_helper.load_external_data_for_model(proto, base)  # the small rest
    except Exception as exc:
        raise BadOnnxError(f"cannot read the external data of {source}: {type(exc).__name__}: {str(exc)[:200]}",
                           source=source, hint="keep the data file(s) next to the model") from exc
    return proto, source, mapped


def _map_external(t: onnx.TensorProto, base: str, source: str) -> np.ndarray:
    """The external data of initializer ``t`` as a private memory map of its file."""
    info = external_data_helper.ExternalDataInfo(t)
    path = os.path.join(base, info.location)
    nbytes = tensor_bytes(t)
    offset = int(info.offset or 0)
    if (info.length and int(info.length) != nbytes) or not os.path.isfile(path) \
            or os.path.getsize(path) < offset + nbytes:
        raise BadOnnxError(f"invalid ONNX model: initializer {t.name!r} needs {nbytes} bytes at offset {offset} "
                           f"of {path}, which does not hold them", source=source,
                           hint="keep the data file next to the model, as the exporter wrote it")
    return map_tensor(path, offset, t)


def _annotate(model: onnx.ModelProto, source: str) -> None:
    """Check ``model`` (as its ``skeleton``), shape-infer it in place and name its nodes
    uniquely; errors say what is wrong."""
    try:
        check_model(model)
        infer_shapes(model, inplace=True, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise BadOnnxError(f"invalid ONNX model: {str(exc).strip()[:400]}", source=source,
                           hint="fix the model so that onnx.checker.check_model passes") from exc
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    if len({n.name for n in model.graph.node}) != len(model.graph.node):
        for i, n in enumerate(model.graph.node):
            n.name = f"{n.name}__{i}"


def read_model(model: Any) -> tuple[onnx.ModelProto, str]:
    """Load and validate; errors name the file and say what is wrong.  A file's proto is
    annotated in place; a caller's ModelProto is copied, never changed."""
    proto, source = _parse(model)
    if source == "<ModelProto>":
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        proto = copy
    _annotate(proto, source)
    return proto, source


def _weight(t: onnx.TensorProto, source: str) -> np.ndarray:
    """An initializer's contents as a writeable C-contiguous array of its own (the one copy
    of a weight the importer makes; ``raw_data`` is read once, as a view)."""
    try:
        arr = numpy_helper.to_array(t)
    except Exception as exc:
        raise BadOnnxError(f"invalid ONNX model: initializer {t.name!r} cannot be read: "
                           f"{type(exc).__name__}: {str(exc)[:200]}", source=source,
                           hint="fix the model so that onnx.checker.check_model passes") from exc
    if not arr.flags.writeable or not arr.flags.c_contiguous:  # a view of the proto's bytes
        arr = np.array(arr, order="C")
    return arr


def example_feeds(model: onnx.ModelProto, example: Any, source: str = "<ModelProto>") -> dict[str, np.ndarray]:
    """Feeds for the graph inputs: the user's example tensors (in input order or by name),
    or random ones with a dynamic batch set to 1 (see :mod:`.onnx_inputs`: any other
    dynamic dimension must be given)."""
    return feeds_from_example(model, example, source)


def _zero_weights(moved: dict[str, onnx.TensorProto]) -> dict[str, np.ndarray]:
    """Zeros in the type and shape of each fed weight, all views of one buffer (as big as
    the largest weight; onnxruntime only reads its inputs).  Shapes and shape arithmetic
    never read a weight's values, so a capture needs none: the weights of a model given
    as a file are not even read (a 2.5 GB model is analysed in a few hundred MB)."""
    sizes = {k: (int(np.prod(t.dims)) if len(t.dims) else 1, elem_dtype(t.data_type)) for k, t in moved.items()}
    buf = np.zeros(max((n * dt.itemsize for n, dt in sizes.values()), default=0), np.uint8)
    return {k: np.frombuffer(buf, dt, n).reshape(tuple(moved[k].dims)) for k, (n, dt) in sizes.items()}


def capture(model: onnx.ModelProto, feeds: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Every node output's value on ``feeds`` (one onnxruntime run).  The model runs as
    its ``skeleton`` with zeros fed for the float weights (:func:`_zero_weights`), so
    nothing is serialised but the graph: any size works.

    Only the analysis's needs come back whole: integer and boolean tensors (shape
    arithmetic, indices, masks), Constant outputs and the graph outputs.  A float
    intermediate comes back as its ``Shape`` (a node added right after its producer), and
    is returned as a zero-memory stand-in of that shape and dtype (``np.broadcast_to``):
    holding every activation at once took 2.4 GB on swin_t."""
    import onnxruntime as ort

    probe, moved = skeleton(model)
    feeds = {**feeds, **_zero_weights(moved)}
    elem = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)
            if v.type.HasField("tensor_type")}
    known = {o.name for o in probe.graph.output}
    shape_of: dict[str, str] = {}  # float value -> the output holding its shape
    nodes = []
    for n in probe.graph.node:
        nodes.append(n)
        for o in n.output:
            if not o or o in known:
                continue
            known.add(o)
            if n.op_type != "Constant" and elem.get(o) in FLOAT_TYPES:
                shape_of[o] = f"{o}__gp_shape"
                nodes.append(helper.make_node("Shape", [o], [shape_of[o]], name=f"{o}__gp_shape"))
                probe.graph.output.append(helper.ValueInfoProto(name=shape_of[o]))
            else:
                probe.graph.output.append(helper.ValueInfoProto(name=o))
    del probe.graph.node[:]
    probe.graph.node.extend(nodes)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = False  # activations go back to the system as they die
    opts.enable_mem_pattern = False
    # run each added Shape as soon as its input exists, so the activation dies at once (the
    # default order ran them last and held them all: 1.8 GB instead of 0.4 on maxvit_t)
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    except Exception as exc:
        raise BadOnnxError(f"onnxruntime cannot run the model: {str(exc).strip()[:400]}", source=source,
                           hint="check the shapes and dtypes of the example inputs (from the shell: "
                                "--input-shape NAME=1x3x224x224 or --inputs file.npz)") from exc
    for o, sh in shape_of.items():
        outs[o] = np.broadcast_to(np.zeros((), elem_dtype(elem[o])), tuple(int(d) for d in outs.pop(sh)))
    return {k: v for k, v in outs.items() if k not in moved}


def _second_capture(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
                    source: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """A capture at other sizes of every dynamic input axis (:func:`second_feeds`), which
    tells which intermediate dims follow them, and those feeds (None: nothing is dynamic).
    A model that declares a dimension dynamic but cannot run at another size of it is
    captured again at another batch only, and that is logged: its compact model keeps the
    sizes of the example in everything that depends on that dimension."""
    alt = second_feeds(model, feeds)
    if alt is None:
        return {}, None
    try:
        return capture(model, alt, source), alt
    except BadOnnxError as exc:
        alt = second_feeds(model, feeds, batch_only=True)
        if alt is None:
            raise
        log.warning("%s does not run at other sizes of its dynamic axes (%s); only the batch is varied",
                    source, str(exc).splitlines()[0][:200])
        return capture(model, alt, source), alt


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else (list(v) if isinstance(v, (list, tuple)) else v)
    return out


def _in_torch(spec: OnnxOp, attrs: dict[str, Any], outputs: list[str]) -> Callable[..., Any]:
    """The node as a torch callable of its inputs: the entry's implementation with the
    node's attributes bound, returning the outputs the node uses (its empty optional
    outputs dropped), one tensor or a tuple."""
    used = [k for k, o in enumerate(outputs) if o]

    def run(*inputs: Any) -> Any:
        out = spec.torch(*inputs, **{k: v for k, v in attrs.items() if not isinstance(v, Ref)})
        if not isinstance(out, (tuple, list)):
            return out
        picked = tuple(out[k] for k in used)
        return picked[0] if len(picked) == 1 else picked
    return run


def load_onnx(model: Any, example: Any = ()) -> tuple[Graph, onnx.ModelProto, dict[str, np.ndarray]]:
    """The IR of an ONNX model, the (validated, named) proto, and the example feeds
    (``example``: arrays in input order or by name, see :func:`example_feeds`).  Every
    value's ``alt_shape`` is its shape at other sizes of the dynamic input axes, the
    inputs' included (:func:`_second_capture`).

    The proto kept is the model's structure with its fed weights as stubs
    (:func:`without_weights`): the IR's tensors, read from the given proto or file once, are
    the one copy of the weights (a caller's ModelProto is neither changed nor copied whole;
    a file's is dropped once read, and its external weights are memory-mapped, not read:
    :func:`_open`)."""
    given, source, mapped = _open(model)
    proto = without_weights(given)
    _annotate(proto, source)  # the checker sees the same skeleton as for ``given``
    arrays = {t.name: mapped[t.name] if t.name in mapped else _weight(t, source) for t in given.graph.initializer}
    del given
    feeds = example_feeds(proto, example, source)
    values: dict[str, Value] = {}
    for init in proto.graph.initializer:
        arr = arrays[init.name]
        kind = "param" if np.issubdtype(arr.dtype, np.floating) and arr.ndim >= 1 else "const"
        data = torch.from_numpy(arr)  # one copy of the weights; capture feeds the same memory
        values[init.name] = Value(init.name, tuple(arr.shape), data.dtype, kind, data, init.name)
    captured = capture(proto, feeds, source)
    alt_captured, alt = _second_capture(proto, feeds, source)
    fused = {k: norm for norm in _decomposed_norms(proto, arrays, captured, feeds) for k in norm.nodes}
    del arrays
    inputs = []
    for i in proto.graph.input:
        if i.name in values:
            continue
        arr = feeds[i.name]
        values[i.name] = Value(i.name, tuple(arr.shape), torch.from_numpy(np.array(arr, order="C")).dtype, "input",
                               None, i.name, tuple(alt[i.name].shape) if alt is not None else None)
        inputs.append(i.name)
    nodes = []
    alias: dict[str, str] = {}  # Identity of a constant -> the constant
    for n in proto.graph.node:
        norm = fused.get(n.name)
        if norm is not None:  # one node of a decomposed norm: the norm is one IR node, at its last node
            if n.name == norm.name:
                nodes.append(_norm_node(norm, values, captured, alt_captured))
            continue
        src = values.get(n.input[0]) if n.input and is_view(n) else None
        if src is not None and src.kind == "const" and n.op_type == "Identity":
            alias[n.output[0]] = n.input[0]
            continue
        if src is not None and src.kind == "param":
            # exporters share equal-valued initializers through Identity nodes (all-zero
            # biases of unrelated convs), and fp16 files convert a weight with a Cast for
            # an op kept in fp32; each use becomes its own weight (in the type the op
            # reads), so unrelated layers are not coupled.  The emitter writes it back in
            # the source's form (onnx_weight_forms).
            values[n.output[0]] = _view_weight(n, src)
            continue
        weight = constant_weight(n)
        if weight is not None:  # a weight held in a Constant node (paddle2onnx writes every weight so)
            o = n.output[0]
            values[o] = Value(o, tuple(weight.shape), torch.from_numpy(weight).dtype, "param",
                              torch.from_numpy(weight), o)
            continue
        n_inputs = [alias.get(i, i) for i in n.input]
        outs = [o for o in n.output if o]
        for o in outs:
            arr = captured[o]
            keep = n.op_type == "Constant" or (not np.issubdtype(arr.dtype, np.floating) and arr.size <= _BIG)
            values[o] = Value(o, tuple(arr.shape), torch.from_numpy(np.empty(0, arr.dtype)).dtype,
                              "const" if n.op_type == "Constant" else "act",
                              torch.from_numpy(np.array(arr, order="C")) if keep else None, o,
                              tuple(alt_captured[o].shape) if o in alt_captured else None)
        if n.op_type == "Constant":
            continue
        for i in n_inputs:
            if i and i not in values:
                raise BadOnnxError(f"input {i!r} of node {n.name} is not produced by any node", node=n.name,
                                   op=n.op_type, source=source)
        attrs = _attrs(n)
        spec = onnx_op(n.op_type)
        names = spec.inputs if spec is not None else ()
        for k, i in enumerate(n_inputs):
            if not i or k >= len(names):
                continue
            key = names[k]
            v = values[i]
            if key in spec.lists and v.data is not None and not v.data.is_floating_point():
                attrs[key] = [int(x) for x in v.data.reshape(-1).tolist()]
            else:
                attrs[key] = Ref(i)
        if spec is not None and spec.normalise is not None:
            spec.normalise(attrs, [tuple(captured[o].shape) for o in outs])
        op = canonical_onnx(n.op_type)
        if n.op_type == "Gather" and values[n_inputs[0]].kind == "param" and len(values[n_inputs[0]].shape) == 2 \
                and attrs.get("axis", 0) == 0:
            op, attrs["weight"] = "embedding", Ref(n_inputs[0])
        target = _in_torch(spec, attrs, list(n.output)) if spec is not None else None
        args = tuple(Ref(i) if i else None for i in n_inputs)
        outer = [alias.get(i, i) for i in outer_reads(n)]  # what a control-flow node's branches read
        kwargs = {"outer": tuple(Ref(i) for i in outer if i in values)} if outer else {}
        nodes.append(Node(n.name, op, target, args, kwargs, outs, attrs, n.name, f"onnx::{n.op_type}"))
    outputs = [alias.get(o.name, o.name) for o in proto.graph.output]
    _drop_unread_weights(values, nodes, outputs)
    return Graph(nodes, values, inputs, outputs, "onnx", source), proto, feeds


def _decomposed_norms(proto: onnx.ModelProto, arrays: dict[str, np.ndarray], captured: dict[str, np.ndarray],
                      feeds: dict[str, np.ndarray]) -> list[DecomposedNorm]:
    """The layer and RMS norms the exporter wrote op by op (:mod:`.onnx_fusion`), judged
    on the initializers, the captured values and the ``Constant`` weights."""
    known = {**feeds, **arrays, **captured}
    consts = {n.output[0] for n in proto.graph.node if n.op_type == "Constant" and n.output}
    weights = {k for k, a in arrays.items() if np.issubdtype(a.dtype, np.floating) and a.ndim >= 1}
    weights |= {n.output[0] for n in proto.graph.node if constant_weight(n) is not None}

    def scalar(name: str) -> float | None:
        a = known.get(name)
        return float(a.reshape(-1)[0]) if a is not None and a.size == 1 and (name in arrays or name in consts) \
            else None

    def ints(name: str) -> list[int] | None:
        a = known.get(name)
        return [int(v) for v in a.reshape(-1)] if a is not None and np.issubdtype(a.dtype, np.integer) else None

    return find_norms(proto, shape=lambda v: tuple(known[v].shape) if v in known else None,
                      dtype=lambda v: known[v].dtype if v in known else None, const=scalar, ints=ints,
                      is_weight=weights.__contains__)


def _norm_node(norm: DecomposedNorm, values: dict[str, Value], captured: dict[str, np.ndarray],
               alt_captured: dict[str, np.ndarray]) -> Node:
    """The ``layer_norm`` IR node of a decomposed norm: the registry's ``LayerNormalization``
    (``RMSNormalization``) entry over the last axis, reading the subgraph's input and weights
    by the names the file gives them; its output is the subgraph's."""
    o = norm.output
    arr = captured[o]
    values[o] = Value(o, tuple(arr.shape), torch.from_numpy(np.empty(0, arr.dtype)).dtype, "act", None, o,
                      tuple(alt_captured[o].shape) if o in alt_captured else None)
    spec = onnx_op("RMSNormalization" if norm.rms else "LayerNormalization")
    args = (Ref(norm.x), Ref(norm.scale) if norm.scale else None, Ref(norm.bias) if norm.bias else None)
    attrs: dict[str, Any] = {"input": Ref(norm.x), "axis": -1, "epsilon": norm.eps}
    if norm.scale:
        attrs["scale"] = Ref(norm.scale)
    if norm.bias:
        attrs["B"] = Ref(norm.bias)
    outputs = [o, "", ""] if not norm.rms else [o, ""]
    return Node(norm.name, "layer_norm", _in_torch(spec, attrs, outputs), args[:2] if norm.rms else args, {}, [o],
                attrs, norm.name, norm.source_op)


def _view_weight(node: onnx.NodeProto, src: Value) -> Value:
    """The weight ``node`` (an Identity, or a Cast to a float type) makes of the weight
    ``src``: a tensor of its own, in the type the node hands on."""
    out = node.output[0]
    data = src.data.clone()
    to = cast_target(node)
    if to is not None:
        data = data.to(torch.from_numpy(np.empty(0, elem_dtype(to))).dtype)
    return Value(out, src.shape, data.dtype, "param", data, out)


def _drop_unread_weights(values: dict[str, Value], nodes: list[Node], outputs: list[str]) -> None:
    """Forget the weights that only views (:func:`_view_weight`) read: each view is a
    weight of its own, and the source counted too would count its parameters twice (a
    shared bias once per user plus once more).  The lowering writes every view back from
    its own data and drops the source once nothing reads it."""
    read = {i for n in nodes for i in n.inputs} | set(outputs)
    for name in [k for k, v in values.items() if v.kind == "param" and k not in read]:
        del values[name]
