"""Normalisation layers.

Batch and instance norm are per channel (identity; their affine parameters and
running statistics are sliced with the channel).  Group norm normalises over groups
of channels, so a unit is a whole group.  Layer and RMS norm reduce over their
normalised axes: removing an entry there changes the statistics, so those atoms are
pinned.
"""
from __future__ import annotations

from ..analysis.labels import Field, Labels
from ..ir.graph import Node
from .common import ref_name
from .registry import Rule, register


@register("batch_norm", aten=("batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm",
                              "_native_batch_norm_legit", "instance_norm"),
          onnx=("BatchNormalization", "InstanceNormalization"))
class BatchNorm(Rule):
    def propagate(self, node: Node, lab: Labels) -> None:
        x = ref_name(node.attrs.get("input"))
        ch = lab.axis_labels(x, 1) if x else None
        for key in ("weight", "bias", "running_mean", "running_var", "scale", "B", "input_mean", "input_var"):
            p = ref_name(node.attrs.get(key))
            if p is not None and lab.graph.values[p].kind != "act":
                lab.param_axis(p, 0, ch)
        lab.set_field(node.outputs[0], Field((1,), ch) if ch is not None else None)
        for o in node.outputs[1:]:
            lab.fields[o] = None


@register("layer_norm", aten=("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"),
          onnx=("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"))
class LayerNorm(Rule):
    def propagate(self, node: Node, lab: Labels) -> None:
        x = node.inputs[0]
        rank = len(lab.shape(x))
        shape = node.attrs.get("normalized_shape")
        k = len(shape) if shape is not None else rank - (node.attrs.get("axis", -1) % rank)
        f = lab.field(x)
        if f is not None and any(a >= rank - k for a in f.axes):
            lab.pin(f.labels)
        for affine in node.inputs[1:]:  # scale/bias live on the normalised (pinned) axes
            fa = lab.field(affine)
            if fa is not None:
                lab.pin(fa.labels)
        lab.set_field(node.outputs[0], f)
        for o in node.outputs[1:]:
            lab.fields[o] = None


@register("group_norm", aten=("group_norm", "native_group_norm"), onnx=("GroupNormalization",))
class GroupNorm(Rule):
    def propagate(self, node: Node, lab: Labels) -> None:
        x = ref_name(node.attrs.get("input")) or node.inputs[0]
        g = int(node.attrs.get("num_groups", node.attrs.get("group", 1)))
        ch = lab.axis_labels(x, 1)
        if ch is not None:
            rows = ch.reshape(g, -1)
            lab.union(rows[:, :1], rows)
        for key in ("weight", "bias", "scale"):
            p = ref_name(node.attrs.get(key))
            if p is not None:
                lab.param_axis(p, 0, ch)
        lab.set_field(node.outputs[0], Field((1,), ch) if ch is not None else None)
        for o in node.outputs[1:]:
            lab.fields[o] = None

    def rewrite_fx(self, node, fx_node, shrink) -> None:
        old_c, new_c = shrink.old_shape(node.outputs[0])[1], shrink.new_shape(node.outputs[0])[1]
        g = int(node.attrs.get("num_groups", node.attrs.get("group", 1)))
        new_g = new_c // (old_c // g)
        if "num_groups" in node.attrs:
            shrink.set_fx_arg(fx_node, "num_groups", new_g)
        else:
            shrink.set_fx_arg(fx_node, "group", new_g)
            shrink.set_fx_arg(fx_node, "C", new_c)

    def rewrite_onnx(self, node, proto, shrink) -> None:
        old_c, new_c = shrink.old_shape(node.outputs[0])[1], shrink.new_shape(node.outputs[0])[1]
        g = int(node.attrs.get("num_groups", 1))
        shrink.set_onnx_attr(proto, "num_groups", new_c // (old_c // g))
