"""ONNX in, ONNX out from the shell: inspect, prune, compile (skipped until gp.trace accepts ONNX)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from .conftest import run_cli, run_main
from .onnx_models import n_params


def run_model(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def check_pruned(src, out, x: np.ndarray) -> None:
    """The output is a valid, smaller ONNX model with the same inputs, outputs and output shape."""
    small = onnx.load(out)
    onnx.checker.check_model(small)
    big = onnx.load(src)
    assert [i.name for i in small.graph.input] == [i.name for i in big.graph.input]
    assert [o.name for o in small.graph.output] == [o.name for o in big.graph.output]
    assert n_params(small) < n_params(big)
    assert run_model(out, x).shape == run_model(src, x).shape


pytestmark = pytest.mark.usefixtures("onnx_ready")


def test_inspect_text_json_and_html(tmp_path, onnx_dir, capsys):
    code, out, _ = run_main(capsys, "inspect", onnx_dir / "cnn.onnx")
    assert code == 0 and "2 groups" in out
    page = tmp_path / "graph.html"
    code, out, err = run_main(capsys, "inspect", onnx_dir / "cnn.onnx", "--json", "--html", page)
    assert code == 0, err
    data = json.loads(out)
    assert data["ok"] and data["frontend"] == "onnx" and len(data["groups"]) == 2
    assert data["params"] > data["grouped_params"] > 0
    html = page.read_text()
    assert "<svg" in html and "</html>" in html and data["groups"][0]["name"] in html


def test_prune_cnn_to_target(tmp_path, onnx_dir):
    out = tmp_path / "cnn.small.onnx"
    r = run_cli("prune", onnx_dir / "cnn.onnx", "-o", out, "--flops", "0.5", "--criterion", "obspa", "--json",
                "--multiple", "1", "--report", tmp_path / "report")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["output"] == str(out)
    report = data["report"]
    assert report["flops_removed"] > 0.4 and report["verify_error"] < 1e-4
    check_pruned(onnx_dir / "cnn.onnx", out, np.random.default_rng(0).standard_normal((1, 3, 16, 16), np.float32))
    assert {"report.md", "report.json", "widths.png"} <= {p.name for p in (tmp_path / "report").iterdir()}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_prune_default_output_name(tmp_path, onnx_dir, capsys):
    model = tmp_path / "mlp.onnx"
    model.write_bytes((onnx_dir / "mlp.onnx").read_bytes())
    code, _, err = run_main(capsys, "prune", model, "--criterion", "magnitude", "--params", "0.3")
    assert code == 0, err
    check_pruned(model, tmp_path / "mlp.pruned.onnx", np.ones((3, 8), np.float32))


def test_prune_resnet18(tmp_path, resnet18_path):
    out = tmp_path / "resnet18.small.onnx"
    r = run_cli("prune", resnet18_path, "-o", out, "--flops", "0.5", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)["report"]
    # measured on the compact model; gp.prune's first-order FLOPs accounting overshoots a little
    assert report["flops_removed"] >= 0.4
    assert report["params_after"] < report["params_before"]
    check_pruned(resnet18_path, out, np.random.default_rng(0).standard_normal((1, 3, 32, 32), np.float32))


def test_compile_writes_folder(tmp_path, onnx_dir, capsys):
    out = tmp_path / "out"
    code, _, err = run_main(capsys, "compile", onnx_dir / "mlp.onnx", "-o", out, "--method", "l1", "--units", "0.25",
                            "--multiple", "1")
    assert code == 0, err
    assert {"model.onnx", "report.md", "report.json", "widths.png"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["widths"] == [{"group": report["widths"][0]["group"], "kind": report["widths"][0]["kind"],
                                 "before": 16, "after": 12, "floor": 4, "multiple": 1, "flags": []}]


def test_compile_with_codegen_prints_the_onnxruntime_reference(tmp_path, onnx_dir, capsys):
    pytest.importorskip("tvm")
    out = tmp_path / "out"
    code, text, err = run_main(capsys, "compile", onnx_dir / "cnn.onnx", "-o", out, "--codegen", "x86",
                               "--multiple", "1")
    assert code == 0, err
    assert "latency (x86, TVM)" in text and "onnxruntime on the same compact ONNX" in text
    report = json.loads((out / "report.json").read_text())
    assert report["reference"]["runtime"] == "onnxruntime" and report["latency_ratio"] > 0
    # the library was run against the compact ONNX (onnxruntime) before it was reported
    assert report["codegen_error"] < 1e-4 and "compiled (x86) == compact model" in text


@pytest.mark.slow
def test_tune_resumes(tmp_path, onnx_dir):
    pytest.importorskip("tvm")
    db = tmp_path / "db"
    first = run_cli("tune", onnx_dir / "mlp.onnx", "--trials", "2", "--db", db, "--json", timeout=900)
    assert first.returncode == 0, first.stderr
    again = run_cli("tune", onnx_dir / "mlp.onnx", "--trials", "2", "--db", db, "--json", timeout=900)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["trials_saved"] > 0



@pytest.mark.parametrize("name", ["bert_classifier", "vit"])
def test_prune_transformers_onnx(tmp_path, name):
    """ONNX exported from transformers models (small random configs) through the shell."""
    pytest.importorskip("transformers")
    import torch

    from tests.analysis.hf_models import build

    model, inputs = build(name, "eager")

    class Logits(torch.nn.Module):  # one tensor out: what an exported classifier returns
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x).logits

    src, out = tmp_path / f"{name}.onnx", tmp_path / f"{name}.small.onnx"
    torch.onnx.export(Logits(model).eval(), inputs, str(src), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
    r = run_cli("prune", src, "-o", out, "--flops", "0.3", "--criterion", "l2", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)["report"]
    assert report["verify_error"] < 1e-4 and report["flops_removed"] > 0.25
    check_pruned(src, out, inputs[0].numpy())
