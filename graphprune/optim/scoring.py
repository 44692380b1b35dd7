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
obspa       OBS output error of every consuming layer, data-free         no
==========  ===========================================================  ==========

Slices are sorted into roles (:func:`slice_role`): a *producer* writes the units (rows
of a conv/linear weight, ``dim == 0``), a *consumer* reads them (input columns,
``dim == 1``), a *norm* scales them (BatchNorm/LayerNorm/GroupNorm gamma).  With a
PyTorch model the module type decides; for ONNX (no modules) the shape does: a weight
with two or more dims is a producer along dim 0 and a consumer along dim 1, a
depthwise weight ``[C, 1, ...]`` is neither, and a 1-D ``*weight`` whose sibling
``*running_var`` is an initializer is a norm.

OBSPA (Optimal-Brain-SPA) needs no data: for each consumer it uses a second-moment
proxy ``M ≈ E[x xᵀ]`` of its input units (see :func:`input_moments`: correlations from
the producers' filters, scale and mean from the norm's gamma/beta, passed through an
assumed ReLU), scores unit q by
the Optimal Brain Surgeon error ``||W[:, q]||² / [H⁻¹]_qq`` with ``H = M + damping``,
and :func:`obs_compensate` moves the removed units' contribution onto the kept ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from torch import nn

from graphprune.analysis.groups import Group, Slice
from graphprune.errors import GraphPruneError

Role = Literal["producer", "consumer", "norm", "other"]
Normalize = Literal["none", "mean", "max", "sum", "rank"]
Activation = Literal["relu", "identity"]
Criterion = Callable[..., list[torch.Tensor]]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_DECONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


# ---------------------------------------------------------------------------- slice roles
def _owner(model: nn.Module | None, param: str) -> nn.Module | None:
    """The module that registers ``param`` (``"layer1.conv.weight"`` -> ``layer1.conv``), if known."""
    if model is None or "." not in param:
        return None
    try:
        return model.get_submodule(param.rsplit(".", 1)[0])
    except AttributeError:
        return None


def _module_role(mod: nn.Module, leaf: str, dim: int) -> Role | None:
    """Role from the module type; ``None`` when the type says nothing (fall back to shapes)."""
    if isinstance(mod, _NORMS):
        return "norm" if leaf == "weight" else "other"
    if isinstance(mod, nn.Embedding):
        return "other"  # its columns are outputs, not inputs: never a consumer
    if isinstance(mod, _CONVS + _DECONVS) and mod.groups > 1:
        return "other"  # grouped/depthwise: its rows do not read a shared input
    if isinstance(mod, _DECONVS) and leaf == "weight":
        return "consumer" if dim == 0 else "producer"  # weight is [in, out, k...]
    if isinstance(mod, (nn.Linear,) + _CONVS) and leaf == "weight":
        return "consumer" if dim == 1 else "producer"
    return None


def slice_role(s: Slice, params: dict[str, torch.Tensor], model: nn.Module | None = None) -> Role:
    """How slice ``s`` touches its group's units (see the module docstring for the rules)."""
    mod = _owner(model, s.param)
    if mod is not None:
        role = _module_role(mod, s.param.rsplit(".", 1)[1], s.dim)
        if role is not None:
            return role
    p = params[s.param]
    if p.dim() == 1:
        stem = s.param[: -len("weight")] if s.param.endswith("weight") else None
        return "norm" if stem is not None and stem + "running_var" in params else "other"
    if p.dim() > 2 and p.shape[1] == 1:
        return "other"  # depthwise conv weight [C, 1, k...]
    return {0: "producer", 1: "consumer"}.get(s.dim, "other")


def _bias_of(weight: str, params: dict[str, torch.Tensor], out: int) -> str | None:
    """Name of the bias that goes with ``weight`` (``conv.weight`` -> ``conv.bias``), if any."""
    if not weight.endswith("weight"):
        return None
    name = weight[: -len("weight")] + "bias"
    b = params.get(name)
    return name if b is not None and b.dim() == 1 and b.numel() == out else None


def _norm_bias(weight: str, params: dict[str, torch.Tensor]) -> str | None:
    name = weight[: -len("weight")] + "bias" if weight.endswith("weight") else None
    return name if name in params else None


