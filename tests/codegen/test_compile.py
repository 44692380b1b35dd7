"""x86 builds reproduce torch; ONNX path; export; cross targets refuse to run."""
import os

import pytest
import torch

import graphprune.codegen as codegen
from graphprune.errors import TuningError

from .models import SmallCNN, TinyTransformerBlock, rel_err, seeded


def test_save_json_smoke():
    """tvm.ir.save_json segfaults with apache-tvm-ffi 0.1.15: catches a bad ffi pin (meta-schedule needs it)."""
    import tvm
    from tvm.script import tirx as T

    @T.prim_func
    def add_one(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
        for i in range(4):
            b[i] = a[i] + T.float32(1)

    text = tvm.ir.save_json(add_one)
    tvm.ir.assert_structural_equal(tvm.ir.load_json(text), add_one)


@pytest.fixture(scope="module")
def cnn_build():
    model, x = seeded(SmallCNN()), torch.randn(1, 3, 16, 16)
    return model, x, codegen.build(model, (x,), target="x86")


def test_cnn_matches_torch(cnn_build):
    model, x, compiled = cnn_build
    out = compiled.run(x)
    assert out.shape == (1, 10)
    assert rel_err(out, model(x)) < 1e-4
    assert compiled.tuned_functions == 0 and compiled.total_functions > 0


def test_transformer_block_matches_torch():
    """With CPU fast math (GELU on fast_erf, softmax on fast_exp) the error stays at float32 level."""
    model, x = seeded(TinyTransformerBlock()), torch.randn(2, 8, 32)
    compiled = codegen.build(model, (x,), target="x86")
    assert rel_err(compiled.run(x.numpy()), model(x)) < 1e-5


def test_cpu_fusion_uses_fast_math_and_marks_weights_layout_free():
    """No scalar erf/exp calls are left for LLVM (they do not vectorise), and every fused function
    that reads a weight lists it as layout-free, so tuned schedules may pre-pack it."""
    import tvm

    from graphprune.codegen.pipeline import fuse
    from graphprune.codegen.targets import resolve_target

    model, x = seeded(TinyTransformerBlock()), torch.randn(2, 8, 32)
    program = codegen.import_model(model, (x,))
    cpu = fuse(program.bound(), resolve_target("x86").target)
    assert "T.erf(" not in cpu.script() and "T.exp(" not in cpu.script()
    linear = [f for gv, f in cpu.functions_items()  # matmul + bias: a weight (attention's matmuls have none)
              if "matmul" in gv.name_hint and "add" in gv.name_hint and isinstance(f, tvm.tirx.PrimFunc)]
    assert linear and all(f.attrs and f.attrs.get("layout_free_buffers") for f in linear)
    gpu = fuse(program.bound(), resolve_target("cuda").target)
    assert "T.erf(" in gpu.script() or "T.exp(" in gpu.script()  # GPUs keep their own intrinsics


def test_group_norm_weights_read_through_a_reshape_are_not_marked(tmp_path):
    """In NHWC a group norm reads its affine weights through a reshape, which TVM's RewriteLayout
    cannot pack (it raised, failing poolformer's build and any tuning of it): those functions are
    left unmarked, the convolutions keep their mark, and building and tuning both work."""
    import tvm

    from graphprune.codegen.pipeline import fuse
    from graphprune.codegen.targets import resolve_target

    model = seeded(torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.GroupNorm(1, 16),
                                       torch.nn.GELU(), torch.nn.Conv2d(16, 16, 1), torch.nn.GroupNorm(4, 16)))
    x = torch.randn(1, 3, 12, 12)
    fused = fuse(codegen.import_model(model, (x,)).bound(), resolve_target("x86").target)
    functions = {gv.name_hint: f for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    norms = [f for name, f in functions.items() if "group_norm" in name]
    convs = [f for name, f in functions.items() if "conv2d" in name]
    assert len(norms) == 2 and all("layout_free_buffers" not in f.attrs for f in norms)
    assert convs and all(f.attrs.get("layout_free_buffers") for f in convs)
    assert rel_err(codegen.build(model, (x,), target="x86").run(x), model(x)) < 1e-5
    codegen.tune(model, (x,), "x86", tmp_path / "db", trials_per_task=2)
    assert rel_err(codegen.build(model, (x,), target="x86", tuning_db=tmp_path / "db").run(x), model(x)) < 1e-5


def test_cpu_convolutions_run_in_nhwc():
    """Channels innermost, where tuned loops vectorise: the first convolution reads a (1, 16, 16, 3) image."""
    from graphprune.codegen.pipeline import fuse
    from graphprune.codegen.targets import resolve_target

    model, x = seeded(SmallCNN()), torch.randn(1, 3, 16, 16)
    fused = fuse(codegen.import_model(model, (x,)).bound(), resolve_target("x86").target)
    scripts = [f.script().replace("T.int64(", "(") for gv, f in fused.functions_items() if "conv2d" in gv.name_hint]
    assert any("((1), (16), (16), (3))" in text for text in scripts)
    assert not any("((1), (3), (16), (16))" in text for text in scripts)


@pytest.mark.parametrize("source", ["torch", "onnx"])
def test_batch_norm_is_folded_into_the_convolution(source, tmp_path):
    """The fused convolution computes conv + bias (+ relu): the norm's subtract/divide/multiply
    epilogue is gone from every kernel, for PyTorch and for ONNX input, and the output is unchanged."""
    from graphprune.codegen.pipeline import fuse
    from graphprune.codegen.targets import resolve_target

    model, x = seeded(SmallCNN()), torch.randn(1, 3, 16, 16)
    if source == "onnx":
        path = tmp_path / "cnn.onnx"
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                          do_constant_folding=False)  # keep BatchNormalization as the exporter writes it
        program = codegen.import_model(str(path))
    else:
        program = codegen.import_model(model, (x,))
    fused = fuse(program.bound(), resolve_target("x86").target)
    names = [gv.name_hint for gv, f in fused.functions_items() if "conv2d" in gv.name_hint]
    assert names and not any(op in name for name in names for op in ("subtract", "divide", "sqrt", "multiply"))
    assert rel_err(codegen.build(program, target="x86").run(x), model(x)) < 1e-4


