"""Relax rewrites into ops that layout conversion and fusion can see through. Each is exact.

- **Clip (ReLU6, Hardtanh, clamp) -> ``maximum``/``minimum`` against scalars.** TVM 0.27's
  ``ConvertLayout`` knows no layout rule for ``relax.clip`` (torch.export's ``hardtanh``/
  ``clamp``), and TVM's ONNX frontend turns ``Clip`` into opaque calls of TOPI's maximum/
  minimum PrimFuncs (``call_tir``) it cannot look into either. Either way it transposed NHWC
  back to NCHW before every clip and forward after it: MobileNetV2 had 20 transpose kernels
  and no clip fused into its convolution. Relax's ``maximum``/``minimum`` are broadcast ops,
  which layout conversion passes through and ``FuseOps`` fuses into the convolution's
  epilogue; they legalise to the same TOPI functions.
- **``take`` of a constant scalar index -> ``strided_slice`` + ``squeeze``.** ``take`` reads
  through an index tensor, so ``FuseOps`` keeps it a kernel of its own; attention's
  ``q, k, v = qkv[0], qkv[1], qkv[2]`` (ONNX ``Gather``) cost three extra kernels per layer
  in a small ViT. A slice is injective and fuses into the reshapes around it.
- **Empty operands dropped from ``concat``.** timm's ViTs with no prefix tokens rotate
  ``cat([q[:, :, :0], rope(q[:, :, 0:])])``: TVM 0.27 cannot build the empty slice (it
  vectorises a loop of extent 0 and fails), and a concat without it is the same tensor.
"""
from __future__ import annotations

import math
from typing import Sequence

import tvm
from tvm import relax, tirx
from tvm.s_tir import Schedule

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
_BINARY = {tirx.Max: relax.op.maximum, tirx.Min: relax.op.minimum}


def _clip_as_bounds(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """``relax.clip(x, lo, hi)`` -> ``minimum(maximum(x, lo), hi)``, infinite bounds dropped.

    The last op is returned unbound, so the clip's own variable binds it: a variable-to-variable
    binding would look layout-unaware to ``ConvertLayout``.
    """
    x = call.args[0]
    out: relax.Expr | None = None
    for op, bound in ((relax.op.maximum, call.args[1]), (relax.op.minimum, call.args[2])):
        value = float(getattr(bound.value, "value", bound.value))  # PrimValue of a FloatImm or a float
        if math.isfinite(value):
            out = op(x if out is None else bb.emit(out), relax.const(value, str(x.ty.dtype)))
    return x if out is None else out


def _same_indices(p: Sequence[tirx.PrimExpr], q: Sequence[tirx.PrimExpr]) -> bool:
    return len(p) == len(q) and all(i.same_as(j) for i, j in zip(p, q))


def _scalar_bound_op(func: tirx.PrimFunc, call: relax.Call) -> relax.Expr | None:
    """The Relax op a ``call_tir`` of ``func`` computes, if ``func`` is one elementwise
    ``out[i] = max(x[i], bound[()])`` (or ``min``) over x's whole shape, as TOPI writes it:
    checked on the PrimFunc's single block, not trusted from its name."""
    x, bound = call.args[1].fields
    x_ty, bound_ty, out_ty = x.ty, bound.ty, call.ty
    if not all(isinstance(t, relax.TensorType) and t.shape is not None for t in (x_ty, bound_ty, out_ty)):
        return None
    if (bound_ty.ndim != 0 or x_ty.dtype != bound_ty.dtype or x_ty.dtype != out_ty.dtype
            or x_ty.ndim != out_ty.ndim or not all(isinstance(a, tirx.IntImm) and isinstance(b, tirx.IntImm)
                                                   and int(a) == int(b) for a, b in zip(x_ty.shape, out_ty.shape))):
        return None
    sch = Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    store = sch.get(blocks[0]).body if len(blocks) == 1 else None
    if not isinstance(store, tirx.BufferStore) or type(store.value) not in _BINARY:
        return None
    a, b = store.value.a, store.value.b
    if not (hasattr(a, "indices") and hasattr(b, "indices") and _same_indices(a.indices, store.indices)
            and len(b.indices) == 0):
        return None
    return _BINARY[type(store.value)](x, bound)


def _constant_take_as_slice(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr | None:
    """``take(x, k, axis)`` with a 0-d integer constant k inside x's static extent -> the slice."""
    x, index = call.args
    x_ty = x.ty
    if not (isinstance(index, tvm.ir.expr.GenericConst) and index.ty.ndim == 0
            and str(index.ty.dtype).startswith("int") and isinstance(x_ty, relax.TensorType) and x_ty.shape is not None):
        return None
    axis = int(call.attrs.axis) % x_ty.ndim
    extent, k = x_ty.shape[axis], int(index.value.numpy())
    if not isinstance(extent, tirx.IntImm) or not -int(extent) <= k < int(extent):
        return None
    k %= int(extent)
    return relax.op.squeeze(bb.emit(relax.op.strided_slice(x, axes=[axis], begin=[k], end=[k + 1])), axis=[axis])


def _concat_without_empty(call: relax.Call) -> relax.Expr | None:
    """``concat`` of the operands that are not empty along its axis (statically), if any is."""
    operands = call.args[0]
    if not isinstance(operands, relax.Tuple):
        return None
    axis = int(call.attrs.axis) if call.attrs.axis is not None else 0

    def empty(t: relax.Expr) -> bool:
        ty = t.ty
        if not isinstance(ty, relax.TensorType) or ty.shape is None:
            return False
        extent = ty.shape[axis % ty.ndim]
        return isinstance(extent, tirx.IntImm) and int(extent) == 0

    kept = [t for t in operands.fields if not empty(t)]
    if not kept or len(kept) == len(operands.fields):
        return None
    return relax.op.concat(kept, axis=axis)


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod = mod

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        op = getattr(call.op, "name", None)
        replaced = None
        if op == "relax.clip":
            replaced = _clip_as_bounds(self.builder_, call)
        elif op == "relax.take":
            replaced = _constant_take_as_slice(self.builder_, call)
        elif op == "relax.concat":
            replaced = _concat_without_empty(call)
        elif call.op.same_as(_CALL_TIR) and len(call.args[1].fields) == 2:
            callee = self.mod[call.args[0]]
            if isinstance(callee, tirx.PrimFunc):
                replaced = _scalar_bound_op(callee, call)
        return call if replaced is None else replaced

    def rewrite(self) -> tvm.IRModule:
        for gv, func in self.mod.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()


@tvm.transform.module_pass(opt_level=0, name="FusibleForms")
def fusible_forms(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """``relax.clip(x, lo, hi)`` -> ``minimum(maximum(x, lo), hi)`` (infinite bounds dropped), the
    ONNX frontend's TOPI maximum/minimum calls against a scalar -> the Relax ops, ``take`` of a
    constant index -> a slice, a concat's empty operands dropped. Constants are folded first:
    the ONNX frontend computes Gather's index (negative-index wrap) and Clip's bounds (NaN
    check) in the graph. PrimFuncs nothing calls any more go with dead-code elimination."""
    return relax.transform.DeadCodeElimination()(_Rewriter(relax.transform.FoldConstant()(mod)).rewrite())
