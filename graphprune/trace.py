"""``gp.trace``: any supported model -> a :class:`PrunableGraph`."""
from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch.utils import _pytree as pytree

from .analysis import analyse
from .errors import UnsupportedModelError, VerificationError
from .frontends.backend import Backend, CheckExample
from .frontends.torch_backend import TorchBackend
from .ir.graph import Graph
from .lower.call_binding import CallBinding
from .prunable import PrunableGraph

if TYPE_CHECKING:  # the recorder's imports set warning filters: imported on first use
    from .frontends.torch_record import Recording

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
    call on the example, made on first need.  The recording is also what compact modules
    are lowered from (:mod:`.frontends.torch_replay`): nothing is exported unless
    verification finds the replay does not reproduce the model.  At a batch over one the
    program must take any batch (:mod:`.frontends.batch_general`): where the
    recordings at other batches cannot show how, the model is exported with a dynamic
    batch, and the notes say why.  ``notes`` gets what the summary should say about how
    the model was captured."""
    from .frontends.batch_general import NotBatchGeneral, batch_general, example_batch
    from .frontends.model_copy import UncopyableModel, shared_copy, warm_copy
    from .frontends.small_check import small_check
    from .frontends.torch_export import export_model, from_exported
    from .frontends.torch_record import RecordingFailed, record_call
    from .frontends.torch_replay import ReplayFailed, replay_program

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

    @functools.cache
    def reference() -> torch.nn.Module:
        try:
            return shared_copy(model)
        except UncopyableModel:
            return model  # noted when it was recorded

    export = lambda: export_model(runner(), args, kwargs, dynamic_shapes)  # noqa: E731
    binding = CallBinding.of(model, args, kwargs)
    if recorder and dynamic_shapes is None:
        try:
            cold = shared_copy(model)
        except UncopyableModel:
            cold = model
            notes.append("the model cannot be copied: it was recorded itself, and may keep what its forward cached")
        was_training = cold.training
        cold.eval()
        try:
            rec = record_call(cold, args, kwargs)
        except RecordingFailed as exc:
            log.info("recording %s failed (%s): using torch.export", type(model).__name__, exc)
            notes.append(f"captured with torch.export (fake tensors): the meta-tensor recording failed: {exc}")
        else:
            replay = None
            batch = example_batch(args, kwargs)
            try:
                general = None
                if batch is None and any(isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] > 1
                                         for t in pytree.tree_leaves((args, kwargs))):
                    raise NotBatchGeneral("the tensor inputs have different first dimensions: no one batch")
                if batch is not None and batch > 1:
                    general = batch_general(rec, batch, lambda b: record_call(_fresh(model, cold), args, kwargs, b))
                replay = replay_program(rec, model, general)
            except NotBatchGeneral as exc:
                log.info("the recording of %s is not batch-general (%s): emitting from torch.export",
                         type(model).__name__, exc)
                notes.append(f"emitted from torch.export (dynamic batch): the recording is not batch-general: {exc}")
            except ReplayFailed as exc:
                log.info("replaying the recording of %s failed (%s): emitting from torch.export",
                         type(model).__name__, exc)

            def small() -> list[CheckExample]:  # made on the first check: a trace without one needs none
                found, why = small_check(rec, args, kwargs, bool(replay and replay.any_batch),
                                         functools.partial(_record_eval, cold),
                                         lambda r, general: replay_program(r, model, general))
                if why:
                    log.info("%s: %s", type(model).__name__, "; ".join(why))
                return found
            return rec.graph, TorchBackend(export, runner, replay=replay, reference=reference, binding=binding,
                                           small=small if replay is not None else None)
        finally:
            cold.train(was_training)
    backend = TorchBackend(export, runner, settled=True, binding=binding)
    return from_exported(backend.exported, backend.runner), backend


def _record_eval(model: torch.nn.Module, args: tuple, kwargs: dict, batch: int | None) -> Recording:
    """``model`` recorded in eval mode (as the first recording was), its mode then restored."""
    from .frontends.torch_record import record_call

    was_training = model.training
    model.eval()
    try:
        return record_call(model, args, kwargs, batch)
    finally:
        model.train(was_training)


def _fresh(model: torch.nn.Module, cold: torch.nn.Module) -> torch.nn.Module:
    """A new copy of ``model`` in eval mode to record at another batch (what the first
    recording cached on ``cold`` would be a tensor the recorder cannot name); ``cold``
    itself where the model cannot be copied."""
    from .frontends.model_copy import UncopyableModel, shared_copy

    try:
        return shared_copy(model).eval()
    except UncopyableModel:
        return cold


def _verify_torch(pg: PrunableGraph, backend: TorchBackend, notes: list[str]) -> None:
    """``pg.verify()``; where a replayed recording fails it (a withdrawn group, or a compact
    model that does not run), the replay is checked on its own, nothing removed: if the
    full replayed program does not reproduce the model, the recording missed something
    (not a group's fault), so the model is exported and verified again from there."""
    if backend.replay is None:
        pg.adopt(backend.settle(pg, adopt_groups=True))  # nobody holds the groups yet
        pg.verify()
        return
    failure: VerificationError | None = None
    try:
        if not pg.verify():
            return
    except VerificationError as exc:
        failure = exc
    try:
        err = backend.compare(pg, pg.params, torch.zeros(0, dtype=torch.long))
    except Exception as exc:  # the replayed program itself does not run: a capture problem
        err, why = float("inf"), f"{type(exc).__name__}: {str(exc)[:200]}"
    else:
        why = f"rel. error {err:.2e}"
    if err < 1e-4:
        if failure is not None:
            raise failure
        return  # the program is right: the withdrawn groups are wrong
    log.info("the replayed recording of %s does not reproduce it (%s): using torch.export", pg.ir.source, why)
    notes.append(f"emitted from torch.export: the replayed recording did not reproduce the model ({why})")
    pg.groups, pg.withdrawn = list(pg.analysis.groups), []
    backend.stop_replay()
    pg.adopt(backend.settle(pg, adopt_groups=True))
    pg.verify()


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
    :mod:`.frontends.torch_record`), which is also replayed as the program compact models
    are lowered from, at any batch (:mod:`.frontends.batch_general`); where it cannot be,
    the model is exported with ``torch.export`` when a compact model is first needed (the
    notes say why); ``recorder=False`` (or a model the recorder cannot run) exports at once.
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
    if verify and isinstance(backend, TorchBackend):
        _verify_torch(pg, backend, notes)
    elif verify:
        pg.verify()
    return pg
