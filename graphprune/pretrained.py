"""Compact transformers models that save and load like any other.

A compact model built in module mode (:meth:`~graphprune.PrunableGraph.construct_subnet`)
is the user's ``PreTrainedModel`` with smaller layers, but its config still describes the
full model, so ``from_pretrained`` would build the wrong shapes.  :func:`fit_config`
rewrites the config from the layers: with the same widths in every layer (what
``prune(..., uniform=True)`` selects) the standard fields (``num_attention_heads``,
``num_key_value_heads``, ``head_dim``, kept explicit, ``intermediate_size``,
``hidden_size``) describe it exactly and ``save_pretrained`` / ``from_pretrained`` need
nothing from graphprune.  With per-layer widths no standard field can; the config then
also records every tensor shape and width attribute that differs from what the class
builds for it (``graphprune_shapes``, ``graphprune_widths``), plain ``from_pretrained``
refuses the checkpoint with a size mismatch, and :func:`load_pretrained` rebuilds it.

A bias that compensation added to a layer built without one (``o_proj``, ``down_proj``:
:mod:`graphprune.passes.add_bias`) needs the config flag that makes the class build it
(Llama's ``attention_bias`` for ``q/k/v/o_proj``, ``mlp_bias`` for the MLP): it is set,
and the family's other layers get zero biases (what they computed without).  A class with
no such flag (Qwen2, Mistral) keeps the config's fields, records the biases
(``graphprune_biases``), and :func:`load_pretrained` builds them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import GraphPruneError
from .lower.module import resize_module

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_FUSED_ATTENTION = ("qkv_proj", "o_proj")  # Phi-3: q, k and v rows in one projection, in that order
_MLP = ("gate_proj", "up_proj", "down_proj")
_FUSED_MLP = ("gate_up_proj", "down_proj")
#: config flag -> the layers it gives a bias (transformers' Llama family)
_BIAS_FLAGS = {"attention_bias": _ATTENTION, "mlp_bias": _MLP}


def _layers(model: nn.Module, names: tuple[str, ...]) -> list[nn.Module]:
    return [m for m in model.modules() if all(isinstance(getattr(m, n, None), nn.Linear) for n in names)]


def _fields(model: nn.Module) -> dict[str, Any]:
    """The config fields the layers say (the largest per-layer value where they differ):
    attention with separate ``q/k/v/o_proj`` or a fused ``qkv_proj``, and gated MLPs with
    separate or fused ``gate_up_proj`` projections, the decoder families' naming (Llama,
    Mistral, Qwen2/3, Gemma, Phi-3...)."""
    cfg = model.config
    out: dict[str, Any] = {}
    attn = _layers(model, _ATTENTION) + _layers(model, _FUSED_ATTENTION)
    if attn:
        head_dim = getattr(attn[0], "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        out["head_dim"] = head_dim
        queries = [a.o_proj.in_features // head_dim for a in attn]
        keys = [a.k_proj.out_features if hasattr(a, "k_proj") else (a.qkv_proj.out_features - a.o_proj.in_features) // 2
                for a in attn]
        out["num_attention_heads"] = max(queries)
        out["num_key_value_heads"] = max(k // head_dim for k in keys)
    mlp = _layers(model, _MLP) + _layers(model, _FUSED_MLP)
    if mlp:
        out["intermediate_size"] = max(m.down_proj.in_features for m in mlp)
    embed = model.get_input_embeddings()
    if isinstance(embed, nn.Embedding) and hasattr(cfg, "hidden_size"):
        out["hidden_size"] = embed.embedding_dim
    eps = {m.variance_epsilon for m in model.modules() if isinstance(getattr(m, "variance_epsilon", None), float)}
    if len(eps) == 1 and hasattr(cfg, "rms_norm_eps"):  # rescaled with a pruned hidden width (lower/module.py)
        out["rms_norm_eps"] = eps.pop()
    return out


def _numbers(model: nn.Module) -> dict[str, int | float]:
    """Every module's public int and float attributes (widths, epsilons), by ``path.attr``."""
    return {f"{p}.{k}" if p else k: v for p, m in model.named_modules() for k, v in vars(m).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("_")}


def _rejected(cfg: Any) -> str | None:
    """Why the config's own validators (transformers' strict dataclass checks, which
    ``save_pretrained`` and ``from_pretrained`` run) refuse it, or None."""
    validate = getattr(cfg, "validate", None)
    if validate is None:
        return None
    try:
        validate()
    except Exception as exc:  # noqa: BLE001  (the validators' own error types vary by library version)
        return str(exc.__cause__ or exc).strip().splitlines()[-1]
    return None


