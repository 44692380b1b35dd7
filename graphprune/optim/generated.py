"""Calibration text a generative language model writes itself: data-free, but real inputs.

A user who holds a pretrained causal LM and no text still has a sampler of the model's own
input distribution: the model.  Sequences sampled from it at temperature 1 (no top-k, no
nucleus: the model's own distribution, as LLM-QAT distils from) stand in for calibration
text.  On ``benchmarks/textlm.py``'s Llama (dense 0.433 next-token accuracy), calibrated
OBSPA on 256 sampled sequences keeps 0.392 at 20% of MACs removed against 0.326 for the
weights-only OBSPA and 0.395 on 512 windows of its real training text
(``benchmarks/results/pretrained.txt``); measured once beside it, 600 distillation steps
on 512 sampled sequences recovered as much as on the real windows (0.418 both).

>>> batches = generated_inputs(model, n=256)      # list of (8, 128) token-id tensors
>>> gp.prune(g, target=0.2, data=batches)         # what gp.prune(g, target=0.2) does for an LM
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from graphprune.errors import GraphPruneError
from graphprune.optim.scoring import CALIBRATED

#: sequences and tokens per sequence sampled when ``gp.prune``/``gp.recover`` generate their own
DEFAULT_SEQUENCES, DEFAULT_LENGTH = 256, 128


def can_generate(model: Any) -> bool:
    """Whether ``model`` is a decoder-only transformers model that can sample text (duck-typed:
    graphprune does not import transformers for every model)."""
    config = getattr(model, "config", None)
    check = getattr(model, "can_generate", None)
    if config is None or not callable(check) or getattr(config, "is_encoder_decoder", False):
        return False
    return bool(check())


def samples_for(model: Any, criterion: str | None) -> bool:
    """Whether a one-shot run of ``criterion`` given no data calibrates on ``model``'s own
    samples: a generative LM, and a criterion that reads calibration (or none named, where
    the default picks one that does)."""
    return (criterion is None or criterion in CALIBRATED) and can_generate(model)


def sampled_reason(sampled: int, reason: str) -> str:
    """A report's reason for its criterion, prefixed with where its calibration came from."""
    return (f"no data given, so {sampled} sequences the model sampled itself (a generative LM: no data from "
            f"outside it) serve as calibration; {reason}")


def generated_inputs(model: nn.Module, n: int | None = None, length: int = DEFAULT_LENGTH, batch: int = 8,
                     seed: int = 0, temperature: float = 1.0) -> list[torch.Tensor]:
    """``n`` token sequences (:data:`DEFAULT_SEQUENCES` by default) sampled from ``model``
    itself, as ``(batch, length)`` id tensors.

    Each starts at the model's BOS token (its EOS when it has none: a stream of documents
    separated by EOS starts a document there) and runs ``length - 1`` sampled tokens; an EOS
    sampled midway does not stop it, as documents follow each other in training streams.
    ``length`` is capped by the model's context.  The global random state is left as it
    was (a forked generator seeded with ``seed``), and so are the model's mode and config.
    """
    if not can_generate(model):
        raise GraphPruneError(f"{type(model).__name__} cannot generate text to calibrate on",
                              hint="pass calibration data (unlabeled batches of model inputs)")
    n = DEFAULT_SEQUENCES if n is None else n
    if n < 1 or length < 2 or batch < 1:
        raise GraphPruneError(f"need n >= 1, length >= 2 and batch >= 1; got n={n}, length={length}, batch={batch}")
    config = model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    length = min(length, context) if context else length
    start = config.bos_token_id if config.bos_token_id is not None else config.eos_token_id
    if isinstance(start, (list, tuple)):
        start = start[0] if start else None
    if start is None:
        raise GraphPruneError(f"{type(model).__name__}'s config names neither a BOS nor an EOS token to start from",
                              hint="pass calibration data (unlabeled batches of model inputs)")
    prompts = torch.full((n, 1), int(start), dtype=torch.long)
    return list(_sample(model, prompts, length, seed, temperature, int(start)).split(batch))


def continuations(model: nn.Module, rows: torch.Tensor, n: int, prefix: int = 32, batch: int = 8, seed: int = 0,
                  temperature: float = 1.0) -> list[torch.Tensor]:
    """``n`` sequences ``model`` writes on from the first ``prefix`` tokens of ``rows``
    (``(N, L)`` token ids, cycled through), each as long as the rows, as ``(batch, L)`` id
    tensors: more distillation text in the neighbourhood of the user's own.

    Distilling a pruned LM on 512 calibration windows over-fits them: on
    ``benchmarks/textlm.py``'s Llama at 30% of MACs removed, 600 steps on those windows
    recover 0.408 next-token accuracy, on fresh training windows every step 0.420. The
    dense model's continuations of the windows' openings are fresh text drawn from the
    teacher itself, and close most of that gap (``gp.recover``'s ``augment``).
    Global random state and the model's mode are left as they were."""
    if not can_generate(model):
        raise GraphPruneError(f"{type(model).__name__} cannot generate text to continue",
                              hint="augment=0: distil on the given data alone")
    if n < 1:
        raise GraphPruneError(f"need n >= 1 continuations, got {n}")
    if rows.dim() != 2 or rows.dtype not in (torch.int32, torch.int64) or not len(rows):
        raise GraphPruneError(f"continuations start from (sequences, tokens) integer ids; got {rows.dtype} "
                              f"{tuple(rows.shape)}", hint="augment=0: distil on the given data alone")
    length = rows.shape[1]
    if not 1 <= prefix < length:
        raise GraphPruneError(f"the prefix must leave tokens to write: 1 <= prefix < {length}; got {prefix}")
    prompts = rows[torch.arange(n) % len(rows), :prefix].long()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    return list(_sample(model, prompts, length, seed, temperature, int(pad)).split(batch))


def _sample(model: nn.Module, prompts: torch.Tensor, length: int, seed: int, temperature: float,
            pad: int) -> torch.Tensor:
    """``model``'s samples continuing each row of ``prompts`` to ``length`` tokens, from the
    model's own distribution (no top-k, no nucleus), in a forked random state, the model's
    mode restored; an EOS midway does not stop a row."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was = model.training
    model.eval()
    rows: list[torch.Tensor] = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(seed)
            for first in range(0, len(prompts), 64):  # 64 sequences per call: a big LM's KV cache stays small
                ids = prompts[first:first + 64].to(device)
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                     temperature=temperature, top_k=0, top_p=1.0, max_length=length,
                                     eos_token_id=None, pad_token_id=pad, use_cache=True)
                rows.append(out[:, :length].cpu())
    finally:
        model.train(was)
    return torch.cat(rows)
