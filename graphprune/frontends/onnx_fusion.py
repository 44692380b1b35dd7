"""Recognise layer and RMS norms that an exporter wrote out op by op.

paddle2onnx, tf2onnx and torch's TorchScript exporter below opset 17 have no
``LayerNormalization`` to write, so they write its body::

    mean = ReduceMean(x, axes=[-1]); d = Sub(x, mean); var = ReduceMean(Pow(d, 2))
    y = Div(d, Sqrt(Add(var, eps)))  [ * gamma ]  [ + beta ]

and an RMS norm as ``x / Sqrt(ReduceMean(x²) + eps) * gamma`` (or ``Mul`` by a
``Reciprocal``), with ``Identity`` and same-type ``Cast`` steps anywhere between.
Op by op, the analysis cannot see that the statistics can be kept exact with the
original count (:mod:`graphprune.ops.normalization`), so the hidden columns of every
transformer from those exporters were pinned.  :func:`find_norms` finds each such
subgraph over the last axis; the importer makes one ``layer_norm`` IR node of it, named
after its last ONNX node, so the registry's rule and phantom-norm rewrite apply.  The
file is never changed: a norm left whole keeps the exporter's nodes, and a shrunk one
becomes the phantom norm's body in the file's own opset (the lowering rewrites the last
node and drops the rest, which nothing reads any more).

tf2onnx writes Keras' ``LayerNormalization`` in the batch-norm-like form it computes
(the mean by ``GlobalAveragePool`` on a rank-3 tensor, gamma shaped ``[1, 1, C]``)::

    k = Reciprocal(Sqrt(var + eps)) [ * gamma ]
    y = x * k + (Neg(mean) * k [+ beta])

which is the same norm, recognised too.  Any other form is not silent: its mean over the
channel axis is a reported barrier.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import helper

Shape = Callable[[str], tuple[int, ...] | None]   # a value's shape (None: unknown)
Const = Callable[[str], float | None]             # a scalar constant's value (None: not one)
Ints = Callable[[str], list[int] | None]          # an integer constant's contents
IsWeight = Callable[[str], bool]                    # whether a value is a float weight

@dataclass(frozen=True)
class DecomposedNorm:
    """One recognised norm: the ONNX nodes it spans and what the IR node reads."""

    name: str                 # its last node: the IR node's name, the node the lowering rewrites
    nodes: frozenset[str]     # every node of the subgraph (the last included)
    x: str                    # the normalised input
    scale: str | None         # gamma (a 1-D weight over the last axis), None if absent
    bias: str | None          # beta, None if absent (always for RMS)
    eps: float
    rms: bool
    output: str               # the last node's output

    @property
    def source_op(self) -> str:
        """The op the IR node reports (``onnx::`` prefix, as every ONNX node's)."""
        return "onnx::RMSNormalization(decomposed)" if self.rms else "onnx::LayerNormalization(decomposed)"


class _Graph:
    """Producers, consumers and views of one ONNX graph, for matching."""

    def __init__(self, model: onnx.ModelProto, dtype: Callable[[str], np.dtype | None]) -> None:
        self.producer = {o: n for n in model.graph.node for o in n.output if o}
        self.users: dict[str, list[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for i in dict.fromkeys(i for i in n.input if i):
                self.users.setdefault(i, []).append(n)
        self.outputs = {o.name for o in model.graph.output}
        self.dtype = dtype

    def is_view(self, n: onnx.NodeProto) -> bool:
        """An ``Identity``, or a ``Cast`` to the type its input already has."""
        if n.op_type == "Identity":
            return True
        if n.op_type != "Cast" or not n.input or not n.output:
            return False
        to = next((a.i for a in n.attribute if a.name == "to"), None)
        src = self.dtype(n.input[0])
        return to is not None and src is not None and np.dtype(helper.tensor_dtype_to_np_dtype(to)) == src

    def root(self, v: str) -> str:
        """``v`` before any chain of views."""
        while v in self.producer and self.is_view(self.producer[v]):
            v = self.producer[v].input[0]
        return v

    def consumers(self, v: str, seen: list[onnx.NodeProto]) -> list[tuple[onnx.NodeProto, str]] | None:
        """The nodes reading ``v`` with the name they read it by, looking through views
        (appended to ``seen``); None when a graph output shows ``v`` or a view of it."""
        if v in self.outputs:
            return None
        out = []
        for n in self.users.get(v, []):
            if self.is_view(n):
                seen.append(n)
                more = self.consumers(n.output[0], seen)
                if more is None:
                    return None
                out += more
            else:
                out.append((n, v))
        return out

    def only(self, v: str, op: tuple[str, ...], seen: list[onnx.NodeProto]) -> tuple[onnx.NodeProto, str] | None:
        """The one node reading ``v`` (through views, appended to ``seen`` only when it is
        found), if it is one of ``op``."""
        views: list[onnx.NodeProto] = []
        users = self.consumers(v, views)
        if not users or len(users) != 1 or users[0][0].op_type not in op:
            return None
        seen += views
        return users[0]


def _other(n: onnx.NodeProto, name: str) -> str | None:
    """The other input of a binary node that reads ``name``."""
    if len(n.input) != 2 or name not in n.input:
        return None
    return n.input[1] if n.input[0] == name else n.input[0]


def _is_square(g: _Graph, n: onnx.NodeProto, const: Const) -> str | None:
    """The base ``b`` of ``Pow(b, 2)`` or ``Mul(b, b)`` (its input name), else None."""
    if n.op_type == "Pow" and len(n.input) == 2 and const(g.root(n.input[1])) == 2.0:
        return n.input[0]
    if n.op_type == "Mul" and len(n.input) == 2 and g.root(n.input[0]) == g.root(n.input[1]):
        return n.input[0]
    return None


def _last_axis_mean(n: onnx.NodeProto, rank: int, ints: Ints) -> bool:
    """A ``ReduceMean`` over the last axis only, keeping it (axes an attribute, or an input
    from opset 18), or a ``GlobalAveragePool`` of a rank-3 tensor (it averages axis 2)."""
    if n.op_type == "GlobalAveragePool":
        return rank == 3
    if n.op_type != "ReduceMean":
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    axes = attrs.get("axes")
    if axes is None and len(n.input) > 1 and n.input[1]:
        axes = ints(n.input[1])
    return attrs.get("keepdims", 1) == 1 and axes is not None and [a % rank for a in axes] == [rank - 1]


def find_norms(model: onnx.ModelProto, shape: Shape, dtype: Callable[[str], np.dtype | None], const: Const,
               ints: Ints, is_weight: IsWeight) -> list[DecomposedNorm]:
    """Every decomposed layer or RMS norm over the last axis in ``model`` whose inner
    values nothing outside it reads.  ``shape``/``dtype``: a value's (None if unknown);
    ``const``: a scalar constant's value (None if not one); ``ints``: an integer
    constant's contents; ``is_weight``: whether a value (seen through views) is a float
    weight (an initializer or ``Constant``), the only gamma/beta accepted."""
    g = _Graph(model, dtype)
    found: list[DecomposedNorm] = []
    taken: set[str] = set()
    for n in model.graph.node:
        x = n.input[0] if n.input else ""
        rank = len(shape(x) or ())
        if rank == 0 or not _last_axis_mean(n, rank, ints):
            continue
        norm = _match(g, n, x, rank, shape, const, ints, is_weight) or \
            _match_folded(g, n, x, rank, shape, const, ints, is_weight)
        if norm is not None and not (norm.nodes & taken):
            found.append(norm)
            taken |= norm.nodes
    return found


def _match(g: _Graph, mean: onnx.NodeProto, x: str, rank: int, shape: Shape, const: Const, ints: Ints,
           is_weight: IsWeight) -> DecomposedNorm | None:
    """The norm whose first ``ReduceMean`` is ``mean`` (over ``x``'s last axis), or None."""
    seen: list[onnx.NodeProto] = [mean]
    sub = g.only(mean.output[0], ("Sub",), seen)
    if sub is not None and sub[0].input[1] == sub[1] and g.root(sub[0].input[0]) == g.root(x):
        rms, centred = False, sub[0].output[0]   # layer norm: d = x - mean(x); var = mean(d²)
        seen.append(sub[0])
        square = _squares(g, centred, seen, const)
        if square is None:
            return None
        var = g.only(square.output[0], ("ReduceMean", "GlobalAveragePool"), seen)
        if var is None or not _last_axis_mean(var[0], rank, ints):
            return None
        seen += [square, var[0]]
        stats = var[0]
    else:  # RMS norm: the mean is of x², and x is what is normalised
        rms, stats = True, mean
        v = x
        while v in g.producer and g.is_view(g.producer[v]):  # views between the square and the mean
            seen.append(g.producer[v])
            v = g.producer[v].input[0]
        base = g.producer.get(v)
        centred = _is_square(g, base, const) if base is not None else None
        if centred is None:
            return None
        seen.append(base)
        x = centred
        rank = len(shape(x) or ())
    tail = _rstd_tail(g, stats.output[0], centred, seen, const)
    if tail is None:
        return None
    y, eps = tail
    width = (shape(x) or (0,))[-1]
    scale = bias = None
    step = g.only(y, ("Mul",), seen)
    if step is not None and _affine_ok(g, _other(step[0], step[1]), width, shape, is_weight):
        scale, y = _other(step[0], step[1]), step[0].output[0]
        seen.append(step[0])
        step = g.only(y, ("Add",), seen) if not rms else None
        if step is not None and _affine_ok(g, _other(step[0], step[1]), width, shape, is_weight):
            bias, y = _other(step[0], step[1]), step[0].output[0]
            seen.append(step[0])
    if rms and scale is None:  # the phantom RMS norm takes a scale; without one it stays decomposed
        return None
    last = g.producer[y]
    nodes = frozenset(k.name for k in seen if k is not None)
    if not _closed(g, nodes, y):
        return None
    return DecomposedNorm(last.name, nodes, x, scale, bias, eps, rms, y)


def _match_folded(g: _Graph, mean: onnx.NodeProto, x: str, rank: int, shape: Shape, const: Const, ints: Ints,
                  is_weight: IsWeight) -> DecomposedNorm | None:
    """tf2onnx's form (module docstring): ``x * k + (Neg(mean) * k [+ beta])`` with
    ``k = rstd [* gamma]``; None when ``mean`` starts no such norm."""
    seen: list[onnx.NodeProto] = [mean]
    users = g.consumers(mean.output[0], seen) or []
    sub = next((n for n, v in users if n.op_type == "Sub" and n.input[1] == v and g.root(n.input[0]) == g.root(x)),
               None)
    other = [n for n, _ in users if n is not sub]
    if sub is None or len(other) != 1 or other[0].op_type != "Neg":
        return None
    seen.append(sub)
    square = _squares(g, sub.output[0], seen, const)
    var = g.only(square.output[0], ("ReduceMean", "GlobalAveragePool"), seen) if square is not None else None
    if var is None or not _last_axis_mean(var[0], rank, ints):
        return None
    seen += [square, var[0]]
    rstd = _rstd(g, var[0].output[0], seen, const)
    if rstd is None:
        return None
    k, eps = rstd
    width = (shape(x) or (0,))[-1]
    scale = None
    step = g.only(k, ("Mul",), [])
    if step is not None and _affine_ok(g, _other(step[0], step[1]), width, shape, is_weight):
        scale, k = _other(step[0], step[1]), step[0].output[0]
        seen.append(step[0])
    muls = [n for n, v in g.consumers(k, seen) or [] if n.op_type == "Mul"]
    xk = next((n for n in muls if g.root(_other(n, k) or "") == g.root(x)), None)
    mk = next((n for n in muls if n is not xk), None)
    if xk is None or mk is None or len(muls) != 2:
        return None
    if other[0].op_type != "Neg" or g.root(_other(mk, k) or "") != g.root(other[0].output[0]):
        return None
    shift, bias = mk.output[0], None  # x*k + ((-mean)*k [+ beta])
    seen += [other[0], xk, mk]
    step = g.only(shift, ("Add",), [])
    if step is not None and _affine_ok(g, _other(step[0], step[1]), width, shape, is_weight):
        bias, shift = _other(step[0], step[1]), step[0].output[0]
        seen.append(step[0])
    join = g.only(xk.output[0], ("Add",), [])
    if join is None or g.root(_other(join[0], join[1]) or "") != g.root(shift):
        return None
    seen.append(join[0])
    y = join[0].output[0]
    nodes = frozenset(n.name for n in seen)
    if not _closed(g, nodes, y):
        return None
    return DecomposedNorm(g.producer[y].name, nodes, x, scale, bias, eps, False, y)


def _rstd(g: _Graph, var: str, seen: list[onnx.NodeProto], const: Const) -> tuple[str, float] | None:
    """From the variance ``var``: ``Add eps -> Sqrt -> Reciprocal`` (or ``Div(1, ·)``);
    ``(rstd, eps)``."""
    add = g.only(var, ("Add",), seen)
    eps = const(g.root(_other(add[0], add[1]) or "")) if add is not None else None
    sqrt = g.only(add[0].output[0], ("Sqrt",), seen) if eps is not None else None
    inv = g.only(sqrt[0].output[0], ("Reciprocal", "Div"), seen) if sqrt is not None else None
    if inv is None or (inv[0].op_type == "Div" and (inv[0].input[1] != inv[1]
                                                    or const(g.root(inv[0].input[0])) != 1.0)):
        return None
    seen += [add[0], sqrt[0], inv[0]]
    return inv[0].output[0], float(eps)


def _squares(g: _Graph, d: str, seen: list[onnx.NodeProto], const: Const) -> onnx.NodeProto | None:
    """The node squaring ``d`` among its readers (through views)."""
    for n, name in g.consumers(d, seen) or []:
        if _is_square(g, n, const) is not None and g.root(n.input[0]) == g.root(d):
            return n
    return None


def _rstd_tail(g: _Graph, var: str, num: str, seen: list[onnx.NodeProto], const: Const) -> tuple[str, float] | None:
    """From the variance (mean square) ``var``: ``Add eps -> Sqrt -> Div(num, ·)`` or
    ``-> Reciprocal (or Div(1, ·)) -> Mul(num, ·)``; ``(normalised output, eps)``."""
    add = g.only(var, ("Add",), seen)
    eps = const(g.root(_other(add[0], add[1]) or "")) if add is not None else None
    if eps is None:
        return None
    seen.append(add[0])
    sqrt = g.only(add[0].output[0], ("Sqrt",), seen)
    if sqrt is None:
        return None
    seen.append(sqrt[0])
    step = g.only(sqrt[0].output[0], ("Div", "Reciprocal"), seen)
    if step is None:
        return None
    n, name = step
    if n.op_type == "Div" and n.input[1] == name and g.root(n.input[0]) == g.root(num):
        seen.append(n)
        return n.output[0], float(eps)
    if n.op_type == "Reciprocal" or (n.op_type == "Div" and n.input[1] == name and const(g.root(n.input[0])) == 1.0):
        seen.append(n)
        mul = g.only(n.output[0], ("Mul",), seen)
        if mul is None or g.root(_other(mul[0], mul[1]) or "") != g.root(num):
            return None
        seen.append(mul[0])
        return mul[0].output[0], float(eps)
    return None


def _affine_ok(g: _Graph, name: str | None, width: int, shape: Shape, is_weight: IsWeight) -> bool:
    """Whether ``name`` is a float weight as wide as the normalised axis: 1-D, or with
    leading ones (tf2onnx's ``[1, 1, C]``)."""
    dims = tuple(shape(name) or ()) if name is not None else ()
    return name is not None and is_weight(g.root(name)) and len(dims) >= 1 and dims[-1] == width > 1 \
        and all(d == 1 for d in dims[:-1])


def _closed(g: _Graph, nodes: frozenset[str], y: str) -> bool:
    """Whether every value inside the subgraph is read only inside it (its output ``y`` aside)."""
    inner = [o for k in g.producer.values() if k.name in nodes for o in k.output if o and o != y]
    for v in set(inner):
        if v in g.outputs or any(u.name not in nodes for u in g.users.get(v, [])):
            return False
    return True
