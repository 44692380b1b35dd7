"""The recorded graph as a runnable fx program: what compact modules are lowered from.

``torch.export`` cost 0.9 s of resnet50's 2 s default path (and more on a ViT) only to
rebuild, with fake tensors, the graph the recorder (:mod:`.torch_record`) had already
made: the same ATen ops at the same dispatch level.  This module turns that recording
into a ``torch.fx.GraphModule`` directly: one node per recorded op with the IR's own
name (so the analysis is the program's own and nothing is re-analysed), the weights
and lifted constants as attributes at the user's paths, and the call and output
structure of the model's forward (pytree codegen, as export's unlifted module has).

Every shape in a recording is the example's.  At a batch of one the program is
specialised to it, as export specialises a batch of one.  At a larger batch,
:mod:`.batch_general` finds which recorded integers are the batch, and the program
computes those from its input's first dimension (``x.size(0) * 197``), so it takes any
batch as export's dynamic-batch program does; where that cannot be shown, :func:`.trace`
exports the model instead.  Verification checks the replayed program against the user's
model; a program that does not reproduce it is a capture problem and the model is
exported instead.  Anything this module cannot build raises :class:`ReplayFailed`, which
also sends the model to export.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..ir.graph import Graph, Ref
from ..lower.torch import TorchProgram
from .batch_general import BatchGeneral, BatchSize
from .torch_record import Recording


class ReplayFailed(RuntimeError):
    """The recording cannot be replayed as a module; the caller exports the model."""


def _codegen(rec: Recording) -> Any:
    """The pytree codegen of the model's forward (private torch: any change is a ReplayFailed)."""
    try:
        from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
    except ImportError as exc:  # pragma: no cover - a torch that moved it
        raise ReplayFailed(f"torch has no pytree codegen: {exc}") from exc
    return _PyTreeCodeGen(_PyTreeInfo(list(rec.call.arg_names), rec.call.in_spec, rec.call.out_spec))


class _Sizes:
    """The fx nodes that compute batch-dependent sizes: ``sym_size(x, 0)`` of the batch's
    input, times and plus constants (as export writes a dynamic size, so
    :func:`graphprune.lower.torch._sizes_as_methods` makes them ``x.size(0)`` for ONNX), each
    made once, where first needed, under a name no recorded value has."""

    def __init__(self, g: torch.fx.Graph, ir: Graph, source: torch.fx.Node) -> None:
        self.g, self.ir, self.source = g, ir, source
        self.made: dict[tuple[int, int], torch.fx.Node] = {}

    def _new(self, target: Any, args: tuple) -> torch.fx.Node:
        name = f"batch_size_{len(self.made)}"
        while name in self.ir.values:
            name += "_"
        return self.g.create_node("call_function", target, args, name=name)

    def node(self, size: BatchSize) -> torch.fx.Node:
        key = (size.k, size.c)
        if key not in self.made:
            if key == (1, 0):
                self.made[key] = self._new(torch.ops.aten.sym_size.int, (self.source, 0))
            elif size.c == 0:
                self.made[key] = self._new(operator.mul, (self.node(BatchSize(1, 0)), size.k))
            else:
                self.made[key] = self._new(operator.add, (self.node(BatchSize(size.k, 0)), size.c))
        return self.made[key]