# ---------------------------------------------------------------------------- magnitude criteria
def l1(groups: Sequence[Group], params: dict[str, torch.Tensor], **_: Any) -> list[torch.Tensor]:
    """Sum of |w| over every slice of the unit."""
    return [g.norms(params, p=1) for g in groups]


def l2(groups: Sequence[Group], params: dict[str, torch.Tensor], **_: Any) -> list[torch.Tensor]:
    """Euclidean norm over every slice of the unit."""
    return [g.norms(params, p=2) for g in groups]


def bn_scale(groups: Sequence[Group], params: dict[str, torch.Tensor], model: nn.Module | None = None,
             **_: Any) -> list[torch.Tensor]:
    """|gamma| of the group's norm layers (Network Slimming); groups without a norm use l2.

    Mixing the two inside one global ranking is only fair after per-group normalisation,
    which :func:`normalize` provides.
    """
    out = []
    for g in groups:
        norms = [s for s in g.slices if slice_role(s, params, model) == "norm"]
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


def taylor(groups: Sequence[Group], params: dict[str, torch.Tensor], *, model=None, data=None, loss_fn=None,
           batches: int = 4, **_: Any) -> list[torch.Tensor]:
    """First-order loss change of removing the unit: |Σ w·∂L/∂w| over its slices (Molchanov et al.).

    The absolute value is taken per batch before averaging: at a trained minimum the
    mean gradient is near zero, while the per-batch sensitivity is not.
    """
    return _accumulate(groups, params, lambda w, gr: (w * gr).sum(1).abs(), model, data, loss_fn, batches)


def hessian(groups: Sequence[Group], params: dict[str, torch.Tensor], *, model=None, data=None, loss_fn=None,
            batches: int = 4, **_: Any) -> list[torch.Tensor]:
    """Optimal Brain Damage saliency Σ H_ii w_i² / 2 with the empirical Fisher H_ii ≈ E[g_i²].

    Batch gradients stand in for per-sample ones (a coarser but cheaper Fisher).
    """
    return _accumulate(groups, params, lambda w, gr: (gr.pow(2) * w.pow(2)).sum(1) / 2, model, data, loss_fn,
                       batches)


# ---------------------------------------------------------------------------- OBSPA (data-free)
@dataclass
class InputMoments:
    """Data-free first and second moments of a group's units as consumers see them.

    ``cov`` is ``[size, size]``, ``mean`` is ``[size]``; ``E[x xᵀ] = cov + mean meanᵀ``.
    """

    cov: torch.Tensor
    mean: torch.Tensor

    @property
    def second(self) -> torch.Tensor:
        return self.cov + torch.outer(self.mean, self.mean)


