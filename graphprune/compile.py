"""``gp.compile``: the whole pipeline in one call, model in, compact model and report out.

trace -> prune (one-shot score, or train with an OTO optimizer) -> compact model ->
check it against the zeroed model -> measure -> optionally build and tune with TVM.
Each stage is the public API of the stage before (``gp.trace``, ``gp.prune``, the
optimizers, ``construct_subnet``, ``graphprune.codegen``); this module only sequences
them and records what happened in a :class:`~graphprune.report.Report`.

The user's PyTorch model is never changed: the pipeline works on a deep copy.

>>> result = gp.compile(model, (x,), method="obspa", target=gp.Target(flops=0.5))
>>> result.model                       # compact nn.Module (ModelProto for ONNX input)
>>> result.save("out/")                # model.onnx, model.pt2, report.md/json, plots
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from graphprune.atomic import atomic_path
from graphprune.errors import (GraphPruneError, NotInPlace, TuningError, UnprunableTargetError,
                               UnsupportedModelError, ZeroInvarianceError)
from graphprune.export import export_onnx
from graphprune.frontends.onnx_weight_forms import with_params
from graphprune.lower.module import module_biases
from graphprune.reference import onnxruntime_latency
from graphprune.optim import DHSPG, H2SPG, HESSO, HESSO_CRIC
from graphprune.optim.generated import generated_inputs, sampled_reason, samples_for
from graphprune.optim.oneshot import choose_criterion, prune
from graphprune.optim.recovery import recover
from graphprune.prunable import PrunableGraph
from graphprune.rel_error import check_tolerance, max_rel_error
from graphprune.report import LayerWidth, Report
from graphprune.target import PORTABLE_MULTIPLE, Target
from graphprune.trace import trace

#: One-shot methods and the ``gp.prune`` criterion each one runs ("magnitude" is the L2 norm).
ONESHOT = {"obspa": "obspa", "magnitude": "l2", "l1": "l1", "l2": "l2", "taylor": "taylor",
           "hessian": "hessian", "bn_scale": "bn_scale", "wanda": "wanda", "reconstruction": "reconstruction"}
#: Distillation steps run after pruning when calibration data is given and ``recover_steps`` is not.
DEFAULT_RECOVER_STEPS = 200
#: Methods that train while pruning, and their optimizer.
TRAINING = {"hesso": HESSO, "hesso-cric": HESSO_CRIC, "dhspg": DHSPG, "h2spg": H2SPG}
METHODS = (*ONESHOT, *TRAINING)
#: Largest relative difference allowed between the compact and the zeroed model.
VERIFY_RTOL = 1e-4
#: how far a compiled library may be from the compact model it was built from (float32): it
#: sums in another order and uses TVM's own exp/erf/tanh; a wrong kernel moves outputs by tenths
CODEGEN_RTOL = 1e-3

TrainStep = Callable[[nn.Module, torch.optim.Optimizer], Any]


@dataclasses.dataclass
class CompileResult:
    """The compact model, its report, and the TVM runtime when codegen ran.

    ``model`` is an ``nn.Module`` for PyTorch input and an ``onnx.ModelProto`` for ONNX
    input; ``onnx`` is the compact model as ONNX either way (exported on first use).
    ``graph`` is the traced original, for ``graph.summary()``.
    """

    model: Any
    report: Report
    graph: PrunableGraph
    example_inputs: tuple
    runtime: Any = None
    tuning: Any = None
    _onnx: onnx.ModelProto | None = dataclasses.field(default=None, repr=False)

    @property
    def onnx(self) -> onnx.ModelProto:
        """The compact model as an ONNX ModelProto."""
        if self._onnx is None and isinstance(self.model, onnx.ModelProto):
            self._onnx = self.model
        elif self._onnx is None:
            with tempfile.TemporaryDirectory() as tmp:
                self._onnx = export_onnx(self.model, self.example_inputs, os.path.join(tmp, "model.onnx"))
        return self._onnx

    def save(self, folder: str | os.PathLike) -> list[Path]:
        """Write ``model.onnx`` (and ``model.pt2`` for PyTorch), the built library when codegen
        ran, ``report.md``, ``report.json`` and the plots into ``folder``; returns the paths.

        Every file is written atomically, so an interrupted save leaves no partial file.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = [save_onnx(self.onnx, folder / "model.onnx")]
        if isinstance(self.model, nn.Module):
            program = torch.export.export(self.model, self.example_inputs)
            with atomic_path(folder / "model.pt2") as tmp:
                torch.export.save(program, tmp)
            paths.append(folder / "model.pt2")
        if self.runtime is not None:
            paths.append(Path(self.runtime.export(folder / f"model.{self.report.codegen}.so")))
        return paths + self.report.write(folder)

    def summary(self) -> str:
        return self.report.summary()

    def __repr__(self) -> str:
        r = self.report
        latency = f", {r.codegen} {r.latency['median_ms']:.3f} ms" if r.latency else ""
        return (f"CompileResult({r.method}, params -{r.params_removed:.1%}, "
                f"MACs -{r.flops_removed:.1%}{latency})")