def test_transposed_convolution_after_a_convolution_builds_and_matches_torch():
    """A decoder's upsampling (a segmentation or text-detection head): the convolutions go
    NHWC, the transposed ones must stay in a layout TVM legalises (it failed to build with
    'CodeGenVM cannot emit this Relax operator' on a PaddleOCR detector)."""
    model = seeded(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.ConvTranspose2d(8, 4, 2, stride=2), torch.nn.Conv2d(4, 2, 1))).eval()
    x = torch.randn(1, 3, 8, 12)
    compiled = codegen.build(model, (x,), "x86")
    assert rel_err(compiled.run(x), model(x)) < 1e-4


def test_transposed_convolution_kernels_are_not_packed():
    """A transposed convolution reads its kernel flipped; TVM's RewriteLayout packed that kernel
    wrongly (NaN out of timm's LowFormer, k=4, stride 2): its function is left unmarked and the
    build matches torch."""
    import tvm

    from graphprune.codegen.pipeline import fuse
    from graphprune.codegen.targets import resolve_target

    model = seeded(torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.ConvTranspose2d(64, 128, 4, stride=2, padding=1))).eval()
    x = torch.randn(1, 3, 7, 7)
    fused = fuse(codegen.import_model(model, (x,)).bound(), resolve_target("x86").target)
    marks = {gv.name_hint: "layout_free_buffers" in f.attrs for gv, f in fused.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in gv.name_hint}
    assert [m for name, m in marks.items() if "transpose" in name] == [False], marks
    assert [m for name, m in marks.items() if "transpose" not in name] == [True], marks
    assert rel_err(codegen.build(model, (x,), "x86").run(x), model(x)) < 1e-4


def test_onnx_path_matches_torch(tmp_path):
    model, x = seeded(SmallCNN()), torch.randn(1, 3, 16, 16)
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["image"])
    compiled = codegen.build(str(path), target="x86")
    assert compiled.program.input_names == ["image"]
    assert rel_err(compiled.run(x), model(x)) < 1e-4


def test_benchmark_reports_medians(cnn_build):
    stats = cnn_build[2].benchmark(repeat=3, number=2)
    assert {"median_ms", "mean_ms", "min_ms", "threads"} <= stats.keys()
    assert stats["median_ms"] > 0


