"""Check aarch64 builds for correctness on an x86 machine: cross-compiled driver under qemu.

The driver (``native/vm_driver.cc``) is linked against the aarch64 TVM runtime taken from
PyPI's aarch64 wheels (``scripts/install_arm_toolchain.sh`` puts it in ``.whl/aarch64/lib``,
or set ``GRAPHPRUNE_AARCH64_RUNTIME``). Emulated timing is meaningless: benchmark and tune on a
real board through TVM RPC.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from graphprune.errors import TuningError

CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
SYSROOT = "/usr/aarch64-linux-gnu"
_DRIVER_SOURCE = Path(__file__).with_name("native") / "vm_driver.cc"


def runtime_dir() -> Path:
    """Folder holding the aarch64 ``libtvm_runtime.so`` and ``libtvm_ffi.so``."""
    default = Path(__file__).resolve().parent.parent / ".whl" / "aarch64" / "lib"
    return Path(os.environ.get("GRAPHPRUNE_AARCH64_RUNTIME", default))


def toolchain_missing() -> str | None:
    """Why aarch64 checks cannot run here, or None when everything is installed."""
    missing = [tool for tool in (CXX, QEMU) if shutil.which(tool) is None]
    missing += [f"{runtime_dir()}/{lib}" for lib in ("libtvm_runtime.so", "libtvm_ffi.so")
                if not (runtime_dir() / lib).exists()]
    if missing:
        return f"aarch64 toolchain incomplete (missing {', '.join(missing)}); run scripts/install_arm_toolchain.sh"
    return None


def _include_dirs() -> list[str]:
    import tvm
    import tvm_ffi

    return [str(Path(tvm_ffi.__file__).parent / "include"), str(Path(tvm.__file__).parent / "include")]


def build_driver() -> Path:
    """Cross-compile the driver once (rebuilt when its source is newer)."""
    reason = toolchain_missing()
    if reason:
        raise TuningError(reason)
    driver = runtime_dir() / "vm_driver"
    if driver.exists() and driver.stat().st_mtime >= _DRIVER_SOURCE.stat().st_mtime:
        return driver
    tmp = driver.with_suffix(f".tmp{os.getpid()}")
    command = [CXX, "-std=c++17", "-O2", str(_DRIVER_SOURCE), "-o", str(tmp),
               *(f"-I{d}" for d in _include_dirs()), f"-L{runtime_dir()}",
               "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", f"-Wl,-rpath,{runtime_dir()}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise TuningError(f"cannot build the aarch64 driver:\n{result.stderr[-2000:]}")
    os.replace(tmp, driver)
    return driver


def run_under_qemu(library: str | os.PathLike, inputs: Sequence[np.ndarray], timeout: float = 600) -> list[np.ndarray]:
    """Run ``main`` of an aarch64 library exported by :meth:`CompiledModel.export` under qemu
    (float32 or int64 inputs, float32 outputs)."""
    driver = build_driver()
    env = dict(os.environ, QEMU_LD_PREFIX=SYSROOT, LD_LIBRARY_PATH=str(runtime_dir()))
    with tempfile.TemporaryDirectory(prefix="graphprune-qemu-") as tmp:
        specs = []
        for i, array in enumerate(inputs):
            path = Path(tmp) / f"in{i}.bin"
            integer = np.issubdtype(np.asarray(array).dtype, np.integer)
            np.ascontiguousarray(array, dtype="int64" if integer else "float32").tofile(path)
            specs.append(f"{path}:{','.join(str(d) for d in np.shape(array))}" + (":int64" if integer else ""))
        prefix = str(Path(tmp) / "out")
        result = subprocess.run([QEMU, str(driver), str(library), prefix, *specs],
                                capture_output=True, text=True, env=env, timeout=timeout)
        if result.returncode:
            raise TuningError(f"aarch64 run under qemu failed ({result.returncode}):\n{result.stderr[-2000:]}")
        outputs = []
        for line in result.stdout.splitlines():
            if line.startswith("output "):
                _, index, *dims = line.split()
                shape = tuple(int(d) for d in dims[0].split(",")) if dims else ()
                outputs.append(np.fromfile(f"{prefix}{index}.bin", dtype="float32").reshape(shape))
        return outputs
