"""Lower a compact plan onto a copy of the user's own module: same classes, smaller layers.

The graph lowering (:mod:`.torch`) emits an exported graph; this one keeps the user's
``nn.Module`` tree (its class, methods, ``generate()``, ``save_pretrained()``) and only
swaps each sliced parameter or buffer for its kept rows, then sets the layer attributes
that hold those widths (``out_features``, ``in_channels``, ``num_features``,
``normalized_shape``...), and gives a linear or convolution layer the bias the plan adds
to it (compensated means, :mod:`graphprune.passes.add_bias`).  That is only sound where the layer's forward reads nothing
but its tensors and those attributes, so a sliced tensor must belong to a *standard
layer* (:data:`LAYERS`, or a norm-like leaf holding only 1-D scales); anything else is a
:class:`NotInPlace` with the reason, and the caller falls back to the graph.  Widths
held elsewhere (an attention's ``num_heads``) are :mod:`.widths`' job, and whether the
result computes what the zeroed model computed is the caller's check: this module
decides nothing the plan has not decided.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from graphprune.errors import NotInPlace
from graphprune.ir.graph import Graph
from graphprune.passes.add_bias import AddedBias
from graphprune.passes.plan import CompactPlan

#: layers whose forward reads only their tensors and the attributes :func:`_set_layer_widths` sets
#: (MultiheadAttention's widths are plain attributes that :mod:`.widths` finds)
LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase,
                                       nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.MultiheadAttention,
                                       *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


@dataclass
class Shrunk:
    """What :func:`shrunk_copy` changed: ``widths`` lists every (module path, old size,
    new size) of a sliced dim, which :mod:`.widths` turns into candidate attribute values;
    ``layers`` the paths of the layers whose attributes were set."""

    widths: list[tuple[str, int, int]] = field(default_factory=list)
    layers: set[str] = field(default_factory=set)


def is_standard(module: nn.Module) -> bool:
    """A layer whose widths live in its tensors' shapes and the attributes set here: one of
    :data:`LAYERS`, or a norm-like leaf (no children, only 1-D parameters: RMS norms of
    transformers' model files, T5's layer norm)."""
    if isinstance(module, LAYERS):
        return True
    params = list(module.parameters(recurse=False))
    return not list(module.children()) and bool(params) and all(p.dim() == 1 for p in params)


def shrunk_copy(model: nn.Module, ir: Graph, plan: CompactPlan,
                tensors: dict[str, torch.Tensor]) -> tuple[nn.Module, Shrunk]:
    """A deep copy of ``model`` with ``plan``'s kept indices applied, ``model`` untouched.

    The sliced tensors are cut from ``tensors`` (the weights by the user's names; the
    module's own where absent) and handed to the copy as it is made, so the full-size
    originals are never copied: memory is the user's model plus the compact one (an LLM's
    copy would double it).  Raises :class:`NotInPlace` when the plan erases operators or
    folds batch norms (the module's forward would still run them), or when a sliced
    tensor is held by a module that is not a standard layer."""
    if plan.constants or plan.erased:
        raise NotInPlace(f"the plan erases {len(plan.erased)} operator(s) whose groups were zeroed whole: "
                         f"the module's forward would still run them")
    if plan.folds:
        raise NotInPlace("batch norms folded into their layers (fold_bn=True) change the module's structure")
    owners: dict[str, list[tuple[str, nn.Module, str]]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        for attr, t in (*mod._parameters.items(), *mod._buffers.items()):
            if t is not None:
                owners.setdefault(f"{path}.{attr}" if path else attr, []).append((path, mod, attr))
    by_tensor: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for holders in owners.values():
        for path, mod, attr in holders:
            by_tensor.setdefault(id(getattr(mod, attr)), []).append((path, mod, attr))
    sliced: dict[str, dict[int, torch.Tensor]] = {}
    for value, dims in plan.params.items():
        name = ir.values[value].source_name
        if name is not None and dims:
            sliced.setdefault(name, {}).update(dims)
    memo: dict[int, torch.Tensor] = {}
    out = Shrunk()
    rms: list[tuple[str, int, int]] = []
    for name, dims in sorted(sliced.items()):
        if name not in owners:
            raise NotInPlace(f"{name} is sliced but is no parameter or buffer of the module")
        held = getattr(owners[name][0][1], owners[name][0][2])
        holders = by_tensor[id(held)]
        for path, mod, _ in holders:
            if not is_standard(mod):
                raise NotInPlace(f"{name} is sliced but belongs to {path or 'the model'} "
                                 f"({type(mod).__name__}), not a standard layer")
        t = tensors.get(name, held).detach()
        for d, idx in sorted(dims.items()):
            out.widths.extend((path, t.shape[d], len(idx)) for path, _, _ in holders)
            if d == 0 and t.dim() == 1:
                rms.extend((path, t.shape[0], len(idx)) for path, _, _ in holders)
            t = t.index_select(d, idx.to(t.device))
        # every sliced tensor went through index_select, which copies: no clone (a second
        # copy of each of Phi-3-mini's MLP matrices took 8 s)
        memo[id(held)] = nn.Parameter(t, requires_grad=held.requires_grad) if isinstance(held, nn.Parameter) else t
        out.layers.update(path for path, _, _ in holders)
    for name, t in tensors.items():  # weights given other than the module's own (a verification's copy)
        if name in owners and id(held := getattr(owners[name][0][1], owners[name][0][2])) not in memo \
                and t is not held:
            memo[id(held)] = nn.Parameter(t.detach().clone(), requires_grad=held.requires_grad) \
                if isinstance(held, nn.Parameter) else t.detach().clone()
    try:
        compact = copy.deepcopy(model, memo)
    except Exception as exc:  # noqa: BLE001  (a module that cannot be copied keeps the graph form)
        raise NotInPlace(f"the model cannot be deep-copied ({type(exc).__name__}: {exc})") from exc
    for added in plan.biases:
        _give_bias(compact, owners, added)
    for path in out.layers:
        _set_layer_widths(compact.get_submodule(path), path)
    for path, old, new in rms:
        _rescale_rms(compact.get_submodule(path), old, new)
    return compact, out


def module_biases(model: nn.Module, biases: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``biases`` (added biases by weight name, ``path.weight``) as the ``path.bias``
    entries that run ``model`` with them through ``torch.func.functional_call``: each
    weight's module must be a linear or convolution layer without a bias (its forward adds
    ``self.bias`` when there is one).  The zeroed model plus these biases is what a
    compensated compact model must reproduce."""
    out = {}
    for name, b in biases.items():
        path, _, leaf = name.rpartition(".")
        mod = model.get_submodule(path) if path else model
        if leaf != "weight" or not isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) or mod.bias is not None:
            raise NotInPlace(f"{name} gets an added bias, but {path or 'the model'} ({type(mod).__name__}) is not "
                             f"a linear or convolution layer without one")
        out[f"{path}.bias" if path else "bias"] = b
    return out


