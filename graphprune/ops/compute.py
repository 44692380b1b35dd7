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

from typing import Callable

import torch

from ..analysis.labels import Field, Labels, ParamView, unlabelled
from ..ir.graph import Node
from .common import as_list, numel, ref_name, same_pads
from .registry import BiasSite, Layer, OnnxOp, Rule, register
from .rewrite import OnnxArg, Rewrite

F = torch.nn.functional


def _param(lab: Labels, node: Node, key: str) -> str | None:
    name = ref_name(node.attrs.get(key))
    if name is not None and not lab.graph.values[name].fixed:
        return None
    return name


def _computed(lab: Labels, node: Node, key: str) -> bool:
    """Whether the argument under ``key`` is there and computed (not a weight): a bias
    made by ``torch.cat((q_bias, k_bias, v_bias))`` (timm's EVA, BEiT) is sliced by nothing,
    so the features it adds to must all stay."""
    name = ref_name(node.attrs.get(key))
    return name is not None and not lab.graph.values[name].fixed


def _trained(lab: Labels, node: Node, *keys: str) -> bool:
    """Whether the weights under ``keys`` (absent ones aside) are parameters, so a removed
    unit's entries of them are zero: the rows they produce are then zero too."""
    names = [ref_name(node.attrs.get(k)) for k in keys]
    return all(n is None or lab.graph.values[n].kind == "param" for n in names)


def _onnx_conv(x, w, b=None, *, strides=None, dilations=None, groups=1, auto_pad="NOTSET", pads=None, **_):
    spatial = w.dim() - 2
    strides, dilations = strides or [1] * spatial, dilations or [1] * spatial
    begin, end = same_pads(list(x.shape[2:]), list(w.shape[2:]), strides, dilations, auto_pad, pads)
    if begin != end:
        x = F.pad(x, [p for be in zip(reversed(begin), reversed(end)) for p in be])
        begin = [0] * spatial
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    return conv(x, w, b, stride=strides, padding=begin, dilation=dilations, groups=groups)


