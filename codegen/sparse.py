"""Block-sparse (BSR) linear kernels in TIR (which layers get them is :mod:`.sparsify`'s choice).

TVM 0.27 has no sparse operators (the old ``topi.nn.sparse_dense`` is gone), so the kernel
is written here in TVMScript. ``y = x @ W.T (+ b)`` with ``W`` (N x K) stored as BSR blocks of
R x C. The loop nest must vectorise along a dimension the block actually has, so there are
three forms, picked from the block shape and the batch M:

- ``tokens`` (M a multiple of 8): vector over M, reading a transposed copy of ``x``; any block.
- ``rows`` (R >= 4, e.g. 16x1, 4x4): vector over the block's R output rows.
- ``cols`` (R < 4, e.g. 1x16): vector over the block's C inputs, lane sums reduced at the end.

Every kernel is marked ``tirx.is_scheduled`` so tuning and default scheduling leave it alone.
"""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import scipy.sparse
import torch
import tvm
from tvm.script import tirx as T

from graphprune.errors import ShapeMismatchError, TuningError

from .targets import CodegenTarget, resolve_target


@dataclass(frozen=True)
class BsrWeight:
    """A weight (N x K) in block-sparse-row form: ``data[nnzb, R, C]``, ``indices`` (block columns),
    ``indptr`` (per block row)."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    shape: tuple[int, int]
    block: tuple[int, int]

    @property
    def block_density(self) -> float:
        """Fraction of the R x C blocks that are stored."""
        rows, cols = self.shape[0] // self.block[0], self.shape[1] // self.block[1]
        return len(self.indices) / (rows * cols)

    @classmethod
    def from_dense(cls, weight: np.ndarray, block: tuple[int, int]) -> "BsrWeight":
        """Keep every R x C block that has a nonzero; the shape must be a multiple of the block."""
        n, k = weight.shape
        if n % block[0] or k % block[1]:
            raise ShapeMismatchError(f"weight {weight.shape} is not a multiple of block {block}",
                                     hint="choose a block shape that divides both dimensions")
        bsr = scipy.sparse.bsr_matrix(np.asarray(weight, dtype="float32"), blocksize=block)
        bsr.eliminate_zeros()
        keep = np.abs(bsr.data).reshape(-1, block[0] * block[1]).max(axis=1) > 0
        starts = np.concatenate([[0], np.cumsum(keep)])
        return cls(np.ascontiguousarray(bsr.data[keep], dtype="float32"), bsr.indices[keep].astype("int32"),
                   starts[bsr.indptr].astype("int32"), (n, k), tuple(block))

    def kernel_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(data, indices, indptr)`` as the kernel takes them: an empty weight gets one zero pad
        block (a zero-size buffer is not allowed), which ``indptr`` skips."""
        if len(self.indices):
            return self.data, self.indices, self.indptr
        return np.zeros((1, *self.block), "float32"), np.zeros(1, "int32"), self.indptr

    def to_dense(self) -> np.ndarray:
        return scipy.sparse.bsr_matrix((self.data, self.indices, self.indptr), shape=self.shape).toarray()


def kernel_form(block: tuple[int, int], batch: int) -> str:
    """Which loop nest vectorises well for this block shape and batch (see the module docstring)."""
    if batch % 8 == 0:
        return "tokens"
    return "rows" if block[0] >= 4 else "cols"


