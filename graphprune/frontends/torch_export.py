"""PyTorch frontend: ``torch.export`` an ``nn.Module`` and turn its ATen graph into the IR.

Parameters keep their ``named_parameters()`` names; each node remembers the user's
module path (from ``nn_module_stack``) so groups and barriers are reported in the
user's own names.  Fused attention stays one ``scaled_dot_product_attention`` node whose
registry entry exposes the heads (``nn.MultiheadAttention`` is lowered to it by export).
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw
from torch.utils import _pytree as pytree

from ..errors import UnsupportedModelError
from ..ir.graph import Graph, Node, Ref, Value
from ..ops.catalog import canonical_aten
from .composites import decompose_composites


def export_program(model: torch.nn.Module, args: tuple, kwargs: dict | None = None,
                   dynamic_shapes: Any = None) -> torch.export.ExportedProgram:
    """``torch.export`` with a clear error naming the model class on failure, composite ops
    decomposed as the recorder decomposes them (:mod:`.composites`).  It exports
    aliases of the inputs: export marks the dynamic dims on the tensors it is given and
    leaves the marks there, even when it fails, so a second export of the same tensors
    (the static retry of :func:`export_model`) failed on the first one's marks."""
    args, kwargs = pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, (args, kwargs or {}))
    try:
        ep = torch.export.export(model, args, kwargs or {}, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # torch raises many unrelated types here
        raise UnsupportedModelError(
            f"torch.export could not trace {type(model).__name__}: {type(exc).__name__}: {str(exc)[:500]}",
            source=type(model).__module__ + "." + type(model).__name__,
            hint="make the forward traceable by torch.export (no data-dependent Python control flow), "
                 "or export it to ONNX and pass the file") from exc
    return decompose_composites(ep)


def export_model(model: torch.nn.Module, args: tuple, kwargs: dict,
                 dynamic_shapes: Any = None) -> torch.export.ExportedProgram:
    """Export ``model`` in eval mode, with a dynamic batch dimension when the example has a
    batch over 1 (so the compact model takes any batch size), static shapes if the model
    forbids a dynamic batch or when ``dynamic_shapes`` is given."""
    was_training = model.training
    model.eval()
    try:
        batched = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0]
        # a batch of 1 is specialised by torch.export anyway: don't pay for a failing attempt
        if dynamic_shapes is None and not (args and kwargs) and any(t.shape[0] > 1 for t in batched):
            try:
                return export_program(model, args, kwargs, batch_dynamic_shapes(args, kwargs))
            except UnsupportedModelError:
                # the failed attempt leaves torch's dynamic-dim marks on the example tensors
                # (a time-major RNN's dim 0 is specialised): export the static one from copies
                args, kwargs = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t,
                                               (args, kwargs))
        return export_program(model, args, kwargs, dynamic_shapes)
    finally:
        model.train(was_training)


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def _concrete(s: Any) -> Any:
    """A symbolic size's value at the example input (labels are computed concretely)."""
    return guarding_hint_or_throw(s) if isinstance(s, torch.SymInt) else s


def _shape(val: Any) -> tuple[int, ...]:
    return tuple(int(_concrete(s)) for s in val.shape)


def batch_dynamic_shapes(args: tuple, kwargs: dict) -> Any:
    """Mark dim 0 of every tensor input dynamic so the compact model takes any batch size
    (for inputs given all positionally or all as keywords)."""
    dyn = lambda t: {0: torch.export.Dim.DYNAMIC} if isinstance(t, torch.Tensor) and t.dim() > 0 else None  # noqa: E731
    return pytree.tree_map(dyn, kwargs) if kwargs else pytree.tree_map(dyn, args)