def _onnx_conv_transpose(x, w, b=None, *, strides=None, dilations=None, groups=1, auto_pad="NOTSET", pads=None,
                         output_padding=None, output_shape=None, **_):
    """Computed without padding, then cropped: ONNX pads may differ at the two ends."""
    spatial = w.dim() - 2
    strides, dilations = strides or [1] * spatial, dilations or [1] * spatial
    extra = list(output_padding or [0] * spatial)
    full = [st * (s - 1) + e + (k - 1) * d + 1
            for s, k, st, d, e in zip(x.shape[2:], w.shape[2:], strides, dilations, extra)]
    if output_shape:
        totals = [f - o for f, o in zip(full, output_shape[-spatial:])]
        upper = auto_pad == "SAME_UPPER"
        begin = [t // 2 if upper else t - t // 2 for t in totals]
        end = [t - t // 2 if upper else t // 2 for t in totals]
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        totals = [f - s * st for f, s, st in zip(full, x.shape[2:], strides)]
        upper = auto_pad == "SAME_UPPER"
        begin = [t // 2 if upper else t - t // 2 for t in totals]
        end = [t - t // 2 if upper else t // 2 for t in totals]
    else:
        begin, end = (list(pads[:spatial]), list(pads[spatial:])) if pads else ([0] * spatial, [0] * spatial)
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[spatial - 1]
    y = conv(x, w, b, stride=strides, padding=0, output_padding=extra, groups=groups, dilation=dilations)
    return y[(slice(None), slice(None), *(slice(bg, f - e) for bg, e, f in zip(begin, end, full)))]


def _conv2d_shape(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """conv2d's output from the usual formula (its meta kernel is Python, slow to record)."""
    x, w = args[0], args[1]
    if kwargs or x.dim() != 4 or w.dim() != 4:
        return None

    def pair(k: int, default: int) -> list[int]:  # stride, padding, dilation: one int or two
        a = list(args[k]) if len(args) > k else [default]
        return a * 2 if len(a) == 1 else a
    stride, pad, dil = pair(3, 1), pair(4, 0), pair(5, 1)
    h, wd = ((x.shape[2 + i] + 2 * pad[i] - dil[i] * (w.shape[2 + i] - 1) - 1) // stride[i] + 1 for i in range(2))
    return torch.empty((x.shape[0], w.shape[0], h, wd), dtype=x.dtype, device="meta")


def _linear_shape(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args[1].dim() != 2:
        return None
    return torch.empty((*args[0].shape[:-1], args[1].shape[0]), dtype=args[0].dtype, device="meta")


def _sdpa_shape(args: tuple, kwargs: dict) -> torch.Tensor:
    """[..., L, E] x [..., S, Ev] -> [..., L, Ev]."""
    q, v = args[0], args[2]
    return torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device="meta")


def _groups(attrs: dict, _: list) -> None:
    attrs["groups"] = attrs.pop("group", 1)


def _weight_param(node: Node, graph, arg: str, ndim: int) -> str | None:
    """The IR value of argument ``arg`` when it is a parameter with ``ndim`` dims."""
    w = ref_name(node.attrs.get(arg))
    ok = w is not None and graph.values[w].kind == "param" and len(graph.values[w].shape) == ndim
    return w if ok else None


def _bias_site(node: Node, graph, w: str | None, out_dim: int, axis: int, arg: str | None,
               scale: float = 1.0) -> BiasSite | None:
    """A :class:`BiasSite` over the weight parameter ``w`` when the node adds no bias yet."""
    if w is None or graph.values[w].kind != "param" or (arg is not None and node.attrs.get(arg) is not None):
        return None
    return BiasSite(w, out_dim, axis, arg, scale)


def _dense_layer(node: Node, graph, x: str | None, w: str | None, in_dim: int) -> Layer | None:
    """``x`` (``[..., in]``) times the 2-D parameter ``w`` whose dim ``in_dim`` is the input."""
    if x is None or w is None:
        return None
    shape, xs = graph.values[w].shape, graph.values[x].shape
    return Layer(w, "dense", in_dim, 1 - in_dim, (shape[in_dim], shape[1 - in_dim]), rows=numel(xs[:-1]))


@register("conv", aten=("conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
                        "conv_transpose2d", "conv_transpose3d"),
          onnx={"Conv": OnnxOp(_onnx_conv, ("input", "weight", "bias"), normalise=_groups),
                "ConvTranspose": OnnxOp(_onnx_conv_transpose, ("input", "weight", "bias"), normalise=_groups)},
          shape_only={"conv2d.default": _conv2d_shape})
class Conv(Rule):
    """Output channels are new atoms; input channels become the weight's input slices."""

    mixes_channels = True

    onnx_args = {("Conv", "groups"): OnnxArg(name="group"), ("ConvTranspose", "groups"): OnnxArg(name="group")}

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
        b = _param(lab, node, "bias")
        if g > 1:  # a grouped filter reads its group's channels only: neither producer nor consumer
            per_group = outs.reshape(g, -1)
            lab.union(per_group[:, :1], per_group)
            if ins is not None:
                lab.union(ins.reshape(g, -1), per_group[:, :1])
            lab.param_axis(w, 0, ins if transposed else outs)
        else:
            lab.param_axis(w, 1 if transposed else 0, outs, "producer", b)
            lab.param_axis(w, 0 if transposed else 1, ins, "consumer", b)
        if b is not None:
            lab.param_axis(b, 0, outs)
        macs = numel(lab.shape(out)) * (cin // g) * numel(wshape[2:])
        if transposed:
            macs = numel(lab.shape(x)) * (cout // g) * numel(wshape[2:])
        lab.total_macs += macs
        lab.param_macs[w] = lab.param_macs.get(w, 0.0) + macs
        lab.cost(outs, macs)
        if g == 1:  # a grouped filter's inputs are its outputs' atoms: their MACs count once
            lab.cost(ins, macs)
        lab.set_field(out, Field((1,), outs))

    def keeps_zero(self, node, lab) -> bool:
        return _trained(lab, node, "weight", "bias")

    def block_sparse_weight(self, node: Node, graph) -> str | None:
        """A pointwise convolution (1x1, stride 1, unpadded, ungrouped, not transposed) is a
        matmul of its weight over every pixel."""
        a = node.attrs
        w = ref_name(a.get("weight"))
        if w is None or graph.values[w].kind != "param":
            return None
        shape = graph.values[w].shape
        pads = a.get("padding", a.get("pads", 0))
        pads = [pads] if isinstance(pads, (int, str)) else list(pads)
        pointwise = len(shape) == 4 and tuple(shape[2:]) == (1, 1) and int(a.get("groups", 1) or 1) == 1
        transposed = bool(a.get("transposed")) or "transpose" in node.source_op.lower()
        strided = any(int(s) != 1 for s in as_list(a.get("stride", a.get("strides", 1))))
        padded = any(p not in (0, "valid", "VALID") for p in pads) or a.get("auto_pad", "NOTSET") not in ("NOTSET",
                                                                                                         "VALID")
        return w if pointwise and not (transposed or strided or padded) else None

    def layer(self, node: Node, graph) -> Layer | None:
        """A 2-D, not transposed convolution; padding is read back from the shapes (the
        frontends spell it three ways: pairs, ONNX begin/end lists, ``auto_pad``)."""
        a = node.attrs
        w, x = _weight_param(node, graph, "weight", 4), ref_name(a.get("input"))
        transposed = bool(a.get("transposed")) or "transpose" in node.source_op.lower()
        if w is None or x is None or transposed or len(graph.values[x].shape) != 4:
            return None
        (n, cin, h, wd), (cout, _, kh, kw) = graph.values[x].shape, graph.values[w].shape
        out = graph.values[node.outputs[0]].shape
        stride = [int(v) for v in as_list(a.get("stride", a.get("strides", 1)))] * 2
        dilation = [int(v) for v in as_list(a.get("dilation", a.get("dilations", 1)))] * 2
        pads = tuple(max(0, -(-((o - 1) * st + d * (k - 1) + 1 - i) // 2))
                     for o, st, d, k, i in zip(out[2:], stride, dilation, (kh, kw), (h, wd)))
        return Layer(w, "conv2d", 1, 0, (cin, cout), rows=n, size=(h, wd), kernel=(kh, kw),
                     stride=(stride[0], stride[1]), padding=pads, dilation=(dilation[0], dilation[1]),
                     groups=int(a.get("groups", 1) or 1))

    def bias_site(self, node: Node, graph) -> BiasSite | None:
        """Output channels are axis 1 of the output and axis 0 of the weight (not transposed)."""
        transposed = bool(node.attrs.get("transposed")) or "transpose" in node.source_op.lower()
        w = ref_name(node.attrs.get("weight"))
        return None if transposed else _bias_site(node, graph, w, 0, 1, "bias")

    def rewrite(self, node, shrink) -> Rewrite | None:
        """A grouped convolution keeps its group size: removed groups lower the count."""
        g = int(node.attrs.get("groups", 1) or 1)
        if g == 1:
            return None
        per = shrink.old_shape(node.outputs[0])[1] // g
        return Rewrite(args={"groups": shrink.new_shape(node.outputs[0])[1] // per})


def _linear(lab: Labels, node: Node, x: str, w: str, b: str | None, w_in_dim: int, computed_bias: bool) -> None:
    """Output features are new atoms (kept where a computed bias adds to them), input
    features are W's columns."""
    out = node.outputs[0]
    n_out = lab.shape(out)[-1]
    outs = lab.fresh(n_out, node)
    if computed_bias:
        lab.pin(outs)
    ins = lab.axis_labels(x, -1)
    bias = b if b is not None and lab.shape(b) == (n_out,) else None
    lab.param_axis(w, 1 - w_in_dim, outs, "producer", bias)
    lab.param_axis(w, w_in_dim, ins, "consumer", bias)
    if b is not None and len(lab.shape(b)) >= 1 and lab.shape(b)[-1] == n_out:
        lab.param_axis(b, len(lab.shape(b)) - 1, outs)
    macs = numel(lab.shape(out)) * lab.shape(x)[-1]
    lab.total_macs += macs
    lab.param_macs[w] = lab.param_macs.get(w, 0.0) + macs
    lab.cost(outs, macs)
    lab.cost(ins, macs)
    lab.set_field(out, Field((len(lab.shape(out)) - 1,), outs))


@register("linear", aten=("linear",), shape_only={"linear.default": _linear_shape})
class Linear(Rule):
    """``y = x Wᵀ + b``: output features are new atoms, input features are W's columns."""

    mixes_channels = True

    def propagate(self, node: Node, lab: Labels) -> None:
        x, w = ref_name(node.attrs.get("input")), _param(lab, node, "weight")
        if w is None or x is None or len(lab.shape(w)) != 2:
            return lab.barrier(node, "linear whose weight is computed, not a parameter")
        _linear(lab, node, x, w, _param(lab, node, "bias"), 1, _computed(lab, node, "bias"))

    def keeps_zero(self, node, lab) -> bool:
        return _trained(lab, node, "weight", "bias")

    def block_sparse_weight(self, node: Node, graph) -> str | None:
        """``x Wᵀ`` with W [out, in] a parameter."""
        w = ref_name(node.attrs.get("weight"))
        return w if w is not None and graph.values[w].kind == "param" and len(graph.values[w].shape) == 2 else None

    def layer(self, node: Node, graph) -> Layer | None:
        return _dense_layer(node, graph, ref_name(node.attrs.get("input")), _weight_param(node, graph, "weight", 2), 1)

    def bias_site(self, node: Node, graph) -> BiasSite | None:
        return _bias_site(node, graph, _weight_param(node, graph, "weight", 2), 0, -1, "bias")


@register("addmm", aten=("addmm",))
class Addmm(Rule):
    """``bias + x @ W`` with W [in, out] as a parameter (GPT-2's Conv1D)."""

    def propagate(self, node: Node, lab: Labels) -> None:
        x, w = ref_name(node.attrs.get("mat1")), _param(lab, node, "mat2")
        if w is None or x is None:
            return lab.barrier(node, "addmm of two activations")
        _linear(lab, node, x, w, _param(lab, node, "input"), 0, _computed(lab, node, "input"))

    def keeps_zero(self, node, lab) -> bool:
        return _trained(lab, node, "mat2", "input")

    def layer(self, node: Node, graph) -> Layer | None:
        return _dense_layer(node, graph, ref_name(node.attrs.get("mat1")), _weight_param(node, graph, "mat2", 2), 0)


def _onnx_gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0, **_):
    out = alpha * ((a.T if transA else a) @ (b.T if transB else b))
    return out if c is None else out + beta * c


@register("gemm", onnx={"Gemm": OnnxOp(_onnx_gemm, ("A", "B", "C"))})
class Gemm(Rule):
    """ONNX Gemm ``alpha·A'·B' + beta·C`` with B an initializer."""

    mixes_channels = True

    def propagate(self, node: Node, lab: Labels) -> None:
        x, w = ref_name(node.attrs.get("A")), _param(lab, node, "B")
        if w is None or x is None or node.attrs.get("transA", 0):
            return lab.barrier(node, "Gemm without a constant B or with transA")
        _linear(lab, node, x, w, _param(lab, node, "C"), 1 if node.attrs.get("transB", 0) else 0,
                _computed(lab, node, "C"))

    def keeps_zero(self, node, lab) -> bool:
        return _trained(lab, node, "B", "C")

    def layer(self, node: Node, graph) -> Layer | None:
        if node.attrs.get("transA", 0):
            return None
        return _dense_layer(node, graph, ref_name(node.attrs.get("A")), _weight_param(node, graph, "B", 2),
                            1 if node.attrs.get("transB", 0) else 0)

    def bias_site(self, node: Node, graph) -> BiasSite | None:
        """``C`` is added times ``beta``; B is ``[in, out]``, or ``[out, in]`` with transB."""
        if node.attrs.get("transA", 0):
            return None
        return _bias_site(node, graph, _weight_param(node, graph, "B", 2), 0 if node.attrs.get("transB", 0) else 1,
                          -1, "C", float(node.attrs.get("beta", 1.0)))


def _transposed_param(lab: Labels, name: str) -> str | None:
    """The 2-d parameter W when ``name`` is W transposed (Falcon's linear layers compute
    ``x @ self.weight.T``): the product is then a linear layer over W's rows and columns,
    not a product of two activations whose operand's every element is an atom.  Checked
    by running the producer on an index grid, so any op that transposes counts."""
    node = lab.producer(name)
    if node is None or node.op != "permute" or len(node.inputs) != 1:
        return None
    w = lab.graph.values[node.inputs[0]]
    if w.kind != "param" or len(w.shape) != 2:
        return None
    grid = torch.arange(numel(w.shape)).reshape(w.shape)
    try:
        out = node.call({w.name: grid})
    except Exception:
        return None
    return w.name if isinstance(out, torch.Tensor) and torch.equal(out, grid.T) else None


def _contract(lab: Labels, la: torch.Tensor, lb: torch.Tensor, fa: Field | None, a_rows: bool,
              b_cols: bool) -> torch.Tensor:
    """Couplings and output labels of ``A @ B`` for two activations, from their labels
    broadcast to ``[..., M, K]`` and ``[..., K, N]``: A's contraction atoms are paired
    with B's (a removed k is zero in both, so its products vanish), and the product
    carries B's column atoms or else A's contraction atoms.  Rows of A that carry atoms
    (``a_rows``) are pinned: with B's columns they would meet in every output entry.
    Returns labels that broadcast to the output ``[..., M, N]``."""
    if a_rows:
        lab.pin(fa.labels)
        la = unlabelled(la.shape)
    a0 = la.select(-2, 0)                        # [...a, K]
    lab.union(a0.unsqueeze(-1), lb)              # pair A[., k] with B[., k, n]
    if b_cols:
        rows = lb.movedim(-2, 0).reshape(lb.shape[-2], -1)
        lab.union(rows[:1], rows)
        return lb.select(-2, 0).unsqueeze(-2)
    lab.union(a0[..., :1], a0)
    return a0[..., :1].unsqueeze(-1)


def _known_view(lab: Labels, name: str) -> ParamView | None:
    """``name`` as a parameter view already found (or the parameter itself)."""
    if lab.graph.values[name].kind == "param":
        return ParamView(name, tuple(range(len(lab.shape(name)))))
    return lab.views.get(name)


def _weight_side(lab: Labels, a: str, b: str) -> tuple[str, ParamView, bool] | None:
    """(the other operand, the weight as a parameter view, whether the weight is B) when
    one operand of ``A @ B`` is a parameter of rank >= 2 or a broadcast view of one whose
    two matrix axes are two of its dims (a position table ``[2, P, D]`` under a one-hot,
    ``table.unsqueeze(0).expand(B, -1, -1)`` under bmm): the product is then a batched linear
    layer, labelled per dim, never per element (the element-wise coupling of the general
    rule cost O(batch x K x N) and tied every row to every column of the weight)."""
    for name, other, is_b in ((b, a, True), (a, b, False)):
        view = lab.param_view(name, claim=False)
        if view is None or view.dims[-1] is None or view.dims[-2] is None:
            continue
        if lab.param_view(other, claim=False) is not None:
            return None  # a product of two weights: the general rule
        return other, lab.param_view(name), is_b
    return None


def _batched_linear(lab: Labels, node: Node, x: str, w: ParamView, w_is_b: bool) -> None:
    """``x @ W`` (``w_is_b``) or ``W @ x`` with W a parameter (view): W's own matrix axis
    (columns of B, rows of A) produces new atoms, shared by all of W's batch entries (they
    are sliced together); its contracted axis consumes ``x``'s contracted atoms.  Cost is
    O(K + N) whatever the batch and row sizes."""
    out = node.outputs[0]
    rank = len(lab.shape(out))
    own, contracted, x_axis, out_axis = (-1, -2, -1, rank - 1) if w_is_b else (-2, -1, -2, rank - 2)
    outs = lab.fresh(lab.shape(out)[out_axis], node)
    ins = lab.axis_labels(x, x_axis)
    lab.param_axis(w.param, w.dims[own], outs, "producer")
    lab.param_axis(w.param, w.dims[contracted], ins, "consumer")
    macs = numel(lab.shape(out)) * lab.shape(x)[x_axis]
    lab.total_macs += macs
    lab.param_macs[w.param] = lab.param_macs.get(w.param, 0.0) + macs
    lab.cost(outs, macs)
    lab.cost(ins, macs)
    lab.set_field(out, Field((out_axis,), outs))


def _product_cost(lab: Labels, out: str, macs: float) -> None:
    """Count a product's MACs, attribute them to its output's atoms, and record atoms on a
    batch axis (attention heads) as heads."""
    lab.total_macs += macs
    f = lab.fields.get(out)
    lab.cost(f.labels if f is not None else None, macs)
    if f is not None and min(f.axes) < len(lab.shape(out)) - 2:
        lab.head_atoms.append(f.labels.reshape(-1))


@register("matmul", aten=("matmul", "mm", "bmm"), onnx={"MatMul": OnnxOp(lambda a, b, **_: a @ b)})
class MatMul(Rule):
    """A parameter operand makes it a linear layer; two activations (attention scores,
    attention × values) couple along the contraction and carry batch (head) atoms."""

    mixes_channels = True

    def attention_values(self, node: Node, data: list[str],
                         producer: Callable[[str], Rule | None]) -> int | None:
        if len(data) == 2 and (p := producer(data[0])) is not None and p.probabilities:
            return 1
        return None

    def propagate(self, node: Node, lab: Labels) -> None:
        a_name, b_name = node.inputs[0], node.inputs[-1]
        sa, sb, out = lab.shape(a_name), lab.shape(b_name), node.outputs[0]
        if len(sb) == 2 and lab.graph.values[b_name].kind == "param":
            return _linear(lab, node, a_name, b_name, None, 0, False)
        w = _transposed_param(lab, b_name)
        if w is not None:  # x @ W.T: a linear layer over W [out, in]
            return _linear(lab, node, a_name, w, None, 1, False)
        if len(sa) < 2 or len(sb) < 2:
            return lab.barrier(node, "matmul with a vector operand")
        weight = _weight_side(lab, a_name, b_name)
        if weight is not None:
            return _batched_linear(lab, node, *weight)
        fa, fb = lab.field(a_name), lab.field(b_name)
        res = _contract(lab, lab.full(a_name), lab.full(b_name), fa,
                        fa is not None and (len(sa) - 2) in fa.axes, fb is not None and (len(sb) - 1) in fb.axes)
        lab.set_from_tensor(out, res.expand(lab.shape(out)))
        _product_cost(lab, out, numel(lab.shape(out)) * sa[-1])

    def keeps_zero(self, node, lab) -> bool:
        """A linear layer's output, or a product whose removed entries meet a zero-where-
        removed operand (each removed output entry sums products with a removed, so zero,
        entry of every labelled operand: the rule couples them)."""
        b = node.inputs[-1]
        if len(lab.shape(b)) == 2 and lab.graph.values[b].kind == "param":
            return True
        if any(lab.param_axes.get(v.param) for i in (node.inputs[0], b) if (v := _known_view(lab, i)) is not None):
            return True  # a (batched) linear layer over a parameter: see _batched_linear
        return any(lab.fields.get(i) is not None and lab.is_zero(i) for i in node.inputs[:1] + node.inputs[-1:])

    def layer(self, node: Node, graph) -> Layer | None:
        """``x @ W`` with W ``[in, out]`` a parameter (an ONNX MatMul over an initializer)."""
        w = node.inputs[-1]
        if len(node.inputs) != 2 or graph.values[w].kind != "param" or len(graph.values[w].shape) != 2:
            return None
        return _dense_layer(node, graph, node.inputs[0], w, 0)

    def bias_site(self, node: Node, graph) -> BiasSite | None:
        """``x @ W`` with W ``[in, out]`` a parameter: a bias is an add after the product."""
        w = node.inputs[-1]
        if len(node.inputs) != 2 or len(graph.values[w].shape) != 2:
            return None
        return _bias_site(node, graph, w, 1, -1, None)


@register("einsum", aten=("einsum",), onnx={"Einsum": OnnxOp(lambda *xs, equation, **_: torch.einsum(equation, *xs))})
class Einsum(Rule):
    """A two-operand einsum is a batched matmul of its letters: batch letters (in both
    operands and the output), M (A's own), N (B's own) and K (contracted).  The operands'
    labels are permuted and reshaped into ``[batch, M, K] @ [batch, K, N]``, contracted as
    :class:`MatMul` does, and put back in the output's order.  Other forms (one or three
    operands, a letter repeated in an operand, a letter summed out of one operand alone)
    keep their channels."""

    def propagate(self, node: Node, lab: Labels) -> None:
        ops = node.inputs
        form = _einsum_form(str(node.attrs.get("equation", "")), [len(lab.shape(o)) for o in ops])
        if form is None or len(ops) != 2:
            return lab.barrier(node, "einsum other than a two-operand contraction")
        (sa, sb), so = form
        size = {c: n for sub, o in zip((sa, sb), ops) for c, n in zip(sub, lab.shape(o))}
        batch = [c for c in so if c in sa and c in sb]
        m, n = [c for c in so if c in sa and c not in sb], [c for c in so if c in sb and c not in sa]
        k = [c for c in sa if c in sb and c not in so]

        def arranged(sub: str, name: str, rows: list[str], cols: list[str]) -> torch.Tensor:
            t = lab.full(name).permute(*[sub.index(c) for c in batch + rows + cols])
            return t.reshape(*[size[c] for c in batch], numel([size[c] for c in rows]), numel([size[c] for c in cols]))

        fa, fb = lab.field(ops[0]), lab.field(ops[1])
        res = _contract(lab, arranged(sa, ops[0], m, k), arranged(sb, ops[1], k, n), fa,
                        fa is not None and any(sa.index(c) in fa.axes for c in m),
                        fb is not None and any(sb.index(c) in fb.axes for c in n))
        grid = res.expand(*[size[c] for c in batch], numel([size[c] for c in m]), numel([size[c] for c in n]))
        grid = grid.reshape(*[size[c] for c in batch + m + n])
        out = node.outputs[0]
        lab.set_from_tensor(out, grid.permute(*[(batch + m + n).index(c) for c in so]))
        _product_cost(lab, out, numel(lab.shape(out)) * numel([size[c] for c in k]))

    def keeps_zero(self, node, lab) -> bool:
        """Each removed output entry sums products with a removed entry of a labelled
        operand (the rule couples them): zero if that operand is zero where removed."""
        return any(lab.fields.get(i) is not None and lab.is_zero(i) for i in node.inputs)


def _einsum_form(equation: str, ranks: list[int]) -> tuple[list[str], str] | None:
    """(operand subscripts, output subscripts) with ``...`` spelled out as fresh letters
    (and an implicit output made explicit); None for forms the rule does not handle: a
    letter repeated inside an operand or output, or summed out of one operand alone."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    subs = lhs.split(",")
    if len(subs) != len(ranks):
        return None
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq]
    dots = max((r - len(sub.replace("...", "")) for sub, r in zip(subs, ranks) if "..." in sub), default=0)
    fill = "".join(spare[:dots])
    subs = [sub.replace("...", fill[len(fill) - (r - len(sub.replace("...", ""))):] if r - len(sub.replace("...", "")) else "")
            for sub, r in zip(subs, ranks)]
    if not arrow:  # implicit output: the ellipsis, then letters used once, in order
        once = sorted(c for c in set("".join(subs)) if "".join(subs).count(c) == 1 and c not in fill)
        rhs = fill + "".join(once)
    rhs = rhs.replace("...", fill)
    if any(len(set(s)) != len(s) or len(s) != r for s, r in zip(subs, ranks)) or len(set(rhs)) != len(rhs):
        return None
    if any(sum(c in s for s in subs) == 1 and c not in rhs for c in "".join(subs)):
        return None
    return subs, rhs


@register("sdpa", aten=("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                        "_scaled_dot_product_attention_math"),
          shape_only={"scaled_dot_product_attention.default": _sdpa_shape})
class ScaledDotProductAttention(Rule):
    """Heads are units: a query head, its key/value head (shared under GQA) and its
    output columns go together; the head dimension itself stays uniform."""

    def attention_values(self, node: Node, data: list[str],
                         producer: Callable[[str], Rule | None]) -> int | None:
        return 2 if len(data) >= 3 else None

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
            ms, mf = lab.shape(mask), lab.field(mask)
            if mf is not None and len(ms) == 4 and mf.axes == (1,) and ms[1] == hq:
                # a learned per-head bias (T5's relative positions, shared by every layer):
                # a head's bias entries go with the head
                lab.union(q0[..., :1], mf.labels.reshape(1, hq, 1))
            elif mf is not None:
                lab.pin(q0)
                lab.pin(mf.labels)
            elif len(ms) == 4 and ms[1] > 1:  # a fixed per-head mask cannot lose a head
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

    mixes_channels = True

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