def _bsr_prim_func(m: int, n: int, k: int, block: tuple[int, int], nnz: int, form: str) -> tvm.tirx.PrimFunc:
    r_, c_ = block
    nb = n // r_
    v_ = 16 if m % 16 == 0 else 8
    attrs = {"global_symbol": "bsr_linear", "tirx.noalias": True, "tirx.is_scheduled": True}

    @T.prim_func
    def rows(x: T.Buffer((m, k), "float32"), data: T.Buffer((nnz, r_, c_), "float32"),
             indices: T.Buffer((nnz,), "int32"), indptr: T.Buffer((nb + 1,), "int32"),
             bias: T.Buffer((n,), "float32"), y: T.Buffer((m, n), "float32")):
        T.func_attr(attrs)
        for i in T.parallel(nb):
            acc = T.decl_buffer((r_,), "float32", scope="local")
            for t in range(m):
                for r in T.vectorized(r_):
                    acc[r] = bias[i * r_ + r]
                for j in range(indptr[i], indptr[i + 1]):
                    for c in range(c_):
                        for r in T.vectorized(r_):
                            acc[r] = acc[r] + data[j, r, c] * x[t, indices[j] * c_ + c]
                for r in T.vectorized(r_):
                    y[t, i * r_ + r] = acc[r]

    @T.prim_func
    def cols(x: T.Buffer((m, k), "float32"), data: T.Buffer((nnz, r_, c_), "float32"),
             indices: T.Buffer((nnz,), "int32"), indptr: T.Buffer((nb + 1,), "int32"),
             bias: T.Buffer((n,), "float32"), y: T.Buffer((m, n), "float32")):
        T.func_attr(attrs)
        for i in T.parallel(nb):
            acc = T.decl_buffer((r_, c_), "float32", scope="local")
            for t in range(m):
                for r in range(r_):
                    for c in T.vectorized(c_):
                        acc[r, c] = T.float32(0)
                for j in range(indptr[i], indptr[i + 1]):
                    for r in range(r_):
                        for c in T.vectorized(c_):
                            acc[r, c] = acc[r, c] + data[j, r, c] * x[t, indices[j] * c_ + c]
                for r in range(r_):
                    y[t, i * r_ + r] = bias[i * r_ + r]
                    for c in range(c_):
                        y[t, i * r_ + r] = y[t, i * r_ + r] + acc[r, c]

    @T.prim_func
    def tokens(x: T.Buffer((m, k), "float32"), data: T.Buffer((nnz, r_, c_), "float32"),
               indices: T.Buffer((nnz,), "int32"), indptr: T.Buffer((nb + 1,), "int32"),
               bias: T.Buffer((n,), "float32"), y: T.Buffer((m, n), "float32")):
        T.func_attr(attrs)
        xt = T.decl_buffer((k, m), "float32")
        for kk in T.parallel(k):
            for t in range(m):
                xt[kk, t] = x[t, kk]
        for i in T.parallel(nb):
            acc = T.decl_buffer((r_, v_), "float32", scope="local")
            for to in range(m // v_):
                for r in range(r_):
                    for tv in T.vectorized(v_):
                        acc[r, tv] = bias[i * r_ + r]
                for j in range(indptr[i], indptr[i + 1]):
                    for r in range(r_):
                        for c in range(c_):
                            for tv in T.vectorized(v_):
                                acc[r, tv] = acc[r, tv] + data[j, r, c] * xt[indices[j] * c_ + c, to * v_ + tv]
                for r in range(r_):
                    for tv in range(v_):
                        y[to * v_ + tv, i * r_ + r] = acc[r, tv]

    return {"rows": rows, "cols": cols, "tokens": tokens}[form]


def bsr_prim_func(weight: BsrWeight, batch: int, name: str = "bsr_linear") -> tvm.tirx.PrimFunc:
    """The kernel for ``weight`` at ``batch`` rows, in the form :func:`kernel_form` picks, named
    ``name``. Its arguments are ``x``, :meth:`BsrWeight.kernel_arrays`, a bias and the output."""
    nnz = len(weight.kernel_arrays()[1])
    func = _bsr_prim_func(batch, weight.shape[0], weight.shape[1], weight.block, nnz,
                          kernel_form(weight.block, batch))
    return func.with_attr("global_symbol", name)


class BsrLinear:
    """A compiled BSR linear layer for one batch size: ``layer(x)`` returns ``x @ W.T + b``."""

    def __init__(self, weight: BsrWeight, bias: np.ndarray | None, batch: int, target: CodegenTarget) -> None:
        self.weight, self.batch, self.target = weight, batch, target
        self.form = kernel_form(weight.block, batch)
        self.bias = np.zeros(weight.shape[0], "float32") if bias is None else np.asarray(bias, "float32")
        data, indices, indptr = weight.kernel_arrays()
        func = bsr_prim_func(weight, batch)
        self.library = tvm.compile(tvm.IRModule({"bsr_linear": func}), target=target.target).jit()
        device = target.device()
        self._constants = [tvm.runtime.tensor(a, device) for a in (data, indices, indptr, self.bias)]

    def _args(self, x: np.ndarray) -> list[tvm.runtime.Tensor]:
        if x.shape != (self.batch, self.weight.shape[1]):
            raise ShapeMismatchError(f"BSR kernel compiled for input {(self.batch, self.weight.shape[1])}, "
                                     f"got {x.shape}", op="bsr_linear")
        device = self.target.device()
        y = tvm.runtime.empty((self.batch, self.weight.shape[0]), "float32", device)
        return [tvm.runtime.tensor(np.ascontiguousarray(x, "float32"), device), *self._constants, y]

    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        args = self._args(_numpy(x))
        self.library["bsr_linear"](*args)
        return args[-1].numpy()

    def benchmark(self, repeat: int = 7, min_repeat_ms: int = 20) -> float:
        """Median milliseconds per call."""
        x = np.random.default_rng(0).standard_normal((self.batch, self.weight.shape[1])).astype("float32")
        timer = self.library.time_evaluator("bsr_linear", self.target.device(), repeat=repeat,
                                            min_repeat_ms=min_repeat_ms)
        return float(np.median(timer(*self._args(x)).results) * 1e3)

    def __repr__(self) -> str:
        return (f"BsrLinear({self.weight.shape[0]}x{self.weight.shape[1]}, block={self.weight.block}, "
                f"density={self.weight.block_density:.2f}, batch={self.batch}, form={self.form})")


def bsr_linear(weight: np.ndarray | torch.Tensor, block: tuple[int, int] = (16, 1), batch: int = 1,
               bias: np.ndarray | torch.Tensor | None = None, target: str | CodegenTarget = "x86") -> BsrLinear:
    """Compile ``x @ weight.T + bias`` as a BSR kernel for inputs of shape (batch, K).

    >>> layer = bsr_linear(w, block=(16, 1), batch=128)
    >>> y = layer(x)                 # numpy in, numpy out
    """
    resolved = resolve_target(target)
    if not resolved.runs_here or resolved.is_gpu:
        raise TuningError("BSR kernels are built for the host CPU only", hint='use target="x86" on this machine')
    return BsrLinear(BsrWeight.from_dense(_numpy(weight), block), None if bias is None else _numpy(bias),
                     batch, resolved)


def _numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
