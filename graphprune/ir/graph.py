"""The IR: a small typed graph shared by the PyTorch and ONNX frontends.

A :class:`Graph` is a list of :class:`Node` in topological order over named
:class:`Value` s.  A node keeps the callable that computes it (the ATen overload for
PyTorch, a torch implementation of the ONNX op for ONNX) and its arguments with
tensor arguments replaced by :class:`Ref`, so the analysis can *execute* data-movement
ops on label tensors instead of re-deriving their index maps by hand.  ``op`` is the
canonical op name the registry is keyed by, whichever frontend the node came from.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import networkx as nx
import torch
from torch.utils import _pytree as pytree


@dataclass(frozen=True)
class Ref:
    """A reference to a tensor value inside a node's arguments."""

    name: str


@dataclass
class Value:
    """A tensor in the graph.  ``kind``: input, param, buffer, const or act (activation)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str = "act"
    data: torch.Tensor | None = None  # real contents for param/buffer/const values
    source_name: str | None = None    # the user's name (parameter FQN, initializer name)
    alt_shape: tuple[int, ...] | None = None  # shape at a second batch size: its differing dims are dynamic

    @property
    def fixed(self) -> bool:
        """Whether the contents are known before the model runs: a parameter, buffer or constant."""
        return self.kind in ("param", "buffer", "const")

    @property
    def dynamic_axes(self) -> set[int]:
        """Axes whose size changed at the second batch size (ONNX import); none if unknown."""
        if self.alt_shape is None:
            return set()
        return {i for i, (a, b) in enumerate(zip(self.shape, self.alt_shape)) if a != b}


@dataclass
class Node:
    """One operator application."""

    name: str
    op: str                        # canonical op name (registry key)
    target: Callable[..., Any] | None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)  # normalised named arguments
    module: str = ""              # the user's module path / ONNX node name
    source_op: str = ""           # "aten.conv2d.default", "onnx::Conv", ...

    @functools.cached_property
    def inputs(self) -> list[str]:
        """Names of the tensor arguments (a node's arguments never change once built)."""
        leaves = pytree.tree_leaves((self.args, self.kwargs))
        return [a.name for a in leaves if isinstance(a, Ref)]

    def call(self, env: dict[str, Any]) -> Any:
        """Run the node's callable with every :class:`Ref` looked up in ``env``."""
        args, kwargs = pytree.tree_map(lambda a: env[a.name] if isinstance(a, Ref) else a,
                                       (self.args, self.kwargs),
                                       is_leaf=lambda a: isinstance(a, Ref))
        return self.target(*args, **kwargs)

    def arg(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)


@dataclass
class Graph:
    """A traced model: nodes in topological order, values by name, and its origin."""

    nodes: list[Node]
    values: dict[str, Value]
    inputs: list[str]
    outputs: list[str]
    frontend: str                 # "torch" or "onnx"
    source: str = "<memory>"      # file path for ONNX, class name for PyTorch

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def params(self) -> dict[str, Value]:
        return {v.name: v for v in self.values.values() if v.kind == "param"}

    def producers(self) -> dict[str, Node]:
        """Value -> the node computing it (inputs, parameters and constants have none)."""
        return {o: n for n in self.nodes for o in n.outputs}

    def users(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                out.setdefault(i, []).append(n)
        return out

    def to_networkx(self) -> nx.DiGraph:
        """Value -> node -> value digraph, for reachability and drawing."""
        g = nx.DiGraph()
        for n in self.nodes:
            g.add_node(n.name, kind="node", op=n.op)
            for i in n.inputs:
                g.add_edge(i, n.name)
            for o in n.outputs:
                g.add_edge(n.name, o)
        return g

    def print_tabular(self) -> str:
        rows = [f"{'node':32} {'op':22} inputs -> outputs"]
        for n in self.nodes:
            rows.append(f"{n.name[:32]:32} {n.op[:22]:22} {', '.join(n.inputs)} -> {', '.join(n.outputs)}")
        return "\n".join(rows)
