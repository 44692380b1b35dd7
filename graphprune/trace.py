"""``gp.trace``: any supported model -> a :class:`PrunableGraph`."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from .analysis.dependency import propagate, solve
from .analysis.grouping import build_groups
from .errors import UnsupportedModelError
from .prunable import PrunableGraph


def _as_args(example_inputs: Any, example_kwargs: dict | None) -> tuple[tuple, dict]:
    if example_inputs is None:
        return (), dict(example_kwargs or {})
    if isinstance(example_inputs, dict):
        return (), {**example_inputs, **(example_kwargs or {})}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), dict(example_kwargs or {})
    return (example_inputs,), dict(example_kwargs or {})


def trace(model: Any, example_inputs: Any = None, *, example_kwargs: dict | None = None,
          verify: bool = True, dynamic_shapes: Any = None) -> PrunableGraph:
    """Trace a PyTorch model (with example inputs: a tensor, a tuple, or a dict of keyword
    inputs) or an ONNX model (a path or ``onnx.ModelProto``, with optional example inputs in
    graph-input order) and find its groups.  For ONNX, ``construct_subnet()`` returns a
    ModelProto and ``params`` holds the initializers as editable torch tensors.

    With ``verify`` each group is checked to be zero-invariant on the example input and
    withdrawn (see ``summary()``) if it is not.
    """
    if isinstance(model, torch.nn.Module):
        from .frontends.torch_backend import TorchBackend
        from .frontends.torch_export import batch_dynamic_shapes, export_program, from_exported

        args, kwargs = _as_args(example_inputs, example_kwargs)
        was_training = model.training
        model.eval()
        try:
            ep = None
            batched = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0]
            # a batch of 1 is specialised by torch.export anyway: don't pay for a failing attempt
            if dynamic_shapes is None and not (args and kwargs) and any(t.shape[0] > 1 for t in batched):
                try:  # any batch size in the compact model; static shapes if the model forbids it
                    ep = export_program(model, args, kwargs, batch_dynamic_shapes(args, kwargs))
                except UnsupportedModelError:
                    ep = None
            if ep is None:
                ep = export_program(model, args, kwargs, dynamic_shapes)
        finally:
            model.train(was_training)
        ir = from_exported(ep, model)
        params = dict(model.named_parameters())
        backend: Any = TorchBackend(ep)
    else:
        from .frontends.onnx_backend import OnnxBackend
        from .frontends.onnx_import import load_onnx

        args, kwargs = _as_args(example_inputs, example_kwargs)
        ir, proto, feeds = load_onnx(model, args)
        backend = OnnxBackend(proto, feeds)
        params = backend.initial_params(ir)
        model = None
    lab = propagate(ir)
    comp = solve(lab)
    groups = build_groups(lab, comp)
    pg = PrunableGraph(ir, lab, comp, groups, params=params, model=model, example=(args, kwargs), backend=backend)
    if verify:
        pg.verify()
    return pg
