"""Shared machinery of the OTO-family optimizers (DHSPG, H2SPG, HESSO, HESSO-CRIC).

Every optimizer here is a ``torch.optim.Optimizer`` over ALL of the traced model's
parameters.  Each step first takes the base update (SGD with momentum, or AdamW) on
every parameter, then lets the method overwrite the units it is steering toward zero
("held" units: it computes their new values from the values and gradients *before*
the base step), and finally writes exact zeros into the units that are pruned and
clears their optimizer state, so a pruned unit can never come back.  Only the method's
decisions differ between the subclasses; the bookkeeping (masks, counters, history,
state_dict round trips, DDP agreement, numerical guards) lives here once.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from graphprune.analysis.groups import Group
from graphprune.errors import NumericalError, UnprunableTargetError
from graphprune.latency import LatencyPlan
from graphprune.optim.saliency import saliency, unit_criteria
from graphprune.target import Target, achieved, select_units

if TYPE_CHECKING:
    from graphprune.prunable import PrunableGraph

_STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq")


class UnitIndex:
    """Reads and writes chosen units of one group, as ``[k, n]`` rows.

    Works on any name -> tensor mapping shaped like the parameters (the parameters,
    their gradients, optimizer state), so one index serves every update rule.
    """

    def __init__(self, group: Group) -> None:
        self.group = group
        self._index: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _rows(self, k: int, slice_no: int, units: torch.Tensor, device: torch.device) -> torch.Tensor:
        key = (slice_no, device)
        if key not in self._index:
            self._index[key] = self.group.slices[slice_no].index.to(device)
        return self._index[key][units.to(device)].reshape(-1)

    def gather(self, tensors: Mapping[str, torch.Tensor], units: torch.Tensor) -> torch.Tensor:
        """Rows of ``units`` (a LongTensor) as a ``[len(units), n]`` matrix (a copy)."""
        cols = []
        for j, s in enumerate(self.group.slices):
            t = tensors[s.param]
            if s.is_block:
                cols.append(s.gather_block(t, units))
                continue
            rows = t.movedim(s.dim, 0).index_select(0, self._rows(len(units), j, units, t.device))
            cols.append(rows.reshape(len(units), -1))
        return torch.cat(cols, dim=1)

    def put_(self, tensors: Mapping[str, torch.Tensor], units: torch.Tensor, values: torch.Tensor | float) -> None:
        """Write ``values`` (``[len(units), n]``, or one number) into the rows of ``units``."""
        offset = 0
        for j, s in enumerate(self.group.slices):
            if s.param not in tensors:
                continue
            if s.is_block:
                t = tensors[s.param]
                width = s.index.shape[1] * s.index2.shape[1] * t.numel() // (t.shape[s.dim] * t.shape[s.dim2])
                s.put_block_(t, units, values[:, offset:offset + width]
                             if isinstance(values, torch.Tensor) else values)
                offset += width
                continue
            view = tensors[s.param].movedim(s.dim, 0)
            idx = self._rows(len(units), j, units, view.device)
            if isinstance(values, torch.Tensor):
                width = s.index.shape[1] * view[0].numel()
                block = values[:, offset:offset + width].reshape(-1, *view.shape[1:])
                view.index_copy_(0, idx, block.to(view.dtype))
                offset += width
            else:
                view.index_fill_(0, idx, values)


class GroupOptimizer(torch.optim.Optimizer):
    """Base of the OTO family: base update on every parameter, plus group decisions.

    ``g`` is a traced graph (``gp.trace``): its ``params`` are the live parameters of the
    user's model, so stepping this optimizer trains that model.  ``target`` is a
    :class:`graphprune.Target` or a float (the FLOPs fraction to remove).  ``variant``
    picks the base update for parameters outside the held units: ``"sgd"`` (momentum,
    L2 weight decay, as ``torch.optim.SGD``) or ``"adamw"`` (decoupled weight decay).

    ``groups`` replaces the groups the method steers (default ``g.groups``).  It is how
    in-layer block sparsity is asked for: ``groups=block_groups(g)`` zeroes weight blocks
    only, ``groups=[*g.groups, *block_groups(g)]`` channels and blocks under one target
    (keep ``g.groups`` first: H2SPG's hierarchy indexes them).  Block units remove nothing
    in ``construct_subnet``; their zeros are for the block-sparse kernels of
    ``graphprune.codegen.build(..., sparse="auto")``.

    A latency budget (``Target(latency_ms=...)`` or ``Target(latency=...)``) is met as
    compiled: units are chosen under ``latency``, a :class:`graphprune.latency.LatencyPlan`
    (default: measured for this CPU, ``LatencyPlan.for_graph(g, groups, target)``), from its
    layer table while the schedule is part-way and with the compact model compiled and timed
    for the whole budget.
    """

    def __init__(self, g: PrunableGraph, lr: float, *, target: Target | float = 0.5, variant: str = "sgd",
                 momentum: float = 0.9, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, check_finite: bool = True, groups: Sequence[Group] | None = None,
                 latency: LatencyPlan | None = None) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if variant not in ("sgd", "adamw"):
            raise ValueError(f"variant must be 'sgd' or 'adamw', got {variant!r}")
        if not 0.0 <= momentum < 1.0 or weight_decay < 0:
            raise ValueError(f"need 0 <= momentum < 1 and weight_decay >= 0 (got {momentum}, {weight_decay})")
        self.graph = g
        self.groups: list[Group] = list(g.groups if groups is None else groups)
        if not self.groups:
            raise UnprunableTargetError("the graph has no prunable groups", hint="check g.summary() for barriers")
        self.named = dict(g.params)
        defaults = dict(lr=lr, variant=variant, momentum=momentum, weight_decay=weight_decay,
                        betas=tuple(betas), eps=eps)
        super().__init__(list(self.named.values()), defaults)
        self.target = Target.coerce(target)
        self.check_finite = check_finite
        self.units = [UnitIndex(grp) for grp in self.groups]
        self._names = {id(p): n for n, p in self.named.items()}
        self.num_steps = 0
        self.masks = self._empty()   # units chosen for removal (being driven to zero, or zero)
        self.pruned = self._empty()  # units that are exactly zero and stay so
        self.history: list[dict[str, Any]] = []
        self.last_loss: float | None = None
        self.param_macs: dict[str, float] = dict(g.param_macs)  # exact FLOPs accounting of overlaps
        if latency is not None and self.target.kind != "latency":
            raise ValueError(f"latency= is the plan for a latency target; the target is {self.target!r}")
        self.latency = latency
        if self.target.kind == "latency" and latency is None:
            self.latency = LatencyPlan.for_graph(g, self.groups, self.target)

    # ---- the step -----------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One training step: decisions, base update, held units, exact zeros."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.check_finite:
            self._check_finite("gradient", {n: p.grad for n, p in self.named.items() if p.grad is not None})
        params = self.named
        # the last good weights: a step that overflows is undone before the error is raised
        good = {n: p.detach().clone() for n, p in params.items()} if self.check_finite else None
        self._decide()
        grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
        held = self._held()
        snapshot = [(i, u, self.units[i].gather(params, u), self.units[i].gather(grads, u))
                    for i, u in enumerate(_indices(held)) if len(u)]
        self._base_update()
        for i, units, x, grad in snapshot:
            self.units[i].put_(params, units, self._update_held(i, units, x, grad))
            self._clear_state(i, units)
        self._after_update()
        for i, units in enumerate(_indices(self.pruned)):
            if len(units):
                self.units[i].put_(params, units, 0.0)
                self._clear_state(i, units)
        if good is not None:
            try:
                self._check_finite("weight", params)
            except NumericalError:
                for n, p in params.items():
                    p.copy_(good[n])
                raise
        self.num_steps += 1
        self._finish_step()
        return loss

    def _base_update(self) -> None:
        """SGD(momentum) or AdamW on every parameter that has a gradient."""
        for pg in self.param_groups:
            lr, wd, variant = pg["lr"], pg["weight_decay"], pg["variant"]
            for p in pg["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if variant == "sgd":
                    d = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                    if pg["momentum"]:
                        if "momentum_buffer" not in state:
                            state["momentum_buffer"] = d.clone()
                        else:
                            state["momentum_buffer"].mul_(pg["momentum"]).add_(d)
                        d = state["momentum_buffer"]
                    p.add_(d, alpha=-lr)
                else:
                    b1, b2 = pg["betas"]
                    if "exp_avg" not in state:
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    state["step"] += 1
                    t = state["step"]
                    p.mul_(1 - lr * wd)
                    state["exp_avg"].lerp_(p.grad, 1 - b1)
                    state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                    denom = (state["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(pg["eps"])
                    p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1 ** t))

    def _clear_state(self, i: int, units: torch.Tensor) -> None:
        """Zero the momentum / Adam moments of these units: a held unit carries no history."""
        for key in _STATE_KEYS:
            tensors = {n: self.state[p][key] for n, p in self.named.items() if key in self.state.get(p, {})}
            if tensors:
                self.units[i].put_(tensors, units, 0.0)

    # ---- hooks the methods fill in ----------------------------------------------------

    def _decide(self) -> None:
        """Take this step's group decisions (period starts, partitions) before updating."""

    def _held(self) -> list[torch.Tensor]:
        """Units whose update the method computes itself (default: the pruned ones)."""
        return self.pruned

    def _update_held(self, i: int, units: torch.Tensor, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """New values of held ``units`` of group ``i`` from their values/gradients before the step."""
        return torch.zeros_like(x)

    def _after_update(self) -> None:
        """Decisions that need the updated weights (projections), before exact zeros are written."""

    def _finish_step(self) -> None:
        """Bookkeeping after the step counter moved (period ends, history)."""

    # ---- shared decisions -------------------------------------------------------------

    def current_lr(self) -> float:
        """The learning rate of the first parameter group (what schedulers set)."""
        return float(self.param_groups[0]["lr"])

    def _empty(self) -> list[torch.Tensor]:
        return [torch.zeros(grp.size, dtype=torch.bool) for grp in self.groups]

    def select(self, scores: Sequence[torch.Tensor], target: Target,
               protect: Sequence[torch.Tensor | None] | None = None, broadcast: bool = True) -> list[torch.Tensor]:
        """Global selection under ``target`` that keeps every unit already chosen.

        With ``broadcast`` (the final decision of a step) rank 0's choice is used on every
        rank; intermediate probes pass False so ranks need not make the same number of calls.
        """
        scores = [s.detach().cpu().double().masked_fill(m, float("-inf")) for s, m in zip(scores, self.masks)]
        if target.kind == "latency":  # a probe (not broadcast) is predicted, a decision is also timed
            assert self.latency is not None
            masks = self.latency.select(scores, target, protect, measured=broadcast)
        else:
            masks = select_units(self.groups, scores, target, total_params=getattr(self.graph, "total_params", None),
                                 total_flops=getattr(self.graph, "total_flops", None), protect=protect,
                                 params=self.named, param_macs=self.param_macs)
        if broadcast:
            masks = broadcast_masks(masks, self.named)
        return [m | old for m, old in zip(masks, self.masks)]

    def saliency_scores(self, weights: Mapping[str, float] | None = None) -> list[torch.Tensor]:
        """Every unit's saliency (see :mod:`graphprune.optim.saliency`) from the current weights and gradients."""
        grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in self.named.items()}
        per_group = []
        for grp, ui in zip(self.groups, self.units):
            units = torch.arange(grp.size)
            per_group.append(unit_criteria(ui.gather(self.named, units), ui.gather(grads, units)))
        return saliency(per_group, weights)

    def zero_units(self) -> list[torch.Tensor]:
        """Units whose every slice is exactly zero now (what ``construct_subnet`` removes)."""
        with torch.no_grad():
            return [(grp.gather(self.named).abs().amax(dim=1) == 0).cpu() for grp in self.groups]

    def reduction(self, masks: Sequence[torch.Tensor] | None = None) -> dict[str, float]:
        """Removed fractions of units/params/FLOPs for ``masks`` (default: the exact zeros now),
        counted as ``construct_subnet`` realises them (see :meth:`compact_masks`)."""
        return achieved(self.groups, self.compact_masks(masks if masks is not None else self.zero_units()),
                        total_params=getattr(self.graph, "total_params", None),
                        total_flops=getattr(self.graph, "total_flops", None),
                        params=self.named, param_macs=self.param_macs)

    def compact_masks(self, masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``masks`` as the compact model removes them.

        A group that is zero everywhere (H2SPG erasing a residual branch) is removed
        entirely only where the graph erases the operators it feeds; otherwise
        ``construct_subnet`` keeps one zero unit of it, whose cost the compact model still
        pays, so counting the group as gone would overstate the reduction.
        """
        out = []
        for i, m in enumerate(masks):
            if m.numel() and bool(m.all()) and not self._erases_whole(i):
                m = m.clone()
                m[0] = False
            out.append(m)
        return out

    def _erases_whole(self, i: int) -> bool:
        """Whether ``construct_subnet`` removes every unit of group ``i`` once all are zero (probed once)."""
        cache = self.__dict__.setdefault("_erasable", {})
        if i not in cache:
            grp = self.groups[i]
            removed_units = getattr(self.graph, "removed_units", None)
            if removed_units is None or grp.atoms is None:
                cache[i] = True  # no compact-model rule to ask: count the group as gone
            else:
                touched = {s.param for s in grp.slices}
                with torch.no_grad():
                    tensors = {n: p.detach().clone() if n in touched else p.detach() for n, p in self.named.items()}
                    self.units[i].put_(tensors, torch.arange(grp.size), 0.0)
                    ids = removed_units(tensors).to(grp.atoms.device)
                cache[i] = bool(torch.isin(grp.atoms, ids).all())
        return cache[i]

    def record_loss(self, loss: torch.Tensor | float) -> None:
        """Remember the latest training loss for :attr:`history` (does not steer decisions)."""
        self.last_loss = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)

    def log(self, event: str, **extra: Any) -> dict[str, Any]:
        """Append one :attr:`history` row: step, event, sparsity and reductions of the exact zeros."""
        zeros = self.zero_units()
        red = self.reduction(zeros)
        row = dict(step=self.num_steps, event=event, group_sparsity=red["groups"], params_reduction=red["params"],
                   flops_reduction=red["flops"], redundant_units=int(sum(int(m.sum()) for m in self.masks)),
                   loss=self.last_loss, **extra)
        self.history.append(row)
        return row

    # ---- guards -----------------------------------------------------------------------

    def _check_finite(self, what: str, tensors: Mapping[str, torch.Tensor]) -> None:
        if not tensors:
            return
        flags = [torch.isfinite(t).all() for t in tensors.values()]
        device = flags[0].device
        if bool(torch.stack([f.to(device) for f in flags]).all()):
            return
        bad = [n for n, f in zip(tensors, flags) if not bool(f)]
        raise NumericalError(f"NaN/Inf in the {what} of parameter {bad[0]!r}" +
                             (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""), node=bad[0],
                             hint="lower the learning rate, clip gradients, or check the loss for overflow")

    @staticmethod
    def output_depends_on_input(model: nn.Module, example: torch.Tensor | tuple, eps: float = 1e-2) -> bool:
        """True if perturbing the input changes the output: the pruned net is still wired through.

        Deterministic (its own seeded generator) and side-effect free (eval mode, no grad,
        the model's train/eval flags restored).
        """
        return output_depends_on_input(model, example, eps)

    # ---- state_dict ---------------------------------------------------------------------

    def _extra_state(self) -> dict[str, Any]:
        """Method state beyond the per-parameter buffers; subclasses add their own keys."""
        return dict(num_steps=self.num_steps, masks=[m.clone() for m in self.masks],
                    pruned=[m.clone() for m in self.pruned], history=list(self.history),
                    last_loss=self.last_loss)

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self.num_steps = int(extra["num_steps"])
        self.masks = [m.clone().bool().cpu() for m in extra["masks"]]
        self.pruned = [m.clone().bool().cpu() for m in extra["pruned"]]
        self.history = list(extra["history"])
        self.last_loss = extra["last_loss"]

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["graphprune"] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("graphprune", None)
        if extra is None:
            raise ValueError(f"not a {type(self).__name__} state_dict (no 'graphprune' entry)")
        super().load_state_dict(state_dict)
        self._load_extra_state(extra)

    # ---- readable -------------------------------------------------------------------------

    def __repr__(self) -> str:
        chosen = sum(int(m.sum()) for m in self.masks)
        total = sum(grp.size for grp in self.groups)
        return (f"{type(self).__name__}({self.target!r}, step={self.num_steps}, "
                f"redundant={chosen}/{total} units, lr={self.current_lr():g})")

    def summary(self) -> str:
        """One line per group: size, units chosen for removal, units exactly zero now."""
        zeros = self.zero_units()
        width = max(len(grp.name) for grp in self.groups)
        lines = [f"{'group':<{width}}  {'kind':<8} {'size':>5} {'chosen':>6} {'zero':>5}"]
        for grp, m, z in zip(self.groups, self.masks, zeros):
            lines.append(f"{grp.name:<{width}}  {grp.kind:<8} {grp.size:>5} {int(m.sum()):>6} {int(z.sum()):>5}")
        red = self.reduction(zeros)
        lines.append(f"removed: {red['groups']:.1%} units, {red['params']:.1%} params, {red['flops']:.1%} FLOPs")
        return "\n".join(lines)


def _indices(masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [m.nonzero().flatten() for m in masks]


def broadcast_masks(masks: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Rank 0's masks on every rank when torch.distributed is running (else unchanged).

    Decisions already use only all-reduced quantities; the broadcast removes any doubt
    from floating-point ties or rank-local closures (CRIC's held-out batch).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return masks
    device = next(iter(params.values())).device
    flat = torch.cat([m.flatten() for m in masks]).to(device=device, dtype=torch.uint8)
    dist.broadcast(flat, src=0)
    out, start = [], 0
    for m in masks:
        out.append(flat[start:start + m.numel()].cpu().bool().reshape(m.shape))
        start += m.numel()
    return out


def output_depends_on_input(model: nn.Module, example: torch.Tensor | tuple, eps: float = 1e-2) -> bool:
    """True if a small deterministic perturbation of the floating inputs changes the output."""
    inputs = example if isinstance(example, tuple) else (example,)
    gen = torch.Generator().manual_seed(0)
    moved = tuple(x + eps * (1 + x.abs()) * torch.randn(x.shape, generator=gen).to(x)
                  if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            a, b = model(*inputs), model(*moved)
    finally:
        for m, training in flags.items():
            m.training = training
    outs_a = a if isinstance(a, (tuple, list)) else (a,)
    outs_b = b if isinstance(b, (tuple, list)) else (b,)
    return any(not torch.equal(x, y) for x, y in zip(outs_a, outs_b) if isinstance(x, torch.Tensor))
