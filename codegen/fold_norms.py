"""Fold inference batch norms into the convolution before them, in the bound Relax program.

Without it every fused convolution of a CNN ends in the norm's ``subtract/divide/multiply/add``
epilogue, computed per output element at run time. Folded, the convolution reads scaled weights
and adds one bias. TVM's ``FoldBatchnormToConv2D`` does the folding, but only where the norm
reads the convolution directly; a convolution with a bias (``conv2d -> add -> batch_norm``: every
ONNX ``Conv`` with a ``B`` input, a torch ``Conv2d(bias=True)``) does not match it. So the bias
is first moved into the norm, which is exact::

    batch_norm(conv(x) + b, mean)  ==  batch_norm(conv(x), mean - b)

after which TVM's pass applies. The weights must be bound as constants (the rewrite computes
new ones), which is why this runs on :meth:`~.frontend.RelaxProgram.bound` modules only.
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard


def _bias_into_norm_mean(func: relax.Function) -> relax.Function:
    """``batch_norm(add(conv2d(x, W), b), ..., mean, var)`` -> ``batch_norm(conv2d(x, W), ..., mean - b, var)``
    for a constant per-channel ``b`` on the norm's axis."""
    conv = is_op("relax.nn.conv2d")(wildcard(), is_const())
    bias, gamma, beta, mean, var = is_const(), is_const(), is_const(), is_const(), is_const()
    biased = is_op("relax.add")(conv, bias)
    norm = is_op("relax.nn.batch_norm")(biased, gamma, beta, mean, var)

    def rewrite(call: relax.Call, matched: dict) -> relax.Expr:
        b = matched[bias].value.numpy()
        m = matched[mean].value.numpy()
        axis, channels = int(call.attrs.axis), m.shape[0]
        # only a bias that is one value per channel on the norm's axis can move into its mean
        if b.ndim != len(call.args[0].ty.shape) or b.size != channels or b.shape[axis] != channels:
            return call
        if bool(call.attrs.training):  # batch statistics: nothing to fold
            return call
        shifted = relax.const((m - b.reshape(-1)).astype(m.dtype))
        return relax.Call(call.op, [matched[conv], matched[gamma], matched[beta], shifted, matched[var]],
                          call.attrs, call.ty_args)

    return rewrite_call(norm, rewrite, func)


@tvm.transform.module_pass(opt_level=0, name="FoldBatchNorms")
def fold_batch_norms(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Every inference batch norm after a ``conv2d`` (with or without bias) folded into it."""
    mod = relax.transform.FoldConstant()(mod)  # biases arrive as reshapes of constants
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gv] = _bias_into_norm_mean(func)
    return tvm.transform.Sequential([relax.transform.FoldBatchnormToConv2D(),
                                     relax.transform.FoldConstant()])(mod)
