"""Group importance criteria for one-shot pruning (SPA).

Every criterion looks at a unit through *all* of its coupled slices (producer rows,
norm entries, consumer columns), never through one layer, and returns one score
tensor ``[size]`` per group: low = cheap to remove.  Criteria are plain functions in
the :data:`CRITERIA` table; adding one is adding an entry.

==========  ===========================================================  ==========
name        score of unit u                                              needs data
==========  ===========================================================  ==========
l1          sum |w| over its slices                                      no
l2          ||w||_2 over its slices                                      no
bn_scale    |gamma| summed over the norm layers in the group (else l2)   no
taylor      mean over batches of |sum w * dL/dw| (first-order loss Δ)    yes
hessian     mean over batches of sum (dL/dw)^2 w^2 / 2 (Fisher OBD)      yes
obspa       OBS output error of every consuming layer: data-free, or     no / optional
            with the input Hessian measured on calibration inputs
wanda       Σ W² E[x²] over its consumer columns (activation-weighted)   unlabeled
reconstruction  measured output error of removing it alone               unlabeled
==========  ===========================================================  ==========

The calibrated criteria (:mod:`graphprune.optim.calibrated`) read ``calibration=``, the
statistics :func:`graphprune.optim.calibration.calibrate` measured on unlabeled inputs.

Slices are read through the roles their op rules gave them in the layer
(:attr:`Slice.role`: producer rows, consumer columns, norm entries); OBSPA, the data-free criterion with
consumer compensation, lives in :mod:`graphprune.optim.obspa`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from torch import nn

from graphprune.analysis.groups import Group
from graphprune.errors import GraphPruneError
from graphprune.optim.calibrated import reconstruction, wanda
from graphprune.optim.obspa import obspa

Normalize = Literal["none", "mean", "max", "sum", "rank"]
Criterion = Callable[..., list[torch.Tensor]]


# ---------------------------------------------------------------------------- magnitude criteria
def l1(groups: Sequence[Group], params: dict[str, torch.Tensor], **_: Any) -> list[torch.Tensor]:
    """Sum of |w| over every slice of the unit."""
    rows: dict = {}  # a weight's row norms, shared by the groups that cut it
    return [g.norms(params, p=1, rows=rows) for g in groups]


def l2(groups: Sequence[Group], params: dict[str, torch.Tensor], **_: Any) -> list[torch.Tensor]:
    """Euclidean norm over every slice of the unit."""
    rows: dict = {}  # a weight's row norms, shared by the groups that cut it
    return [g.norms(params, p=2, rows=rows) for g in groups]


def bn_scale(groups: Sequence[Group], params: dict[str, torch.Tensor], **_: Any) -> list[torch.Tensor]:
    """|gamma| of the group's norm layers (Network Slimming); groups without a norm use l2.

    Mixing the two inside one global ranking is only fair after per-group normalisation,
    which :func:`normalize` provides.
    """
    out = []
    for g in groups:
        norms = [s for s in g.slices if s.role == "norm"]
        if not norms:
            out.append(g.norms(params, p=2))
            continue
        out.append(sum(Group(g.id, g.name, g.kind, g.size, [s]).gather(params).abs().sum(1) for s in norms))
    return out


# ---------------------------------------------------------------------------- gradient criteria
def _inputs_targets(batch: Any) -> tuple[tuple[Any, ...], Any]:
    """``(x, y)`` or ``((x1, x2), y)`` -> positional inputs and the loss target."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise GraphPruneError("each batch of `data` must be a pair (inputs, targets)",
                              hint="yield (x, y), or ((x1, x2), y) for several inputs")
    x, y = batch
    return (tuple(x) if isinstance(x, (tuple, list)) else (x,)), y


def _gradient_passes(model: nn.Module | None, params: dict[str, torch.Tensor], data: Iterable | None,
                     loss_fn: Callable | None, batches: int) -> Iterable[dict[str, torch.Tensor]]:
    """Yield ``{param: grad}`` for up to ``batches`` batches, the model in eval mode.

    Eval mode scores the function that will be deployed (running BN statistics), not
    the batch-statistics one.  ``autograd.grad`` leaves the user's ``.grad`` untouched.
    """
    if model is None:
        raise GraphPruneError("gradient criteria need a differentiable PyTorch model; this graph has none",
                              hint="trace the nn.Module, or use a data-free criterion (obspa, l1, l2, bn_scale)")
    if data is None or loss_fn is None:
        raise GraphPruneError("gradient criteria need `data` (an iterable of (inputs, targets)) and `loss_fn`",
                              hint="pass data=loader, loss_fn=torch.nn.functional.cross_entropy")
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(data):
            if i >= batches:
                break
            x, y = _inputs_targets(batch)
            grads = torch.autograd.grad(loss_fn(model(*x), y), list(params.values()), allow_unused=True)
            yield {n: torch.zeros_like(p) if gr is None else gr for (n, p), gr in zip(params.items(), grads)}
    finally:
        model.train(was_training)


