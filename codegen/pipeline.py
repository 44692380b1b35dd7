"""The Relax pass pipeline graphprune compiles with: fuse, apply tuning records, schedule the rest.

It is TVM's ``meta_schedule.compile_relax`` pipeline plus default schedules on CPU (TVM's
has none there, see :mod:`.schedules`). Tuning extracts its tasks with :func:`fuse` so the
database keys are exactly the functions this pipeline looks up.
"""
from __future__ import annotations

import importlib
import logging

import tvm
from tvm import relax, te, tirx, topi
from tvm.s_tir import SBlockRealize, Schedule, meta_schedule as ms
from tvm.target import Target

from .fold_norms import fold_batch_norms
from .fusible import flat_matmuls, fusible_forms
from .phantom_norm import fuse_phantom_layer_norm
from .schedules import default_schedule_pass
from .transfer import CarriedOver

_LOG = logging.getLogger("graphprune.codegen")


def _backend(target: Target):
    # relax.pipeline.dataflow_lower_passes fails for CPU in 0.27 (cpu_generic does not
    # re-export it), so the backend's pipeline module is used directly.
    name = "cuda" if target.kind.name == "cuda" else "cpu_generic"
    return importlib.import_module(f"tvm.relax.backend.{name}.pipeline")


def _fast_gelu(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """GELU with TVM's vectorisable ``fast_erf`` instead of ``erf``, which LLVM leaves as one scalar
    libm call per element (a third of a small ViT's MLP layer, measured)."""
    def gelu(x: te.Tensor) -> te.Tensor:
        half = tirx.const(0.5, x.dtype)
        return x * (half + topi.fast_erf(x * tirx.const(0.5 ** 0.5, x.dtype)) * half)

    return bb.call_te(gelu, call.args[0], primfunc_name_hint="gelu")


def _cpu_passes(target: Target) -> tuple[list[tvm.transform.Pass], dict]:
    """CPU only: convolutions in NHWC, fast math and GELU on ``fast_erf``.

    - NHWC puts channels innermost, where the tuned loops vectorise; meta-schedule finds twice
      as fast convolutions at the same trials as in NCHW (two 3x3 layers, 48-64 channels at
      28x28, 32 trials: 0.83 vs 1.64 ms, 1 thread). Layout transforms are inserted only where
      a layout-agnostic chain of ops begins and ends.
    - Fast math: erf, exp, tanh and softmax as TVM's polynomial approximations (float32
      accurate), which vectorise; onnxruntime does the same.
    """
    if target.kind.name != "llvm":
        return [], {}
    return [_convolutions_to_nhwc, relax.transform.FastMathTransform()], {"relax.nn.gelu": _fast_gelu}


def _calls(mod: tvm.IRModule, op_name: str) -> bool:
    found: list[bool] = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, lambda e: found.append(
                isinstance(e, relax.Call) and getattr(e.op, "name", None) == op_name))
    return any(found)


@tvm.transform.module_pass(opt_level=0, name="ConvolutionsToNHWC")
def _convolutions_to_nhwc(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """``ConvertLayout`` to NHWC for models with 2-d convolutions. TVM 0.27's pass fails
    (``std::bad_alloc``) on some graphs, e.g. torch's ``nn.MultiheadAttention`` exported
    through torch.export; the layout is only a speed choice, so those keep NCHW."""
    if not _calls(mod, "relax.nn.conv2d"):
        return mod
    try:
        # transposed convolutions stay NCHW: TVM 0.27 legalises them in no other layout, and the
        # pass would otherwise carry NHWC into them from the convolution before
        return relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"],
                                              "relax.nn.conv2d_transpose": ["NCHW", "IOHW"]})(mod)
    except tvm.error.InternalError as exc:
        _LOG.info("convolutions stay NCHW: TVM's ConvertLayout failed on this graph (%s)", exc)
        return mod