def _rows(g: Group, s: Slice, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The slice as a ``[size, n]`` matrix (each unit's rows flattened)."""
    return Group(g.id, g.name, g.kind, g.size, [s]).gather(params).detach().double()


def input_moments(g: Group, params: dict[str, torch.Tensor], model: nn.Module | None = None,
                  activation: Activation = "relu") -> InputMoments:
    """Estimate what the group's consumers read, from weights alone.

    * Correlation between units comes from the producers: if a producer's input is
      white, its outputs have covariance ``W Wᵀ`` (rows = units), so two units whose
      filters point the same way carry the same signal and can stand in for each
      other.  Several producers (a residual sum) are averaged; none gives identity.
    * Scale and mean come from the norm layers when the group has any: an affine norm
      outputs, per unit, mean ``beta`` and standard deviation ``|gamma|`` by
      construction, and that output is what consumers read.  (The norm's running
      statistics describe its *input*, the producer output, so they are not used.)
      Parallel norms (branches of a residual sum) add.  Without a norm the scale is
      the producer's ``W Wᵀ + b bᵀ`` itself.
    The activation between norm and consumer is not visible in the groups, so it is
    an assumption: ``"relu"`` (the default; most CNN/MLP hidden units are rectified)
    passes each unit's Gaussian through a ReLU (:func:`rectify`), ``"identity"``
    keeps the pre-activation moments (residual streams, linear bottlenecks).  On
    digits-trained nets the identity assumption made OBS compensation *hurt* a
    BN-ReLU conv (the bias absorbed ``beta`` where the ReLU had clipped it); ReLU
    moments fixed that and helped every model tried.
    """
    grams, means = [], []
    gammas, betas = [], []
    for s in g.slices:
        role = slice_role(s, params, model)
        if role == "producer":
            w = _rows(g, s, params)
            grams.append(w @ w.T)
            bias = _bias_of(s.param, params, params[s.param].shape[s.dim]) if s.dim == 0 else None
            means.append(_rows(g, Slice(bias, 0, s.index), params).sum(1) if bias else torch.zeros(g.size).double())
        elif role == "norm":
            gammas.append(_rows(g, s, params).pow(2).sum(1))
            beta = _norm_bias(s.param, params)
            betas.append(_rows(g, Slice(beta, s.dim, s.index), params).sum(1) if beta else torch.zeros(g.size).double())
    if gammas:
        corr = torch.stack([_correlation(m) for m in grams]).mean(0) if grams else torch.eye(g.size).double()
        std = torch.stack(gammas).sum(0).sqrt()
        mom = InputMoments(corr * torch.outer(std, std), torch.stack(betas).sum(0))
    elif grams:
        mom = InputMoments(torch.stack(grams).sum(0), torch.stack(means).sum(0))
    else:
        mom = InputMoments(torch.eye(g.size).double(), torch.zeros(g.size).double())
    if activation == "relu":
        return rectify(mom)
    if activation == "identity":
        return mom
    raise GraphPruneError(f"unknown activation {activation!r}", hint="use 'relu' or 'identity'")


def rectify(mom: InputMoments) -> InputMoments:
    """Moments after a ReLU, each unit taken as Gaussian ``N(mu, sigma²)``.

    Mean and variance are the rectified-Gaussian closed forms
    ``E = mu Φ(a) + sigma φ(a)``, ``E[x²] = (mu² + sigma²) Φ(a) + mu sigma φ(a)``,
    ``a = mu / sigma``; correlations are kept (a first-order choice: the exact
    bivariate form with means has no closed form worth its cost here).
    """
    std = mom.cov.diagonal().clamp_min(1e-12).sqrt()
    a = mom.mean / std
    normal = torch.distributions.Normal(torch.zeros((), dtype=a.dtype), torch.ones((), dtype=a.dtype))
    cdf, pdf = normal.cdf(a), normal.log_prob(a).exp()
    mean = mom.mean * cdf + std * pdf
    second = (mom.mean.pow(2) + std.pow(2)) * cdf + mom.mean * std * pdf
    new_std = (second - mean.pow(2)).clamp_min(1e-12).sqrt()
    return InputMoments(_correlation(mom.cov) * torch.outer(new_std, new_std), mean)


def _correlation(gram: torch.Tensor) -> torch.Tensor:
    d = gram.diagonal().clamp_min(1e-12).rsqrt()
    return gram * torch.outer(d, d)


def obs_hessian(m: torch.Tensor, damping: float = 0.1) -> torch.Tensor:
    """``M + damping·mean(diag M)·I``: OBS needs an invertible H, and the proxy needs humility.

    A producer with fewer inputs than outputs makes ``W Wᵀ`` singular, which would say
    some units are exact linear combinations of others; nonlinearities break that, so
    the ridge is larger than the usual 1% used with real activations.
    """
    scale = m.diagonal().mean().clamp_min(1e-12)
    return m + damping * scale * torch.eye(m.shape[0], dtype=m.dtype)


def consumer_rows(p: torch.Tensor, s: Slice) -> torch.Tensor:
    """Consumer weight as ``[R, size]``: one column per unit, one row per (output, tap, j).

    ``s.index[u, j]`` is unit u's j-th input column (a channel, or one spatial position
    of it after a flatten).  With ``H = M ⊗ I`` (positions and taps uncorrelated) every
    such row sees the same ``M``, so OBS decouples row by row.
    """
    w = p.detach().movedim(s.dim, -1)
    cols = w[..., s.index.T.reshape(-1).to(w.device)]
    return cols.reshape(-1, s.index.shape[0]).double()


def _write_consumer_rows(p: torch.Tensor, s: Slice, rows: torch.Tensor) -> None:
    w = p.detach().movedim(s.dim, -1).clone()
    w[..., s.index.T.reshape(-1).to(w.device)] = rows.reshape(*w.shape[:-1], -1).to(w.dtype)
    with torch.no_grad():
        p.copy_(w.movedim(-1, s.dim))


def obs_saliency(rows: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-unit OBS error ``Σ_r W[r, q]² / [H⁻¹]_qq``: output energy lost after compensation."""
    hinv_diag = torch.linalg.inv(h).diagonal()
    return rows.pow(2).sum(0) / hinv_diag


def obs_compensate(rows: torch.Tensor, h: torch.Tensor, remove: torch.Tensor) -> torch.Tensor:
    """Rows with the removed columns zeroed and their signal re-expressed by the kept ones.

    Removing set Q at once, the least-squares optimum under ``E[x xᵀ] = H`` is
    ``W_K += W_Q H_QK H_KK⁻¹`` — the block form of the OBS update
    ``δw = −W_Q [H⁻¹]_QQ⁻¹ [H⁻¹]_Q,:`` — and ``W_Q = 0``.
    """
    keep = ~remove
    out = rows.clone()
    if remove.any() and keep.any():
        h_kk, h_qk = h[keep][:, keep], h[remove][:, keep]
        out[:, keep] += torch.linalg.solve(h_kk, (rows[:, remove] @ h_qk).T).T
    out[:, remove] = 0
    return out


def _consumers(g: Group, params: dict[str, torch.Tensor], model: nn.Module | None) -> list[Slice]:
    return [s for s in g.slices if slice_role(s, params, model) == "consumer"]


def obspa(groups: Sequence[Group], params: dict[str, torch.Tensor], *, model=None, damping: float = 0.1,
          activation: Activation = "relu", **_: Any) -> list[torch.Tensor]:
    """Data-free Optimal-Brain-SPA: OBS error summed over every layer that reads the unit.

    Consumers with a bias let the unit's mean go into the bias, so they are scored with
    the covariance; others with the full second moment.  A group with no parametric
    consumer (e.g. attention scores) falls back to l2.
    """
    out = []
    for g in groups:
        consumers = _consumers(g, params, model)
        if not consumers:
            out.append(g.norms(params, p=2))
            continue
        mom = input_moments(g, params, model, activation)
        score = torch.zeros(g.size, dtype=torch.float64)
        for s in consumers:
            p = params[s.param]
            has_bias = s.dim == 1 and _bias_of(s.param, params, p.shape[0]) is not None
            score += obs_saliency(consumer_rows(p, s), obs_hessian(mom.cov if has_bias else mom.second, damping))
        out.append(score.float())
    return out


def compensate(g: Group, remove: torch.Tensor, params: dict[str, torch.Tensor], model: nn.Module | None = None,
               mom: InputMoments | None = None, damping: float = 0.1, activation: Activation = "relu") -> None:
    """Apply the OBS update to every consumer of ``g`` for the units in ``remove`` (in place).

    Kept columns absorb the removed units' fluctuation; where the consumer has a bias
    (``[out]``, output along dim 0) it absorbs the mean shift as well:
    ``b += Σ (W_Q μ_Q − δW_K μ_K)`` over taps.  Removed columns are zeroed here too.
    """
    mom = mom or input_moments(g, params, model, activation)
    remove = remove.cpu().bool()
    for s in _consumers(g, params, model):
        p = params[s.param]
        rows = consumer_rows(p, s)
        bias = _bias_of(s.param, params, p.shape[0]) if s.dim == 1 else None
        h = obs_hessian(mom.cov if bias else mom.second, damping)
        new = obs_compensate(rows, h, remove)
        if bias:
            shift = ((rows - new) @ mom.mean).reshape(p.shape[0], -1).sum(1)
            with torch.no_grad():
                params[bias].add_(shift.to(params[bias].dtype).to(params[bias].device))
        _write_consumer_rows(p, s, new)


# ---------------------------------------------------------------------------- registry and normalisation
CRITERIA: dict[str, Criterion] = {
    "l1": l1,
    "l2": l2,
    "bn_scale": bn_scale,
    "taylor": taylor,
    "hessian": hessian,
    "obspa": obspa,
}


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
