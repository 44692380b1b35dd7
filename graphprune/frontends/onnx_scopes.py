"""What an ONNX node reads from the graph around it.

A control-flow node (``If``, ``Loop``, ``Scan``) lists only its condition or loop state
as inputs; its subgraphs may read any value of an enclosing graph by name (a shape
computed outside, a position-embedding weight).  Every pass that asks "who reads this
value" must count those reads, or dead-code elimination drops a producer a branch still
needs and the analysis misses a weight the branch uses.  A leaf module.
"""
from __future__ import annotations

from typing import Iterator

import onnx


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held in ``node``'s attributes (both branches of an ``If``, a loop body)."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _defined(graph: onnx.GraphProto) -> set[str]:
    return ({i.name for i in graph.input} | {t.name for t in graph.initializer}
            | {o for n in graph.node for o in n.output if o})


def outer_reads(node: onnx.NodeProto) -> list[str]:
    """Names ``node``'s subgraphs (at any depth) read without defining them, in first-read order."""
    seen: dict[str, None] = {}

    def visit(graph: onnx.GraphProto, shadowed: set[str]) -> None:
        local = shadowed | _defined(graph)
        for n in graph.node:
            for i in n.input:
                if i and i not in local:
                    seen.setdefault(i)
            for g in subgraphs(n):
                visit(g, local)
        for o in graph.output:  # a branch may return an outer value as it is
            if o.name not in local:
                seen.setdefault(o.name)

    for g in subgraphs(node):
        visit(g, set())
    return list(seen)


def reads(node: onnx.NodeProto) -> list[str]:
    """Every name ``node`` reads from its graph: its inputs, then its subgraphs' outer reads."""
    return [i for i in node.input if i] + [i for i in outer_reads(node) if i not in node.input]


def rename_reads(node: onnx.NodeProto, old: str, new: str) -> None:
    """Make ``node`` read ``new`` wherever it (or a subgraph not shadowing ``old``) reads ``old``."""
    for k, i in enumerate(node.input):
        if i == old:
            node.input[k] = new

    def visit(graph: onnx.GraphProto) -> None:
        if old in _defined(graph):
            return
        for n in graph.node:
            rename_reads(n, old, new)
        for o in graph.output:
            if o.name == old:  # an output returned as it is: read it through an Identity
                graph.node.append(onnx.helper.make_node("Identity", [new], [old], name=f"{old}__outer"))

    for g in subgraphs(node):
        visit(g)
