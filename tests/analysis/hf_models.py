"""Hugging Face transformers built from small random configs (no download), shared by
the tests and ``benchmarks/coverage.py``.

Each architecture stresses a different coupling: BERT's fused query/key/value heads and
pooler, GPT-2's ``Conv1D`` (``addmm`` with ``W[in, out]``), Llama's grouped-query
attention with rotary tables shared by every head, and ViT's patch convolution feeding
a class token and position embeddings.  Importing this module needs ``transformers``.
"""
from __future__ import annotations

from typing import Callable

import torch
import transformers

VOCAB = 100


def _tokens(batch: int = 2, length: int = 7) -> tuple[torch.Tensor]:
    return (torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0)),)


def bert() -> tuple[torch.nn.Module, tuple]:
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(cfg), _tokens()


def bert_classifier() -> tuple[torch.nn.Module, tuple]:
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg), _tokens()


def gpt2() -> tuple[torch.nn.Module, tuple]:
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, use_cache=False)
    return transformers.GPT2LMHeadModel(cfg), _tokens()


def llama_gqa() -> tuple[torch.nn.Module, tuple]:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, max_position_embeddings=32,
                                   use_cache=False)
    return transformers.LlamaForCausalLM(cfg), _tokens()


def vit() -> tuple[torch.nn.Module, tuple]:
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, num_labels=5)
    return transformers.ViTForImageClassification(cfg), (torch.randn(2, 3, 16, 16),)


# name -> (builder, query-head units per attention layer, MLP units per layer)
MODELS: dict[str, tuple[Callable[[], tuple[torch.nn.Module, tuple]], int, int]] = {
    "bert": (bert, 4, 64),
    "bert_classifier": (bert_classifier, 4, 64),
    "gpt2": (gpt2, 4, 128),
    "llama_gqa": (llama_gqa, 2, 96),  # a unit is a key/value head with its 2 query heads
    "vit": (vit, 4, 64),
}


def build(name: str, attention: str = "sdpa") -> tuple[torch.nn.Module, tuple]:
    """A fresh model in eval mode (seeded) and its example inputs."""
    torch.manual_seed(0)
    model, inputs = MODELS[name][0]()
    model.set_attn_implementation(attention)
    return model.eval(), inputs
