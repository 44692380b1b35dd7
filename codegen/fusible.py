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
- **A batched matmul by a 2-d weight broadcast over the batch -> one 2-d matmul of the rows
  between reshapes, and the elementwise ops after a 2-d matmul's reshape (bias and residual
  adds, activations) moved onto its rows.** torch decomposes ``linear`` to ``view``, ``addmm``,
  ``view`` for a contiguous input but to a batched matmul by the weight broadcast over the
  batch for a strided one, so a model and its pruned form could reach TVM with different
  matmuls: a digits ViT whose layer norms became graphprune's width-corrected form
  (elementwise ops that keep the strides of a transposed patch embedding) ran its q/k/v
  projections as batched matmuls reading 32 folded copies of each weight, functions its
  dense form never tuned: 0.22 ms each, 0.04 ms as 2-d matmuls with the same database, and
  the compact model 0.94 of the dense model's time instead of 0.54.  On the ``addmm``
  path the residual add came after the ``view`` and ran as a kernel of its own.  Relax has
  no strides, so the reshapes are free views, and the ops moved onto the rows fuse into the
  matmul's kernel.
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


def _static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    dims = ty.shape.values
    return tuple(int(d) for d in dims) if all(isinstance(d, tirx.IntImm) for d in dims) else None


def _flat_matmul(bb: relax.BlockBuilder, call: relax.Call, weight: relax.Expr) -> relax.Expr | None:
    """``matmul(x, w)`` with ``x`` of 3 or more static dims and ``weight`` the 2-d matrix ``w``
    broadcasts over x's batch -> the 2-d matmul of x's rows by ``weight``, reshaped back."""
    x = call.args[0]
    xs, ws, out = _static_shape(x), _static_shape(weight), _static_shape(call)
    if xs is None or ws is None or out is None or len(xs) <= 2 or len(ws) != 2 or xs[-1] != ws[0]:
        return None
    flat = bb.emit(relax.op.matmul(bb.emit(relax.op.reshape(x, (math.prod(xs[:-1]), xs[-1]))), weight,
                                   out_dtype=call.attrs.out_dtype))
    return relax.op.reshape(flat, out)


def _every_function(mutator: relax.PyExprMutator) -> tvm.IRModule:
    """``mutator.mod`` with each of its Relax functions visited by ``mutator``."""
    for gv, func in mutator.mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


#: elementwise ops moved onto a 2-d matmul's rows
_UNARY_ELEMENTWISE = {"relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.relu", "relax.nn.silu", "relax.sigmoid",
                      "relax.tanh", "relax.erf", "relax.exp", "relax.astype"}
_BINARY_ELEMENTWISE = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum",
                       "relax.minimum", "relax.power"}