def _give_bias(compact: nn.Module, owners: dict[str, list[tuple[str, nn.Module, str]]], added: AddedBias) -> None:
    """The layer holding ``added.weight`` in ``compact`` gets ``added.value`` as its bias
    parameter; only a linear or convolution layer without one can take it."""
    holders = owners.get(added.weight, [])
    for path, _, attr in holders:
        mod = compact.get_submodule(path) if path else compact
        if attr != "weight" or not isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) or mod.bias is not None:
            raise NotInPlace(f"{added.weight} gets an added bias, but {path or 'the model'} ({type(mod).__name__}) is "
                             f"not a linear or convolution layer without one")
        w = mod.weight
        mod.bias = nn.Parameter(added.value.to(dtype=w.dtype, device=w.device).clone(), requires_grad=w.requires_grad)
    if not holders:
        raise NotInPlace(f"{added.weight} gets an added bias but is no parameter of the module")


def _rescale_rms(mod: nn.Module, old: int, new: int) -> None:
    """Keep an RMS norm exact when its axis loses ``old - new`` entries that were zero.

    The zeroed model divides by ``sqrt(S / old + eps)``, the compact one by
    ``sqrt(S / new + eps')``; with ``eps' = eps * old / new`` the second is the first
    times ``sqrt(old / new)``, which the scale absorbs.  Applied to nn.RMSNorm and to
    norm-like leaves with a float ``variance_epsilon`` or ``eps`` (transformers' and T5's
    RMS norms); a norm that also subtracts a mean cannot be kept exact by any rescale,
    and the caller's check against the zeroed model refuses it, as it would without."""
    if isinstance(mod, LAYERS) and not (hasattr(nn, "RMSNorm") and isinstance(mod, nn.RMSNorm)):
        return
    attr = next((a for a in ("variance_epsilon", "eps") if isinstance(getattr(mod, a, None), float)), None)
    if attr is None or old == new:
        return
    if isinstance(mod, nn.RMSNorm) and mod.eps is None:
        return  # torch's default eps depends on the dtype: not ours to rescale
    setattr(mod, attr, getattr(mod, attr) * old / new)
    with torch.no_grad():
        mod.weight.mul_((old / new) ** 0.5)


