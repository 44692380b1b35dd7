#!/usr/bin/env bash
# Installs what the aarch64 codegen tests need: a cross compiler, qemu user-mode emulation
# and the aarch64 TVM runtime libraries (taken from PyPI's aarch64 wheels, never installed
# into the host Python). Idempotent; CI calls it before pytest. Without it those tests skip.
#
#   scripts/install_arm_toolchain.sh [DEST]   (DEST defaults to .whl/aarch64 in the repo root)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$repo/.whl/aarch64}
tvm_version=0.27.0.post1
ffi_version=0.1.14.post1   # same pin as pyproject.toml: newer ffi breaks tvm.ir.save_json

if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user
fi

mkdir -p "$dest"
if [ ! -f "$dest/lib/libtvm_runtime.so" ] || [ ! -f "$dest/lib/libtvm_ffi.so" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    # apache-tvm's aarch64 wheel is tagged manylinux_2_28 only: manylinux2014 alone finds nothing.
    python -m pip download --quiet --no-deps --only-binary=:all: \
        --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
        --python-version 3.11 --dest "$tmp" \
        "apache-tvm==$tvm_version" "apache-tvm-ffi==$ffi_version"
    mkdir -p "$tmp/x" "$dest/lib"
    for whl in "$tmp"/*.whl; do python -m zipfile -e "$whl" "$tmp/x"; done
    # Runtime libraries for the emulated driver; headers come from the host wheels.
    find "$tmp/x" -name 'libtvm_runtime.so' -exec cp {} "$dest/lib/" \;
    find "$tmp/x" -name 'libtvm_ffi.so' -exec cp {} "$dest/lib/" \;
fi
ls "$dest/lib"
