"""Lower a compact plan to an ``nn.Module``: the captured program's own graph, edited.

The program's module (export's unlifted module, or the replayed recording) is the template: its parameters and buffers are replaced
by the plan's slices (the user's model is never touched), each node's
:class:`~graphprune.ops.rewrite.Rewrite` is applied to its fx node (a schema argument
set, or the target replaced by a phantom op's torch function), erased operators give
way to constant buffers, folded batch norms to their layer's output, and a bias the plan
adds to a layer without one becomes its bias argument or an add after it.  The result
has the original call signature and also works in training mode (batch norm and
dropout flags follow ``.train()``/``.eval()``, as the op registry says which argument
carries the mode).
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from graphprune.errors import ZeroInvarianceError
from graphprune.ir.graph import Graph, Node, Ref
from graphprune.lower.call_binding import CallBinding
from graphprune.ops.catalog import canonical_aten, rule_for
from graphprune.ops.rewrite import Call, Entries, Rewrite
from graphprune.passes.add_bias import AddedBias
from graphprune.passes.fold_bn import Fold
from graphprune.passes.plan import CompactPlan


@dataclass(frozen=True)
class TorchProgram:
    """What a compact module is lowered from: ``module()`` gives a fresh template module
    (the full model's graph, calling ATen ops) for each lowering to edit, ``paths`` the
    attribute path of each fixed IR value in it where that differs from the value's
    source name, ``dynamic`` a value's symbolic axes, ``any_batch`` whether its modules
    take any batch (a batch-general recording's do).  The frontend makes it, from an
    ExportedProgram (:func:`program_of_export`) or from a recording
    (:mod:`graphprune.frontends.torch_replay`)."""

    module: Callable[[], torch.fx.GraphModule]
    paths: dict[str, str]
    dynamic: Callable[[str], set[int]]
    any_batch: bool = False


def program_of_export(exported: torch.export.ExportedProgram, dynamic: Callable[[str], set[int]]) -> TorchProgram:
    """The unlifted module of ``exported`` as the template (a tied weight's placeholders
    have their own paths)."""
    sig = exported.graph_signature
    return TorchProgram(exported.module, {**sig.inputs_to_parameters, **sig.inputs_to_buffers}, dynamic)


class CompactModule(torch.nn.Module):
    """A rewritten exported graph that honours train/eval like an ordinary module."""

    def __init__(self, gm: torch.fx.GraphModule, binding: CallBinding | None = None) -> None:
        """``gm``'s code is regenerated here once, in eval mode (lowering edits its graph
        without regenerating: each regeneration of resnet50's code took 25 ms).
        ``binding`` maps a call of the user's model onto ``gm``'s inputs
        (:mod:`graphprune.lower.call_binding`); without it ``gm`` is called as it is."""
        super().__init__()
        self.gm = gm
        self._set_mode(False)
        self.gm.recompile()
        names = set(inspect.signature(self.gm.forward).parameters)
        self.binding = binding if binding is not None and names == binding.traced else None

    def _mode_nodes(self) -> list[tuple[torch.fx.Node, str]]:
        """The nodes whose registry entry names an argument that follows the mode."""
        out = []
        for n in self.gm.graph.nodes:
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
                packet = n.target.overloadpacket.__name__
                arg = rule_for(canonical_aten(packet)).mode_arg(packet, lambda name, n=n: get_arg(n, name))
                if arg is not None:
                    out.append((n, arg))
            elif n.op == "call_function" and getattr(n.target, "mode_arg", None) in n.kwargs:
                out.append((n, n.target.mode_arg))  # a phantom op's keyword (a pruned RNN's ``train``)
        return out

    def _set_mode(self, mode: bool) -> bool:
        """Set the mode flags and every mode argument; whether any argument changed."""
        self.training = mode
        for m in self.gm.modules():
            if m is not self.gm:
                m.training = mode
        changed = False
        for n, arg in self._mode_nodes():
            if isinstance(n.target, torch._ops.OpOverload):
                changed |= get_arg(n, arg) != mode
                set_arg(n, arg, mode)
            else:
                changed |= n.kwargs.get(arg) != mode
                n.kwargs = {**n.kwargs, arg: mode}
        return changed

    def train(self, mode: bool = True) -> "CompactModule":
        if self._set_mode(mode):
            self.gm.recompile()
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.binding is None:
            return self.gm(*args, **kwargs)
        args, kwargs = self.binding.inputs(args, kwargs)
        return self.gm(*args, **kwargs)


def lower_torch(ir: Graph, program: TorchProgram, plan: CompactPlan,
                tensors: dict[str, torch.Tensor], copy_uncut: bool = True,
                binding: CallBinding | None = None) -> CompactModule:
    """The compact module of ``plan``; ``tensors``: current values by the user's names
    (parameters and buffers), the IR's data where absent.  A tensor no unit is cut from
    is copied, so the compact model owns its weights; ``copy_uncut=False`` shares it,
    for a model built to be compared once and dropped (the copies were a second Phi-3
    when a check removed few units); ``binding``: see :class:`CompactModule`."""
    gm = program.module()
    for name in ("train", "eval"):  # export's guards against mode switches; CompactModule owns modes
        gm.__dict__.pop(name, None)
    fx_nodes = {n.name: n for n in gm.graph.nodes}
    _write_tensors(gm, ir, program.paths, plan, tensors, copy_uncut)
    for node in ir.nodes:
        rw = plan.rewrites.get(node.name)
        fx = fx_nodes.get(node.name)
        if rw is not None and fx is not None:
            _apply(node, fx, rw, ir.source)
    removed = set(plan.erased)
    if plan.constants:
        _feed_constants(gm, plan, fx_nodes)
    for k, fold in enumerate(plan.folds):
        removed.add(_fold(gm, fx_nodes, fold, k))
    for k, added in enumerate(plan.biases):
        _add_bias(gm, fx_nodes[added.node], added, k)
    if removed:
        _drop(gm, removed)
    for n in gm.graph.nodes:  # full-model shapes are stale now; fake tensors and provenance chains block deepcopy
        n.meta.clear()
    _sizes_as_methods(gm)
    return CompactModule(gm, binding)  # regenerates gm's code


def _sizes_as_methods(gm: torch.fx.GraphModule) -> None:
    """Sizes read at run time (a dynamic batch) and the ops that take them become method
    calls, ``x.size(0)`` and ``h.view(n, 64)``: TorchScript's ONNX exporter (what
    :func:`graphprune.export_onnx` uses) traces those as Shape ops feeding the reshape,
    while an ATen overload call hands it plain ints, and the batch became a constant."""
    sizes = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten.sym_size.int:
            n.op, n.target = "call_method", "size"
            sizes.add(n)
        elif n.op == "call_function" and n.target in _SIZE_ARITHMETIC and sizes.intersection(n.all_input_nodes):
            sizes.add(n)  # ``n * 16``: traced as arithmetic on the Shape op's output
        elif n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) \
                and n.target.overloadpacket.__name__ in _SIZE_METHODS and sizes.intersection(n.all_input_nodes):
            # keywords the method takes too (``new_zeros(..., pin_memory=False)``) stay; ``expand``'s
            # ``implicit=False`` is its default and the method has no such keyword
            kwargs = {k: v for k, v in n.kwargs.items() if not (k == "implicit" and v is False)}
            if set(kwargs) <= _SIZE_METHODS[n.target.overloadpacket.__name__]:
                n.op, n.target, n.kwargs = "call_method", n.target.overloadpacket.__name__, kwargs


_SIZE_ARITHMETIC = (operator.add, operator.sub, operator.mul, operator.floordiv, operator.neg)
_FACTORY_KEYWORDS = frozenset({"dtype", "layout", "device", "pin_memory", "requires_grad"})
#: ops taking sizes that have a Tensor method of the same name, and the keywords that method takes
_SIZE_METHODS = {"view": frozenset(), "reshape": frozenset(), "expand": frozenset(), "repeat": frozenset(),
                 "new_zeros": _FACTORY_KEYWORDS, "new_ones": _FACTORY_KEYWORDS, "new_empty": _FACTORY_KEYWORDS}


# ---- editors -------------------------------------------------------------------------
def _schema_name(fx_node: torch.fx.Node, name: str) -> str:
    names = [a.name for a in fx_node.target._schema.arguments]
    return "self" if name == "input" and "input" not in names else name  # the IR calls ``self`` input


def get_arg(fx_node: torch.fx.Node, name: str, default: Any = None) -> Any:
    """A schema argument of an fx node by name (``default`` where left to its default)."""
    name = _schema_name(fx_node, name)
    if name in fx_node.kwargs:
        return fx_node.kwargs[name]
    pos = [a.name for a in fx_node.target._schema.arguments].index(name)
    return fx_node.args[pos] if pos < len(fx_node.args) else default


def set_arg(fx_node: torch.fx.Node, name: str, value: Any) -> None:
    """Set a schema argument of an fx node by name, positional or keyword."""
    name = _schema_name(fx_node, name)
    if name in fx_node.kwargs:
        fx_node.kwargs = {**fx_node.kwargs, name: value}
        return
    pos = [a.name for a in fx_node.target._schema.arguments].index(name)
    if pos < len(fx_node.args):
        args = list(fx_node.args)
        args[pos] = value
        fx_node.args = tuple(args)
    else:
        fx_node.kwargs = {**fx_node.kwargs, name: value}


def _apply(node: Node, fx: torch.fx.Node, rw: Rewrite, source: str | None) -> None:
    if rw.feeds or rw.constant is not None:  # only ONNX models compute shapes at run time
        raise ZeroInvarianceError("a run-time shape rewrite met a PyTorch graph", node=node.name, op=node.source_op,
                                  source=source, hint="this is a graphprune bug; please report it")
    for name, value in rw.args.items():
        set_arg(fx, name, _entries(node, fx, name, value) if isinstance(value, Entries) else value)
    if rw.call is not None:
        _call(node, fx, rw.call, source)


def _entries(node: Node, fx: torch.fx.Node, name: str, value: Entries) -> list:
    """``value`` applied to ``fx``'s list argument ``name``.  An entry computed at run time
    (a dynamic batch) that a pruned axis also shrinks is a batch-dependent size times the
    pruned one (``batch * heads`` in ``nn.MultiheadAttention``'s views): it becomes
    ``size * new // old``, with ``new`` and ``old`` that entry at the example's batch, so
    the compact module still takes any batch (the plain compact value fixed it)."""
    old = list(get_arg(fx, name))
    example = node.attrs[name]
    at = dict(value.at)
    for k, new in value.at.items():
        if isinstance(old[k], torch.fx.Node):
            with fx.graph.inserting_before(fx):
                scaled = fx.graph.call_function(operator.mul, (old[k], new))
                at[k] = fx.graph.call_function(operator.floordiv, (scaled, int(example[k])))
    return Entries(at).apply(old)


def _call(node: Node, fx: torch.fx.Node, call: Call, source: str | None) -> None:
    """Make ``fx`` a call of the phantom op's torch function: the inputs (the fx nodes
    that hold those IR values), then the attributes as keywords."""
    if call.op.torch is None:
        raise ZeroInvarianceError(f"{call.op.name} has no PyTorch form", node=node.name, op=node.source_op,
                                  source=source, hint="this is a graphprune bug; please report it")
    held = _fx_inputs(node, fx)
    fx.target = call.op.torch
    fx.args = tuple(None if v is None else held[v] for v in call.inputs)
    fx.kwargs = dict(call.attrs)


def _fx_inputs(node: Node, fx: torch.fx.Node) -> dict[str, torch.fx.Node]:
    """IR value name -> the fx node passed in its place: the IR node's arguments are the
    fx node's, leaf for leaf, with tensors as :class:`Ref`."""
    ir_leaves = pytree.tree_leaves((node.args, node.kwargs), is_leaf=lambda a: isinstance(a, Ref))
    fx_leaves = pytree.tree_leaves((fx.args, fx.kwargs))
    return {a.name: b for a, b in zip(ir_leaves, fx_leaves) if isinstance(a, Ref) and isinstance(b, torch.fx.Node)}


def _set_tensor(root: torch.nn.Module, fqn: str, t: torch.Tensor) -> None:
    prefix, _, leaf = fqn.rpartition(".")
    mod = root.get_submodule(prefix) if prefix else root
    if isinstance(t, torch.nn.Parameter):
        setattr(mod, leaf, t)
    elif leaf in getattr(mod, "_buffers", {}):
        mod._buffers[leaf] = t
    else:
        setattr(mod, leaf, t)


def _get_tensor(root: torch.nn.Module, fqn: str) -> Any:
    prefix, _, leaf = fqn.rpartition(".")
    return getattr(root.get_submodule(prefix) if prefix else root, leaf)


def _write_tensors(gm: torch.fx.GraphModule, ir: Graph, paths: dict[str, str],
                   plan: CompactPlan, tensors: dict[str, torch.Tensor], copy_uncut: bool) -> None:
    """Every parameter and buffer, sliced (and with folded norms' scale and shift); see
    :func:`lower_torch` for ``copy_uncut``."""
    weights = {f.weight: f for f in plan.folds}
    biases = {f.bias: f for f in plan.folds if f.bias is not None}
    # a module shared under several paths (CoaT's cpe), or a tied weight (GPT-2's lm_head),
    # is one tensor under each path: all of them get the sliced tensor, or the module
    # would keep the full original under the other paths
    aliases: dict[int, list[str]] = {}
    for fqn, held in (*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)):
        aliases.setdefault(id(held), []).append(fqn)
    written: dict[str, list[torch.nn.Parameter]] = {}
    for name, v in ir.values.items():
        if not v.fixed or v.source_name is None:
            continue
        src = tensors.get(v.source_name, v.data)
        if src is None:
            continue
        # a cut (index_select) is a new tensor already; an uncut one is the caller's
        t = plan.slice(name, src.detach()) if plan.params.get(name) else \
            src.detach().clone() if copy_uncut else src.detach()
        if name in weights:
            t = weights[name].scaled(t)
        elif name in biases:
            t = biases[name].shift.clone()
        if v.kind == "param":  # export gives each path of a shared module its own placeholder
            same = next((w for w in written.get(v.source_name, ()) if w.shape == t.shape and torch.equal(w, t)), None)
            t = same if same is not None else torch.nn.Parameter(t, requires_grad=t.is_floating_point())
            written.setdefault(v.source_name, []).append(t)
        path = paths.get(name, v.source_name)
        try:
            held = _get_tensor(gm, path)
        except AttributeError:
            continue  # lifted constants that the unlifted module inlines
        for alias in aliases.get(id(held), [path]):
            _set_tensor(gm, alias, t)


