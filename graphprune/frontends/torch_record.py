"""Fast PyTorch frontend: record the model's ATen ops on meta tensors, for the analysis.

``torch.export`` spends 80-95% of a trace on machinery the analysis does not need (fake
tensors, guards, graph-module code generation).  The analysis needs only what export's
graph holds: each ATen op at the pre-dispatch level (``conv2d``, ``linear``,
``batch_norm``, ``scaled_dot_product_attention``... the op set of export's training IR), its
arguments and output shapes, and the user's module path.  This module records exactly
that by running the model once on meta copies of its inputs and weights under a
dispatch mode installed at the PreDispatch key, which is where export's own tracer sits,
so the recorded op sequence is export's.

The ExportedProgram is still what the compact model is emitted from: it is built later,
on first need (see :class:`.torch_backend.TorchBackend`), and its analysis must agree with
the recorded one.  The recorder leans on private dispatcher hooks; whenever it cannot
record a model (data-dependent Python control flow, ops without meta kernels, a torch
whose internals moved) it raises :class:`RecordingFailed` and ``gp.trace`` uses
``torch.export`` directly.
"""
from __future__ import annotations

import builtins
import contextlib
import functools
import itertools
import keyword
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils import _pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..ir.graph import Graph, Node, Ref, Value
from ..ops.catalog import canonical_aten, decomposes, shape_only
from ..ops.registry import op_kind
from .composites import mode_base
from .module_slots import one_name_per_slot
from .torch_export import named_args

aten = torch.ops.aten

def _map(fn: Any, obj: Any) -> Any:
    """``fn`` over the leaves of an op's arguments (tuples, lists, dicts of tensors and
    scalars): what pytree does, without its generality, which cost a third of recording."""
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(fn, o) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(fn, v) for k, v in obj.items()}
    return fn(obj)


def _any_tensor(obj: Any) -> bool:
    if isinstance(obj, (tuple, list)):
        return any(_any_tensor(o) for o in obj)
    return isinstance(obj, torch.Tensor)


@functools.cache
def _shape_only_table() -> dict[Any, Any]:
    """OpOverload -> how its registry entry computes its output from shapes alone
    (:func:`graphprune.ops.registry.shape_only`)."""
    table = {}
    for name, fn in shape_only().items():
        packet, overload = name.split(".")
        table[getattr(getattr(aten, packet), overload)] = fn
    return table


def _shape_only(func: Any, args: tuple, kwargs: dict) -> Any:
    """The op's meta output without running its meta kernel, where its registry entry says
    how (several meta kernels go through slow Python: batch_norm alone was 80% of
    recording a ResNet, conv2d, linear and attention 80% of recording a ViT); None where
    the kernel must run."""
    fn = _shape_only_table().get(func)
    return fn(args, kwargs) if fn is not None else None


class RecordingFailed(RuntimeError):
    """The recorder could not run this model; the caller falls back to ``torch.export``."""


