"""Ops with weights or contractions: convolution, linear, matmul, attention, embedding.

These *produce* atoms (a conv's filters, a linear's output features, an embedding's
columns) and *consume* their input's atoms (input channels/columns of the weight), so
one unit spans a layer's filters, everything elementwise after them, and the next
layers' input slices.  Grouped convolutions tie a whole group of input and output
channels into one unit; attention ties each head (or each key/value group under
grouped-query attention) into one unit.  A removed unit's filters (or columns) are
zero, so what they produce is zero where removed (``keeps_zero``).
"""
from __future__ import annotations

import torch

from ..analysis.labels import Field, Labels
from ..ir.graph import Node
from .common import numel, ref_name
from .registry import Rule, register


def _param(lab: Labels, node: Node, key: str) -> str | None:
    name = ref_name(node.attrs.get(key))
    if name is not None and lab.graph.values[name].kind not in ("param", "buffer", "const"):
        return None
    return name


def _trained(lab: Labels, node: Node, *keys: str) -> bool:
    """Whether the weights under ``keys`` (absent ones aside) are parameters, so a removed
    unit's entries of them are zero: the rows they produce are then zero too."""
    names = [ref_name(node.attrs.get(k)) for k in keys]
    return all(n is None or lab.graph.values[n].kind == "param" for n in names)


@register("conv", aten=("conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
                        "conv_transpose2d", "conv_transpose3d"), onnx=("Conv", "ConvTranspose"))
