"""Copies of the user's model for capture to run, so that nothing capture runs changes it.

Model code caches state on its first call (a detection head's anchors, and the input
shape they were made for, in plain attributes), and both the meta recording and
``torch.export`` run the forward.  A copy shares the parameters and buffers (the
groups, the optimizers and ``construct_subnet`` read the user's own tensors, and a
compact model built after training takes the batch-norm statistics training left) and
holds its own submodules and plain attributes, which is where model code caches what
its first call computes.
"""
from __future__ import annotations

import copy
from typing import Any

import torch


class UncopyableModel(RuntimeError):
    """``copy.deepcopy`` cannot copy the model (it holds a lock, a file, a C handle...)."""


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are the model's own tensors."""
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:  # deepcopy raises whatever the object it met raises
        raise UncopyableModel(f"{type(exc).__name__}: {str(exc)[:200]}") from exc


def warm_copy(model: torch.nn.Module, args: tuple, kwargs: dict) -> torch.nn.Module:
    """:func:`shared_copy` after one forward on the example inputs (eval mode, no grad),
    so that what the model computes and caches on its first call is there when
    ``torch.export`` traces it: export then sees the branch every later call takes, not
    the one that builds the cache (which may depend on data, ``GuardOnDataDependentSymNode``)."""
    warm = shared_copy(model).eval()
    with torch.no_grad():
        warm(*args, **kwargs)
    return warm
