import platform

import pytest

from graphprune.codegen.targets import prune_multiple, resolve_target, vector_lanes
from graphprune.errors import TuningError

on_x86 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 host only")


@on_x86
def test_x86_is_host_cpu_with_mcpu_and_cores():
    target = resolve_target("x86")
    assert target.runs_here and target.kind == "llvm"
    assert target.target.attrs["mcpu"] and int(target.target.attrs["num-cores"]) >= 1


@on_x86
def test_arm_is_a_cross_target():
    target = resolve_target("arm")
    assert not target.runs_here
    assert str(target.target.attrs["mtriple"]).startswith("aarch64")
    with pytest.raises(TuningError):
        target.device()


def test_cuda_tag_has_llvm_host_and_thread_limits():
    target = resolve_target("cuda")
    assert target.is_gpu and target.target.host.kind.name == "llvm"
    assert int(target.target.attrs["max_threads_per_block"]) > 0
    assert resolve_target("cuda:nvidia/nvidia-h100").target.attrs["arch"].startswith("sm_90")


def test_tvm_target_and_unknown_names():
    import tvm

    assert resolve_target(tvm.target.Target({"kind": "llvm"})).kind == "llvm"
    with pytest.raises(TuningError, match="unknown target"):
        resolve_target("tpu")


def test_vector_lanes_follow_the_cpu():
    """float32 lanes: NEON's 128 bits hold 4; this x86 host has at least SSE's 4 and at most
    AVX-512's 16; a GPU has no CPU vector width."""
    assert vector_lanes("arm") == 4 and vector_lanes("arm", element_bits=8) == 16
    assert vector_lanes("x86") in (4, 8, 16)
    with pytest.raises(TuningError, match="CPU targets"):
        vector_lanes("cuda")


def test_prune_multiple_is_the_targets_width():
    """Pruned widths round to a CPU's float32 lanes (NEON 4, this x86 host's own), 8 on CUDA."""
    assert prune_multiple("arm") == 4
    assert prune_multiple("x86") == vector_lanes("x86")
    assert prune_multiple("cuda") == 8
