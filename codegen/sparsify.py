"""Whole-model block sparsity: swap chosen dense layers of a Relax program for BSR kernels.

The substitution is done on the imported Relax module, not on the PyTorch model. Both
frontends lower a linear layer to ``matmul(x, permute_dims(W))`` (torch) or
``matmul(x, W^T-initializer)`` (ONNX MatMul) and a 1x1 convolution to ``nn.conv2d``, with
the weight a named parameter of ``main`` whose value :class:`RelaxProgram` holds. So one
pattern match serves PyTorch and ONNX inputs, needs no custom torch op (``torch.export``
and the importer would both need to learn it) and sees the exact weight values and the
exact token count (batch x sequence, or batch x H x W) each layer runs at.

A matched layer becomes ``call_tir`` to the hand-scheduled BSR PrimFunc from
:mod:`.sparse` with the BSR arrays as constants (reshapes and, for a convolution, NCHW <->
token-major transposes around it). The PrimFunc is marked scheduled and opaque, so tuning,
default schedules and operator fusion leave it alone; the bias ``add`` the frontend emits
stays a separate (fused) op, so the kernel gets a zero bias.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
import tvm
from tvm import relax

from graphprune.errors import ShapeMismatchError, TuningError

from .compiled import compile_program
from .frontend import RelaxProgram, import_model
from .sparse import BsrWeight, bsr_linear, bsr_prim_func, kernel_form
from .targets import CodegenTarget, resolve_target

#: TVM's OpPatternKind.kOpaque: FuseOps never fuses into or out of such a function.
_OPAQUE = 8


@dataclass(frozen=True)
class DenseLayer:
    """One matmul or 1x1 convolution of ``main`` whose weight is a parameter.

    ``binding`` is the Relax variable the layer's result is bound to, ``param`` the index of
    its weight in :attr:`RelaxProgram.params`, ``transposed`` whether that parameter is stored
    (K x N) rather than (N x K), ``tokens`` the rows the layer multiplies.
    """

    binding: relax.Var
    param: int
    name: str
    kind: Literal["linear", "conv1x1"]
    transposed: bool
    tokens: int

    def weight(self, program: RelaxProgram) -> np.ndarray:
        """The weight as an (out x in) matrix."""
        value = program.params[self.param]
        return np.ascontiguousarray(value.T if self.transposed else value.reshape(value.shape[:2]), "float32")


@dataclass(frozen=True)
class KernelChoice:
    """The chooser's verdict for one layer, with both timings so the decision can be checked."""

    layer: str
    kernel: str
    dense_ms: float
    bsr_ms: float | None
    block_density: float
    form: str | None

    def __str__(self) -> str:
        bsr = "n/a" if self.bsr_ms is None else f"{self.bsr_ms:.4f} ms ({self.form})"
        return (f"{self.layer}: {self.kernel}  dense {self.dense_ms:.4f} ms, bsr {bsr}, "
                f"block density {self.block_density:.2f}")


def choose_linear_kernel(linear: torch.nn.Linear, batch: int, block: tuple[int, int] = (16, 1),
                         target: str | CodegenTarget = "x86", tuning_db: str | None = None, name: str = "linear") -> KernelChoice:
    """Time a layer as BSR and as the dense kernel graphprune would build (tuned records from
    ``tuning_db`` or default schedules); pick BSR only when it is faster."""
    resolved = resolve_target(target)
    weight = linear.weight.detach().cpu().numpy()
    dense = compile_program(import_model(linear, (torch.zeros(batch, weight.shape[1]),)), resolved, tuning_db)
    dense_ms = dense.benchmark()["median_ms"]
    try:
        sparse = bsr_linear(weight, block, batch, linear.bias, resolved)
    except ShapeMismatchError:
        return KernelChoice(name, "dense", dense_ms, None, 1.0, None)
    bsr_ms = sparse.benchmark()
    return KernelChoice(name, "bsr" if bsr_ms < dense_ms else "dense", dense_ms, bsr_ms,
                        sparse.weight.block_density, sparse.form)


