"""Ops that are barriers on purpose, each declared once with the reason.

An op here is known: the report names its reason, not "no channel rule", and
``tests/ops/test_opset_completeness.py`` counts it as covered.  A barrier keeps the
channels touching it (only where its inputs carry any: an op on unlabelled tensors, a
mask or an index, keeps nothing and is not reported).  Some reasons say "not analysed":
the op could have a rule, none is written yet; the reason says what the rule would need.
"""
from __future__ import annotations

from .registry import declare_barrier

DATA_SHAPE = "its output's shape depends on the values of its input, not on its shape"
SEQUENCE = "works on ONNX sequences or optionals, which carry no channel axes the analysis follows"
CONTROL = "runs subgraphs (control flow): the analysis does not look inside them"
STRINGS = "works on strings or encoded bytes, not on numeric channels"
QUANTISED = ("an integer kernel with its own scales and zero-points: pruning it would rewrite integer weights "
             "and per-channel quantisation parameters; not analysed (prune the float model, then quantise)")
BACKWARD = "a gradient op: graphprune analyses inference graphs (trace the model in eval mode, outside autograd)"
SYMBOLIC = ("a symbolic shape query: graphprune records with concrete shapes, so such a graph comes from a dynamic-"
            "shape export it does not analyse")

# ---- data-dependent output shapes
declare_barrier("nonzero", DATA_SHAPE, aten=("nonzero",), onnx=("NonZero",))
declare_barrier("unique", DATA_SHAPE, onnx=("Unique",))
declare_barrier("non_max_suppression", DATA_SHAPE + " (the boxes that survive)", onnx=("NonMaxSuppression",))
declare_barrier("compress", DATA_SHAPE + " (the entries its condition selects)", onnx=("Compress",))
declare_barrier("masked_scatter", "fills masked positions from its source in order: which source entry lands "
                "where depends on the mask's values", aten=("masked_scatter",))
declare_barrier("index_put", "writes at positions that come from data", aten=("index_put",))
declare_barrier("local_scalar_dense", "reads a tensor's value into Python (.item()): what follows depends on it",
                aten=("_local_scalar_dense",))

# ---- sequences, optionals, control flow, strings
for _op in ("SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
            "SequenceLength", "SequenceMap", "ConcatFromSequence", "SplitToSequence", "Optional",
            "OptionalGetElement", "OptionalHasElement"):
    declare_barrier(f"onnx_{_op}", SEQUENCE, onnx=(_op,))
for _op in ("If", "Loop", "Scan"):
    declare_barrier(f"onnx_{_op}", CONTROL, onnx=(_op,))
for _op in ("StringConcat", "StringNormalizer", "StringSplit", "RegexFullMatch", "TfIdfVectorizer", "ImageDecoder"):
    declare_barrier(f"onnx_{_op}", STRINGS, onnx=(_op,))

# ---- quantised kernels
for _op in ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul"):
    declare_barrier(f"onnx_{_op}", QUANTISED, onnx=(_op,))
declare_barrier("dynamic_quantize_linear", "computes one scale and zero-point from the whole tensor's range: "
                "every entry's quantisation depends on every channel", onnx=("DynamicQuantizeLinear",))

# ---- gradient ops and symbolic shape queries (core ATen, never in an inference recording)
for _op in ("convolution_backward", "avg_pool2d_backward", "_adaptive_avg_pool2d_backward",
            "max_pool2d_with_indices_backward", "embedding_dense_backward", "native_group_norm_backward",
            "native_layer_norm_backward"):
    declare_barrier(_op.lstrip("_"), BACKWARD, aten=(_op,))
for _op in ("sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "sym_is_contiguous"):
    declare_barrier(_op, SYMBOLIC, aten=(_op,))

# ---- ops whose index maps are not affine in the channel index
declare_barrier("resize_", "resizes its tensor's storage in place to sizes given as data: a compact graph cannot "
                "rewrite them", aten=("resize_",))
declare_barrier("as_strided", "its sizes and strides address raw storage: they cannot be rewritten for a compact "
                "tensor", aten=("as_strided",))
declare_barrier("col2im", "folds channel x kernel-position columns into images: its channel axis interleaves "
                "kernel positions; not analysed", aten=("col2im",), onnx=("Col2Im",))
declare_barrier("max_unpool", "its indices address the flattened N·C·H·W input and its output_shape holds the "
                "channel count; not analysed", onnx=("MaxUnpool",))
declare_barrier("deform_conv", "a convolution sampling at offsets its input computes; not analysed (its weight "
                "would prune like Conv's, the offsets' channels are tied to kernel positions)", onnx=("DeformConv",))
declare_barrier("affine_grid", "builds a sampling grid from affine matrices: its axes are coordinates, not channels",
                onnx=("AffineGrid",))
declare_barrier("det", "the determinant of each matrix on the last two axes: removing a row or column changes it",
                onnx=("Det",))
declare_barrier("lp_normalization", "divides by the norm along an axis: a removed channel's all-zero fibre gives "
                "0/0 = NaN, which a next layer's zero weight does not cancel", onnx=("LpNormalization",))
declare_barrier("mean_variance_normalization", "standardises over axes with no epsilon in the ONNX definition: "
                "a removed channel's zero fibre may give 0/0; not analysed", onnx=("MeanVarianceNormalization",))
declare_barrier("stft", "frames a signal along its time axis into a new frequency axis; not analysed",
                onnx=("STFT",))
declare_barrier("one_hot", "its new axis has a length given by data (a class count), not by a channel",
                aten=("one_hot",), onnx=("OneHot",))
declare_barrier("multinomial", "draws class indices at random from a distribution over its last axis",
                onnx=("Multinomial",))
declare_barrier("mel_weight_matrix", "builds a constant filter bank from scalar inputs (no channels flow in); "
                "no torch implementation is written", onnx=("MelWeightMatrix",))
declare_barrier("cdist", "pairwise distances sum over the feature axis of both operands; not analysed (a rule "
                "would couple both operands' features, as a matmul's contraction does)",
                aten=("_cdist_forward", "_pdist_forward"))
declare_barrier("embedding_bag", "sums or averages bags of embedding rows with offsets and per-sample weights; "
                "not analysed (its columns would prune like embedding's)", aten=("_embedding_bag",))

# ---- losses: they end a training graph, reducing over the class axis
declare_barrier("nll_loss", "a loss: reduces over the class axis, which the model's output keeps whole anyway",
                onnx=("NegativeLogLikelihoodLoss",))
declare_barrier("softmax_cross_entropy", "a loss: reduces over the class axis, which the model's output keeps whole "
                "anyway", onnx=("SoftmaxCrossEntropyLoss",))

# ---- opset 23 attention: fused multi-head ops with head counts as attributes
declare_barrier("onnx_attention", "fused attention whose head counts (q_num_heads, kv_num_heads) are attributes "
                "and whose 3-D inputs pack heads into the hidden axis; not analysed (rewriting would shrink the "
                "head counts with the heads)", onnx=("Attention",))
declare_barrier("rotary_embedding", "rotates pairs of entries along the head dimension with position tables; not "
                "analysed (a rule would couple each rotated pair and slice the cos/sin caches)",
                onnx=("RotaryEmbedding",))
