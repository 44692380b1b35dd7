#!/usr/bin/env bash
# Regenerate constraints.txt as a newcomer's machine would resolve it today: a fresh clone in a new
# virtual environment, the README's install commands without constraints, then pip freeze.
# Review the diff (a new pytest, transformers or onnxruntime can change what the tests see), run the
# README's two commands with the new file, and commit it.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/src"
python3.11 -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
cd "$work/src"
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -e ".[tvm,test,bench]"
{
  sed -n '1,/^[^#]/{/^#/p}' "$repo/constraints.txt"
  python -m pip freeze --exclude-editable
} > "$work/constraints.txt"
mv "$work/constraints.txt" "$repo/constraints.txt"
echo "constraints.txt: $(grep -vc '^#' "$repo/constraints.txt") pins"
