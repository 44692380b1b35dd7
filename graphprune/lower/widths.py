"""Find the width attributes (``num_heads``, ``head_dim``, ``all_head_size``...) that a
shrunk copy of the user's module must update, by watching what its forward reads.

A layer's own widths are set from its tensors (:mod:`.module`); the widths a forward
uses to *reshape* (an attention's head count, a ViT's ``hidden_dim``) live in plain
integer attributes whose meaning no name reliably tells (``head_dim`` stays when heads
go, ``num_heads`` does not; ``layer_idx`` is no width at all).  So: :func:`record_reads`
runs the full-size copy once and notes which integer attributes each module's code
reads; :func:`candidates` proposes, for each read attribute, the values it would take
if it scaled with a width that shrank beneath it; :func:`settle` tries combinations,
fewest changes first, until the copy reproduces the zeroed model.  The same decision
is taken for an attribute in every instance of a class (every layer's ``num_heads``
scales, or none does), which keeps the search small.

A model's configuration object, when its modules keep one as ``config`` (transformers
models), is watched like a module: Phi-3's attention slices its fused ``qkv_proj`` at
``config.num_attention_heads * head_dim``. It is one object shared by every layer, so it
is watched once, under the path of the outermost module holding it (``"#config"`` after
the path), and can only take widths every layer shares.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

#: combinations :func:`settle` tries before giving up (each is one forward on the example)
MAX_TRIALS = 64


@dataclass(frozen=True)
class Candidate:
    """Attribute ``attr`` of the module at ``path`` (class ``cls``) holds ``value``; read by
    its forward, it may have to become one of ``options`` (most likely first)."""

    path: str
    cls: str
    attr: str
    value: int
    options: tuple[int, ...]


CONFIG = "#config"


def _int_attrs(mod: object) -> set[str]:
    return {k for k, v in vars(mod).items() if isinstance(v, int) and not isinstance(v, bool) and not k.startswith("_")}


def _watched(model: nn.Module) -> list[tuple[str, object]]:
    """Every module by its path, then every distinct ``config`` object its modules hold,
    under the outermost holder's path plus :data:`CONFIG`."""
    out: list[tuple[str, object]] = []
    configs: set[int] = set()
    for path, mod in model.named_modules():
        out.append((path, mod))
        cfg = vars(mod).get("config")
        if cfg is not None and not isinstance(cfg, nn.Module) and id(cfg) not in configs and hasattr(cfg, "__dict__"):
            configs.add(id(cfg))
            out.append((path + CONFIG, cfg))
    return out


def _resolve(model: nn.Module, path: str) -> object:
    """The module at ``path``, or the config object a :data:`CONFIG` path names."""
    if path.endswith(CONFIG):
        return model.get_submodule(path[: -len(CONFIG)]).config
    return model.get_submodule(path)


def record_reads(model: nn.Module, run: Callable[[], Any]) -> dict[str, set[str]]:
    """Module path -> the integer attributes of that module its code read during ``run()``.

    Each module's (and config's, see the module docstring) class is swapped for the
    duration for a subclass whose ``__getattribute__`` notes the reads, and swapped back,
    whatever ``run`` does."""
    reads: dict[str, set[str]] = {}
    swapped: list[tuple[object, type]] = []
    try:
        for path, mod in _watched(model):
            watched = _int_attrs(mod)
            if not watched:
                continue
            seen = reads.setdefault(path, set())
            cls = type(mod)

            def getattribute(self: object, name: str, _cls: type = cls, _watched: set = watched,
                             _seen: set = seen) -> Any:
                if name in _watched:
                    _seen.add(name)
                return _cls.__getattribute__(self, name)

            try:
                mod.__class__ = type(cls.__name__, (cls,), {"__getattribute__": getattribute,
                                                            "__module__": cls.__module__})
            except TypeError:  # a class that cannot be subclassed or swapped (a scripted module): unwatched
                continue
            swapped.append((mod, cls))
        run()
    finally:
        for mod, cls in swapped:
            mod.__class__ = cls
    return {p: s for p, s in reads.items() if s}


def candidates(model: nn.Module, reads: dict[str, set[str]], widths: list[tuple[str, int, int]],
               skip: set[str]) -> list[Candidate]:
    """For every read integer attribute (``skip``: the paths of layers whose widths are set
    already), the values it takes if it scales like one of the widths that shrank in its
    module's subtree: ``value * new / old`` where that is a whole number (``value == old``
    first: an attribute holding the width itself)."""
    out = []
    for path, attrs in sorted(reads.items()):
        if path in skip:
            continue
        mod = _resolve(model, path)
        root = path.removesuffix(CONFIG)
        below = {(old, new) for p, old, new in widths if old != new and (not root or p == root or p.startswith(root + "."))}
        for attr in sorted(attrs):
            value = getattr(mod, attr)
            if value <= 0:
                continue
            opts = [new for old, new in below if old == value]
            opts += [new * value // old for old, new in sorted(below) if (new * value) % old == 0]
            opts = [o for o in dict.fromkeys(opts) if 0 < o != value]
            if opts:
                out.append(Candidate(path, type(mod).__name__, attr, value, tuple(opts)))
    return out


def settle(model: nn.Module, found: list[Candidate], check: Callable[[], str | None],
           max_trials: int = MAX_TRIALS) -> tuple[dict[str, tuple[int, int]] | None, str | None]:
    """Set the candidates' attributes so that ``check()`` (None when the copy reproduces the
    zeroed model, else why not) passes, trying combinations of (class, attribute) keys,
    fewest changes first.  Returns ``({"path.attr": (old, new)}, None)`` on success, or
    ``(None, why)`` after ``max_trials`` combinations or all of them (the reason of the
    first, unchanged trial: later ones fail for the wrong guesses)."""
    keys = sorted({(c.cls, c.attr) for c in found})
    width = {k: max(len(c.options) for c in found if (c.cls, c.attr) == k) for k in keys}
    combos = (dict(zip(subset, picks)) for changed in range(len(keys) + 1)
              for subset in itertools.combinations(keys, changed)
              for picks in itertools.product(*(range(width[k]) for k in subset)))
    first = None
    for choice in itertools.islice(combos, max_trials):
        applied = {}
        for c in found:
            pick = choice.get((c.cls, c.attr))
            new = c.options[pick] if pick is not None and pick < len(c.options) else c.value
            setattr(_resolve(model, c.path), c.attr, new)
            if new != c.value:
                applied[f"{c.path}.{c.attr}" if c.path else c.attr] = (c.value, new)
        reason = check()
        if reason is None:
            return applied, None
        first = first or reason
    tried = f"; no other value of the width attributes {sorted({k[1] for k in keys})} helped" if keys else ""
    return None, f"{first}{tried}"
