"""Hugging Face transformers built from small random configs (no download), shared by
the tests and ``benchmarks/coverage.py``.

Each architecture stresses a different coupling: BERT's fused query/key/value heads and
pooler, GPT-2's ``Conv1D`` (``addmm`` with ``W[in, out]``), Llama's grouped-query
attention with rotary tables shared by every head, and ViT's patch convolution feeding
a class token and position embeddings.  The other families add T5's relative-position
bias shared by every layer, Falcon's ``x @ W.T`` linear layers and single key/value
head, ALBERT's layers shared across depth, OPT's and GPT-NeoX's partial rotary,
Mistral's and Qwen2's GQA, BART's encoder-decoder, Whisper's convolutional front,
MobileViT's convolution-attention mix, CLIP's argmax pooling and BLOOM's ALiBi.
Importing this module needs ``transformers``.
"""
from __future__ import annotations

from dataclasses import dataclass
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


def _small(**extra) -> dict:
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **extra)


def _causal(cls, cfg_cls, **cfg) -> Callable[[], tuple[torch.nn.Module, tuple]]:
    return lambda: (cls(cfg_cls(vocab_size=VOCAB, use_cache=False, **cfg)), _tokens())


def distilbert() -> tuple[torch.nn.Module, tuple]:
    cfg = transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                        max_position_embeddings=32)
    return transformers.DistilBertModel(cfg), _tokens()


def albert() -> tuple[torch.nn.Module, tuple]:
    cfg = transformers.AlbertConfig(vocab_size=VOCAB, embedding_size=16, max_position_embeddings=32, **_small())
    return transformers.AlbertModel(cfg), _tokens()


def t5_encoder() -> tuple[torch.nn.Module, tuple]:
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return transformers.T5EncoderModel(cfg), _tokens()


def bart() -> tuple[torch.nn.Module, tuple]:
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=32, use_cache=False)
    return transformers.BartModel(cfg), _tokens()


def whisper_encoder() -> tuple[torch.nn.Module, tuple]:
    cfg = transformers.WhisperConfig(d_model=32, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=64,
                                     num_mel_bins=8, max_source_positions=16, num_labels=3)
    return transformers.WhisperForAudioClassification(cfg), (torch.randn(2, 8, 32),)


def deit() -> tuple[torch.nn.Module, tuple]:
    cfg = transformers.DeiTConfig(image_size=16, patch_size=4, num_labels=5, **_small())
    return transformers.DeiTForImageClassification(cfg), (torch.randn(2, 3, 16, 16),)


def swin() -> tuple[torch.nn.Module, tuple]:
    cfg = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                                  window_size=4, num_labels=5)
    return transformers.SwinForImageClassification(cfg), (torch.randn(2, 3, 32, 32),)


def mobilevit() -> tuple[torch.nn.Module, tuple]:
    cfg = transformers.MobileViTConfig(image_size=32, hidden_sizes=[16, 24, 32],
                                       neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_labels=5)
    return transformers.MobileViTForImageClassification(cfg), (torch.randn(2, 3, 32, 32),)


def clip_text() -> tuple[torch.nn.Module, tuple]:
    cfg = transformers.CLIPTextConfig(vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1, **_small())
    return transformers.CLIPTextModel(cfg), _tokens()


@dataclass(frozen=True)
class Spec:
    """A model and what its analysis must find: the size of every head group (None: its
    heads must stay, e.g. one key/value head shared by all query heads), the size of
    some MLP group, and the ops reported as barriers (none, unless listed)."""

    build: Callable[[], tuple[torch.nn.Module, tuple]]
    heads: int | None
    mlp: int
    barriers: tuple[str, ...] = ()


_LM = dict(max_position_embeddings=32)
MODELS: dict[str, Spec] = {
    "bert": Spec(bert, 4, 64),
    "bert_classifier": Spec(bert_classifier, 4, 64),
    "gpt2": Spec(gpt2, 4, 128),
    "llama_gqa": Spec(llama_gqa, 2, 96),  # a unit is a key/value head with its 2 query heads
    "vit": Spec(vit, 4, 64),
    "distilbert": Spec(distilbert, 4, 64),
    "roberta": Spec(_causal(transformers.RobertaModel, transformers.RobertaConfig, max_position_embeddings=40,
                            **_small()), 4, 64),
    "albert": Spec(albert, 4, 64),  # one layer's weights used at every depth
    "opt": Spec(_causal(transformers.OPTForCausalLM, transformers.OPTConfig, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32, **_LM), 4, 64),
    "gpt_neox": Spec(_causal(transformers.GPTNeoXForCausalLM, transformers.GPTNeoXConfig, rotary_pct=0.25,
                             **_LM, **_small()), 4, 64),
    "mistral": Spec(_causal(transformers.MistralForCausalLM, transformers.MistralConfig, num_key_value_heads=2,
                            **_LM, **_small()), 2, 64),
    "qwen2": Spec(_causal(transformers.Qwen2ForCausalLM, transformers.Qwen2Config, num_key_value_heads=2,
                          **_LM, **_small()), 2, 64),
    "phi": Spec(_causal(transformers.PhiForCausalLM, transformers.PhiConfig, **_LM, **_small()), 4, 64),
    "gemma": Spec(_causal(transformers.GemmaForCausalLM, transformers.GemmaConfig, num_key_value_heads=1,
                          head_dim=8, **_LM, **_small()), None, 64),
    "falcon": Spec(_causal(transformers.FalconForCausalLM, transformers.FalconConfig, hidden_size=32,
                           num_hidden_layers=2, num_attention_heads=4), None, 128),
    "t5_encoder": Spec(t5_encoder, 4, 64),  # heads coupled across layers by the shared bias table
    "bart": Spec(bart, 4, 64),
    "whisper_encoder": Spec(whisper_encoder, 4, 64),
    "deit": Spec(deit, 4, 64),
    "swin": Spec(swin, None, 64),  # per-head relative-position tables and shifted-window masks
    "mobilevit": Spec(mobilevit, 4, 48),
    "clip_text": Spec(clip_text, 4, 64),  # the pooled token (argmax of the ids) is picked along the tokens only
    "bloom": Spec(_causal(transformers.BloomForCausalLM, transformers.BloomConfig, hidden_size=32, n_layer=2,
                          n_head=4), None, 128, ("aten.baddbmm.default",)),  # ALiBi slopes fixed per head
}


def build(name: str, attention: str = "sdpa") -> tuple[torch.nn.Module, tuple]:
    """A fresh model in eval mode (seeded) and its example inputs."""
    torch.manual_seed(0)
    model, inputs = MODELS[name].build()
    model.set_attn_implementation(attention)
    return model.eval(), inputs
