"""Which names of a module's weights ``torch.func.functional_call`` may be given.

A module reachable under two paths (CoaT's shared ``cpe1`` is also
``serial_blocks1.0.cpe``) holds each weight in one attribute.  ``functional_call`` swaps
an attribute once per name it is given and restores in the same way, so the second
path restores the value the first one swapped in: the user's model is left holding
the recorder's meta tensors, or the plain tensors verification ran with.  Tied weights
in two modules (GPT-2's ``lm_head`` and ``wte``) are two attributes, and both are swapped.
"""
from __future__ import annotations

import torch


def one_name_per_slot(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mapping to hand ``functional_call(..., tie_weights=False)``: each module attribute
    under one name (its first in ``named_modules`` order), holding the tensor ``tensors``
    gives under any name of the model's tensor there (so a tied weight given by its
    first name replaces it in every module that holds it)."""
    given: dict[int, torch.Tensor] = {}
    for fqn, held in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        if fqn in tensors:
            given.setdefault(id(held), tensors[fqn])
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, str]] = set()
    for path, mod in model.named_modules(remove_duplicate=False):
        for attr, held in (*mod._parameters.items(), *mod._buffers.items()):
            if held is None or (id(mod), attr) in seen or id(held) not in given:
                continue
            seen.add((id(mod), attr))
            out[f"{path}.{attr}" if path else attr] = given[id(held)]
    return out