def _build(model: nn.Module) -> nn.Module:
    """``model``'s class built from its config on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return type(model)(model.config)


def fit_config(model: nn.Module, read: set[str]) -> str | None:
    """Rewrite ``model.config`` (the compact copy's own) to describe ``model``; ``read``:
    the integer attributes its forward reads (``"path.attr"``, see :mod:`.lower.widths`),
    which must come back as they are.  Returns None
    when the standard fields alone describe it (``from_pretrained`` rebuilds it), else
    why not; the config then keeps the full model's fields and records the shapes and
    width attributes that differ from what its class builds, for :func:`load_pretrained`."""
    cfg = model.config
    for key in ("graphprune_shapes", "graphprune_widths", "graphprune_biases"):
        if hasattr(cfg, key):
            delattr(cfg, key)
    widths = _fields(model)
    flags, unflagged = _bias_flags(model, _extra_biases(model))
    fields = {**widths, **flags}
    original = {k: getattr(cfg, k) for k in fields if hasattr(cfg, k)}
    for key, value in fields.items():
        setattr(cfg, key, value)
    reason = _rejected(cfg)
    if reason is None and unflagged:
        reason = (f"{type(cfg).__name__} has no field that makes {type(model).__name__} build a bias for "
                  f"{unflagged[0]}{f' (+{len(unflagged) - 1} more)' if len(unflagged) > 1 else ''}, which "
                  f"compensation added; from_pretrained would drop it")
    elif reason is None:
        fresh = _build(model)
        if _differences(model, fresh, read) == ({}, {}):
            _zero_biases(model, fresh)
            have = _numbers(model)
            for k, v in _numbers(fresh).items():  # widths no forward reads (LlamaMLP.intermediate_size)
                if have.get(k) != v:
                    prefix, _, leaf = k.rpartition(".")
                    setattr(model.get_submodule(prefix) if prefix else model, leaf, v)
            return None
        reason = ("the layers differ in width" if widths else
                  f"graphprune knows no config field for {type(model).__name__}'s widths")
    else:
        reason = f"{type(cfg).__name__} refuses the compact widths: {reason}"
    for key in fields:
        if key in original:
            setattr(cfg, key, original[key])
        else:
            delattr(cfg, key)
    cfg.graphprune_shapes, cfg.graphprune_widths = _differences(model, _build(model), read)
    extra = _extra_biases(model)
    if extra:
        cfg.graphprune_biases = {k: list(model.get_parameter(k).shape) for k in extra}
    return reason


def _extra_biases(model: nn.Module) -> list[str]:
    """Bias parameters of ``model`` that its class, built from its config, does not have
    (added by compensation to layers built without one)."""
    built = {k for k, _ in _build(model).named_parameters()}
    return [k for k, _ in model.named_parameters() if k.endswith(".bias") and k not in built]


def _bias_flags(model: nn.Module, extra: list[str]) -> tuple[dict[str, bool], list[str]]:
    """The config flags (:data:`_BIAS_FLAGS`) that make the class build the ``extra``
    biases, and the biases no flag of the config builds."""
    flags, unflagged = {}, []
    for name in extra:
        layer = name.rsplit(".", 2)[-2]
        flag = next((f for f, layers in _BIAS_FLAGS.items() if layer in layers and hasattr(model.config, f)), None)
        if flag is None:
            unflagged.append(name)
        else:
            flags[flag] = True
    return flags, unflagged


def _zero_biases(model: nn.Module, fresh: nn.Module) -> None:
    """Give every linear layer that ``fresh`` (built with the bias flags set) builds a
    bias for, and ``model`` has none, a zero bias: it computes what it did."""
    built = dict(fresh.named_modules())
    for path, mod in model.named_modules():
        other = built.get(path)
        if isinstance(mod, nn.Linear) and mod.bias is None and isinstance(other, nn.Linear) \
                and other.bias is not None:
            w = mod.weight
            mod.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                    requires_grad=w.requires_grad)


def _differences(model: nn.Module, fresh: nn.Module, read: set[str]
                 ) -> tuple[dict[str, list[int]], dict[str, int | float]]:
    """The tensor shapes, the integer attributes the forward reads and the float
    attributes (a rescaled norm's epsilon) in which ``model`` differs from ``fresh`` (its
    class built from its config); ints no forward reads (stale widths) do not count."""
    built = {k: tuple(v.shape) for k, v in (*fresh.named_parameters(), *fresh.named_buffers())}
    shapes = {k: list(v.shape) for k, v in (*model.named_parameters(), *model.named_buffers())
              if k in built and built[k] != tuple(v.shape)}
    have, fresh_attrs = _numbers(model), _numbers(fresh)
    attrs = {k: v for k, v in have.items() if (k in read or isinstance(v, float)) and fresh_attrs.get(k) != v}
    return shapes, attrs


def load_pretrained(path: str | Path, **kwargs: Any) -> nn.Module:
    """Load a compact model saved with ``save_pretrained``: plain ``from_pretrained`` when
    its config is standard, else the class built from the config, resized to the
    recorded shapes and width attributes, and loaded exactly (``kwargs`` go to
    ``from_pretrained`` / the config)."""
    import transformers
    from safetensors.torch import load_file

    path = Path(path)
    cfg = transformers.AutoConfig.from_pretrained(path, **kwargs)
    cls = getattr(transformers, (cfg.architectures or [""])[0], None)
    if cls is None:
        raise GraphPruneError(f"config.architectures={cfg.architectures!r} names no transformers class",
                              source=str(path), hint="save the model with save_pretrained, which records its class")
    shapes = getattr(cfg, "graphprune_shapes", None)
    biases = getattr(cfg, "graphprune_biases", None)
    if not shapes and not biases:
        return cls.from_pretrained(path, config=cfg)
    model = cls(cfg)
    for name, shape in (biases or {}).items():  # compensation's biases, which the class does not build
        layer = model.get_submodule(name.rpartition(".")[0])
        layer.bias = nn.Parameter(torch.zeros(shape, dtype=layer.weight.dtype))
    resize_module(model, {k: tuple(v) for k, v in (shapes or {}).items()})
    for key, value in getattr(cfg, "graphprune_widths", {}).items():
        prefix, _, leaf = key.rpartition(".")
        setattr(model.get_submodule(prefix) if prefix else model, leaf, value)
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(path / f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    tied = {k for k, v in model.state_dict(keep_vars=True).items() if k in missing
            and any(v is w for n, w in model.state_dict(keep_vars=True).items() if n in state)}
    untied = set(missing) - tied
    if unexpected or untied:
        raise GraphPruneError(f"{path}: the checkpoint does not match its recorded shapes "
                              f"(missing {sorted(untied)[:5]}, unexpected {sorted(unexpected)[:5]})", source=str(path),
                              hint="save the compact model with save_pretrained after construct_subnet(mode='module')")
    return model.eval()