class Conv(Rule):
    """Output channels are new atoms; input channels become the weight's input slices."""

    def propagate(self, node: Node, lab: Labels) -> None:
        a = node.attrs
        x, out = ref_name(a.get("input")), node.outputs[0]
        w = _param(lab, node, "weight")
        if w is None or x is None:
            return lab.barrier(node, "convolution whose weight is computed, not a parameter")
        transposed = bool(a.get("transposed")) or "transpose" in node.source_op or node.source_op == "onnx::ConvTranspose"
        g = int(a.get("groups", 1) or 1)
        cin, cout = lab.shape(x)[1], lab.shape(out)[1]
        outs = lab.fresh(cout, node)
        ins = lab.axis_labels(x, 1)
        wshape = lab.shape(w)
        if g > 1:
            per_group = outs.reshape(g, -1)
            lab.union(per_group[:, :1], per_group)
            if ins is not None:
                lab.union(ins.reshape(g, -1), per_group[:, :1])
            lab.param_axis(w, 0, ins if transposed else outs)
        else:
            lab.param_axis(w, 1 if transposed else 0, outs)
            lab.param_axis(w, 0 if transposed else 1, ins)
        b = _param(lab, node, "bias")
        if b is not None:
            lab.param_axis(b, 0, outs)
        macs = numel(lab.shape(out)) * (cin // g) * numel(wshape[2:])
        if transposed:
            macs = numel(lab.shape(x)) * (cout // g) * numel(wshape[2:])
        lab.total_macs += macs
        lab.param_macs[w] = lab.param_macs.get(w, 0.0) + macs
        lab.cost(outs, macs)
        lab.cost(ins, macs)
        lab.set_field(out, Field((1,), outs))

    def keeps_zero(self, node, lab) -> bool:
        return _trained(lab, node, "weight", "bias")

    def rewrite_fx(self, node, fx_node, shrink) -> None:
        g = int(node.attrs.get("groups", 1) or 1)
        if g > 1:
            per = shrink.old_shape(node.outputs[0])[1] // g
            shrink.set_fx_arg(fx_node, "groups", shrink.new_shape(node.outputs[0])[1] // per)

    def rewrite_onnx(self, node, proto, shrink) -> None:
        g = int(node.attrs.get("groups", 1) or 1)
        if g > 1:
            per = shrink.old_shape(node.outputs[0])[1] // g
            shrink.set_onnx_attr(proto, "group", shrink.new_shape(node.outputs[0])[1] // per)


def _linear(lab: Labels, node: Node, x: str, w: str, b: str | None, w_in_dim: int) -> None:
    out = node.outputs[0]
    n_out = lab.shape(out)[-1]
    outs = lab.fresh(n_out, node)
    ins = lab.axis_labels(x, -1)
    lab.param_axis(w, 1 - w_in_dim, outs)
    lab.param_axis(w, w_in_dim, ins)
    if b is not None and len(lab.shape(b)) >= 1 and lab.shape(b)[-1] == n_out:
        lab.param_axis(b, len(lab.shape(b)) - 1, outs)
    macs = numel(lab.shape(out)) * lab.shape(x)[-1]
    lab.total_macs += macs
    lab.param_macs[w] = lab.param_macs.get(w, 0.0) + macs
    lab.cost(outs, macs)
    lab.cost(ins, macs)
    lab.set_field(out, Field((len(lab.shape(out)) - 1,), outs))


@register("linear", aten=("linear",))
class Linear(Rule):
    """``y = x Wᵀ + b``: output features are new atoms, input features are W's columns."""

    def propagate(self, node: Node, lab: Labels) -> None:
        x, w = ref_name(node.attrs.get("input")), _param(lab, node, "weight")
        if w is None or x is None or len(lab.shape(w)) != 2:
            return lab.barrier(node, "linear whose weight is computed, not a parameter")
        _linear(lab, node, x, w, _param(lab, node, "bias"), 1)

    def keeps_zero(self, node, lab) -> bool:
        return _trained(lab, node, "weight", "bias")


@register("addmm", aten=("addmm",))
class Addmm(Rule):
    """``bias + x @ W`` with W [in, out] as a parameter (GPT-2's Conv1D)."""

    def propagate(self, node: Node, lab: Labels) -> None:
        x, w = ref_name(node.attrs.get("mat1")), _param(lab, node, "mat2")
        if w is None or x is None:
            return lab.barrier(node, "addmm of two activations")
        _linear(lab, node, x, w, _param(lab, node, "input"), 0)

    def keeps_zero(self, node, lab) -> bool:
        return _trained(lab, node, "mat2", "input")


@register("gemm", onnx=("Gemm",))
class Gemm(Rule):
    """ONNX Gemm ``alpha·A'·B' + beta·C`` with B an initializer."""

    def propagate(self, node: Node, lab: Labels) -> None:
        x, w = ref_name(node.attrs.get("A")), _param(lab, node, "B")
        if w is None or x is None or node.attrs.get("transA", 0):
            return lab.barrier(node, "Gemm without a constant B or with transA")
        _linear(lab, node, x, w, _param(lab, node, "C"), 1 if node.attrs.get("transB", 0) else 0)

    def keeps_zero(self, node, lab) -> bool:
        return _trained(lab, node, "B", "C")


@register("matmul", aten=("matmul", "mm", "bmm"), onnx=("MatMul",))
class MatMul(Rule):
    """A parameter operand makes it a linear layer; two activations (attention scores,
    attention × values) couple along the contraction and carry batch (head) atoms."""

    def propagate(self, node: Node, lab: Labels) -> None:
        a_name, b_name = node.inputs[0], node.inputs[-1]
        sa, sb, out = lab.shape(a_name), lab.shape(b_name), node.outputs[0]
        if len(sb) == 2 and lab.graph.values[b_name].kind == "param":
            return _linear(lab, node, a_name, b_name, None, 0)
        if len(sa) < 2 or len(sb) < 2:
            return lab.barrier(node, "matmul with a vector operand")
        la, lb = lab.full(a_name), lab.full(b_name)
        fa, fb = lab.field(a_name), lab.field(b_name)
        if fa is not None and (len(sa) - 2) in fa.axes:  # rows of A carry atoms: ambiguous identity
            lab.pin(fa.labels)
            la = torch.full(sa, -1, dtype=torch.long)
        b_carries = fb is not None and (len(sb) - 1) in fb.axes
        a0 = la.select(-2, 0)                        # [...a, K]
        lab.union(a0.unsqueeze(-1), lb)              # pair A[., k] with B[., k, n]
        macs = numel(lab.shape(out)) * sa[-1]
        lab.total_macs += macs
        if b_carries:
            rows = lb.movedim(-2, 0).reshape(sb[-2], -1)
            lab.union(rows[:1], rows)
            res = lb.select(-2, 0).unsqueeze(-2)
        else:
            lab.union(a0[..., :1], a0)
            res = a0[..., :1].unsqueeze(-1)
        lab.set_from_tensor(out, res.expand(lab.shape(out)))
        f = lab.fields.get(out)
        lab.cost(f.labels if f is not None else None, macs)
        if f is not None and min(f.axes) < len(lab.shape(out)) - 2:  # atoms on a batch axis: heads
            lab.head_atoms.append(f.labels.reshape(-1))

    def keeps_zero(self, node, lab) -> bool:
        """A linear layer's output, or a product whose removed entries meet a zero-where-
        removed operand (each removed output entry sums products with a removed, so zero,
        entry of every labelled operand: the rule couples them)."""
        b = node.inputs[-1]
        if len(lab.shape(b)) == 2 and lab.graph.values[b].kind == "param":
            return True
        return any(lab.fields.get(i) is not None and lab.is_zero(i) for i in node.inputs[:1] + node.inputs[-1:])


@register("sdpa", aten=("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                        "_scaled_dot_product_attention_math"))
class ScaledDotProductAttention(Rule):
    """Heads are units: a query head, its key/value head (shared under GQA) and its
    output columns go together; the head dimension itself stays uniform."""

    def propagate(self, node: Node, lab: Labels) -> None:
        q, k, v = (ref_name(node.attrs.get(n)) for n in ("query", "key", "value"))
        if None in (q, k, v) or len(lab.shape(q)) != 4:
            return lab.barrier(node, "attention without 4-d query/key/value")
        hq, hk = lab.shape(q)[1], lab.shape(k)[1]
        q0, k0, v0 = (lab.full(t).select(2, 0) for t in (q, k, v))   # [B, H, E]
        for t in (q, k, v):
            f = lab.field(t)
            if f is not None and 2 in f.axes:
                lab.pin(f.labels)
        if hk != hq:
            k0, v0 = k0.repeat_interleave(hq // hk, dim=1), v0.repeat_interleave(hq // hk, dim=1)
        lab.union(q0, k0)
        lab.union(q0[..., :1], q0)
        lab.union(q0[..., :1], v0)
        mask = ref_name(node.attrs.get("attn_mask"))
        if mask is not None:
            ms = lab.shape(mask)
            if lab.field(mask) is not None or (len(ms) == 4 and ms[1] > 1):
                lab.pin(q0)
        out = node.outputs[0]
        lab.set_from_tensor(out, v0.unsqueeze(2).expand(lab.shape(out)))
        b, _, l_, e = lab.shape(q)
        macs = b * hq * l_ * lab.shape(k)[2] * (e + lab.shape(v)[3])
        lab.total_macs += macs
        lab.cost(q0[0, :, 0], macs)
        lab.head_atoms.append(q0[0, :, 0])

    def keeps_zero(self, node, lab) -> bool:
        """A removed head's output averages its value rows: zero if they are (not if only
        its queries are: zero scores still average the values)."""
        v = ref_name(node.attrs.get("value"))
        return v is not None and lab.is_zero(v)


@register("embedding", aten=("embedding",))
class Embedding(Rule):
    """Embedding columns are new atoms; the vocabulary axis is never pruned."""

    def propagate(self, node: Node, lab: Labels) -> None:
        w = _param(lab, node, "weight")
        if w is None:
            return lab.barrier(node, "embedding with a computed table")
        out = node.outputs[0]
        cols = lab.fresh(lab.shape(w)[1], node)
        lab.param_axis(w, 1, cols)
        lab.set_field(out, Field((len(lab.shape(out)) - 1,), cols))

    def keeps_zero(self, node, lab) -> bool:
        return _trained(lab, node, "weight")