def fuse(mod: tvm.IRModule, target: Target) -> tvm.IRModule:
    """Legalise and fuse: the functions tuning tasks are extracted from.

    The passes are listed here rather than taken from the backend's ``legalize_passes``,
    because CUDA's also applies dlight schedules, which would hide functions from the database.
    On CPU the weights of each fused function are marked layout-free, so tuned schedules may
    store them pre-packed in the tiles their loops read (``RewriteLayout``); the packing itself
    is split off and folded into the constants at compile time (:func:`compile_pipeline`).
    """
    cpu, legalize = _cpu_passes(target)
    passes = [
        flat_matmuls,  # linear layers as 2-d matmuls, however torch decomposed them (before any folding)
        fold_batch_norms,  # into the convolutions before them: scaled weights, no norm epilogue
        fuse_phantom_layer_norm,  # pruned-width layer norms: one kernel each, not five
        fusible_forms,  # clips and constant-index takes as ops layout conversion and FuseOps see through
        *cpu,
        # the batch norms left (after an add, on [N, C] features) as elementwise ops, which fuse
        # into the kernel before them
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        *_backend(target).library_dispatch_passes(target),
        relax.transform.LegalizeOps(customize_legalize_map=legalize),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    if target.kind.name == "llvm":
        passes += [relax.transform.AttachAttrLayoutFreeBuffers(), _unmark_unpackable]
    with target:
        return tvm.transform.Sequential(passes)(mod)


@tvm.transform.module_pass(opt_level=0, name="UnmarkUnpackable")
def _unmark_unpackable(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Functions that read a marked weight through index arithmetic, unmarked: TVM 0.27's
    ``RewriteLayout`` packs such a weight wrongly or not at all. A transposed convolution
    reads its kernel flipped (``W[i, o, 3 - h, 3 - w]``), and its packed kernel came out as
    garbage (NaN out of timm's LowFormer with default schedules); a group norm in NHWC reads
    its affine through a reshape (``B[c % 64]``), and the pass raised (poolformer), in
    tuning and in default schedules alike. Every other function keeps its mark, so the
    database's records still match them."""
    out = tvm.IRModule(attrs=mod.attrs)
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and "layout_free_buffers" in func.attrs and not _packable(func):
            func = func.without_attr("layout_free_buffers")
        out[gv] = func
    return out


def _packable(func: tvm.tirx.PrimFunc) -> bool:
    """Whether every block that reads one of ``func``'s marked weights indexes it by its own
    iteration variables and constants alone (no flip, no reshape arithmetic)."""
    if _plain_loops(func):  # nothing is packed in a hand-written kernel
        return True
    marked = {func.params[int(i)].name for i in func.attrs["layout_free_buffers"]}
    sch = Schedule(tvm.IRModule({"main": func}))
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        stmt = sch.get(block)
        own = [v.var for v in stmt.iter_vars]

        def plain(index: tirx.PrimExpr) -> bool:
            return isinstance(index, tirx.IntImm) or any(index.same_as(v) for v in own)

        if any(region.source.name in marked and not all(plain(r.min) for r in region.region)
               for region in stmt.reads):
            return False
    return True


def _plain_loops(func: tvm.tirx.PrimFunc) -> bool:
    """A hand-written kernel in plain loops (the BSR kernels of :mod:`.sparse`), with no root
    block for TVM's block-level passes to parse."""
    return not isinstance(func.body, SBlockRealize)


@tvm.transform.module_pass(opt_level=0, name="PrepackWeights")
def _prepack_weights(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Split the weight packing off the tuned functions and fold it into the constants, once.

    TVM's split pass parses every PrimFunc as a root block; hand-written kernels
    (:func:`_plain_loops`) have none and pack nothing, so they are set aside for it.
    Folding leaves each call's tuple of packed weights built and unpacked though nothing reads
    it: four VM instructions per kernel (over half of a CNN's), which dead-code elimination drops.
    """
    aside = {gv: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and _plain_loops(f)}
    rest = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv not in aside}, attrs=mod.attrs)
    rest = tvm.transform.Sequential([relax.transform.SplitLayoutRewritePreproc(),
                                     relax.transform.FoldConstant(),
                                     relax.transform.CanonicalizeBindings(),
                                     relax.transform.DeadCodeElimination()])(rest)
    for gv, func in aside.items():
        rest[gv] = func
    return rest


def compile_pipeline(target: Target, database: ms.Database | None,
                     default_schedules: bool = True, carried: CarriedOver | None = None) -> tvm.transform.Pass:
    """A Relax pipeline for ``tvm.compile`` of a :func:`fuse`-d module: records from ``database``
    first, then schedules ``carried`` over from records of other extents (CPU), then default
    schedules, then lowering to the VM."""
    backend = _backend(target)

    @tvm.transform.module_pass(opt_level=3, name="GraphpruneCompile")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            if database is not None:
                with database:
                    mod = relax.transform.MetaScheduleApplyDatabase()(mod)
            if default_schedules:
                mod = default_schedule_pass(target, carried)(mod)
            if target.kind.name == "llvm":  # only CPU schedules re-lay weights out (fuse marks them)
                mod = _prepack_weights(mod)
            return tvm.transform.Sequential(backend.dataflow_lower_passes(target)
                                            + backend.finalize_passes(target))(mod)

    return _pipeline


def compile_fused(fused: tvm.IRModule, target: Target, database: ms.Database | None = None,
                  default_schedules: bool = True, carried: CarriedOver | None = None) -> relax.VMExecutable:
    """Compile a module returned by :func:`fuse` for ``target`` into a VM executable.

    Fusing once, before both the database lookup and compilation, is what makes tuning
    records apply: a database is keyed on the fused functions.
    """
    with tvm.transform.PassContext(opt_level=3):
        return tvm.compile(fused, target=target,
                           relax_pipeline=compile_pipeline(target, database, default_schedules, carried))