def _template(rec: Recording, model: torch.nn.Module, general: BatchGeneral | None
              ) -> tuple[torch.fx.Graph, dict[str, str], dict[str, torch.Tensor]]:
    """The fx graph of the recording (its batch-dependent sizes computed at run time where
    ``general`` gives them), each fixed value's attribute path, and what each attribute
    holds (the user's tensors: lowering replaces them by the plan's slices)."""
    ir, call = rec.graph, rec.call
    if call.lost_outputs:
        raise ReplayFailed(f"{call.lost_outputs} output tensor(s) were made by no recorded op")
    g = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    for k, name in enumerate(call.in_leaves):
        ph = g.placeholder(name if name is not None else f"_unused_{k}")
        if name is not None:
            env[name] = ph
    paths: dict[str, str] = {}
    held: dict[str, torch.Tensor] = {}

    def fixed(name: str) -> torch.fx.Node:
        v = ir.values[name]
        path = v.source_name if v.kind in ("param", "buffer") else f"_const.{name}"
        if v.data is None:
            raise ReplayFailed(f"{name} has no contents")
        paths[name], held[path] = path, v.data
        node = g.get_attr(path)
        env[name] = node
        return node

    sizes = _Sizes(g, ir, env[general.source]) if general is not None else None

    def look(a: Any) -> Any:
        if isinstance(a, BatchSize):
            return sizes.node(a)
        if not isinstance(a, Ref):
            return a
        if a.name in env:
            return env[a.name]
        if a.name in ir.values and ir.values[a.name].fixed:
            return fixed(a.name)
        raise ReplayFailed(f"value {a.name} is used before it is made")

    for node in ir.nodes:
        if not isinstance(node.target, torch._ops.OpOverload):
            raise ReplayFailed(f"{node.name} calls {node.target!r}, not an ATen overload")
        given = general.args.get(node.name) if general is not None else None
        args, kwargs = pytree.tree_map(look, given or (node.args, node.kwargs),
                                       is_leaf=lambda a: isinstance(a, (Ref, BatchSize)))
        fx = g.create_node("call_function", node.target, tuple(args), dict(kwargs), name=node.name)
        if fx.name != node.name:
            raise ReplayFailed(f"fx renamed node {node.name} to {fx.name}")
        if node.outputs == [node.name]:
            env[node.name] = fx
            continue
        for out in node.outputs:
            base, _, index = out.rpartition(".")
            if base != node.name or not index.isdigit():
                raise ReplayFailed(f"{node.name} has an output named {out}")
            env[out] = g.call_function(operator.getitem, (fx, int(index)))
    outs = [look(Ref(n)) if n is not None else c for n, c in zip(call.out_leaves, call.out_consts)]
    g.output(outs)
    g._codegen = _codegen(rec)
    return g, paths, held


def _root(model: torch.nn.Module, held: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Modules at the user's paths holding the weights as parameters and buffers (so the
    compact module's ``.to()``, ``state_dict()`` and ``parameters()`` see them), buffers
    persistent as in the user's model."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    root = torch.nn.Module()
    for path, t in held.items():
        *parents, leaf = path.split(".")
        mod = root
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, torch.nn.Module())
            mod = getattr(mod, p)
        if path in params:
            mod.register_parameter(leaf, torch.nn.Parameter(t.detach(), requires_grad=t.requires_grad))
        else:
            mod.register_buffer(leaf, t.detach(), persistent=_persistent(model, path))
    return root


def _persistent(model: torch.nn.Module, path: str) -> bool:
    """Whether the buffer at ``path`` is in the user's state dict; a lifted constant
    (``_const.<name>``, a plain tensor the forward read) is not.  Its path names no user
    module, so it must be told apart before one is looked up (that lookup raised, and
    every model with a lifted constant was exported instead of replayed)."""
    if path.startswith("_const."):
        return False
    parent, _, leaf = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    return leaf not in getattr(owner, "_non_persistent_buffers_set", ())


def replay_program(rec: Recording, model: torch.nn.Module, general: BatchGeneral | None = None) -> TorchProgram:
    """The recording as a :class:`TorchProgram` for :func:`graphprune.lower.torch.lower_torch`:
    at the example's shapes, or at any batch with ``general`` (:mod:`.batch_general`).
    The template graph is built (and checked, by making a module of it) once; each
    lowering gets its own copy, the first one that checked module (generating a large
    graph's code is 15-25 ms, and the default path lowers twice: the check's compact
    model and ``construct_subnet``'s)."""
    try:
        graph, paths, held = _template(rec, model, general)
        root = _root(model, held)
        unused = [torch.fx.GraphModule(root, _copy(graph))]  # generates (checks) its code
    except ReplayFailed:
        raise
    except Exception as exc:  # fx or pytree refusing the graph: export it instead
        raise ReplayFailed(f"{type(exc).__name__}: {str(exc)[:300]}") from exc

    def module() -> torch.fx.GraphModule:
        return unused.pop() if unused else torch.fx.GraphModule(root, _copy(graph))

    if general is None:
        return TorchProgram(module, paths, lambda name: set())
    return TorchProgram(module, paths, general.axes, any_batch=True)


def _copy(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A copy of ``graph`` for one lowering to edit (with its pytree codegen)."""
    copy = torch.fx.Graph()
    out = copy.graph_copy(graph, {})
    copy.output(out)
    copy._codegen = graph._codegen
    return copy
