"""Calling a compact graph module the way the user's model is called.

A captured program (the replayed recording, or ``torch.export``'s module) takes exactly
the example's call: each example input by its name, every one of them, the non-tensor
ones (``use_cache=False``) specialised into the graph.  Users call the compact model as
they call their own: ``model(ids)`` for a model traced with
``example_kwargs={"input_ids": ids, "use_cache": False}``, which the program refused
("missing 1 required positional argument: 'use_cache'"), so ``gp.recover`` on plain id
batches failed.  A :class:`CallBinding` binds a call to the user's forward signature
and passes the program every traced input in the example's form (positional or by
keyword): the example's value for a non-tensor input the call leaves out (the only one
the program computes), and a clear error for a missing tensor input, an input the
example did not have, or a non-tensor input given another value than the traced one.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree


def _holds_tensor(value: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))


def _show(value: Any) -> str:
    """A short form of an input for an error message (a tensor by its shape)."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _same(a: Any, b: Any) -> bool:
    """Whether a non-tensor input equals the traced one (``==`` where it is a plain bool)."""
    if a is b:
        return True
    try:
        return not _holds_tensor(a) and not _holds_tensor(b) and bool(a == b)
    except Exception:  # noqa: BLE001  (an object whose == is not a truth value)
        return False


@dataclass(frozen=True)
class CallBinding:
    """The user's forward signature, the names the example passed positionally and by
    keyword (the program takes them in that form: export's module checks it), and the
    example's non-tensor inputs by name (``fixed``); see the module docstring."""

    signature: inspect.Signature
    positional: tuple[str, ...]
    keywords: tuple[str, ...]
    fixed: dict[str, Any]

    @classmethod
    def of(cls, model: torch.nn.Module, args: tuple, kwargs: dict) -> "CallBinding | None":
        """The binding of ``model``'s forward for the example ``(args, kwargs)``; None where
        a call cannot be bound by name (no signature, ``*args`` or ``**kwargs`` in use):
        the program is then called as it is."""
        try:
            sig = inspect.signature(model.forward)
            bound = sig.bind(*args, **kwargs).arguments
        except (TypeError, ValueError):
            return None
        if any(sig.parameters[n].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
               for n in bound):
            return None
        positional = tuple(bound)[: len(args)]
        fixed = {n: v for n, v in bound.items() if not _holds_tensor(v)}
        return cls(sig, positional, tuple(kwargs), fixed)

    @property
    def traced(self) -> frozenset[str]:
        """Every input the program takes."""
        return frozenset(self.positional + self.keywords)

    def inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict[str, Any]]:
        """The program's inputs, in the example's form, for the call ``(*args, **kwargs)``."""
        try:
            given = self.signature.bind_partial(*args, **kwargs).arguments
        except TypeError as exc:
            raise TypeError(f"the compact model takes the model's own arguments {self.signature}: {exc}") from None
        out: dict[str, Any] = {}
        for name in self.positional + self.keywords:
            if name in given:
                value = given[name]
                if name in self.fixed and not _same(value, self.fixed[name]):
                    raise ValueError(f"the compact model was traced with {name}={_show(self.fixed[name])} and "
                                     f"computes only that; it was called with {name}={_show(value)} (trace again "
                                     f"with it)")
                out[name] = value
            elif name in self.fixed:
                out[name] = self.fixed[name]
            else:
                raise TypeError(f"the compact model needs the input {name!r}: the model was traced with it")
        for name, value in given.items():
            if name not in out and not _same(value, self.signature.parameters[name].default):
                raise TypeError(f"the compact model was traced without {name!r} and cannot take "
                                f"{name}={_show(value)} (trace again with it in the example)")
        return tuple(out[n] for n in self.positional), {n: out[n] for n in self.keywords}
