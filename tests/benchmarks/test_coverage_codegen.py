"""The coverage table's codegen column: its cells, and what its totals and failures say."""
from __future__ import annotations

from tests.helpers import load_benchmark


def test_codegen_totals_count_fallbacks_and_report_failures(capsys) -> None:
    cov = load_benchmark("coverage")
    ok = {"status": "ok", "seconds": 20.0, "flops_removed": 0.3, "codegen_error": 4e-7, "latency_ratio": 2.0,
          "codegen_from": None}
    cells = {("resnet18", "codegen-x86"): {"model": "resnet18", "tool": "codegen-x86", **ok},
             ("resnet50", "codegen-x86"): {"model": "resnet50", "tool": "codegen-x86", **ok, "latency_ratio": 4.0,
                                          "codegen_from": "the compact ONNX (TVM's torch importer: index_tensor)"},
             ("vgg11", "codegen-x86"): {"model": "vgg11", "tool": "codegen-x86", "status": "fail",
                                       "reason": "TuningError: TVM failed to compile"}}
    cov.print_table(cells, ["codegen-x86"])
    cov.print_totals(cells, ["codegen-x86"], ["resnet18", "resnet50", "vgg11"])
    out = capsys.readouterr().out
    assert "codegen-x86      cells 3/3, analysed 2 (built, and matching" in out
    assert "built from the compact ONNX 1, untuned TVM / onnxruntime median 3.00" in out
    assert "vgg11                  codegen-x86      TuningError: TVM failed to compile" in out
    row = next(line for line in out.splitlines() if line.startswith("resnet50"))
    assert row.split("|")[-1].split() == ["20", "4e-07", "4.00"]
