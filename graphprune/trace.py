"""``gp.trace``: any supported model -> a :class:`PrunableGraph`."""
from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from .analysis import analyse
from .errors import UnsupportedModelError
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
                 recorder: bool, notes: list[str]) -> tuple[Graph, TorchBackend]:
    """The IR (recorded, or from ``torch.export`` where recording fails) and the backend.
    Both run copies of ``model`` (:mod:`.frontends.model_copy`); export's is warmed by one
    call on the example, made on first need.  ``notes`` gets what the summary should say
    about how the model was captured."""
    from .frontends.model_copy import UncopyableModel, shared_copy, warm_copy
    from .frontends.torch_export import export_model, from_exported
    from .frontends.torch_record import RecordingFailed, record

    @functools.cache
    def runner() -> torch.nn.Module:
        try:
            return warm_copy(model, args, kwargs)
        except UncopyableModel as exc:
            notes.append(f"the model cannot be copied ({exc}): export ran it without a warm-up call")
            return model
        except Exception as exc:  # the user's forward on the user's inputs
            raise UnsupportedModelError(f"{type(model).__name__} does not run on the example inputs: "
                                        f"{type(exc).__name__}: {str(exc)[:300]}",
                                        source=type(model).__module__ + "." + type(model).__name__,
                                        hint="give example inputs the model's forward accepts") from exc

    export = lambda: export_model(runner(), args, kwargs, dynamic_shapes)  # noqa: E731
    if recorder and dynamic_shapes is None:
        try:
            cold = shared_copy(model)
        except UncopyableModel:
            cold = model
            notes.append("the model cannot be copied: it was recorded itself, and may keep what its forward cached")
        was_training = cold.training
        cold.eval()
        try:
            return record(cold, args, kwargs), TorchBackend(export, runner)
        except RecordingFailed as exc:
            log.info("recording %s failed (%s): using torch.export", type(model).__name__, exc)
            notes.append(f"captured with torch.export (fake tensors): the meta-tensor recording failed: {exc}")
        finally:
            cold.train(was_training)
    backend = TorchBackend(export, runner, settled=True)
    return from_exported(backend.exported, backend.runner), backend


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
        notes: list[str] = []
        ir, backend = _trace_torch(model, args, kwargs, dynamic_shapes, recorder, notes)
        params = dict(model.named_parameters())
    else:
        from .frontends.onnx_backend import OnnxBackend
        from .frontends.onnx_import import load_onnx

        ir, proto, feeds = load_onnx(model, kwargs or args)
        backend = OnnxBackend.of(ir, proto, feeds)
        params = backend.initial_params(ir)
        model = None
    pg = PrunableGraph(analyse(ir), params=params, model=model, example=(args, kwargs), backend=backend)
    if isinstance(backend, TorchBackend):
        pg.notes = notes  # the same list: a note made when export first runs shows too
    if verify:
        if isinstance(backend, TorchBackend):
            pg.adopt(backend.settle(pg, adopt_groups=True))  # nobody holds the groups yet
        pg.verify()
    return pg
