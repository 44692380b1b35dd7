"""graphprune's width-corrected layer norm compiled as one kernel instead of five.

Where pruning removes hidden columns that a LayerNorm normalises, the compact model keeps
the statistics over the original width N (``graphprune.ops.normalization``:
mean = Σx/N, var = (Σ(x-mean)² + (N-N')·mean²)/N). No framework op says that, so it
reaches TVM as elementwise ops around two sums, and ``FuseOps`` cannot join a reduction
to a later one: every such norm became five kernels (a small ViT pruned to half its
FLOPs: 65 kernel calls for 13 norms, about an eighth of its run time). This pass finds the
sequence the emitters write (``LAYER_NORM_STEPS``, defined with them) in the Relax
graph, from the ONNX frontend (``Reciprocal(Sqrt)``) or torch.export (``rsqrt``), and
replaces it with one TE function; the affine scale and shift after it fuse
into that kernel as usual.

Every other float32 layer norm over the last axis becomes the same function with none
missing: the dense model's norms are then the same kernel as its pruned forms', so a tuned
dense schedule carries over to them (:mod:`.transfer` matches functions by structure).
Otherwise a pruned form's norms had no donor but each other: their first record came from
one blind trial, and a digits ViT's norms ran 49-98 us at 40-72 channels against 12 us
tuned at 96 (a compact model with 72 hidden channels took 47% of the dense time, with 64,
whose norms happened to draw a good sample, 36%).
"""
from __future__ import annotations

import tvm
from tvm import relax, te, tirx
from tvm.relax.dpl import is_op, wildcard

from graphprune.ops.normalization import LAYER_NORM_STEPS


def _pattern() -> tuple[relax.dpl.DFPattern, dict[str, relax.dpl.DFPattern | list[relax.dpl.DFPattern]]]:
    """The Relax pattern of :data:`LAYER_NORM_STEPS` (the sequence graphprune's emitters
    write), and its parts by value name; the numbers ``n``, ``missing`` and ``eps`` are a
    fresh wildcard at each use (a list of them), checked to be equal scalar constants after
    matching: a frontend may give a tensor constant or a scalar (TVM's ONNX frontend turns
    some Mul operands into T.float32), and each use may be its own constant."""
    x = wildcard()
    parts: dict[str, relax.dpl.DFPattern | list[relax.dpl.DFPattern]] = {"x": x, "two": []}

    def operand(name: str) -> relax.dpl.DFPattern:
        if name in ("n", "missing", "eps"):
            parts.setdefault(name, []).append(wildcard())
            return parts[name][-1]
        return parts[name]

    def squared(p: relax.dpl.DFPattern) -> relax.dpl.DFPattern:
        parts["two"].append(wildcard())
        return is_op("relax.multiply")(p, p) | is_op("relax.square")(p) | is_op("relax.power")(p, parts["two"][-1])

    binary = {"divide": "relax.divide", "subtract": "relax.subtract", "multiply": "relax.multiply", "add": "relax.add"}
    for out, op, args in LAYER_NORM_STEPS:
        a = [operand(v) for v in args]
        if op == "sum":
            parts[out] = is_op("relax.sum")(a[0])
        elif op == "square":
            parts[out] = squared(a[0])
        elif op == "rsqrt":  # ONNX's Reciprocal(Sqrt) or torch's rsqrt
            parts[out] = is_op("relax.divide")(wildcard(), is_op("relax.sqrt")(a[0])) | is_op("relax.rsqrt")(a[0])
        else:
            parts[out] = is_op(binary[op])(*a)
    return parts["y"], parts


def _scalar(expr: relax.Expr) -> float | None:
    """The value of a one-element constant tensor or a constant scalar; None for anything else."""
    if isinstance(expr, (tirx.FloatImm, tirx.IntImm)):
        return float(expr.value)
    if isinstance(expr, tvm.ir.expr.GenericConst):
        value = expr.value.numpy()
        return float(value.reshape(-1)[0]) if value.size == 1 else None
    return None


def _unit_numerator(rstd: relax.Call) -> bool:
    """``1 / sqrt(...)`` (ONNX's Reciprocal) or ``rsqrt``: not some other constant over it."""
    return rstd.op.name == "relax.rsqrt" or _scalar(rstd.args[0]) == 1.0


def _last_axis_sum(call: relax.Call) -> bool:
    axes = call.attrs.axis
    return bool(call.attrs.keepdims) and axes is not None and len(axes) == 1 and int(axes[0]) in (-1, call.args[0].ty.ndim - 1)


