"""Resolve a user's target name ("x86", "arm", "cuda") or a TVM Target into one small record.

Everything downstream (build, tuning, sparse kernels) needs the same three facts: the TVM
target to compile for, whether the result can run on this machine, and which device to run
it on. Deciding them once here keeps "can I run/measure this?" out of every other module.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import tvm
from tvm.target import Target

from graphprune.errors import TuningError

#: Cross target for 64-bit ARM boards (Raspberry Pi 4/5, Graviton, Jetson CPUs).
ARM_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 4}
#: GPU tag used when the user says only "cuda": tags carry the limits meta-schedule needs.
DEFAULT_CUDA_TAG = "nvidia/nvidia-a100"

_HOST_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


@dataclass(frozen=True)
class CodegenTarget:
    """A resolved target: ``name`` is the short name, ``runs_here`` says if this host can execute it."""

    name: str
    target: Target
    runs_here: bool

    @property
    def kind(self) -> str:
        """TVM target kind: "llvm" for CPUs, "cuda" for NVIDIA GPUs."""
        return self.target.kind.name

    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda"

    def device(self) -> tvm.runtime.Device:
        """The device to run on; raises when this host cannot run the target."""
        if not self.runs_here:
            raise TuningError(f"target {self.name!r} cannot run on this machine",
                              hint="export the library and run it on the device (TVM RPC), "
                                   "or under qemu for aarch64 correctness checks")
        return tvm.cuda() if self.is_gpu else tvm.cpu()

    def __repr__(self) -> str:
        where = "runs here" if self.runs_here else "cross"
        return f"CodegenTarget({self.name}, {self.target.export()['kind']}, {where})"


def host_cpu_target(num_cores: int | None = None) -> Target:
    """The host CPU with its real ``mcpu`` (generic code is several times slower) and ``num-cores``,
    which meta-schedule requires for CPU targets."""
    attrs = dict(Target.from_device(tvm.cpu()).export())
    attrs = {k: attrs[k] for k in ("kind", "mtriple", "mcpu", "mattr") if k in attrs}
    attrs["num-cores"] = num_cores or os.cpu_count() or 1
    return Target(attrs)


def vector_lanes(spec: str | dict | Target | CodegenTarget = "x86", element_bits: int = 32) -> int:
    """Elements per vector register of a CPU target (float32: 16 with AVX-512, 8 with AVX2, 4 on
    NEON): the ``multiple`` to prune widths to for it.

    Tuned CPU loops vectorise the channel axis, and meta-schedule splits it only by exact
    divisors: a pruned width of 8 x 53 = 424 holds no 16-lane vector, and its convolution was
    tuned to 4-lane ones (resnet18 pruned to multiples of 8 on AVX-512, measured).
    """
    resolved = resolve_target(spec)
    if resolved.kind != "llvm":
        raise TuningError(f"vector_lanes is for CPU targets, not {resolved.kind!r}")
    return max(1, tvm.target.codegen.llvm_get_vector_width(resolved.target) // element_bits)


def prune_multiple(spec: str | dict | Target | CodegenTarget = "x86") -> int:
    """Channel multiple the pruned widths are rounded to for ``spec``: a CPU's float32 vector
    lanes (:func:`vector_lanes`: 16 with AVX-512, 8 with AVX2, 4 on NEON), 8 on CUDA.

    On CUDA the fp32 kernels TVM schedules vectorise by 4 and tensor cores take fp16
    channels in multiples of 8; rounding to a warp (32) would remove far more than either needs.
    """
    resolved = resolve_target(spec)
    return vector_lanes(resolved) if resolved.kind == "llvm" else 8


def _llvm_arch(target: Target) -> str:
    triple = str(target.attrs.get("mtriple", "")) or platform.machine().lower()
    arch = triple.split("-")[0]
    return _HOST_ARCH.get(arch, arch)


def _llvm_record(target: Target) -> CodegenTarget:
    arch = _llvm_arch(target)
    name = {"x86_64": "x86", "aarch64": "arm"}.get(arch, arch)
    return CodegenTarget(name, target, arch == _HOST_ARCH.get(platform.machine().lower()))


def _local_cuda() -> CodegenTarget:
    """The GPU in this machine (its real arch and limits), or the default tag when there is none."""
    if tvm.cuda().exist:
        try:
            return CodegenTarget("cuda", Target.from_device(tvm.cuda()).with_host(host_cpu_target()), True)
        except (ValueError, RuntimeError):  # a device the target registry cannot describe: fall back
            pass
    return CodegenTarget("cuda", Target(DEFAULT_CUDA_TAG, host=host_cpu_target()), tvm.cuda().exist)


def resolve_target(spec: str | dict | Target | CodegenTarget = "x86") -> CodegenTarget:
    """Turn ``spec`` into a :class:`CodegenTarget`.

    >>> resolve_target("arm").runs_here        # on an x86 machine
    False

    ``spec`` is "x86"/"host" (this CPU), "arm" (aarch64 + NEON), "cuda" (this machine's GPU,
    else the A100 tag) or "cuda:<tag>" (e.g. "cuda:nvidia/nvidia-h100"), a TVM target dict,
    or a ``tvm.target.Target``.
    """
    if isinstance(spec, CodegenTarget):
        return spec
    if isinstance(spec, str):
        name = spec.lower()
        if name in ("x86", "host", "cpu", "llvm"):
            return _llvm_record(host_cpu_target())
        if name in ("arm", "aarch64", "arm64"):
            return _llvm_record(Target(ARM_TARGET))
        if name == "cuda" or name.startswith("cuda:"):
            if ":" in spec:
                return CodegenTarget("cuda", Target(spec.split(":", 1)[1], host=host_cpu_target()), tvm.cuda().exist)
            return _local_cuda()
        raise TuningError(f"unknown target {spec!r}",
                          hint='use "x86", "arm", "cuda", "cuda:<tag>" or a tvm.target.Target')
    target = spec if isinstance(spec, Target) else Target(spec)
    if target.kind.name == "cuda":
        if target.host is None:
            target = target.with_host(host_cpu_target())
        return CodegenTarget("cuda", target, tvm.cuda().exist)
    if target.kind.name == "llvm":
        return _llvm_record(target)
    raise TuningError(f"unsupported target kind {target.kind.name!r}", hint="graphprune builds for llvm and cuda")