def named_args(target: torch._ops.OpOverload, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments by schema name, defaults filled in: what the rules read.  Binding by the
    schema directly is ~10x faster than ``normalize_function`` on large graphs."""
    out: dict[str, Any] = {}
    for i, a in enumerate(target._schema.arguments):
        key = "input" if a.name == "self" else a.name  # one name for the primary tensor, as fx does
        if i < len(args) and not a.kwarg_only:
            out[key] = args[i]
        elif a.name in kwargs:
            out[key] = kwargs[a.name]
        elif a.has_default_value():
            out[key] = a.default_value
    return out


def _tensor_meta(val: Any) -> bool:
    return isinstance(val, torch.Tensor)


def from_exported(ep: torch.export.ExportedProgram, model: torch.nn.Module) -> Graph:
    """Translate an ExportedProgram into the IR (values, nodes in topological order)."""
    sig = ep.graph_signature
    # the signature rebuilds these mappings on every access: read them once
    to_params, to_buffers = sig.inputs_to_parameters, sig.inputs_to_buffers
    to_consts = sig.inputs_to_lifted_tensor_constants
    state = dict(model.named_parameters(remove_duplicate=False))
    # a tied weight (GPT-2's lm_head and wte) is one tensor: report it by its first name,
    # the one ``named_parameters()`` gives (the emitter writes each placeholder's own path)
    first: dict[int, str] = {}
    canonical = {n: first.setdefault(id(p), n) for n, p in state.items()}
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    values: dict[str, Value] = {}
    nodes: list[Node] = []
    alias: dict[str, str] = {}
    inputs: list[str] = []

    for ph in ep.graph.find_nodes(op="placeholder"):
        val = ph.meta.get("val")
        if not _tensor_meta(val):
            continue
        name = ph.name
        if name in to_params:
            fqn = to_params[name]
            values[name] = Value(name, _shape(val), val.dtype, "param", state.get(fqn, ep.state_dict.get(fqn)),
                                 canonical.get(fqn, fqn))
        elif name in to_buffers:
            fqn = to_buffers[name]
            data = state.get(fqn, ep.state_dict.get(fqn, ep.constants.get(fqn)))
            values[name] = Value(name, _shape(val), val.dtype, "buffer", data, fqn)
        elif name in to_consts:
            fqn = to_consts[name]
            values[name] = Value(name, _shape(val), val.dtype, "const", ep.constants[fqn], fqn)
        else:
            values[name] = Value(name, _shape(val), val.dtype, "input", None, name)
            inputs.append(name)

    def ref(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            name = alias.get(a.name, a.name)
            return Ref(name) if name in values else _concrete(a.meta.get("val"))
        return a

    for fx in ep.graph.nodes:
        if fx.op != "call_function":
            continue
        val = fx.meta.get("val")
        if fx.target is operator.getitem:
            src, idx = fx.args
            alias[fx.name] = f"{alias.get(src.name, src.name)}.{idx}"
            continue
        args, kwargs = pytree.tree_map(ref, (fx.args, fx.kwargs))
        if isinstance(val, (list, tuple)):
            outs = []
            for i, v in enumerate(val):
                if _tensor_meta(v):
                    values[f"{fx.name}.{i}"] = Value(f"{fx.name}.{i}", _shape(v), v.dtype)
                    outs.append(f"{fx.name}.{i}")
        elif _tensor_meta(val):
            values[fx.name] = Value(fx.name, _shape(val), val.dtype)
            outs = [fx.name]
        else:
            outs = []  # asserts and symbolic-size ops: nothing to analyse
        if not outs:
            continue
        target = fx.target
        if isinstance(target, torch._ops.OpOverload):
            packet = target.overloadpacket.__name__
            source_op = f"aten.{packet}.{target._overloadname}"
            attrs = named_args(target, args, kwargs)
        else:
            packet = getattr(target, "__name__", str(target))
            source_op = packet
            attrs = {}
        nodes.append(Node(fx.name, canonical_aten(packet), target, tuple(args), dict(kwargs), outs,
                          attrs, _module_path(fx), source_op))

    out_node = ep.graph.find_nodes(op="output")[0]
    flat_out = [a for a in pytree.tree_leaves(out_node.args) if isinstance(a, torch.fx.Node)]
    n_user = len(sig.user_outputs)
    outputs = [alias.get(a.name, a.name) for a in flat_out[len(flat_out) - n_user:]]
    return Graph(nodes, values, inputs, [o for o in outputs if o in values], "torch",
                 type(model).__module__ + "." + type(model).__name__)
