"""Shared test machinery: the zero-invariance property every group must satisfy, and the
benchmark scripts loaded as modules."""
from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch.utils import _pytree as pytree

import graphprune as gp
from graphprune.rel_error import max_rel_error


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


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (``benchmarks/`` is scripts, not a package), loaded
    once per session; registered in ``sys.modules`` because dataclasses look their module up."""
    key = f"_benchmark_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def assert_same_structure(ref: Any, out: Any) -> None:
    """Same pytree (tuples, dicts, Hugging Face ``ModelOutput`` s) with at least one float
    tensor: ``max_rel_error`` zips leaves, so a missing output would otherwise go unseen."""
    ref_leaves, ref_spec = pytree.tree_flatten(ref)
    out_leaves, out_spec = pytree.tree_flatten(out)
    assert len(ref_leaves) == len(out_leaves), f"outputs differ in structure: {ref_spec} vs {out_spec}"
    assert any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in ref_leaves), \
        "the model has no floating-point output to compare"


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
    assert_same_structure(ref, out)
    err = max_rel_error(ref, out)
    assert err < rtol, f"compact model differs from the zeroed model: rel. error {err:.3e}"
    if removed:
        assert n_params(compact) < n_params(model)
    # construct_subnet never touches the user's model
    for k, v in model.state_dict().items():
        assert torch.equal(v, zeroed_state[k]), k
    assert before.keys() == zeroed_state.keys()
    return g


def randomise_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """The model in eval mode with non-trivial batch-norm statistics and affines, so a
    wrongly kept or dropped channel (or an erased branch's constant) cannot hide behind zeros."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-1, 1)
    return model.eval()