def _accumulate(groups: Sequence[Group], params: dict[str, torch.Tensor], per_batch: Callable, model, data,
                loss_fn, batches: int) -> list[torch.Tensor]:
    """Mean over batches of ``per_batch(w, grad) -> [size]`` for every group."""
    live = {n: p for n, p in params.items() if p.requires_grad}
    total = [torch.zeros(g.size, dtype=torch.float64) for g in groups]
    count = 0
    weights = [g.gather(params).detach() for g in groups]
    for grads in _gradient_passes(model, live, data, loss_fn, batches):
        full = {n: grads.get(n, torch.zeros_like(p)) for n, p in params.items()}
        for t, g, w in zip(total, groups, weights):
            t += per_batch(w, g.gather(full)).detach().double().cpu()
        count += 1
    if count == 0:
        raise GraphPruneError("`data` yielded no batches", hint="pass a non-empty iterable of (inputs, targets)")
    return [(t / count).float() for t in total]


def taylor(groups: Sequence[Group], params: dict[str, torch.Tensor], *, model: nn.Module | None = None,
           data: Iterable | None = None, loss_fn: Callable | None = None,
           batches: int = 4, **_: Any) -> list[torch.Tensor]:
    """First-order loss change of removing the unit: |Σ w·∂L/∂w| over its slices (Molchanov et al.).

    The absolute value is taken per batch before averaging: at a trained minimum the
    mean gradient is near zero, while the per-batch sensitivity is not.
    """
    return _accumulate(groups, params, lambda w, gr: (w * gr).sum(1).abs(), model, data, loss_fn, batches)


def hessian(groups: Sequence[Group], params: dict[str, torch.Tensor], *, model: nn.Module | None = None,
            data: Iterable | None = None, loss_fn: Callable | None = None,
            batches: int = 4, **_: Any) -> list[torch.Tensor]:
    """Optimal Brain Damage saliency Σ H_ii w_i² / 2 with the empirical Fisher H_ii ≈ E[g_i²].

    Batch gradients stand in for per-sample ones (a coarser but cheaper Fisher).
    """
    return _accumulate(groups, params, lambda w, gr: (gr.pow(2) * w.pow(2)).sum(1) / 2, model, data, loss_fn,
                       batches)


# ---------------------------------------------------------------------------- registry and normalisation
CRITERIA: dict[str, Criterion] = {
    "l1": l1,
    "l2": l2,
    "bn_scale": bn_scale,
    "taylor": taylor,
    "hessian": hessian,
    "obspa": obspa,
    "wanda": wanda,
    "reconstruction": reconstruction,
}
#: Criteria that use calibration statistics when unlabeled data is given (the last two need it).
CALIBRATED = ("obspa", "wanda", "reconstruction")


def normalize(scores: Sequence[torch.Tensor], how: Normalize = "mean") -> list[torch.Tensor]:
    """Make scores comparable across groups before the global selection.

    ``mean``/``max``/``sum`` divide each group by that statistic of its own scores;
    ``rank`` replaces scores by their within-group rank scaled to ``(0, 1]`` (pure
    ordering, robust to heavy tails); ``none`` keeps raw values.
    """
    if how == "none":
        return [s.clone() for s in scores]
    if how == "rank":
        return [(torch.argsort(torch.argsort(s, stable=True)) + 1).float() / s.numel() for s in scores]
    stat = {"mean": torch.mean, "max": torch.amax, "sum": torch.sum}.get(how)
    if stat is None:
        raise GraphPruneError(f"unknown normalisation {how!r}", hint="use one of none, mean, max, sum, rank")
    return [s / stat(s).clamp_min(1e-12) for s in scores]


def score(groups: Sequence[Group], params: dict[str, torch.Tensor], criterion: str = "obspa", *,
          model: nn.Module | None = None, data: Iterable | None = None, loss_fn: Callable | None = None,
          **options: Any) -> list[torch.Tensor]:
    """Raw (unnormalised) scores ``[size]`` per group under ``criterion``.

    >>> scores = score(g.groups, g.params, "l2")
    """
    fn = CRITERIA.get(criterion)
    if fn is None:
        raise GraphPruneError(f"unknown criterion {criterion!r}", hint=f"use one of {', '.join(CRITERIA)}")
    return [s.detach().float().cpu() for s in fn(groups, params, model=model, data=data, loss_fn=loss_fn, **options)]