def save_onnx(proto: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """``onnx.save`` with an atomic replace (no half-written model if the write fails)."""
    with atomic_path(path) as tmp:
        onnx.save(proto, os.fspath(tmp))
    return Path(path)


# ---- the pipeline -------------------------------------------------------------------------

def _sampled_like(model: nn.Module, example_inputs: Any) -> list[torch.Tensor]:
    """Sequences a generative LM samples itself, in batches shaped like its example token
    ids: the compact graph keeps the shape arithmetic of the size it was traced at, and
    recovery runs it on them."""
    ids = example_inputs[0] if isinstance(example_inputs, (tuple, list)) and example_inputs else example_inputs
    if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point():
        return generated_inputs(model, length=ids.shape[1], batch=ids.shape[0])
    return generated_inputs(model)


def compile(model_or_onnx: nn.Module | onnx.ModelProto | str | os.PathLike, example_inputs: Any = None, *,
            method: str | None = None, target: Target | float = 0.5, train_fn: TrainStep | None = None,
            data: Iterable | None = None, eval_data: Iterable | None = None, steps: int | None = None,
            lr: float = 0.01, optimizer_options: dict[str, Any] | None = None, device: str | torch.device | None = None,
            codegen: str | None = None, tune_trials: int = 0, tune_minutes: float | None = None,
            tuning_db: str | os.PathLike | None = None, output: str | os.PathLike | None = None,
            progress: bool = False, calibration: Iterable | None = None,
            recover_steps: int | None = None) -> CompileResult:
    """Prune ``model_or_onnx`` to ``target`` with ``method`` and return the compact model and its report.

    ``model_or_onnx``: an ``nn.Module`` (``example_inputs`` required: a tensor or tuple),
    or an ONNX path / ``ModelProto`` (example inputs in graph-input order or by name; needed for every
    dynamic dim but the batch, which defaults to 1).  A model with nothing to prune raises
    :class:`~graphprune.errors.UnprunableTargetError` saying why; ``report.unchanged`` says when
    pruning removed nothing.
    ``target``: a :class:`~graphprune.Target` or a float, the fraction of FLOPs to remove.
    ``Target(latency_ms=...)`` is a budget for the compiled compact model on ``codegen`` (x86
    when none is given), ``Target(latency=0.4)`` one of 60% of the dense model's time, met by
    the one-shot methods with the compiler in the loop (:mod:`graphprune.latency`); the
    report shows the measured latency against it.
    Kept widths are rounded to the hardware's multiple unless the target sets one
    (``Target(flops=0.5, multiple=1)`` for none): ``codegen``'s vector lanes
    (:func:`graphprune.codegen.targets.prune_multiple`), else
    :data:`~graphprune.target.PORTABLE_MULTIPLE`; every group keeps its floor
    (``Target.min_fraction``, a quarter of its width by default).

    ``method``: one-shot ``"obspa"`` (compensated; data-free, or with the input Hessian
    measured on ``calibration``), ``"wanda"``/``"reconstruction"`` (need ``calibration``),
    ``"magnitude"`` (L2 norm), ``"l1"``, ``"taylor"``/``"hessian"`` (need ``data``), ``"bn_scale"``; or a training
    method ``"hesso"``, ``"hesso-cric"``, ``"dhspg"``, ``"h2spg"`` (PyTorch input only).
    Training calls ``train_fn(model, optimizer)`` ``steps`` times; each call is one
    training step of the user's own loop (forward, backward, ``optimizer.step()``) and may
    return the loss for the history.  Without ``train_fn``, a cross-entropy step over
    ``data`` (an iterable of ``(inputs, targets)``, re-iterated as needed) is used, and
    ``steps`` defaults to ten passes over ``data``.  The schedule warms up for 10% of the
    steps and prunes over the next 60%; ``optimizer_options`` override any optimizer
    argument.  Training runs on ``device``; the compact model is emitted on the CPU.

    Top-1 accuracy before and after is measured on ``eval_data`` (else on ``data``) when
    either is given.  ``codegen`` ("x86", "arm", "cuda") builds the compact model with
    TVM; ``tune_trials`` > 0 first tunes it (trials per tuning task) and ``tune_minutes``
    for a time budget (spent on the tasks with the largest share of the latency; with
    ``tune_trials`` too, that caps each task), into ``tuning_db`` (default: this machine's
    shared database for the target; resumed if it exists).  ``output`` saves everything there (:meth:`CompileResult.save`).
    ``progress`` shows progress bars on stderr.

    ``calibration``: unlabeled batches of model inputs (see :func:`graphprune.prune`) for
    the calibrated criteria and for label-free recovery: after pruning, the compact model
    is distilled from the input model's outputs on them for ``recover_steps`` steps
    (default :data:`DEFAULT_RECOVER_STEPS` with calibration data, 0 without;
    :func:`graphprune.recover`).  ``method`` None picks the best one-shot criterion for
    what is given (:func:`graphprune.optim.oneshot.choose_criterion`); the report says
    which and why.  A generative language model (a transformers causal LM) given no
    calibration samples its own (:mod:`graphprune.optim.generated`) for a calibrated or
    default one-shot method.
    """
    calibration = list(calibration) if calibration is not None else None  # read twice: scoring and recovery
    named = ONESHOT.get(method, method) if method is not None else None  # the criterion asked for, if any
    sampled = None
    if calibration is None and samples_for(model_or_onnx, named):
        calibration = _sampled_like(model_or_onnx, example_inputs)
        sampled = sum(len(b) for b in calibration)
    criterion, reason = choose_criterion(named, calibration is not None)
    if sampled is not None:
        reason = sampled_reason(sampled, reason)
    if method is None:
        method = criterion
    if recover_steps is None:
        recover_steps = DEFAULT_RECOVER_STEPS if calibration is not None else 0
    if recover_steps and calibration is None:
        raise GraphPruneError("recovery distils from the input model's outputs on calibration inputs, and none "
                              "were given", hint="pass calibration= (unlabeled batches of model inputs)")
    if method not in METHODS:
        raise GraphPruneError(f"unknown method {method!r}", hint=f"use one of {', '.join(METHODS)}")
    if (tune_trials or tune_minutes) and not codegen:
        raise TuningError("tuning needs a codegen target", hint='pass codegen="x86" (or "arm", "cuda")')
    target = Target.coerce(target).for_hardware(
        codegen_api("prune_multiple")(codegen) if codegen else PORTABLE_MULTIPLE)
    stages = _Stages(["trace", method, "emit", "verify"] + (["recover"] if recover_steps else []) + ["measure"]
                     + (["codegen"] if codegen else []), progress)
    with stages("trace"):
        work, g, source = _trace(model_or_onnx, example_inputs)
    if not g.groups:
        stages.close()
        raise UnprunableTargetError(f"nothing to prune: {g.why_no_groups}", source=source,
                                    hint="graphprune inspect (or g.summary()) lists the barriers and withdrawn groups")
    example = _example_inputs(g)
    scored = eval_data if eval_data is not None else data
    accuracy_before = _accuracy(_reference(g, work), scored) if scored is not None else None
    history: list[dict[str, Any]] = []
    curve: list[tuple[int, float]] = []
    dense = _dense_copy(g, work) if recover_steps else None
    pruned = None
    with stages(method):
        if method in ONESHOT:
            gradient = ONESHOT[method] in ("taylor", "hessian")
            latency = dict(codegen=codegen or "x86", tuning_db=tuning_db) if target.kind == "latency" else {}
            pruned = prune(g, ONESHOT[method], target, data=data if gradient else calibration,
                           loss_fn=F.cross_entropy if gradient and data is not None else None, **latency)
            pruned.reason = reason
        elif target.kind == "latency":
            raise UnprunableTargetError(f"{target!r} is met by one-shot pruning with the compiler in the loop",
                                        hint=f"use a one-shot method ({', '.join(ONESHOT)}), or a FLOPs target")
        else:
            history, curve = _train(g, work, method, target, train_fn=train_fn, data=data, eval_data=eval_data,
                                    steps=steps, lr=lr, options=optimizer_options or {}, device=device,
                                    progress=progress)
    with stages("emit"):
        compact = g.construct_subnet()
    with stages("verify"):
        error = _verify(g, _reference(g, work), compact, example)
    recovery = None
    if recover_steps:
        with stages("recover"):
            recovery = recover(compact, dense, calibration, steps=recover_steps)
            compact = recovery.model
    with stages("measure"):
        report = _measure(g, compact, example, source=source, method=method, target=target)
        report.verify_error, report.history, report.accuracy_curve = error, history, curve
        if target.kind == "latency":
            report.latency_target = dict(dataclasses.asdict(pruned.latency), codegen=codegen or "x86")
        if pruned is not None:
            report.criterion, report.criterion_reason = pruned.criterion, pruned.reason
            report.calibration = repr(pruned.calibration) if pruned.calibration is not None else None
        if recovery is not None:
            report.recovery = {"steps": recovery.steps, "loss": recovery.loss, "loss_before": recovery.loss_before,
                               "loss_after": recovery.loss_after, "improved": recovery.improved,
                               "batches": recovery.batches, "skipped_batches": recovery.skipped_batches,
                               "augmented_batches": recovery.augmented_batches, "lr": recovery.lr}
        report.unchanged = _unchanged(g, report, method)
        if scored is not None:
            report.accuracy_on = "eval_data" if eval_data is not None else "data"
            report.accuracy_before, report.accuracy_after = accuracy_before, _accuracy(compact, scored)
    result = CompileResult(compact, report, g, example)
    if codegen:
        with stages("codegen"):
            _run_codegen(result, codegen, tune_trials, tune_minutes, tuning_db)
    stages.close()
    report.seconds = stages.seconds
    if output is not None:
        result.save(output)
    return result


class _Stages:
    """Times the pipeline's stages for the report and shows them as one progress bar."""

    def __init__(self, names: Sequence[str], progress: bool) -> None:
        self.seconds: dict[str, float] = {}
        self.bar = tqdm(total=len(names), desc="graphprune", unit="stage", disable=not progress, leave=False)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.bar.set_description(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start
            self.bar.update()

    def close(self) -> None:
        self.bar.close()


def _trace(model: Any, example_inputs: Any) -> tuple[nn.Module | None, PrunableGraph, str]:
    """(working copy of a PyTorch model or None, its traced graph, a name for reports)."""
    if isinstance(model, nn.Module):
        if example_inputs is None:
            raise UnsupportedModelError(f"{type(model).__name__}: a PyTorch model needs example_inputs",
                                        hint="pass example_inputs=(torch.randn(1, 3, 224, 224),)")
        work = copy.deepcopy(model).eval()
        return work, trace(work, _as_tuple(example_inputs)), type(model).__name__
    g = trace(model, example_inputs if isinstance(example_inputs, dict) else _as_tuple(example_inputs))
    name = os.fspath(model) if isinstance(model, (str, os.PathLike)) else \
        f"{getattr(getattr(model, 'graph', None), 'name', '') or 'model'} (ModelProto)"
    return None, g, name


def _as_tuple(x: Any) -> tuple:
    if x is None:
        return ()
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _example_inputs(g: PrunableGraph) -> tuple:
    """The inputs the graph was traced with, as tensors (ONNX: its example feeds, in input order)."""
    if g.ir.frontend == "onnx":
        return tuple(torch.from_numpy(np.asarray(a)) for a in g.backend.feeds.values())
    return g.example[0]


# ---- training -----------------------------------------------------------------------------

def _train(g: PrunableGraph, work: nn.Module | None, method: str, target: Target, *, train_fn: TrainStep | None,
           data: Iterable | None, eval_data: Iterable | None, steps: int | None, lr: float,
           options: dict[str, Any], device: str | torch.device | None,
           progress: bool) -> tuple[list[dict[str, Any]], list[tuple[int, float]]]:
    """Train the working copy with the method's optimizer; returns its history and accuracy curve."""
    if work is None:
        raise GraphPruneError(f"method {method!r} trains the model, and an ONNX model cannot be trained here",
                              source=g.ir.source, hint="use a one-shot method (obspa, magnitude), "
                                                        "or compile the PyTorch model instead")
    if train_fn is None and data is None:
        raise GraphPruneError(f"method {method!r} needs train_fn= (one training step) or data= ((x, y) batches)",
                              hint="or use a data-free one-shot method such as obspa")
    if steps is None:
        if train_fn is not None or not hasattr(data, "__len__"):
            raise GraphPruneError("steps= is needed: how many training steps to run",
                                  hint="e.g. steps=1000; it defaults to ten passes only for sized data")
        steps = 10 * len(data)  # type: ignore[arg-type]
    home = next(work.parameters()).device
    device = torch.device(device) if device is not None else home
    work.to(device)
    opt = _optimizer(g, work, method, target, steps, lr, options, data, eval_data, device)
    step = train_fn or cross_entropy_step(data, device)  # type: ignore[arg-type]
    every = max(steps // 10, 1)
    curve = []
    work.train()
    try:
        for i in tqdm(range(steps), desc=method, unit="step", disable=not progress, leave=False):
            loss = step(work, opt)
            if loss is not None:
                opt.record_loss(loss)
            if eval_data is not None and ((i + 1) % every == 0 or i + 1 == steps):
                curve.append((i + 1, _accuracy(work, eval_data)))
                work.train()
    finally:
        work.eval()
        work.to(home)
    return opt.history, curve


def _optimizer(g: PrunableGraph, work: nn.Module, method: str, target: Target, steps: int, lr: float,
               options: dict[str, Any], data: Iterable | None, eval_data: Iterable | None,
               device: torch.device) -> torch.optim.Optimizer:
    """The method's optimizer with a schedule sized to ``steps``: 10% warm-up, 60% pruning."""
    window = max(steps * 6 // 10, 1)
    kwargs: dict[str, Any] = dict(lr=lr, target=target, warmup_steps=steps // 10, pruning_steps=window)
    if method in ("hesso", "hesso-cric"):
        kwargs["pruning_periods"] = min(10, window)
    if method == "hesso-cric" and "loss_fn" not in options:
        held = eval_data if eval_data is not None else data
        if held is None:
            raise GraphPruneError("hesso-cric probes the loss on a held-out batch: pass eval_data= or data=",
                                  hint="or pass optimizer_options={'loss_fn': <closure returning a loss>}")
        x, y = next(iter(held))
        xs = tuple(t.to(device) for t in _as_tuple(x))
        kwargs["loss_fn"] = lambda: F.cross_entropy(work(*xs), y.to(device))
    return TRAINING[method](g, **{**kwargs, **options})


def cross_entropy_step(data: Iterable, device: torch.device | str = "cpu") -> TrainStep:
    """A training step over ``data`` ((inputs, targets) batches, re-iterated forever) with
    cross-entropy loss: what :func:`compile` uses when no ``train_fn`` is given."""
    def batches() -> Iterator[Any]:
        while True:
            empty = True
            for batch in data:
                empty = False
                yield batch
            if empty:
                raise GraphPruneError("`data` yielded no batches",
                                      hint="pass a non-empty iterable of (inputs, targets)")

    stream = batches()

    def step(model: nn.Module, opt: torch.optim.Optimizer) -> torch.Tensor:
        x, y = next(stream)
        loss = F.cross_entropy(model(*(t.to(device) for t in _as_tuple(x))), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


# ---- checks and measurements -----------------------------------------------------------------

def _outputs(model: nn.Module | onnx.ModelProto, inputs: Sequence[Any]) -> list[np.ndarray]:
    """Run a PyTorch module (no grad, its own device) or an ONNX model (onnxruntime) on ``inputs``."""
    if isinstance(model, onnx.ModelProto):
        from graphprune.frontends.onnx_backend import run_onnx

        inits = {i.name for i in model.graph.initializer}
        names = [i.name for i in model.graph.input if i.name not in inits]
        feeds = {n: (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
                 for n, x in zip(names, inputs)}
        return run_onnx(model, feeds)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        out = model(*(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs))
    return [t.detach().cpu().numpy() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _dense_copy(g: PrunableGraph, work: nn.Module | None) -> nn.Module | onnx.ModelProto:
    """The input model as it is before pruning, the teacher of recovery (pruning edits ``g.params``)."""
    return copy.deepcopy(work) if work is not None else with_params(g.backend.proto, g.params)


def _reference(g: PrunableGraph, work: nn.Module | None) -> nn.Module | onnx.ModelProto:
    """The input model with its current weights: the PyTorch working copy, or the input
    ONNX model with ``g.params`` written into its initializers (run by onnxruntime).

    Where compensation gave layers without a bias one (``g.added_biases``) the model to
    reproduce has them: the working copy runs with them set on its linear or convolution
    layers; where they are other ops (a MatMul over a parameter, an ONNX input), the traced
    graph is lowered with nothing removed and those biases added."""
    if g.added_biases:
        if work is not None:
            try:
                return _WithBiases(work, module_biases(work, g.added_biases))
            except NotInPlace:
                pass
        return g.backend.emit(g, g.params, torch.zeros(0, dtype=torch.long), biases=g.added_biases)
    return work if work is not None else with_params(g.backend.proto, g.params)


class _WithBiases(nn.Module):
    """``model`` run with ``biases`` (``path.bias`` entries its layers hold as None) set."""

    def __init__(self, model: nn.Module, biases: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model, self.biases = model, biases

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.model, self.biases, args, kwargs, strict=False)


def _verify(g: PrunableGraph, reference: nn.Module | onnx.ModelProto, compact: Any, example: tuple) -> float:
    """Max relative error of the compact model against the zeroed input model; raises past ``VERIFY_RTOL``.

    The reference is the user's own model with the pruned weights zeroed
    (:func:`_reference`), not a second emission, so an emitter bug cannot hide behind itself.
    """
    worst = max(max_rel_error(_outputs(reference, inputs), _outputs(compact, inputs)) for inputs in _checked_at(g, example))
    if not worst <= VERIFY_RTOL:
        raise ZeroInvarianceError(f"the compact model differs from the zeroed model (max rel. error {worst:.2e})",
                                  source=g.ir.source, hint="this is a graphprune bug: please report it with the "
                                                           "model; nothing was written")
    return worst


def _checked_at(g: PrunableGraph, example: tuple) -> list[tuple]:
    """The inputs the compact model is checked at: the example, and for an ONNX model with
    dynamic axes the same inputs at other sizes of each (the compact file keeps them)."""
    second = getattr(g.backend, "second", None)
    return [example] + ([tuple(torch.from_numpy(np.asarray(a)) for a in second.values())] if second else [])


def _measure(g: PrunableGraph, compact: Any, example: tuple, *, source: str, method: str,
             target: Target) -> Report:
    """Sizes before and after (the compact model traced again: exact, not estimated), widths, barriers."""
    small = trace(compact, example, verify=False)
    return Report(source=source, frontend=g.ir.frontend, method=method, target=repr(target),
                  params_before=g.total_params, params_after=small.total_params,
                  flops_before=g.total_flops, flops_after=small.total_flops,
                  widths=[LayerWidth(grp.name, grp.kind, grp.size, grp.size - int(zero.sum()), target.floor(grp),
                                     target.unit_multiple(grp))
                          for grp, zero in zip(g.groups, g.zero_masks())],
                  barriers=[dataclasses.asdict(b) for b in g.barriers],
                  withdrawn=[{"group": grp.name, "reason": reason} for grp, reason in g.withdrawn])


def _unchanged(g: PrunableGraph, report: Report, method: str) -> str | None:
    """Why the compact model is the input model, when it is (None when pruning removed something)."""
    if report.params_after < report.params_before or report.flops_after < report.flops_before:
        return None
    return (f"pruning left the model unchanged: {method} zeroed no whole unit of its {len(g.groups)} groups "
            f"(target {report.target})")


def _accuracy(model: nn.Module | onnx.ModelProto, data: Iterable) -> float:
    """Top-1 accuracy of ``model``'s first output over ``data`` ((inputs, labels) batches)."""
    correct = total = 0
    for x, y in data:
        logits = _outputs(model, _as_tuple(x))[0]
        labels = y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        correct += int((logits.argmax(axis=1) == labels).sum())
        total += len(labels)
    if total == 0:
        raise GraphPruneError("the accuracy data yielded no batches",
                              hint="pass a non-empty iterable of (inputs, labels)")
    return correct / total


# ---- code generation (graphprune.codegen, imported on use) -------------------------------------

def codegen_api(name: str) -> Callable[..., Any]:
    """``graphprune.codegen.<name>``, or a clear :class:`TuningError` when TVM or codegen is missing."""
    try:
        from graphprune import codegen

        return getattr(codegen, name)
    except (ImportError, AttributeError) as exc:
        raise TuningError(f"code generation is not available: {type(exc).__name__}: {exc}",
                          hint="install TVM with: python -m pip install -e '.[tvm]'") from exc


@contextlib.contextmanager
def _codegen_errors(what: str) -> Iterator[None]:
    """TVM fails with many internal exception types; report them all as a :class:`TuningError`."""
    try:
        yield
    except GraphPruneError:
        raise
    except Exception as exc:
        raise TuningError(f"{what} failed: {type(exc).__name__}: {str(exc)[:400]}",
                          hint="run with --debug (CLI) for the traceback; try another target") from exc


def _check_compiled(result: CompileResult, target: str) -> float:
    """Max relative error of the compiled library against the compact model on the example
    (floating-point outputs; an integer output such as an argmax may flip on a rounding tie);
    raises past :data:`CODEGEN_RTOL`.  TVM's importers, passes and schedules are code graphprune
    does not own: a library that computes something else must not ship as the model."""
    reference = _outputs(result.model, result.example_inputs)
    compiled = result.runtime.run(*result.example_inputs)
    compiled = compiled if isinstance(compiled, list) else [compiled]
    if len(compiled) != len(reference):
        raise TuningError(f"the library built for {target} returns {len(compiled)} outputs, the compact model "
                          f"{len(reference)}", source=result.report.source,
                          hint="build without codegen and run the compact ONNX with onnxruntime; please report "
                               "the model to graphprune")
    error = max_rel_error(reference, compiled)
    tolerance = check_tolerance(CODEGEN_RTOL, [torch.as_tensor(a) for a in reference])
    if not error <= tolerance:
        worst = max(range(len(compiled)), key=lambda i: max_rel_error([reference[i]], [compiled[i]]))
        raise TuningError(f"the library built for {target} differs from the compact model on the example "
                          f"(max rel. error {error:.2e}, output {worst})", source=result.report.source,
                          hint="the compact model itself is checked (compile without codegen to get it); "
                               "this is a code generation bug: please report it with the model")
    return error


def _run_codegen(result: CompileResult, target: str, tune_trials: int, tune_minutes: float | None,
                 tuning_db: str | os.PathLike | None) -> None:
    """Tune (optional), build and time the compact model; fills ``result.runtime``/``.tuning`` and the report.

    TVM imports the compact module as PyTorch input gives it (the form the latency-target
    rounds build, so their tuning records apply), and the compact ONNX where its torch
    importer refuses the module (the index op torch.export makes of ``nn.Unfold``, in timm's
    TNT): the report says so."""
    source: Any = result.model

    def imported(step: Callable[[Any], Any]) -> Any:
        nonlocal source
        try:
            return step(source)
        except UnsupportedModelError as exc:  # the module could not be imported into Relax
            if isinstance(source, onnx.ModelProto):
                raise
            refusal = str(exc).partition("\n")[0][:200]
            result.report.codegen_from = f"the compact ONNX (TVM's torch importer: {refusal})"
            source = result.onnx
            return step(source)

    tuning_report = None
    if tune_trials > 0 or tune_minutes:
        with _codegen_errors(f"tuning for {target}"):
            result.tuning = imported(lambda model: codegen_api("tune")(
                model, result.example_inputs, target, work_dir=tuning_db, trials_per_task=tune_trials or None,
                minutes=tune_minutes))
        tuning_db = result.tuning.work_dir
        tuning_report = result.tuning.as_dict()
    with _codegen_errors(f"building for {target}"):
        result.runtime = imported(lambda model: codegen_api("build")(model, result.example_inputs, target=target,
                                                                     tuning_db=tuning_db))
    try:
        latency = result.runtime.benchmark()
    except TuningError:  # a cross target (ARM from x86, CUDA without a GPU) builds but cannot run here
        latency = None
    if latency is not None:
        result.report.codegen_error = _check_compiled(result, target)
        result.report.reference = onnxruntime_latency(result.onnx, result.example_inputs, int(latency["threads"]))
    result.report.codegen, result.report.latency, result.report.tuning = target, latency, tuning_report
    result.report.schedules = result.runtime.schedules
    program = result.runtime.program  # shapes bound at import: the library takes exactly these
    result.report.codegen_inputs = {n: [int(d) for d in shape]
                                     for n, shape in zip(program.input_names, program.input_shapes)}