class _Recorder(mode_base()):  # type: ignore[misc]
    """Runs each op (shape only, on meta tensors) and appends an IR node for it."""

    def __init__(self, names: dict[int, str], values: dict[str, Value], modules: list[str],
                 device: torch.device) -> None:
        TorchDispatchMode.__init__(self, _dispatch_key=torch._C.DispatchKey.PreDispatch)
        self.names, self.values, self.modules = names, values, modules
        self.device = device  # where the model really runs: model code asks its meta inputs
        self.nodes: list[Node] = []
        self.keep: list[Any] = []      # every recorded tensor stays alive: ids are never reused
        self.counts: dict[str, Iterator[int]] = {}

    def _name(self, packet: str) -> str:
        """fx-style names (``linear``, ``linear_1``), never one an input or weight holds, nor
        one fx would rename (a Python builtin or keyword: export's first ``slice`` is
        ``slice_1``), so the replayed program's nodes keep the IR's names."""
        counter = self.counts.setdefault(packet, itertools.count())
        while True:
            k = next(counter)
            name = packet if k == 0 else f"{packet}_{k}"
            if name not in self.values and name not in builtins.__dict__ and not keyword.iskeyword(name):
                return name

    def _ref(self, a: Any) -> Any:
        if isinstance(a, torch.device) and a.type == "meta":
            return self.device  # ``torch.arange(n, device=x.device)``: the real device, for the replay
        if not isinstance(a, torch.Tensor):
            return a
        name = self.names.get(id(a))
        if name is None:
            # a tensor the module holds outside its parameters and buffers (export lifts
            # these as constants); without real contents it cannot be a recorded constant
            raise RecordingFailed(f"tensor of shape {tuple(a.shape)} is neither an input, a weight nor an op output")
        return Ref(name)

    def _constant(self, a: Any) -> Any:
        """A real tensor met inside the forward (a plain tensor attribute, a closure): a
        constant, moved to meta for the op."""
        if isinstance(a, torch.Tensor) and a.device.type != "meta" and id(a) not in self.names:
            name = self._name("c_lifted_tensor")
            self.values[name] = Value(name, tuple(a.shape), a.dtype, "const", a, name)
            meta = a.to("meta")
            self.names[id(meta)] = name
            self.keep += [a, meta]
            return meta
        return a

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if decomposes(func):  # recorded as the ops it is made of (see ``catalog.decomposes``)
            with self:
                return func.decompose(*args, **kwargs)
        args, kwargs = _map(self._constant, args), _map(self._constant, kwargs)
        run_kwargs = kwargs
        if "device" in kwargs and not _any_tensor(args):
            run_kwargs = {**kwargs, "device": torch.device("meta")}  # a factory: its output joins the others
        out = _shape_only(func, args, kwargs)
        if out is None:
            try:
                out = func(*args, **run_kwargs)
            except Exception as exc:  # no meta kernel, data-dependent value...
                raise RecordingFailed(f"{func} on meta tensors: {type(exc).__name__}: {str(exc)[:200]}") from exc
        if not isinstance(func, torch._ops.OpOverload):
            return out
        packet = func.overloadpacket.__name__
        ref_args, ref_kwargs = _map(self._ref, args), _map(self._ref, kwargs)
        name = self._name(packet)
        if isinstance(out, (list, tuple)):
            outs = [(f"{name}.{i}", v) for i, v in enumerate(out) if isinstance(v, torch.Tensor)]
        elif isinstance(out, torch.Tensor):
            outs = [(name, out)]
        else:
            return out  # sizes, scalars: nothing to analyse
        if not outs:
            return out
        for vname, v in outs:
            self.values[vname] = Value(vname, tuple(v.shape), v.dtype)
            self.names[id(v)] = vname  # an in-place op's result is its input: later uses see the new value
            self.keep.append(v)
        self.nodes.append(Node(name, canonical_aten(packet), func, tuple(ref_args), dict(ref_kwargs),
                               [n for n, _ in outs], named_args(func, ref_args, ref_kwargs),
                               self.modules[-1] if self.modules else "", f"aten.{packet}.{func._overloadname}"))
        return out


def _as_if_exporting() -> contextlib.AbstractContextManager:
    """Model code that branches on ``torch.compiler.is_exporting()`` (transformers builds its
    attention masks differently then) must take export's branch, or the two graphs differ."""
    try:
        from torch._export.utils import _compiling_state_context
    except ImportError:  # pragma: no cover - a torch that moved it
        return contextlib.nullcontext()
    return _compiling_state_context()


class _FactoryAliases(TorchFunctionMode):
    """Python-level factory functions (``torch.arange``, ``torch.zeros``) hand back a shallow
    copy of the tensor the dispatcher produced (autograd's ``make_variable``), so the
    recorder would not know the tensor the model holds.  Seen from the Python call, the
    copy is the output of the last op recorded during the call if that op took no tensor
    or is a ``*_like`` factory (DETR's decoder starts from ``torch.zeros_like(queries)``)."""

    def __init__(self, rec: _Recorder) -> None:
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        before = len(self.rec.nodes)
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and id(out) not in self.rec.names and len(self.rec.nodes) > before:
            last = self.rec.nodes[-1]
            factory = not last.inputs or op_kind(last).endswith("_like")
            if factory and len(last.outputs) == 1 and self.rec.values[last.outputs[0]].shape == tuple(out.shape):
                self.rec.names[id(out)] = last.outputs[0]
                self.rec.keep.append(out)
        return out