def _feed_constants(gm: torch.fx.GraphModule, plan: CompactPlan, fx_nodes: dict[str, torch.fx.Node]) -> None:
    """Feed each frontier consumer its constant (a buffer ``_erased_<k>``)."""
    g = gm.graph
    for k, (name, c) in enumerate(sorted(plan.constants.items())):
        old = _fx_value(fx_nodes, name)
        gm.register_buffer(f"_erased_{k}", c)
        with g.inserting_before(old):
            new = g.get_attr(f"_erased_{k}")
        for user in list(old.users):
            if user.name not in plan.erased:
                user.replace_input_with(old, new)
                _out_of_place(user, new)


def _fold(gm: torch.fx.GraphModule, fx_nodes: dict[str, torch.fx.Node], fold: Fold, k: int) -> str:
    """Read the layer's output where the norm's was read, giving the layer a bias
    (``_folded_bias_<k>``) if it had none; returns the norm's node name (to drop)."""
    g, layer, norm = gm.graph, fx_nodes[fold.producer], fx_nodes[fold.norm]
    if fold.bias is None:
        gm.register_parameter(f"_folded_bias_{k}", torch.nn.Parameter(fold.shift.clone()))
        with g.inserting_before(layer):
            set_arg(layer, "bias", g.get_attr(f"_folded_bias_{k}"))
    for user in list(norm.users):
        if user.target is operator.getitem:  # _native_batch_norm_legit_no_training: (out, mean, rstd)
            user.replace_all_uses_with(layer)
        else:
            user.replace_input_with(norm, layer)
    return fold.norm


