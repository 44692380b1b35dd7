"""Build a PyTorch or ONNX model for a TVM target, and run, time or export the result.

``build`` is the one entry point: import (frontend) -> bind weights -> compile with the
tuning database's records and default schedules for the rest (pipeline) -> ``CompiledModel``.
Weights are bound as constants at this point because tuning records are keyed on the
constant-folded functions and because an exported library must be self-contained.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch
import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from graphprune.errors import TuningError

from graphprune.atomic import atomic_path
from .frontend import RelaxProgram, import_model
from .pipeline import compile_fused, fuse
from .sparse import KernelChoice
from .sparsify import sparsify
from .targets import CodegenTarget, resolve_target
from .tuning import database_coverage, has_records, open_database, shared_database_dir

#: Cross compilers for targets that do not run here, by LLVM triple prefix.
CROSS_COMPILERS = {"aarch64": "aarch64-linux-gnu-g++"}


class CompiledModel:
    """A compiled model: ``run`` and ``benchmark`` on this machine, ``export`` for any target.

    For a cross target (ARM from x86, CUDA without a GPU) it is an exported-library holder:
    ``export`` works, ``run`` and ``benchmark`` raise :class:`TuningError`.
    """

    def __init__(self, executable: relax.VMExecutable, target: CodegenTarget, program: RelaxProgram,
                 tuned_functions: int, total_functions: int,
                 kernel_choices: list[KernelChoice] | None = None) -> None:
        self.executable = executable
        #: per dense layer, BSR or dense and the timings behind it (empty unless built with ``sparse=``)
        self.kernel_choices = kernel_choices or []
        self.target = target
        self.program = program
        self.tuned_functions = tuned_functions
        self.total_functions = total_functions
        self._vm: relax.VirtualMachine | None = None

    @property
    def vm(self) -> relax.VirtualMachine:
        if self._vm is None:
            self._vm = relax.VirtualMachine(self.executable, self._device())
        return self._vm

    def _device(self) -> tvm.runtime.Device:
        if not self.target.runs_here:
            raise TuningError(f"a model built for {self.target.name} cannot run on this machine",
                              hint="export() it and run it on the device through TVM RPC; for aarch64 "
                                   "correctness checks run it under qemu (graphprune.codegen.qemu)")
        return self.target.device()

    def _to_device(self, inputs: Sequence[Any]) -> list[tvm.runtime.Tensor]:
        if len(inputs) != len(self.program.input_names):
            raise TuningError(f"expected {len(self.program.input_names)} inputs "
                              f"({', '.join(self.program.input_names)}), got {len(inputs)}")
        device = self._device()
        arrays = [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in inputs]
        return [tvm.runtime.tensor(np.require(a, requirements="C"), device) for a in arrays]

    def run(self, *inputs: Any) -> np.ndarray | list[np.ndarray]:
        """Run on numpy arrays or torch tensors; one output comes back as an array, several as a list."""
        result = self.vm["main"](*self._to_device(inputs))
        outputs = _flatten(result)
        return outputs[0] if len(outputs) == 1 else outputs

    def example_inputs(self, seed: int = 0) -> list[np.ndarray]:
        """Random inputs of the compiled shapes and dtypes (zeros for integer inputs)."""
        rng = np.random.default_rng(seed)
        return [rng.standard_normal(shape).astype(dtype) if dtype.startswith("float") else np.zeros(shape, dtype)
                for shape, dtype in zip(self.program.input_shapes, self.program.input_dtypes)]

    def benchmark(self, repeat: int = 7, number: int | None = None, min_repeat_ms: int = 50,
                  inputs: Sequence[Any] | None = None) -> dict[str, float | int | str]:
        """Time ``main`` with TVM's time evaluator: ``repeat`` medians of ``number`` runs each.

        With ``number=None`` each repeat runs for at least ``min_repeat_ms``. Thread count is the
        TVM runtime's (set ``TVM_NUM_THREADS`` before the first run to fix it).
        """
        args = self._to_device(list(inputs) if inputs is not None else self.example_inputs())
        timer = self.vm.time_evaluator("main", self._device(), number=number or 1, repeat=repeat,
                                       min_repeat_ms=0 if number else min_repeat_ms)
        times_ms = np.array(timer(*args).results) * 1e3
        return {"median_ms": float(np.median(times_ms)), "mean_ms": float(times_ms.mean()),
                "std_ms": float(times_ms.std()), "min_ms": float(times_ms.min()), "repeat": repeat,
                "threads": int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1)),
                "target": self.target.name}

    def export(self, path: str | os.PathLike) -> Path:
        """Write a shared library loadable by the TVM runtime on the target (atomic: temp file + rename)."""
        options = {}
        if self.target.kind == "llvm" and not self.target.runs_here:
            arch = str(self.target.target.attrs.get("mtriple", "")).split("-")[0]
            if arch not in CROSS_COMPILERS:
                raise TuningError(f"no cross compiler known for {arch!r}", hint=f"known: {sorted(CROSS_COMPILERS)}")
            options["fcompile"] = tvm.support.cc.cross_compiler(CROSS_COMPILERS[arch])
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            self.executable.export_library(str(tmp), **options)
        return Path(path)

    @property
    def bsr_layers(self) -> list[str]:
        """The layers compiled as block-sparse kernels."""
        return [c.layer for c in self.kernel_choices if c.kernel == "bsr"]

    def summary(self) -> str:
        lines = [self.program.summary(), f"  target: {self.target}",
                 f"  tuned functions: {self.tuned_functions}/{self.total_functions} (others: default schedules)"]
        lines += [f"  {choice}" for choice in self.kernel_choices]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"CompiledModel({self.program.name}, {self.target.name}, "
                f"tuned {self.tuned_functions}/{self.total_functions})")


def _flatten(value: Any) -> list[np.ndarray]:
    if isinstance(value, tvm.runtime.Tensor):
        return [value.numpy()]
    return [array for item in value for array in _flatten(item)]


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
    database = open_database(tuning_db) if isinstance(tuning_db, (str, os.PathLike)) else tuning_db
    fused = fuse(program.bound(), resolved.target)
    tuned, total = database_coverage(database, fused, resolved.target)
    try:
        executable = compile_fused(fused, resolved.target, database, default_schedules)
    except Exception as exc:  # TVM reports compile failures as several internal error types
        raise TuningError(f"TVM failed to compile {program.name} for {resolved.name}: {exc}") from exc
    return CompiledModel(executable, resolved, program, tuned, total, choices)