def _int_list(obj: Any) -> bool:
    """A non-empty (nested) list or tuple of Python ints: an index that is data."""
    if isinstance(obj, (list, tuple)):
        return bool(obj) and all(_int_list(o) for o in obj)
    return isinstance(obj, int) and not isinstance(obj, bool)


class _ListIndices(TorchFunctionMode):
    """``x[:, :, perm]`` with ``perm`` a Python list of ints: indexing turns the list into
    an index tensor on ``x``'s device without the dispatcher, so on meta the recorder
    meets a tensor with neither a name nor contents (timm's csatv2 was exported instead,
    4.9 s for a trace the recorder makes in under one).  Here such a list becomes a CPU
    tensor first, which the recorder lifts as a constant (what export does with it)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1:
            index = args[1]
            if isinstance(index, tuple):
                index = tuple(torch.tensor(i) if isinstance(i, list) and _int_list(i) else i for i in index)
            elif isinstance(index, list) and _int_list(index):
                index = torch.tensor(index)
            args = (args[0], index, *args[2:])
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _module_stack(model: torch.nn.Module, stack: list[str]) -> Iterator[None]:
    """Keep ``stack`` equal to the module paths being executed (export's nn_module_stack)."""
    paths = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}

    def pre(mod: torch.nn.Module, _: Any) -> None:
        stack.append(paths.get(id(mod), stack[-1] if stack else ""))

    def post(mod: torch.nn.Module, _: Any, __: Any) -> None:
        stack.pop()

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
               torch.nn.modules.module.register_module_forward_hook(post, always_call=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class CallSpec:
    """How the recorded graph is called, for replaying it as a module
    (:mod:`.torch_replay`): the pytree of ``(args, kwargs)`` with, per leaf, the IR input
    it became (None for a non-tensor leaf), and the pytree of the output with, per leaf,
    the IR value it is (None where the leaf is not a tensor, which ``out_consts`` holds).
    ``lost_outputs`` counts output tensors that no recorded op made (the graph cannot
    replay those)."""

    in_spec: pytree.TreeSpec
    in_leaves: tuple[str | None, ...]
    out_spec: pytree.TreeSpec
    out_leaves: tuple[str | None, ...]
    out_consts: tuple[Any, ...]
    arg_names: tuple[str, ...]
    lost_outputs: int


@dataclass(frozen=True)
class Recording:
    """The recorded IR and how it is called."""

    graph: Graph
    call: CallSpec


def record(model: torch.nn.Module, args: tuple, kwargs: dict) -> Graph:
    """The IR of ``model`` at these inputs, recorded on meta tensors (model in eval mode)."""
    return record_call(model, args, kwargs).graph


def _forward_arg_names(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[str, ...]:
    """The forward's parameter names for these inputs (``*args`` numbered), then the
    keywords: the compact module's call signature is the model's."""
    import inspect

    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind_partial(*args).arguments
    except (TypeError, ValueError):
        return tuple(f"arg_{i}" for i in range(len(args))) + tuple(kwargs)
    names: list[str] = []
    for name, value in bound.items():
        if sig.parameters[name].kind == inspect.Parameter.VAR_POSITIONAL:
            names += [f"{name}_{i}" for i in range(len(value))]
        else:
            names.append(name)
    return tuple(names) + tuple(kwargs)


def _meta_input(leaf: torch.Tensor, batch: int | None) -> torch.Tensor:
    """A meta tensor like ``leaf``, its first dimension ``batch`` where given (a dense
    contiguous or channels-last input: the recording at another batch must see the
    layout the example has, or ``reshape`` may record other ops)."""
    if batch is None or leaf.dim() == 0:
        return torch.empty_like(leaf, device="meta")
    shape = (batch, *leaf.shape[1:])
    if leaf.is_contiguous():
        return torch.empty(shape, dtype=leaf.dtype, device="meta")
    if leaf.dim() == 4 and leaf.is_contiguous(memory_format=torch.channels_last):
        return torch.empty(shape, dtype=leaf.dtype, device="meta", memory_format=torch.channels_last)
    raise RecordingFailed(f"an input of strides {leaf.stride()} cannot be recorded at another batch")


def record_call(model: torch.nn.Module, args: tuple, kwargs: dict, batch: int | None = None) -> Recording:
    """:func:`record`, with the call's structure for replaying the graph; ``batch``
    records as if every tensor input's first dimension were that (see :mod:`.batch_general`)."""
    from torch._dispatch.python import enable_python_dispatcher

    names: dict[int, str] = {}
    values: dict[str, Value] = {}
    metas: dict[str, torch.Tensor] = {}
    first: dict[int, str] = {}
    for kind, prefix, items in (("param", "p", model.named_parameters(remove_duplicate=False)),
                                ("buffer", "b", model.named_buffers(remove_duplicate=False))):
        for fqn, t in items:
            canonical = first.setdefault(id(t), fqn)  # tied weights: one tensor, its first name
            if canonical != fqn:
                metas[fqn] = metas[canonical]
                continue
            name = f"{prefix}_{fqn.replace('.', '_')}"
            values[name] = Value(name, tuple(t.shape), t.dtype, kind, t, fqn)
            metas[fqn] = torch.empty_like(t, device="meta")
            names[id(metas[fqn])] = name

    inputs: list[str] = []
    in_leaves: list[str | None] = []
    leaves, spec = pytree.tree_flatten((args, kwargs))
    meta_leaves = []
    arg_names = _forward_arg_names(model, args, kwargs)
    for path, leaf in zip(pytree.tree_flatten_with_path((args, kwargs))[0], leaves):
        if isinstance(leaf, torch.Tensor):
            # the forward's parameter names, as export names its placeholders (``x``,
            # ``pixel_values``), so an export of the same ops is the same graph
            keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path[0][1:]]
            if keys and path[0][0].idx == 0 and int(keys[0]) < len(arg_names):
                keys[0] = arg_names[int(keys[0])]
            name = "_".join(keys) or "input"
            name = f"input_{name}" if name[0].isdigit() else name
            while name in values:
                name += "_input"
            meta = _meta_input(leaf, batch)
            values[name] = Value(name, tuple(meta.shape), leaf.dtype, "input", None, name)
            names[id(meta)] = name
            inputs.append(name)
            in_leaves.append(name)
            meta_leaves.append(meta)
        else:
            in_leaves.append(None)
            meta_leaves.append(leaf)
    margs, mkwargs = pytree.tree_unflatten(meta_leaves, spec)

    real = [t for t in (*leaves, *model.parameters(), *model.buffers()) if isinstance(t, torch.Tensor)]
    stack: list[str] = []
    rec = _Recorder(names, values, stack, real[0].device if real else torch.device("cpu"))
    try:
        with _as_if_exporting(), enable_python_dispatcher(), _module_stack(model, stack), rec, _FactoryAliases(rec), \
                _ListIndices():
            out = torch.func.functional_call(model, one_name_per_slot(model, metas), margs, mkwargs,
                                             tie_weights=False, strict=False)
    except RecordingFailed:
        raise
    except Exception as exc:  # anything the meta run cannot do: export will say it properly
        raise RecordingFailed(f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    out_flat, out_spec = pytree.tree_flatten(out)
    out_leaves = tuple(names.get(id(t)) if isinstance(t, torch.Tensor) else None for t in out_flat)
    outputs = [n for n in out_leaves if n is not None]
    call = CallSpec(spec, tuple(in_leaves), out_spec, out_leaves,
                    tuple(None if isinstance(t, torch.Tensor) else t for t in out_flat),
                    arg_names,
                    sum(isinstance(t, torch.Tensor) and id(t) not in names for t in out_flat))
    graph = Graph(rec.nodes, values, inputs, outputs, "torch", type(model).__module__ + "." + type(model).__name__)
    return Recording(graph, call)