def _set_layer_widths(mod: nn.Module, path: str) -> None:
    """Set a standard layer's width attributes from its (sliced) tensors' shapes."""
    if isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, nn.modules.conv._ConvNd):
        _set_conv_widths(mod, path)
    elif isinstance(mod, nn.modules.batchnorm._NormBase):
        mod.num_features = (mod.weight if mod.weight is not None else mod.running_mean).shape[0]
    elif isinstance(mod, nn.GroupNorm):
        per_group = mod.num_channels // mod.num_groups
        mod.num_channels = mod.weight.shape[0]
        if mod.num_channels % per_group:
            raise NotInPlace(f"{path}: {mod.num_channels} channels left do not fill groups of {per_group}")
        mod.num_groups = mod.num_channels // per_group
    elif isinstance(mod, nn.Embedding):
        mod.num_embeddings, mod.embedding_dim = mod.weight.shape
    elif hasattr(mod, "normalized_shape") and getattr(mod, "weight", None) is not None:
        mod.normalized_shape = tuple(mod.weight.shape)


def _set_conv_widths(mod: nn.modules.conv._ConvNd, path: str) -> None:
    """A convolution's channels and groups; a depthwise one (groups == channels) stays depthwise."""
    depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
    w = mod.weight  # [out, in/groups, ...]; transposed: [in, out/groups, ...]
    if mod.transposed:
        in_ch = w.shape[0]
        mod.groups = in_ch if depthwise else mod.groups
        out_ch = w.shape[1] * mod.groups
    else:
        out_ch = w.shape[0]
        mod.groups = out_ch if depthwise else mod.groups
        in_ch = w.shape[1] * mod.groups
    if out_ch % mod.groups or in_ch % mod.groups:
        raise NotInPlace(f"{path}: {in_ch} input / {out_ch} output channels do not fill {mod.groups} groups")
    mod.in_channels, mod.out_channels = in_ch, out_ch


def resize_module(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """Give the tensors named in ``shapes`` those (smaller) shapes, keeping their leading
    entries, and set their layers' width attributes: a freshly built full-width module
    made ready to load a compact model's saved weights (the values are overwritten)."""
    holders: dict[str, list[tuple[str, nn.Module, str]]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        for attr, t in (*mod._parameters.items(), *mod._buffers.items()):
            if t is not None:
                holders.setdefault(f"{path}.{attr}" if path else attr, []).append((path, mod, attr))
    touched = set()
    for name, shape in shapes.items():
        if name not in holders:
            raise NotInPlace(f"the saved shapes name {name}, which {type(model).__name__} does not have")
        path, mod, attr = holders[name][0]
        held = getattr(mod, attr)
        if len(shape) != held.dim() or any(n > m for n, m in zip(shape, held.shape)):
            raise NotInPlace(f"{name}: saved shape {tuple(shape)} does not fit in {tuple(held.shape)}")
        t = held.detach()[tuple(slice(0, n) for n in shape)].clone()
        new = nn.Parameter(t, requires_grad=held.requires_grad) if isinstance(held, nn.Parameter) else t
        for p, m, a in holders[name]:
            (m._parameters if isinstance(held, nn.Parameter) else m._buffers)[a] = new
            touched.add(p)
    for path in touched:
        mod = model.get_submodule(path)
        if is_standard(mod):
            _set_layer_widths(mod, path)
