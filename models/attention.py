"""The ``"qjl"`` attention function, registered with transformers on ``import models``.

It runs every cache of this project: for a compressed cache (QJLCache, KIVICache) the layer's
``update`` returned a :class:`CompressedState` handle and the layer computes attention from its
compressed state; for any other cache (DynamicCache, QuantizedCache, the exact sliding-window
layers of a compressed cache, none) it is SDPA, or the model's own eager attention when the model
asks for a logit softcap (Gemma2) or attention sinks (GPT-OSS), which SDPA lacks.
"""

from __future__ import annotations

import warnings

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cache import ATTN_IMPLEMENTATION, CompressedState, eager_attention


def qjl_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key,
    value,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature; query ``[B, H_q, L, d]`` -> ``[B, L, H_q, d]``."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if not isinstance(key, CompressedState):
        if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
            return eager_attention(module, query, key, value, attention_mask, scaling, dropout=dropout, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError(f"the {ATTN_IMPLEMENTATION!r} attention does not support position_bias")
    if dropout:
        raise NotImplementedError("compressed caches are for inference; attention dropout must be 0")
    if kwargs.get("output_attentions", False):
        warnings.warn(
            f"the {ATTN_IMPLEMENTATION!r} attention computes the step's attention inside the compressed cache and "
            f"returns no attention weights: output_attentions=True gives none (load the model with "
            f"attn_implementation='eager' and an exact cache to get them)",
            UserWarning,
            stacklevel=2,
        )
    return key.layer.attend(module, query, attention_mask, scaling, **kwargs), None


def register() -> None:
    """Register the attention function and its mask (boolean SDPA masks) under ``"qjl"``."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, qjl_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
