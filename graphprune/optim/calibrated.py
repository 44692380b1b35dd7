"""Group criteria that read calibration statistics (:mod:`graphprune.optim.calibration`).

Removing unit ``u`` takes away, from every layer that reads it, the output term
``W[:, u, :] x_u`` (``x_u`` the ``k`` columns the layer reads the unit at).  Two scores
measure that loss on the calibration inputs, both summed over the unit's consumers:

* ``wanda`` — activation-weighted weight norms, in the spirit of Wanda: each consumer
  weight is weighted by the measured energy of the input it multiplies,
  ``Σ_r Σ_j W[r,u,j]² E[x_{u,j}²]``.  No compensation.
* ``reconstruction`` — the exact output-reconstruction error of removing the unit alone,
  ``Σ_r W[r,u,:] C_u W[r,u,:]ᵀ``, with ``C_u`` the measured second moments of the unit's
  columns (their covariance where the layer has a bias or a BatchNorm after it to take the
  unit's mean: the fluctuation idea of FLAP, whose bias compensation :func:`absorb_means`
  applies after selection, giving a bias to layers without one where asked).  Unlike ``wanda`` it sees how a unit's columns co-vary (a
  channel flattened into positions that move together).

OBSPA with the measured input Hessian is the third calibrated criterion; it lives in
:func:`graphprune.optim.obspa.obspa` (``moments=``), as does its compensation.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from graphprune.analysis.groups import Group, Slice
from graphprune.errors import GraphPruneError
from graphprune.optim.calibration import Calibration, ConsumerStats
from graphprune.optim.obspa import GraphRoutes, InputMoments, mean_sink, compensate, consumer_slices


def _unit_weights(p: torch.Tensor, s: Slice) -> torch.Tensor:
    """Consumer weight as ``[R, size, k]``: every output (and tap) row, per unit, per column."""
    w = p.detach().movedim(s.dim, -1)[..., s.index.to(p.device)]
    return w.reshape(-1, *s.index.shape).double().cpu()


def _needs(calibration: Calibration | None, name: str) -> Calibration:
    if calibration is None:
        raise GraphPruneError(f"criterion {name!r} needs calibration data",
                              hint="pass data= (unlabeled batches of model inputs) to gp.prune, or --calibration "
                                   "to the command line; data-free criteria: obspa, l2, l1, bn_scale")
    return calibration


def _per_unit(groups: Sequence[Group], params: dict[str, torch.Tensor], calibration: Calibration,
              term: Any) -> list[torch.Tensor]:
    out = []
    for i, g in enumerate(groups):
        consumers = consumer_slices(g)
        if not consumers:
            out.append(g.norms(params, p=2))  # no layer reads the units as inputs: magnitude, like obspa
            continue
        score = torch.zeros(g.size, dtype=torch.float64)
        for s, st in zip(consumers, calibration.stats[i]):
            score += term(_unit_weights(params[s.param], s), s, st)
        out.append(score.float())
    return out


def wanda(groups: Sequence[Group], params: dict[str, torch.Tensor], *, calibration: Calibration | None = None,
          **_: Any) -> list[torch.Tensor]:
    """``Σ W² E[x²]`` over each unit's consumer columns (activation-weighted weight norm)."""
    cal = _needs(calibration, "wanda")
    return _per_unit(groups, params, cal,
                     lambda w, s, st: (w.pow(2) * st.within.diagonal(dim1=1, dim2=2)[None]).sum((0, 2)))


def reconstruction(groups: Sequence[Group], params: dict[str, torch.Tensor], *,
                   calibration: Calibration | None = None, graph: GraphRoutes | None = None,
                   add_biases: bool = False, **_: Any) -> list[torch.Tensor]:
    """Measured output error of each consumer when the unit alone is removed (mean into the
    bias where possible: the layer's own, or with ``add_biases`` one it is given)."""
    cal = _needs(calibration, "reconstruction")

    def term(w: torch.Tensor, s: Slice, st: ConsumerStats) -> torch.Tensor:
        c = st.within
        if mean_sink(s, params, graph, add_biases) is not None:
            c = c - st.within_mean[:, :, None] * st.within_mean[:, None, :]
        return torch.einsum("rui,uij,ruj->u", w, c, w).clamp_min(0)
    return _per_unit(groups, params, cal, term)


def absorb_means(groups: Sequence[Group], masks: Sequence[torch.Tensor], params: dict[str, torch.Tensor],
                 calibration: Calibration, routes: GraphRoutes | None,
                 added: dict[str, torch.Tensor] | None = None) -> None:
    """Move each removed unit's measured mean contribution ``W_Q μ_Q`` into its consumers'
    bias (or the BatchNorm after them; with ``added``, a bias given to a layer without
    one, kept there by weight name) and zero their columns; kept weights stay as they are.

    This is the OBS update with a diagonal input model (no unit can stand in for another),
    so :func:`~graphprune.optim.obspa.compensate` applies it, without its norm rescaling.
    """
    for i, (g, m) in enumerate(zip(groups, masks)):
        if not m.any():
            continue
        diag = [InputMoments(torch.diag(mo.cov.diagonal()), mo.mean, mo.block) for mo in calibration.moments(i)]
        compensate(g, m, params, diag, graph=routes, rescale=1.0, added=added)