def _add_bias(gm: torch.fx.GraphModule, layer: torch.fx.Node, added: AddedBias, k: int) -> None:
    """Give ``layer`` the bias ``_added_bias_<k>``: as its bias argument where its op has
    one, else added to its output (read by its users instead)."""
    g = gm.graph
    gm.register_parameter(f"_added_bias_{k}", torch.nn.Parameter(added.shaped().clone()))
    if added.site.arg is not None:
        with g.inserting_before(layer):
            set_arg(layer, added.site.arg, g.get_attr(f"_added_bias_{k}"))
        return
    with g.inserting_after(layer):
        bias = g.get_attr(f"_added_bias_{k}")
    with g.inserting_after(bias):
        out = g.call_function(torch.ops.aten.add.Tensor, (layer, bias))
    layer.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)


def _drop(gm: torch.fx.GraphModule, removed: set[str]) -> None:
    """Drop the ``removed`` operators, whatever only they used, and the weights nobody
    reads any more."""
    g = gm.graph
    read = {n.target for n in g.nodes if n.op == "get_attr" and n.users}

    def removable(n: torch.fx.Node) -> bool:
        return n.name in removed or (n.target is operator.getitem and n.args[0].name in removed)

    g.eliminate_dead_code(is_impure_node=lambda n: not removable(n) and (n.op == "call_module" or n.is_impure()))
    for target in read - {n.target for n in g.nodes if n.op == "get_attr"}:
        prefix, _, leaf = target.rpartition(".")
        delattr(gm.get_submodule(prefix) if prefix else gm, leaf)


def _out_of_place(node: torch.fx.Node, const: torch.fx.Node) -> None:
    """``const.add_(x)`` (torchvision's ``out += identity`` with the branch erased) cannot
    grow the constant to the output's shape: use ``add`` instead."""
    packet = getattr(node.target, "overloadpacket", None)
    if packet is not None and packet.__name__.endswith("_") and node.args and node.args[0] is const:
        node.target = getattr(getattr(torch.ops.aten, packet.__name__[:-1]), node.target._overloadname)


def _fx_value(fx_nodes: dict[str, torch.fx.Node], name: str) -> torch.fx.Node:
    """The fx node holding IR value ``name`` ("<node>.<i>" is a getitem of a tuple output)."""
    if name in fx_nodes:
        return fx_nodes[name]
    base, _, index = name.rpartition(".")
    return next(u for u in fx_nodes[base].users if u.target is operator.getitem and u.args[1] == int(index))
