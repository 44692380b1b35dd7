#!/usr/bin/env bash
# GPU check for graphprune.codegen, prepared for a lent GPU machine (a few minutes):
# build a small CNN and a transformer block for the local GPU, compare with torch, time them,
# tune the CNN briefly on the GPU and check the tuned build applies its records and is correct.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (OUT_DIR defaults to $OUT, else runs/gpu_check)
# Needs the project's environment (pip install -e ".[tvm,test]") and a CUDA driver.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
export TVM_CUDA_COMPILE_MODE=${TVM_CUDA_COMPILE_MODE:-nvcc}
timeout 540 python - "$out" <<'PY'
import json, sys, time
import torch
import graphprune.codegen as codegen
from tests.codegen.models import SmallCNN, TinyTransformerBlock, rel_err, seeded

out = sys.argv[1]
target = codegen.resolve_target("cuda")
print(target, target.target, flush=True)
assert target.runs_here, "no CUDA device visible to TVM"
results = {"target": str(target.target)}
for name, model, x in [("cnn", seeded(SmallCNN()), torch.randn(1, 3, 64, 64)),
                       ("transformer", seeded(TinyTransformerBlock()), torch.randn(4, 32, 32))]:
    start = time.perf_counter()
    compiled = codegen.build(model, (x,), target)
    err = rel_err(compiled.run(x), model(x))
    results[name] = {"build_s": time.perf_counter() - start, "rel_err": err,
                     "default_ms": compiled.benchmark()["median_ms"]}
    print(name, results[name], flush=True)
    assert err < 1e-3, f"{name}: GPU output differs from torch ({err:.2e})"

model, x = seeded(SmallCNN()), torch.randn(1, 3, 64, 64)
report = codegen.tune(model, (x,), target, f"{out}/tuning-cnn-cuda", trials_per_task=8)
print(report.summary(), flush=True)
tuned = codegen.build(model, (x,), target, tuning_db=report.work_dir)
results["cnn_tuned"] = {"tuned_functions": tuned.tuned_functions, "total": tuned.total_functions,
                        "rel_err": rel_err(tuned.run(x), model(x)), "tuned_ms": tuned.benchmark()["median_ms"],
                        "tuning_s": report.seconds, "trials": report.trials_run}
print("cnn tuned", results["cnn_tuned"], flush=True)
assert not report.temporary and tuned.tuned_functions > 0 and results["cnn_tuned"]["rel_err"] < 1e-3
with open(f"{out}/gpu_check.json", "w") as f:
    json.dump(results, f, indent=1)
print("GPU CHECK PASSED")
PY
