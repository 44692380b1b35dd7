"""Label-free recovery: distil the compact model from the dense one on calibration inputs.

A user with a pretrained model rarely has its training pipeline, but pruning moved the
function, and a few hundred optimiser steps on the dense model's own outputs move most of
it back (knowledge distillation with the teacher's outputs as the only targets).

>>> g = gp.trace("model.onnx", x); gp.prune(g, target=0.5, data=calib)
>>> result = recover(g.construct_subnet(), "model.onnx", calib, steps=200)
>>> result.model   # a ModelProto: same inputs, outputs, names and dynamic axes

The compact model trains as it is: an ``nn.Module`` in place; a compact ONNX model through
the torch program of its own graph (:class:`~graphprune.frontends.onnx_program.GraphProgram`)
with its weights as trainable tensors, written back into a copy of the file's graph in the
form and type each weight had (:func:`~graphprune.frontends.onnx_weight_forms.with_params`),
so names, dynamic axes and everything else of the file stay as they were.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np
import onnx
import torch
from torch import nn
from torch.utils import _pytree as pytree

from graphprune.errors import GraphPruneError
from graphprune.frontends.onnx_inputs import graph_inputs
from graphprune.frontends.onnx_program import GraphProgram
from graphprune.frontends.onnx_skeleton import run_onnx
from graphprune.frontends.onnx_weight_forms import with_params
from graphprune.optim.calibration import arity, as_inputs
from graphprune.optim import generated

Loss = Literal["mse", "kl"]


@dataclass
class Recovery:
    """What :func:`recover` did: the model (recovered, or as given when distillation did not
    lower the loss), the steps run, and the distillation loss on the calibration inputs
    before and after (relative squared error of the outputs for ``mse``)."""

    model: Any
    steps: int
    loss: Loss
    loss_before: float
    loss_after: float
    batches: int
    skipped_batches: int = 0
    lr: float = 0.0  # the learning rate of the run kept (after any back-off)
    augmented_batches: int = 0  # batches of the dense LM's continuations distilled on besides the data

    @property
    def improved(self) -> bool:
        return self.loss_after < self.loss_before

    def __repr__(self) -> str:
        skipped = f", {self.skipped_batches} batches of another shape skipped" if self.skipped_batches else ""
        more = f" (+{self.augmented_batches} of the dense model's continuations)" if self.augmented_batches else ""
        return (f"Recovery({self.steps} steps of {self.loss} distillation at lr {self.lr:.3g} on {self.batches} "
                f"batches{more}: loss {self.loss_before:.4g} -> {self.loss_after:.4g}{skipped})")


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _onnx_teacher(model: onnx.ModelProto) -> Callable[[tuple], list[torch.Tensor]]:
    names = [vi.name for vi in graph_inputs(model)]

    def run(inputs: tuple) -> list[torch.Tensor]:
        feeds = {n: (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
                 for n, x in zip(names, inputs)}
        return [torch.from_numpy(np.asarray(a)) for a in run_onnx(model, feeds)]
    return run


def _teacher(dense: Any) -> Callable[[tuple], list[torch.Tensor]]:
    """The dense model as ``inputs -> output tensors`` (no gradients)."""
    if isinstance(dense, (str, os.PathLike)):
        dense = onnx.load(os.fspath(dense))
    if isinstance(dense, onnx.ModelProto):
        return _onnx_teacher(dense)
    if isinstance(dense, nn.Module):
        device = next((p.device for p in dense.parameters()), torch.device("cpu"))

        def run(inputs: tuple) -> list[torch.Tensor]:
            was = dense.training
            dense.eval()
            try:
                with torch.no_grad():
                    return [t.detach() for t in _leaves(dense(*(x.to(device) for x in inputs)))]
            finally:
                dense.train(was)
        return run
    if callable(dense):
        return lambda inputs: [t.detach() for t in _leaves(dense(*inputs))]
    raise GraphPruneError(f"the dense model must be an nn.Module, an ONNX model or path, or a callable; got "
                          f"{type(dense).__name__}", hint="pass the model as it was before pruning")


def distillation_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], loss: Loss = "mse",
                      temperature: float = 1.0) -> torch.Tensor:
    """Mean over outputs of the relative squared error ``||s - t||² / ||t||²`` (``mse``: scale-free,
    so a detector's box and score outputs weigh alike), or of ``KL(softmax(t/T) || softmax(s/T))``
    over the last axis (``kl``: for logits)."""
    if len(student) != len(teacher):
        raise GraphPruneError(f"the compact model has {len(student)} outputs and the dense one {len(teacher)}",
                              hint="distil a compact model from the model it was pruned from")
    terms = []
    for s, t in zip(student, teacher):
        s, t = s.float(), t.float().to(s.device)
        if s.shape != t.shape:
            raise GraphPruneError(f"output shapes differ: compact {tuple(s.shape)}, dense {tuple(t.shape)}",
                                  hint="distil a compact model from the model it was pruned from")
        if loss == "kl":
            terms.append(nn.functional.kl_div((s / temperature).log_softmax(-1), (t / temperature).log_softmax(-1),
                                              log_target=True, reduction="batchmean") * temperature ** 2)
        elif loss == "mse":
            terms.append((s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12))
        else:
            raise GraphPruneError(f"unknown distillation loss {loss!r}", hint="use 'mse' or 'kl'")
    return torch.stack(terms).mean()


def recover(compact: nn.Module | onnx.ModelProto, dense: Any, data: Iterable | None = None, *, steps: int = 200,
            lr: float = 1e-3, loss: Loss = "mse", temperature: float = 1.0, seed: int = 0,
            augment: int | None = None) -> Recovery:
    """Distil ``compact`` from ``dense`` on the unlabeled batches ``data`` for ``steps`` Adam steps.

    ``data`` yields batches of model inputs as :func:`graphprune.optim.prune` takes them
    (a tensor, a tuple per input, a dict by input name; ``(x, y)`` pairs for a one-input
    model have their labels ignored); it is read once and cycled through.  ``dense`` is
    the model before pruning (an ``nn.Module``, an ONNX ModelProto or path, or any
    callable).  The learning rate decays to zero on a cosine; the model runs in eval mode
    (BatchNorm keeps its statistics).  If distillation does not lower the loss on ``data``,
    it is run again from the pruned weights at a tenth of the learning rate (twice at
    most: a rate that suits a CNN left a small language model's loss where it was), and
    if none lowers it the model is returned as given (``Recovery.improved`` is False),
    never a worse one.
    An ``nn.Module`` is trained in place; an ONNX model is returned as a new ModelProto.
    ``data`` None: a generative language model ``dense`` samples its own
    (:func:`~graphprune.optim.generated.generated_inputs`, 512 sequences); other models need data.

    ``augment``: sequences a generative language model ``dense`` writes on from the openings
    of the data's token rows (:func:`~graphprune.optim.generated.continuations`) to distil
    on besides the data, each teacher output computed when its batch is drawn; by default
    as many as the steps draw beyond the data (``steps x batch - sequences``, at most
    :data:`AUGMENT_CAP` times the data), none for other models; 0 distils on the data
    alone.  The loss before and after (and the rule above) is measured on the data alone.
    """
    if steps < 0:
        raise GraphPruneError(f"steps must be >= 0, got {steps}")
    if data is None:
        if not generated.can_generate(dense):
            raise GraphPruneError("recovery distils on unlabeled inputs, and none were given",
                                  hint="pass data= (unlabeled batches of model inputs); only a generative "
                                       "language model can sample its own")
        data = generated.generated_inputs(dense, n=2 * generated.DEFAULT_SEQUENCES, seed=1)
    teacher = _teacher(dense)
    if isinstance(compact, onnx.ModelProto):
        names = [vi.name for vi in graph_inputs(compact)]
        n_inputs = len(names)
    elif isinstance(compact, nn.Module):
        names, n_inputs = [], arity(compact)
    else:
        raise GraphPruneError(f"recover takes the compact nn.Module or ONNX ModelProto; got {type(compact).__name__}")
    batches = [tuple(torch.as_tensor(x) for x in as_inputs(b, n_inputs, names)) for b in data]
    if not batches:
        raise GraphPruneError("the calibration data yielded no batches", hint="pass a non-empty iterable of inputs")
    skipped = 0
    if isinstance(compact, onnx.ModelProto):
        # the torch program keeps the shape arithmetic of the size it was traced at
        shapes = [tuple(x.shape for x in b) for b in batches]
        kept = [b for b, s in zip(batches, shapes) if s == shapes[0]]
        skipped, batches = len(batches) - len(kept), kept
    targets = [teacher(b) for b in batches]
    extra = _Extra(_continued(dense, batches, steps, augment, seed), teacher)
    if isinstance(compact, onnx.ModelProto):
        extra.batches = [b for b in extra.batches if tuple(x.shape for x in b) == shapes[0]]
        return _recover_onnx(compact, batches, targets, extra, steps, lr, loss, temperature, seed, skipped)
    params = [p for p in compact.parameters() if p.requires_grad and p.is_floating_point()]
    device = params[0].device if params else torch.device("cpu")
    run = lambda b: _leaves(compact(*(x.to(device) for x in b)))  # noqa: E731
    was = compact.training
    compact.eval()
    try:
        before, after, used = _train(run, params, batches, targets, extra, steps, lr, loss, temperature, seed)
    finally:
        compact.train(was)
    return Recovery(compact, steps, loss, before, after, len(batches), skipped, used, len(extra.batches))


#: the default ``augment`` writes at most this many times the data's sequences
AUGMENT_CAP = 8


def default_augment(steps: int, batch: int, sequences: int) -> int:
    """The continuations :func:`recover` has a generative LM write by default: as many as
    ``steps`` batches of ``batch`` draw beyond the data's ``sequences``, at most
    :data:`AUGMENT_CAP` times them."""
    return min(max(0, steps * batch - sequences), AUGMENT_CAP * sequences)


def _continued(dense: Any, batches: list[tuple], steps: int, augment: int | None, seed: int) -> list[tuple]:
    """Batches of the dense LM's continuations of the data (see :func:`recover`'s ``augment``)."""
    rows = [b[0] for b in batches]
    ids = (len(batches[0]) == 1 and all(r.dim() == 2 and not r.is_floating_point() and not r.is_complex()
                                        and r.shape[1] == rows[0].shape[1] for r in rows))
    if augment is None:
        if not (ids and isinstance(dense, nn.Module) and generated.can_generate(dense)):
            return []
        augment = default_augment(steps, len(rows[0]), sum(len(r) for r in rows))
    if augment < 0:
        raise GraphPruneError(f"augment must be >= 0, got {augment}")
    if augment == 0:
        return []
    if not (isinstance(dense, nn.Module) and generated.can_generate(dense)):
        raise GraphPruneError("augment writes more text with the dense model, and it cannot generate",
                              hint="augment=0 (or leave it unset): distil on the data alone")
    if not ids:
        raise GraphPruneError("augment continues token-id rows; the data's batches are not one (batch, tokens) "
                              "integer tensor of one length", hint="augment=0: distil on the data alone")
    tokens = rows[0].shape[1]
    new = generated.continuations(dense, torch.cat(rows), augment, prefix=max(1, tokens // 4), batch=len(rows[0]),
                                  seed=seed + 1)
    return [(b,) for b in new]


@dataclass
class _Extra:
    """Distillation batches beyond the data, their teacher outputs computed when drawn (a
    vocabulary of logits per token for thousands of sequences would not fit in memory)."""

    batches: list[tuple]
    teacher: Callable[[tuple], list[torch.Tensor]]


def _recover_onnx(compact: onnx.ModelProto, batches: list[tuple], targets: list[list[torch.Tensor]], extra: _Extra,
                  steps: int, lr: float, loss: Loss, temperature: float, seed: int, skipped: int) -> Recovery:
    from graphprune.frontends.onnx_import import load_onnx

    ir, _, _ = load_onnx(compact, [x.numpy() for x in batches[0]])
    weights = {n: v.data.detach().clone().float().requires_grad_(True) for n, v in ir.values.items()
               if v.kind == "param" and v.data is not None and v.data.is_floating_point()}
    program = GraphProgram(ir, weights)
    run = lambda b: _leaves(program(*b))  # noqa: E731
    before, after, used = _train(run, list(weights.values()), batches, targets, extra, steps, lr, loss, temperature,
                                 seed)
    model = with_params(compact, weights) if after < before else compact
    return Recovery(model, steps, loss, before, after, len(batches), skipped, used, len(extra.batches))


def _evaluate(run: Callable, batches: list[tuple], targets: list, loss: Loss, temperature: float) -> float:
    with torch.no_grad():
        return float(np.mean([float(distillation_loss(run(b), t, loss, temperature))
                              for b, t in zip(batches, targets)]))


_BACK_OFF = (1.0, 0.1, 0.01)  # learning-rate factors tried in turn while the loss does not drop


def _train(run: Callable, params: list[torch.Tensor], batches: list[tuple], targets: list, extra: _Extra, steps: int,
           lr: float, loss: Loss, temperature: float, seed: int) -> tuple[float, float, float]:
    """:func:`_run` at ``lr``, then at lower rates (:data:`_BACK_OFF`) while the loss does not
    drop. Returns the loss over all batches before and after, and the rate kept."""
    before = _evaluate(run, batches, targets, loss, temperature)
    if steps == 0 or not params or not math.isfinite(before):
        return before, before, lr
    for factor in _BACK_OFF:
        after = _run(run, params, batches, targets, extra, steps, lr * factor, loss, temperature, seed, before)
        if after < before:
            return before, after, lr * factor
    return before, before, lr


def _run(run: Callable, params: list[torch.Tensor], batches: list[tuple], targets: list, extra: _Extra, steps: int,
         lr: float, loss: Loss, temperature: float, seed: int, before: float) -> float:
    """Adam on ``params`` with a cosine decay; the weights are put back as they were when the
    loss ends no lower than ``before``. Returns the loss over all batches after."""
    start = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    order = torch.randperm(len(batches) + len(extra.batches), generator=torch.Generator().manual_seed(seed))
    for step in range(steps):
        k = int(order[step % len(order)])
        batch = batches[k] if k < len(batches) else extra.batches[k - len(batches)]
        target = targets[k] if k < len(batches) else extra.teacher(batch)
        opt.zero_grad(set_to_none=True)
        distillation_loss(run(batch), target, loss, temperature).backward()
        opt.step()
        sched.step()
    after = _evaluate(run, batches, targets, loss, temperature)
    if not after < before:  # never hand back a worse model
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
    return after
