"""``gp.trace``: any supported model -> a :class:`PrunableGraph`."""
from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from .analysis import analyse
from .frontends.backend import Backend
from .frontends.torch_backend import TorchBackend
from .ir.graph import Graph
from .prunable import PrunableGraph

log = logging.getLogger(__name__)


def _as_args(example_inputs: Any, example_kwargs: dict | None) -> tuple[tuple, dict]:
    if example_inputs is None:
        return (), dict(example_kwargs or {})
    if isinstance(example_inputs, dict):
        return (), {**example_inputs, **(example_kwargs or {})}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), dict(example_kwargs or {})
    return (example_inputs,), dict(example_kwargs or {})


def _trace_torch(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any,
                 recorder: bool) -> tuple[Graph, TorchBackend]:
    from .frontends.torch_export import export_model, from_exported
    from .frontends.torch_record import RecordingFailed, record

    export = functools.partial(export_model, model, args, kwargs, dynamic_shapes)
    if recorder and dynamic_shapes is None:
        was_training = model.training
        model.eval()
        try:
            return record(model, args, kwargs), TorchBackend(export)
        except RecordingFailed as exc:
            log.info("recording %s failed (%s): using torch.export", type(model).__name__, exc)
        finally:
            model.train(was_training)
    backend = TorchBackend(export, settled=True)
    return from_exported(backend.exported, model), backend


def trace(model: Any, example_inputs: Any = None, *, example_kwargs: dict | None = None,
          verify: bool = True, dynamic_shapes: Any = None, recorder: bool = True) -> PrunableGraph:
    """Trace a PyTorch model (with example inputs: a tensor, a tuple, or a dict of keyword
    inputs) or an ONNX model (a path or ``onnx.ModelProto``, with example inputs in
    graph-input order or as a dict by input name: needed for every dynamic dimension but
    the batch, see :mod:`.frontends.onnx_inputs`) and find its groups.  For ONNX, ``construct_subnet()`` returns a
    ModelProto and ``params`` holds the initializers as editable torch tensors.

    With ``verify`` each group is checked to be zero-invariant on the example input and
    withdrawn (see ``summary()``) if it is not.

    A PyTorch model is analysed from a recording of its ATen ops on meta tensors (fast, see
    :mod:`.frontends.torch_record`) and exported with ``torch.export`` when a compact model
    is first needed; ``recorder=False`` (or a model the recorder cannot run) exports at once.
    ``dynamic_shapes`` (torch.export's) also exports at once.
    """
    args, kwargs = _as_args(example_inputs, example_kwargs)
    backend: Backend
    if isinstance(model, torch.nn.Module):
        ir, backend = _trace_torch(model, args, kwargs, dynamic_shapes, recorder)
        params = dict(model.named_parameters())
    else:
        from .frontends.onnx_backend import OnnxBackend
        from .frontends.onnx_import import load_onnx

        ir, proto, feeds = load_onnx(model, kwargs or args)
        backend = OnnxBackend.of(ir, proto, feeds)
        params = backend.initial_params(ir)
        model = None
    pg = PrunableGraph(analyse(ir), params=params, model=model, example=(args, kwargs), backend=backend)
    if verify:
        if isinstance(backend, TorchBackend):
            pg.adopt(backend.settle(pg, adopt_groups=True))  # nobody holds the groups yet
        pg.verify()
    return pg
