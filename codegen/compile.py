"""Build a PyTorch or ONNX model for a TVM target, and run, time or export the result.

``build`` is the one entry point: import (frontend) -> bind weights -> compile with the
tuning database's records and default schedules for the rest (pipeline) -> ``CompiledModel``.
Weights are bound as constants at this point because tuning records are keyed on the
constant-folded functions and because an exported library must be self-contained.
"""
from __future__ import annotations

import os
from typing import Sequence

import onnx
import torch
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from .compiled import CompiledModel, compile_program
from .frontend import RelaxProgram, import_model
from .sparsify import KernelChoice, sparsify
from .targets import CodegenTarget, resolve_target
from .tuning import has_records, shared_database_dir


def build(model_or_onnx: torch.nn.Module | onnx.ModelProto | str | os.PathLike | RelaxProgram,
          example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
          target: str | dict | Target | CodegenTarget = "x86",
          tuning_db: str | os.PathLike | ms.Database | None = None,
          default_schedules: bool = True, sparse: bool | str = False, block: tuple[int, int] = (16, 1),
          min_block_sparsity: float = 0.5) -> CompiledModel:
    """Compile a model for ``target``.

    >>> compiled = build(model, (torch.randn(1, 3, 224, 224),), target="x86", tuning_db="runs/tune")
    >>> compiled.run(x)                       # numpy output(s)
    >>> compiled.benchmark()["median_ms"]

    ``tuning_db`` is a meta-schedule work directory written by :func:`graphprune.codegen.tune`
    (or a ``Database``); by default, the machine's shared database for the target
    (:func:`~graphprune.codegen.tuning.shared_database_dir`) once it exists. Functions without a
    record get default schedules. Turning
    ``default_schedules`` off leaves them naive (30-150x slower on CPU): for tests only.

    ``sparse="auto"`` compiles linear and 1x1-convolution layers whose weights have at least
    ``min_block_sparsity`` all-zero ``block``s (e.g. left by HESSO over ``block_groups``) as
    BSR kernels wherever a measurement at the layer's token count says BSR beats the dense
    kernel; ``sparse=True`` takes BSR for all of them unmeasured (cross targets). The
    verdicts are in ``CompiledModel.kernel_choices`` (see :mod:`.sparsify`).
    """
    resolved = resolve_target(target)
    program = import_model(model_or_onnx, example_inputs)
    if tuning_db is None and has_records(shared_database_dir(resolved)):
        tuning_db = shared_database_dir(resolved)
    choices: list[KernelChoice] = []
    if sparse:
        db_path = os.fspath(tuning_db) if isinstance(tuning_db, (str, os.PathLike)) else None
        program, choices = sparsify(program, resolved, sparse, block, min_block_sparsity, db_path)
    return compile_program(program, resolved, tuning_db, default_schedules, choices)
