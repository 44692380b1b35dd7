#!/usr/bin/env bash
# ONNX in, ONNX out from the shell: export resnet18, look at its groups, prune it to half
# its MACs, and (when TVM is installed) compile the result for this CPU.
#
#   bash examples/onnx_cli.sh [work-folder]      (default: runs/onnx_cli)
#
# Every command exits non-zero on failure (3 bad input, 4 target cannot be met,
# 5 codegen, 6 compact model failed its check, 7 cannot write); see `graphprune --help`.
set -euo pipefail

work="${1:-runs/onnx_cli}"
mkdir -p "$work"
gp="python -m graphprune"   # the same as the `graphprune` script that pip installs

# 1. a model to prune: torchvision's resnet18 (random weights, 1x3x64x64), exported to ONNX
python - "$work/resnet18.onnx" <<'PY'
import sys, torch, torchvision, graphprune as gp
torch.manual_seed(0)
gp.export_onnx(torchvision.models.resnet18().eval(), (torch.randn(1, 3, 64, 64),), sys.argv[1])
PY

# 2. what can be pruned: groups, barriers, params and MACs; the graph as an HTML page
$gp inspect "$work/resnet18.onnx" --html "$work/resnet18.html"

# 3. prune: ONNX in, ONNX out, checked with onnxruntime against the zeroed input model
$gp prune "$work/resnet18.onnx" -o "$work/resnet18.small.onnx" --flops 0.5 --criterion obspa \
    --report "$work/report"

# 4. machine-readable: the same run as JSON (here: just the achieved reductions)
$gp prune "$work/resnet18.onnx" -o "$work/resnet18.small.onnx" --flops 0.5 --json -q |
    python -c 'import json, sys; r = json.load(sys.stdin)["report"]; print({k: round(r[k], 3) for k in ("params_removed", "flops_removed")})'

# 5. compile the compact model with TVM for this CPU (skipped without TVM)
if python -c 'import tvm' 2>/dev/null; then
    $gp compile "$work/resnet18.onnx" --flops 0.5 --codegen x86 -o "$work/compiled"
else
    echo "TVM is not installed: skipping compile (python -m pip install -e '.[tvm]')"
fi
