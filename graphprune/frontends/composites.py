"""Composite ATen ops replaced by the ops they are made of, as both PyTorch frontends see them.

The recorder decomposes a composite op as it runs (:mod:`.torch_record`); an exported
program holds it as one node, replaced here by the nodes its decomposition runs, found the
same way: the op's ``CompositeImplicitAutograd`` kernel run on the node's fake values
under a pre-dispatch mode that collects the calls it makes.  The two graphs then agree op
for op, and the registry sees only the ops :func:`~graphprune.ops.catalog.decomposes`
leaves whole.
"""
from __future__ import annotations

import contextlib
import operator
from typing import Any

import torch
from torch import fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import UnsupportedModelError
from ..ops.catalog import decomposes


def mode_base() -> type:
    """The pre-dispatch mode stack accepts only a few mode classes; the schema-check mode's
    slot is the one a plain recording mode can occupy."""
    try:
        from torch._subclasses.schema_check_mode import SchemaCheckMode
    except ImportError as exc:  # pragma: no cover - a torch without it
        raise UnsupportedModelError("torch has no pre-dispatch schema-check mode") from exc
    return SchemaCheckMode


class _Calls(mode_base()):  # type: ignore[misc]
    """The non-composite calls a decomposition makes, in order, with their outputs."""

    def __init__(self) -> None:
        TorchDispatchMode.__init__(self, _dispatch_key=torch._C.DispatchKey.PreDispatch)
        self.calls: list[tuple[Any, tuple, dict, Any]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if decomposes(func):
            with self:
                return func.decompose(*args, **kwargs)
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out


def decompose_composites(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``ep`` with every composite node replaced by its decomposition (in place).  A node
    whose decomposition cannot be written back (a size that is no tensor's dimension in a
    dynamic export) stays whole, and the analysis reports it as an op without a rule."""
    graph = ep.graph_module.graph
    if not any(n.op == "call_function" and decomposes(n.target) for n in graph.nodes):
        return ep
    sizes: dict[Any, fx.Node] = {}  # symbolic size -> a node before this point that holds it
    for node in list(graph.nodes):
        if getattr(node, "_erased", False):  # a getitem of a decomposed node, replaced with it
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt):
            sizes.setdefault(val.node.expr, node)
        if node.op == "call_function" and decomposes(node.target):
            try:
                _Inline(graph, node, sizes).run()
            except UnsupportedModelError:
                pass
    graph.lint()
    ep.graph_module.recompile()
    return ep


class _Inline:
    """Replaces one composite node by the calls its decomposition makes."""

    def __init__(self, graph: fx.Graph, node: fx.Node, sizes: dict[Any, fx.Node]) -> None:
        self.graph, self.node, self.sizes = graph, node, sizes
        self.env: dict[int, fx.Node] = {}  # id of a fake tensor -> the node that holds it
        self.made: list[fx.Node] = []
        self.meta = {k: v for k, v in node.meta.items() if k != "val"}  # module path, stack trace

    def run(self) -> None:
        val = lambda a: a.meta["val"] if isinstance(a, fx.Node) else a  # noqa: E731
        args, kwargs = pytree.tree_map(val, (self.node.args, self.node.kwargs))
        for a in pytree.tree_leaves((self.node.args, self.node.kwargs)):
            if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor):
                self.env[id(a.meta["val"])] = a
        calls = _Calls()
        fake = detect_fake_mode(pytree.tree_leaves((args, kwargs)))
        with fake if fake is not None else contextlib.nullcontext(), enable_python_dispatcher(), calls:
            out = self.node.target.decompose(*args, **kwargs)
        try:
            for func, cargs, ckwargs, cout in calls.calls:
                fx_args, fx_kwargs = pytree.tree_map(self._arg, (cargs, ckwargs))
                self._hold(self._new(func, tuple(fx_args), dict(fx_kwargs), cout), cout)
            result = pytree.tree_map(self._arg, out)
            if isinstance(result, (tuple, list)) and any(u.target is not operator.getitem for u in self.node.users):
                raise UnsupportedModelError(f"{self.node.name}: a list output read whole")
        except UnsupportedModelError:
            for n in reversed(self.made):
                self.graph.erase_node(n)
            for k in [k for k, v in self.sizes.items() if v in self.made]:
                del self.sizes[k]
            raise
        if isinstance(result, (tuple, list)):  # its users are ``getitem``s: each takes its part
            for user in list(self.node.users):
                user.replace_all_uses_with(result[user.args[1]])
                self.graph.erase_node(user)
        else:
            self.node.replace_all_uses_with(result)
        self.graph.erase_node(self.node)

    def _new(self, func: Any, args: tuple, kwargs: dict, val: Any) -> fx.Node:
        name = func.overloadpacket.__name__ if isinstance(func, torch._ops.OpOverload) else None
        with self.graph.inserting_before(self.node):  # named as the recorder names the op: ``view``, ``view_1``
            new = self.graph.create_node("call_function", func, args, kwargs, name=name)
        new.meta.update(self.meta)
        new.meta["val"] = val
        self.made.append(new)
        return new

    def _hold(self, new: fx.Node, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            self.env[id(out)] = new
        elif isinstance(out, (tuple, list)):
            for i, v in enumerate(out):
                if isinstance(v, torch.Tensor):
                    self.env[id(v)] = self._new(operator.getitem, (new, i), {}, v)

    def _arg(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            if id(a) not in self.env:
                raise UnsupportedModelError(f"decomposing {self.node.target} at node {self.node.name}: a tensor of "
                                            f"shape {tuple(a.shape)} comes from no input and no call")
            return self.env[id(a)]
        if isinstance(a, torch.SymInt):
            return self._size(a)
        return a

    def _size(self, s: torch.SymInt) -> fx.Node:
        """A node holding symbolic size ``s``: one the graph has, else a ``sym_size`` of a
        tensor the decomposition reads that has it as a dimension, else such a size times
        or plus a constant (``flatten(0, 1)`` of a dynamic batch: ``batch * 3``)."""
        expr = s.node.expr
        if expr not in self.sizes:
            node = self._dimension(expr, s)
            if node is None and (expr.is_Mul or expr.is_Add):
                const, rest = expr.as_coeff_Mul() if expr.is_Mul else expr.as_coeff_Add()
                base = self.sizes.get(rest) or self._dimension(rest, s)
                if base is not None and const.is_Integer:
                    op = operator.mul if expr.is_Mul else operator.add
                    node = self._new(op, (base, int(const)), {}, s)
            if node is None:
                raise UnsupportedModelError(f"decomposing {self.node.target} at node {self.node.name}: the size "
                                            f"{expr} is no tensor's dimension")
            self.sizes[expr] = node
        return self.sizes[expr]

    def _dimension(self, expr: Any, s: torch.SymInt) -> fx.Node | None:
        """A ``sym_size`` of a tensor the decomposition reads whose dimension is ``expr``."""
        for t_node in list(self.env.values()):
            dims = [d for d, dim in enumerate(t_node.meta["val"].shape)
                    if isinstance(dim, torch.SymInt) and dim.node.expr == expr]
            if dims:
                node = self._new(torch.ops.aten.sym_size.int, (t_node, dims[0]), {}, t_node.meta["val"].shape[dims[0]])
                self.sizes[expr] = node
                return node
        return None