@relax.expr_functor.mutator
class _FlatMatmuls(relax.PyExprMutator):
    """Batched matmuls by a broadcast 2-d weight as 2-d matmuls, and the elementwise ops after
    a 2-d matmul moved onto its rows (see the module docstring). Runs before constants are
    folded: torch's batched form broadcasts the weight over the batch, and folded, the
    broadcast is a constant of batch copies (a 32-image batch read 32 copies of each q/k/v
    weight) that no longer says it is one matrix."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod = mod

    def _matrix(self, w: relax.Expr) -> relax.Expr:
        """The 2-d matrix ``w`` broadcasts (``broadcast_to(m, (B, K, N))`` of an (K, N) or (1, K, N) m), else ``w``."""
        bound = self.lookup_binding(w) if isinstance(w, relax.Var) else None
        if isinstance(bound, relax.Call) and getattr(bound.op, "name", None) == "relax.broadcast_to":
            source, shape = bound.args[0], _static_shape(bound.args[0])
            if shape is not None and len(shape) >= 2 and math.prod(shape[:-2]) == 1:
                return source if len(shape) == 2 else self.builder_.emit(relax.op.reshape(source, shape[-2:]))
        return w

    def _flat_source(self, expr: relax.Expr) -> relax.Var | None:
        """The 2-d value ``expr`` is a reshape of, where that value is a 2-d matmul's result (or
        elementwise ops' on one): torch's ``addmm`` rows, or a matmul flattened here."""
        if not isinstance(expr, relax.Var):
            return None
        bound = self.lookup_binding(expr)
        if not (isinstance(bound, relax.Call) and getattr(bound.op, "name", None) == "relax.reshape"):
            return None
        source = bound.args[0]
        return source if self._matmul_rows(source) else None

    def _matmul_rows(self, value: relax.Expr, depth: int = 8) -> bool:
        """Whether ``value`` is a 2-d matmul's result, or elementwise ops' on one."""
        shape = _static_shape(value)
        bound = self.lookup_binding(value) if isinstance(value, relax.Var) else None
        if shape is None or len(shape) != 2 or not isinstance(bound, relax.Call) or depth == 0:
            return False
        op = getattr(bound.op, "name", None)
        if op == "relax.matmul":
            return True
        return (op in _UNARY_ELEMENTWISE or op in _BINARY_ELEMENTWISE) and any(
            self._matmul_rows(a, depth - 1) for a in bound.args if _static_shape(a) == shape)

    def _moved_onto_flat(self, call: relax.Call, op: str) -> relax.Expr | None:
        """An elementwise op of a 2-d matmul's reshaped result (and a per-column, scalar or
        same-shape operand) as the op on the 2-d rows, reshaped after: it then fuses into the
        matmul's kernel."""
        out = _static_shape(call)
        if out is None:
            return None
        if op in _UNARY_ELEMENTWISE:
            flat = self._flat_source(call.args[0])
            if flat is None:
                return None
            moved = self.builder_.emit(relax.Call(call.op, [flat, *call.args[1:]], call.attrs, call.ty_args))
        else:
            a, b = call.args
            flat, other, first = self._flat_source(a), b, True
            if flat is None:
                flat, other, first = self._flat_source(b), a, False
            if flat is None:
                return None
            rows, cols = _static_shape(flat)
            theirs = _static_shape(other)
            if theirs is None or math.prod(out) != rows * cols:
                return None
            if theirs == out:  # a residual: the same rows
                other = self.builder_.emit(relax.op.reshape(other, (rows, cols)))
            elif len(theirs) > 1 and math.prod(theirs[:-1]) == 1 and theirs[-1] in (1, cols):  # per column
                other = self.builder_.emit(relax.op.reshape(other, (theirs[-1],)))
            elif len(theirs) > 1 or (theirs and theirs[0] not in (1, cols)):
                return None
            moved = self.builder_.emit(relax.Call(call.op, [flat, other] if first else [other, flat],
                                                  call.attrs, call.ty_args))
        return relax.op.reshape(moved, out)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        op = getattr(call.op, "name", None)
        replaced = None
        if op == "relax.matmul":
            matrix = self._matrix(call.args[1])
            if not matrix.same_as(call.args[1]):  # a weight broadcast over the batch: batch copies once folded
                replaced = _flat_matmul(self.builder_, call, matrix)
        elif op in _UNARY_ELEMENTWISE or op in _BINARY_ELEMENTWISE:
            replaced = self._moved_onto_flat(call, op)
        elif op == "relax.broadcast_to" and _static_shape(call.args[0]) == _static_shape(call) is not None:
            replaced = call.args[0]  # to its own shape: a copy kernel before a matmul that reads it
        return call if replaced is None else replaced

    def rewrite(self) -> tvm.IRModule:
        return _every_function(self)


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
        return _every_function(self)


@tvm.transform.module_pass(opt_level=0, name="FusibleForms")
def fusible_forms(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """``relax.clip(x, lo, hi)`` -> ``minimum(maximum(x, lo), hi)`` (infinite bounds dropped), the
    ONNX frontend's TOPI maximum/minimum calls against a scalar -> the Relax ops, ``take`` of a
    constant index -> a slice, a concat's empty operands dropped. Constants are folded first:
    the ONNX frontend computes Gather's index (negative-index wrap) and Clip's bounds (NaN
    check) in the graph. PrimFuncs nothing calls any more go with dead-code elimination."""
    return relax.transform.DeadCodeElimination()(_Rewriter(relax.transform.FoldConstant()(mod)).rewrite())


@tvm.transform.module_pass(opt_level=0, name="FlatMatmuls")
def flat_matmuls(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Batched matmuls by a 2-d weight broadcast over the batch -> 2-d matmuls between reshapes,
    and elementwise ops after a 2-d matmul's reshape moved onto its rows. To run before
    anything folds constants (see :class:`_FlatMatmuls`). Then reshapes that undo each other
    are dropped (TVM's ``RemoveRedundantReshape``), with broadcasts to a tensor's own shape:
    torch's strided ``linear`` leaves ``view(view(y, (B, T, C)), (B * T, C))`` between a matmul
    and the residual add after it, which kept that add a kernel of its own (a copy of the
    rows each, slowest at widths off the vector lanes: 0.11 ms of a digits ViT's 2.3 at 56
    channels), and ``expand`` of a layer norm's output to its own shape before each of q, k
    and v, a copy each."""
    flat = relax.transform.RemoveRedundantReshape()(_FlatMatmuls(mod).rewrite())
    return relax.transform.DeadCodeElimination()(flat)
