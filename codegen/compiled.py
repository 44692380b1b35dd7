"""A Relax program compiled for a target: :class:`CompiledModel` (run, benchmark, export)
and :func:`compile_program`, which compiles one with a tuning database's records.

Both :func:`.compile.build` and the kernel chooser (:mod:`.sparsify`, which times the
dense kernel of a layer) compile through here; this module decides nothing about sparsity.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, MutableMapping, Sequence

import numpy as np
import torch
import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms

from graphprune.atomic import atomic_path
from graphprune.errors import TuningError

from .frontend import RelaxProgram
from .pipeline import compile_fused, fuse
from .transfer import CarriedOver, Donors
from .targets import CodegenTarget
from .tuning import open_database, recorded_seconds

if TYPE_CHECKING:
    from .sparsify import KernelChoice

#: Cross compilers for targets that do not run here, by LLVM triple prefix.
CROSS_COMPILERS = {"aarch64": "aarch64-linux-gnu-g++"}

#: The TVM runtime's settings a compiled model runs with here, unless the environment sets them.
#: TVM's thread pool pins each worker thread to a core and lets the calling thread, which runs
#: a share of every parallel loop, move freely; when the caller lands on a worker's core the
#: two take turns. On a 2-vCPU machine at 2 threads, pinned: the small ViT (batch 1) ran in
#: 3.1 ms, slower than its 2.5 ms on one thread, unpinned 1.56 ms (onnxruntime 1.88 ms); the
#: pruned BERT 3.29 against 2.57 ms; CNNs within their noise (resnet18 18.8 against 19.2 ms,
#: mobilenet_v2 4.9 against 4.6 ms), fresh processes, medians of 4 to 12 interleaved rounds.
RUNTIME_ENV = {"TVM_BIND_THREADS": "0"}


def runtime_env(env: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """``env`` (``os.environ``, or a child process's environment) given :data:`RUNTIME_ENV`'s
    settings where it has none of its own; returns it."""
    for key, value in RUNTIME_ENV.items():
        env.setdefault(key, value)
    return env


class CompiledModel:
    """A compiled model: ``run`` and ``benchmark`` on this machine, ``export`` for any target.

    For a cross target (ARM from x86, CUDA without a GPU) it is an exported-library holder:
    ``export`` works, ``run`` and ``benchmark`` raise :class:`TuningError`.
    """

    def __init__(self, executable: relax.VMExecutable, target: CodegenTarget, program: RelaxProgram,
                 recorded: dict[str, float | None],
                 kernel_choices: list[KernelChoice] | None = None, carried_functions: int = 0) -> None:
        self.executable = executable
        #: per dense layer, BSR or dense and the timings behind it (empty unless built with ``sparse=``)
        self.kernel_choices = kernel_choices or []
        self.target = target
        self.program = program
        #: each function (by :func:`.tuning.function_key`) with the best seconds the database
        #: recorded for it at its shape when it was compiled; None: no record of its own
        self.recorded = recorded
        #: functions without a record that got a record of another extent (:mod:`.transfer`)
        self.carried_functions = carried_functions
        self._vm: relax.VirtualMachine | None = None

    @property
    def vm(self) -> relax.VirtualMachine:
        """The VM that runs the model here. TVM reads :data:`RUNTIME_ENV`'s settings when its
        thread pool starts (the first parallel loop run in the process), so they are put in
        this process's environment, where it has none of its own, before the first run."""
        if self._vm is None:
            device = self._device()
            runtime_env(os.environ)
            self._vm = relax.VirtualMachine(self.executable, device)
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

        With ``number=None`` each repeat runs for at least ``min_repeat_ms``. ``threads`` is the
        count the TVM runtime ran with, asked of the runtime after timing: set
        ``TVM_NUM_THREADS`` before the first run to fix it. Unset, TVM takes half the logical
        CPUs on x86 (it assumes two hardware threads per core): one on a 2-vCPU machine, where
        ``os.cpu_count()`` says 2 and a reference timed at 2 threads would not be like for like.
        """
        args = self._to_device(list(inputs) if inputs is not None else self.example_inputs())
        timer = self.vm.time_evaluator("main", self._device(), number=number or 1, repeat=repeat,
                                       min_repeat_ms=0 if number else min_repeat_ms)
        times_ms = np.array(timer(*args).results) * 1e3
        return {"median_ms": float(np.median(times_ms)), "mean_ms": float(times_ms.mean()),
                "std_ms": float(times_ms.std()), "min_ms": float(times_ms.min()), "repeat": repeat,
                "threads": int(tvm.runtime.num_threads()), "target": self.target.name}

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
    def tuned_functions(self) -> int:
        """Functions compiled with a record measured at their own shape."""
        return sum(seconds is not None for seconds in self.recorded.values())

    @property
    def total_functions(self) -> int:
        return len(self.recorded)

    @property
    def schedules(self) -> dict[str, int]:
        """How many functions were tuned at their shape, carried over, or given defaults."""
        return {"tuned": self.tuned_functions, "carried": self.carried_functions,
                "default": self.total_functions - self.tuned_functions - self.carried_functions}

    @property
    def bsr_layers(self) -> list[str]:
        """The layers compiled as block-sparse kernels."""
        return [c.layer for c in self.kernel_choices if c.kernel == "bsr"]

    def summary(self) -> str:
        lines = [self.program.summary(), f"  target: {self.target}",
                 f"  tuned functions: {self.tuned_functions}/{self.total_functions}, carried over from tuned "
                 f"functions of other extents (not measured at these): {self.carried_functions}, others: default "
                 f"schedules"]
        lines += [f"  {choice}" for choice in self.kernel_choices]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"CompiledModel({self.program.name}, {self.target.name}, "
                f"tuned {self.tuned_functions}/{self.total_functions})")


def _flatten(value: Any) -> list[np.ndarray]:
    if isinstance(value, tvm.runtime.Tensor):
        return [value.numpy()]
    return [array for item in value for array in _flatten(item)]


def compile_program(program: RelaxProgram, target: CodegenTarget,
                    tuning_db: str | os.PathLike | ms.Database | None = None, default_schedules: bool = True,
                    kernel_choices: list[KernelChoice] | None = None) -> CompiledModel:
    """Bind ``program``'s weights, fuse, and compile it for ``target`` with ``tuning_db``'s
    records (a meta-schedule work directory or a ``Database``); on CPU a function without a
    record gets one of a function that differs only in extents where the database has one
    (:class:`.transfer.CarriedOver`, counted in ``carried_functions``), the rest default schedules."""
    database = open_database(tuning_db) if isinstance(tuning_db, (str, os.PathLike)) else tuning_db
    fused = fuse(program.bound(), target.target)
    recorded = recorded_seconds(database, fused, target.target)
    cpu = target.target.kind.name == "llvm"
    carried = CarriedOver(Donors(database)) if database is not None and default_schedules and cpu else None
    try:
        executable = compile_fused(fused, target.target, database, default_schedules, carried)
    except Exception as exc:  # TVM reports compile failures as several internal error types
        raise TuningError(f"TVM failed to compile {program.name} for {target.name}: {exc}") from exc
    return CompiledModel(executable, target, program, recorded, kernel_choices,
                         carried.applied if carried is not None else 0)