def _fresh_process(code: str, env: dict[str, str]) -> list[str]:
    """The words ``code`` prints, run in a new Python process with ``env`` (TVM's thread pool
    reads its settings once per process)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


_THREADS = """
import torch, graphprune.codegen as codegen
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU()).eval()
print(codegen.build(model, (torch.randn(1, 16),), "x86").benchmark(repeat=2, number=1)["threads"])
"""


@pytest.mark.parametrize("given", [None, "2"])
def test_benchmark_reports_the_threads_tvm_ran_with(given):
    """Unset, TVM runs half the logical CPUs on x86 (one on a 2-vCPU machine): the count a
    compile report prints, and times its onnxruntime reference at, is that one, not os.cpu_count()."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("TVM's default thread count halves the logical CPUs on x86 only")
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    if given:
        env["TVM_NUM_THREADS"] = given
    expected = int(given) if given else max(1, (os.cpu_count() or 1) // 2)
    assert int(_fresh_process(_THREADS, env)[-1]) == expected


def test_export_is_atomic_and_loadable(cnn_build, tmp_path):
    import tvm
    from tvm import relax

    model, x, compiled = cnn_build
    path = compiled.export(tmp_path / "cnn.so")
    assert os.listdir(tmp_path) == ["cnn.so"]  # no temporary file left behind
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()))
    assert rel_err(out[0].numpy(), model(x)) < 1e-4


def test_cross_target_exports_but_refuses_to_run(tmp_path):
    model, x = seeded(SmallCNN()), torch.randn(1, 3, 16, 16)
    compiled = codegen.build(model, (x,), target="arm")
    with pytest.raises(TuningError, match="cannot run on this machine"):
        compiled.run(x)
    from graphprune.codegen.qemu import toolchain_missing

    if toolchain_missing() is None:
        library = compiled.export(tmp_path / "cnn_arm.so")
        assert library.read_bytes()[:4] == b"\x7fELF" and library.read_bytes()[18] == 183  # EM_AARCH64


def test_pytorch_model_needs_example_inputs():
    from graphprune.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="example_inputs"):
        codegen.build(SmallCNN(), target="x86")


def test_onnx_dynamic_batch_needs_example_inputs(tmp_path):
    from graphprune.errors import BadOnnxError

    model, x = seeded(SmallCNN()), torch.randn(2, 3, 16, 16)
    path = tmp_path / "dyn.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["image"],
                      dynamic_axes={"image": {0: "batch"}})
    with pytest.raises(BadOnnxError, match="dynamic"):
        codegen.build(path, target="x86")
    compiled = codegen.build(path, (x,), target="x86")
    assert compiled.program.input_shapes == [(2, 3, 16, 16)]
    assert rel_err(compiled.run(x), model(x)) < 1e-4


def test_pooling_builds_without_unknown_rule_warnings(capfd):
    """TOPI's pooling blocks carry a schedule-rule annotation no TVM build registers for CPU; the
    build schedules them like any other block and prints no C++ warning about it."""
    model = seeded(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                       torch.nn.AvgPool2d(2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()))
    x = torch.randn(2, 3, 16, 16)
    compiled = codegen.build(model, (x,), target="x86")
    assert "Unknown schedule rule" not in capfd.readouterr().err
    assert rel_err(compiled.run(x), model(x)) < 1e-4


_AFFINITY = """
import glob, os, torch, graphprune.codegen as codegen
model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3)).eval()
x = torch.randn(1, 3, 64, 64)
codegen.build(model, (x,), "x86").run(x)
tasks = glob.glob(f"/proc/{os.getpid()}/task/*/status")
print(os.environ.get("TVM_BIND_THREADS"), sum(len(os.sched_getaffinity(int(t.split("/")[-2]))) == 1 for t in tasks))
"""


@pytest.mark.parametrize("bind", [None, "1"])
def test_runtime_threads_are_not_pinned_unless_asked(bind):
    """TVM pins its pool's workers to cores (see ``RUNTIME_ENV``); a compiled model runs
    unpinned unless the environment says otherwise, and a user's ``TVM_BIND_THREADS=1`` holds."""
    if not os.path.isdir("/proc/self/task") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux and two CPUs to pin a worker to one of them")
    env = {k: v for k, v in os.environ.items() if k != "TVM_BIND_THREADS"}
    env["TVM_NUM_THREADS"] = "2"
    if bind:
        env["TVM_BIND_THREADS"] = bind
    setting, pinned = _fresh_process(_AFFINITY, env)[-2:]
    assert setting == (bind or "0")
    assert (int(pinned) > 0) == (bind == "1")
