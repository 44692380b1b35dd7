"""Register only the tensor intrinsics a target needs, instead of TVM's 30-50 s import of all of them.

meta-schedule's ``TuneContext`` and default builder run ``import tvm.s_tir.tensor_intrin``,
whose package ``__init__`` registers every intrinsic set (CUDA's alone takes ~30 s, and the
builder pays it again in every worker, hitting its timeout). Placing a bare package object
in ``sys.modules`` first makes that import a no-op; the submodule the target needs is then
imported on its own (x86: 0.2 s, arm: 1.2 s).

The same goes for the custom schedule rules meta-schedule looks up by name: TOPI annotates
pooling blocks with ``schedule_rule = "meta_schedule.pool_max"`` (and avg, adaptive), which
no TVM build registers for CPU or GPU, so every pooling function logs a C++ warning the user
can do nothing about, then drops the annotation and schedules the block like any other.
:func:`register_pool_rules` registers the rules instead: on CPU, window max pools get
:func:`.pooling.schedule_window_pool`; the others are scheduled like any other block.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import tvm_ffi
from tvm.target import Target

from .pooling import schedule_window_pool

_PACKAGE = "tvm.s_tir.tensor_intrin"
_POOL_RULES = ("pool_max", "pool_avg", "adaptive_pool_max", "adaptive_pool_avg")
_WINDOW_POOLS = ("pool_max",)  # an average pool's rule sits on its division, not its window sum


def _intrinsic_modules(target: Target) -> list[str]:
    if target.kind.name == "cuda":
        return ["cuda"]
    triple = str(target.attrs.get("mtriple", ""))
    if triple.startswith(("aarch64", "arm")):
        return ["arm_cpu"]
    return ["x86"]


def register_intrinsics(target: Target) -> None:
    """Make the tensor intrinsics for ``target`` available without importing the others."""
    if _PACKAGE not in sys.modules:
        spec = importlib.util.find_spec(_PACKAGE)
        package = types.ModuleType(_PACKAGE)
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules[_PACKAGE] = package
    for name in _intrinsic_modules(target):
        importlib.import_module(f"{_PACKAGE}.{name}")
    register_pool_rules()


def _drop_rule_annotation(sch, block):  # noqa: ANN001 (TVM's Schedule and BlockRV)
    sch.unannotate(block, "schedule_rule")
    return [sch]


def register_pool_rules() -> None:
    """The rules for annotated pooling blocks (see the module docstring)."""
    for key in ("cpu", "gpu"):
        for rule in _POOL_RULES:
            name = f"s_tir.meta_schedule.{key}.meta_schedule.{rule}"
            if tvm_ffi.get_global_func(name, allow_missing=True) is None:
                window = key == "cpu" and rule in _WINDOW_POOLS
                tvm_ffi.register_global_func(name, schedule_window_pool if window else _drop_rule_annotation)
