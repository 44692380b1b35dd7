"""What a rule says about its node in the compact model, in no frontend's terms.

A rule's :meth:`~graphprune.ops.registry.Rule.rewrite` looks at the compact shapes
(:class:`graphprune.passes.shrink.Shrink`) and returns a :class:`Rewrite`: the node's
new constant arguments, named as the IR names them, or a :class:`Call` of a graphprune
op that replaces it (a mean that divides by the original count, a norm whose statistics
count removed columns).  The lowerings (:mod:`graphprune.lower`) apply it to an fx
node or an ONNX node without knowing the op: an argument becomes a schema argument or
an ONNX attribute/input, a call becomes the phantom op's torch function or its ONNX
function body.  So an op's rewrite is written once, and the plan that records it
(:class:`graphprune.passes.plan.CompactPlan`) can be inspected and tested without fx or
ONNX.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class OnnxCall:
    """A phantom op's ONNX form for one call: the FunctionProto to call, the call's
    attributes, and int64 constants for some of its inputs (position -> values)."""

    function: Any
    attrs: Mapping[str, Any] = field(default_factory=dict)
    inputs: Mapping[int, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class OnnxContext:
    """What an ONNX form may ask the lowering: the model's default-domain opset (given
    a default for a model that declares none), and a value's compact shape and torch
    dtype."""

    opset: Callable[[int], int]
    shape: Callable[[str], tuple[int, ...]]
    dtype: Callable[[str], Any]


@dataclass(frozen=True)
class Phantom:
    """An op that only compact models contain, defined once with both of its forms:
    ``torch`` (the fx target, called with the call's inputs then its attributes as
    keywords) and ``onnx`` (call, context -> :class:`OnnxCall`; None where no ONNX node
    ever needs it, e.g. nothing but ONNX models have run-time shape tensors)."""

    name: str
    torch: Callable[..., Any] | None
    onnx: Callable[["Call", OnnxContext], OnnxCall] | None


@dataclass(frozen=True)
class Call:
    """The node becomes ``op`` applied to ``inputs`` (IR value names, None for an absent
    optional input) with ``attrs``; its outputs stay."""

    op: Phantom
    inputs: tuple[str | None, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OnnxArg:
    """Where ONNX keeps an argument a rule's rewrite sets, when not in an attribute of
    the IR's name: input ``input`` from opset ``since`` on (an attribute before), under
    the attribute name ``name``; ``replaces``: an attribute the explicit input replaces
    (Split's ``num_outputs``)."""

    input: int | None = None
    since: int = 1
    name: str | None = None
    replaces: str | None = None


@dataclass(frozen=True)
class Entries:
    """A new value for a list argument given entry by entry: entries ``at`` take new
    values, the others stay what they are in the lowered graph (a symbolic batch size
    stays symbolic, a -1 stays -1)."""

    at: Mapping[int, int]

    def apply(self, old: list) -> list:
        return [self.at.get(k, v) for k, v in enumerate(old)]


@dataclass(frozen=True)
class Rewrite:
    """How one node changes in the compact model.

    ``args``: constant arguments, by the name the IR gives them, that take new values
    (whole, or :class:`Entries`): an fx schema argument, an ONNX attribute or constant
    input of that name.  ``call``: the node becomes a call of a phantom op.  ``feeds``: a
    run-time input (a shape computed from ``Shape``) is first passed through a phantom
    call whose only input is that value: input value name -> call.  ``constant``: the
    node's one output becomes this integer constant (an ONNX ``Shape`` whose sizes are
    all known when the model is written).
    """

    args: Mapping[str, Any] = field(default_factory=dict)
    call: Call | None = None
    feeds: Mapping[str, Call] = field(default_factory=dict)
    constant: int | list[int] | None = None