def phantom_layer_norm_te(x: te.Tensor, n: float, missing: float, eps: float) -> te.Tensor:
    """(x - mean) / sqrt(var + eps) over the last axis, as if it had ``n`` entries of which
    ``missing`` are zero: two reductions and the normalisation in one function."""
    *rows, width = x.shape
    dtype = x.dtype
    k = te.reduce_axis((0, width), name="k")
    total = te.compute(rows, lambda *i: te.sum(x[(*i, k)], axis=k), name="phantom_sum")
    j = te.reduce_axis((0, width), name="j")
    inv_n = tirx.const(1.0 / n, dtype)

    def centred(*i):
        return x[i] - total[i[:-1]] * inv_n

    squares = te.compute(rows, lambda *i: te.sum(centred(*i, j) * centred(*i, j), axis=j), name="phantom_squares")

    def normalised(*i):
        mean = total[i[:-1]] * inv_n
        var = (squares[i[:-1]] + tirx.const(missing, dtype) * mean * mean) * inv_n
        return (x[i] - mean) / tirx.sqrt(var + tirx.const(eps, dtype))

    return te.compute(x.shape, normalised, name="phantom_layer_norm")


@relax.expr_functor.mutator
class _PhantomNorms(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.pattern, self.parts = _pattern()
        self.var2val: dict = {}
        self.bound_to: dict = {}   # value -> the variable bound to it

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if getattr(call.op, "name", None) == "relax.nn.layer_norm":
            return self._layer_norm(call)
        matched = self.pattern.extract_matched_expr(call, self.var2val)
        if matched is not None:
            got = {name: matched[p] for name, p in self.parts.items() if not isinstance(p, list) and p in matched}
            numbers = {k: [_scalar(matched[p]) for p in self.parts[k] if p in matched] for k in ("n", "missing", "eps",
                                                                                                  "two")}
            sums = [got[out] for out, op, _ in LAYER_NORM_STEPS if op == "sum"]
            if (all(None not in v and len(set(v)) == 1 for k, v in numbers.items() if k != "two")
                    and all(e == 2.0 for e in numbers["two"]) and _unit_numerator(got["rstd"])
                    and all(_last_axis_sum(t) for t in sums)):
                n, missing, eps = (numbers[k][0] for k in ("n", "missing", "eps"))
                # the matcher sees through bindings, so x is the value that computes the norm's
                # input; its variable is used, or that value (a residual add) would be emitted twice
                x = self.bound_to.get(got["x"], got["x"])
                return self.builder_.call_te(phantom_layer_norm_te, self.visit_expr(x), n, missing, eps,
                                             primfunc_name_hint="phantom_layer_norm")
        return super().visit_call_(call)

    def _layer_norm(self, call: relax.Call) -> relax.Expr:
        """A layer norm over the last axis as the same kernel at its full width (none missing),
        then its scale and shift, which fuse into it as the pruned form's do."""
        x, gamma, beta = (self.visit_expr(a) for a in call.args)
        ty, axes = x.ty, call.attrs.axes
        width = ty.shape[-1] if isinstance(ty, relax.TensorType) and ty.shape is not None else None
        if (not isinstance(width, tirx.IntImm) or len(axes) != 1 or int(axes[0]) not in (-1, ty.ndim - 1)
                or ty.dtype != "float32"):
            return super().visit_call_(call)
        y = self.builder_.call_te(phantom_layer_norm_te, x, float(width.value), 0.0, float(call.attrs.epsilon),
                                  primfunc_name_hint="phantom_layer_norm")
        if call.attrs.scale:
            y = relax.op.multiply(self.builder_.emit(y), gamma)
        if call.attrs.center:
            y = relax.op.add(self.builder_.emit(y), beta)
        return y

    def rewrite(self) -> tvm.IRModule:
        for gv, func in self.builder_.get().functions_items():
            if isinstance(func, relax.Function):
                self.var2val = relax.analysis.get_var2val(func)
                self.bound_to = {value: var for var, value in self.var2val.items()}
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()


@tvm.transform.module_pass(opt_level=0, name="FusePhantomLayerNorm")
def fuse_phantom_layer_norm(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Replace each width-corrected layer norm, and each plain one over the last axis, with one
    TE function; the ops it leaves unused go with dead-code elimination."""
    rewritten = _PhantomNorms(mod).rewrite()
    return relax.transform.DeadCodeElimination()(rewritten)
