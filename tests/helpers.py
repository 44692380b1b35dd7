"""Shared test machinery: the zero-invariance property every group must satisfy."""
from __future__ import annotations

import copy
from typing import Any

import torch

import graphprune as gp
from graphprune.frontends.torch_backend import max_rel_error


def zero_random_half(g: gp.PrunableGraph, seed: int = 0) -> int:
    """Zero a random half (rounded down) of every group's units in ``g.params``."""
    gen = torch.Generator().manual_seed(seed)
    removed = 0
    for grp in g.groups:
        mask = torch.zeros(grp.size, dtype=torch.bool)
        mask[torch.randperm(grp.size, generator=gen)[: grp.size // 2]] = True
        grp.scatter_(g.params, mask)
        removed += int(mask.sum())
    return removed


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def check_zero_invariance(model: torch.nn.Module, inputs: Any, seed: int = 0, rtol: float = 1e-4) -> gp.PrunableGraph:
    """The property: compact(zeroed) == zeroed full model, with fewer parameters."""
    model = copy.deepcopy(model).eval()
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    g = gp.trace(model, args, verify=False)
    assert g.groups, "no prunable group found"
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    removed = zero_random_half(g, seed)
    with torch.no_grad():
        ref = model(*args)
        zeroed_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        compact = g.construct_subnet()
        out = compact(*args)
    err = max_rel_error(ref, out)
    assert err < rtol, f"compact model differs from the zeroed model: rel. error {err:.3e}"
    if removed:
        assert n_params(compact) < n_params(model)
    # construct_subnet never touches the user's model
    for k, v in model.state_dict().items():
        assert torch.equal(v, zeroed_state[k]), k
    assert before.keys() == zeroed_state.keys()
    return g
