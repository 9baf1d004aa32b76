"""Tiny random-weight models built from configs (no downloads) for the cache tests."""

from __future__ import annotations

import torch
from transformers import (
    DynamicCache,
    Gemma2Config,
    Gemma2ForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import models

ARCHS = {
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),  # softcap, alternating sliding / full layers
    "gpt_oss": (GptOssConfig, GptOssForCausalLM),  # attention sinks, alternating sliding / full layers
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
VOCAB = 97


def tiny_model(arch="llama", *, heads=4, kv_heads=2, head_dim=64, layers=2, dtype=torch.float32, seed=0,
               init=0.08, **config_kwargs):
    """A random model whose logits are peaked enough for argmax comparisons (init std ``init``);
    ``config_kwargs`` go to the config (``sliding_window``, ``layer_types``, ...)."""
    config_cls, model_cls = ARCHS[arch]
    if arch == "gpt_oss":
        config_kwargs = dict(num_local_experts=4, num_experts_per_tok=2, **config_kwargs)
    config = config_cls(
        hidden_size=heads * head_dim // 2, intermediate_size=2 * heads * head_dim, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=VOCAB,
        max_position_embeddings=8192, initializer_range=init, tie_word_embeddings=False, **config_kwargs,
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    model.set_attn_implementation(models.ATTN_IMPLEMENTATION)
    return model


def tokens(batch, length, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def step_logits(model, cache, ids, chunks, attention_mask=None):
    """Feed ``ids`` ``[B, T]`` in consecutive chunks of the given lengths; float32 logits ``[B, T, V]``."""
    out, start = [], 0
    for length in chunks:
        end = start + length
        mask = None if attention_mask is None else attention_mask[:, :end]
        kwargs = {}
        if mask is not None:
            position_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, start:end]
            kwargs = dict(attention_mask=mask, position_ids=position_ids)
        kwargs.update(models.cache_kwargs(model, cache))
        logits = model(input_ids=ids[:, start:end], use_cache=True, **kwargs).logits
        out.append(logits.float())
        start = end
    return torch.cat(out, dim=1)


def exact_cache(model):
    return DynamicCache(config=model.config)