def choose_kernels(model: torch.nn.Module, batch: int, block: tuple[int, int] = (16, 1),
                   target: str = "x86", tuning_db: str | None = None) -> list[KernelChoice]:
    """Run :func:`choose_linear_kernel` on every ``nn.Linear`` of ``model`` (by module name)."""
    return [choose_linear_kernel(module, batch, block, target, tuning_db, name)
            for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def _shape(expr: relax.Expr) -> tuple[int, ...] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return tuple(int(d) for d in ty.shape)
    except (TypeError, ValueError):  # symbolic dimensions
        return None


def _is_op(expr: relax.Expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def find_dense_layers(program: RelaxProgram) -> list[DenseLayer]:
    """Every float32 ``matmul`` by a 2-D weight parameter and every plain 1x1 ``conv2d`` (stride 1,
    no padding, one group, NCHW/OIHW) in ``main``'s dataflow blocks."""
    main = program.mod["main"]
    n_inputs = len(program.input_names)
    params = {v.name: i - n_inputs for i, v in enumerate(main.params) if i >= n_inputs}
    bound: dict[str, relax.Expr] = {}
    layers = []
    for block in main.body.blocks:
        for binding in block.bindings:
            if not isinstance(binding, relax.VarBinding):
                continue
            value = binding.value
            bound[binding.var.name] = value
            if _is_op(value, "relax.matmul"):
                x, w = value.args
                transposed = True
                if isinstance(w, relax.Var) and _is_op(bound.get(w.name), "relax.permute_dims"):
                    permute = bound[w.name]
                    axes = permute.attrs.axes
                    if axes is not None and [int(a) for a in axes] != [1, 0]:
                        continue
                    w, transposed = permute.args[0], False
                shape, wshape = _shape(x), _shape(w)
                if not (isinstance(w, relax.Var) and w.name in params and shape and wshape and len(wshape) == 2
                        and len(shape) >= 2 and str(value.ty.dtype) == "float32"):
                    continue
                layers.append(DenseLayer(binding.var, params[w.name], program.param_names[params[w.name]],
                                         "linear", transposed, math.prod(shape[:-1])))
            elif _is_op(value, "relax.nn.conv2d"):
                x, w = value.args
                attrs = value.attrs
                shape, wshape = _shape(x), _shape(w)
                if not (isinstance(w, relax.Var) and w.name in params and shape and wshape
                        and wshape[2:] == (1, 1) and int(attrs.groups) == 1
                        and [int(s) for s in attrs.strides] == [1, 1] and not any(int(p) for p in attrs.padding)
                        and (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) == ("NCHW", "OIHW", "NCHW")
                        and str(value.ty.dtype) == "float32"):
                    continue
                layers.append(DenseLayer(binding.var, params[w.name], program.param_names[params[w.name]],
                                         "conv1x1", False, shape[0] * shape[2] * shape[3]))
    return layers


@relax.expr_functor.mutator
class _SwapToBsr(relax.PyExprMutator):
    """Rebinds each chosen layer's result variable to the BSR computation of the same value."""

    def __init__(self, mod: tvm.IRModule, swaps: list[tuple[DenseLayer, BsrWeight]]) -> None:
        super().__init__(mod)
        self.swaps = swaps

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        swap = next(((layer, bsr) for layer, bsr in self.swaps if layer.binding.same_as(binding.var)), None)
        if swap is None:
            super().visit_var_binding_(binding)
            return
        layer, bsr = swap
        x = self.visit_expr(binding.value.args[0])
        shape = _shape(x)
        n, k = bsr.shape
        emit = self.builder_.emit
        if layer.kind == "conv1x1":
            x = emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
        if len(shape) != 2:
            x = emit(relax.op.reshape(x, (layer.tokens, k)))
        func = bsr_prim_func(bsr, layer.tokens, f"bsr_{layer.name}").with_attr("op_pattern", _OPAQUE)
        gvar = self.builder_.add_func(func, f"bsr_{layer.name}")
        consts = [relax.const(a) for a in (*bsr.kernel_arrays(), np.zeros(n, "float32"))]
        y: relax.Expr = relax.call_tir(gvar, [x, *consts], relax.TensorType((layer.tokens, n), "float32"))
        if layer.kind == "conv1x1":
            y = relax.op.permute_dims(emit(relax.op.reshape(emit(y), (shape[0], shape[2], shape[3], n))),
                                      [0, 3, 1, 2])
        elif len(shape) != 2:
            y = relax.op.reshape(emit(y), (*shape[:-1], n))
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(y)))

    def rewrite(self) -> tvm.IRModule:
        gvar = self.builder_.get().get_global_var("main")
        self.builder_.update_func(gvar, self.visit_expr(self.builder_.get()["main"]))
        return relax.transform.DeadCodeElimination(["main"])(self.builder_.get())


def sparsify(program: RelaxProgram, target: CodegenTarget, mode: bool | str = "auto",
             block: tuple[int, int] = (16, 1), min_block_sparsity: float = 0.5,
             tuning_db: str | None = None) -> tuple[RelaxProgram, list[KernelChoice]]:
    """``program`` with BSR kernels for the dense layers that get them, and one verdict per layer.

    A layer is a candidate when its weight splits into ``block`` blocks of which at least
    ``min_block_sparsity`` are all zero. ``mode="auto"`` times each candidate as BSR and as
    the dense kernel graphprune builds (tuned from ``tuning_db`` when given) at the layer's
    token count and keeps BSR only where it is faster (:func:`choose_linear_kernel`; a 1x1
    convolution is timed as the equivalent linear layer). ``mode=True`` takes BSR for every
    candidate without timing, for targets that cannot run here (an ARM cross build).
    Verdicts of layers that were not candidates say "dense" with no timings (NaN).
    """
    if mode not in (True, "auto"):
        raise ValueError(f"sparse must be False, True or 'auto', got {mode!r}")
    if target.is_gpu or target.kind != "llvm":
        raise TuningError(f"BSR kernels are CPU kernels; {target.name} cannot use them", hint="build with sparse=False")
    if mode == "auto" and not target.runs_here:
        raise TuningError(f"sparse='auto' times kernels on this machine, which cannot run {target.name}",
                          hint="use sparse=True to take BSR for every layer over the sparsity threshold")
    swaps, choices = [], []
    for layer in find_dense_layers(program):
        weight = layer.weight(program)
        n, k = weight.shape
        if n % block[0] or k % block[1]:
            choices.append(KernelChoice(layer.name, "dense", math.nan, None, 1.0, None))
            continue
        bsr = BsrWeight.from_dense(weight, block)
        if 1.0 - bsr.block_density < min_block_sparsity:
            choices.append(KernelChoice(layer.name, "dense", math.nan, None, bsr.block_density, None))
            continue
        if mode == "auto":
            linear = torch.nn.Linear(k, n, bias=False)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(weight))
            choice = choose_linear_kernel(linear, layer.tokens, block, target, tuning_db, layer.name)
        else:
            choice = KernelChoice(layer.name, "bsr", math.nan, None, bsr.block_density,
                                  kernel_form(block, layer.tokens))
        choices.append(choice)
        if choice.kernel == "bsr":
            swaps.append((layer, bsr))
    if not swaps:
        return program, choices
    return replace(program, mod=_SwapToBsr(program.mod, swaps).rewrite()), choices
