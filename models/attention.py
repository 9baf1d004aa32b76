"""The ``"qjl"`` attention function, registered with transformers on ``import models``.

It runs every cache of this project: for a compressed cache (QJLCache, KIVICache) the layer's
``update`` returned a :class:`CompressedState` handle and the layer computes attention from its
compressed state; for any other cache (DynamicCache, QuantizedCache, none) it is SDPA.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cache import ATTN_IMPLEMENTATION, CompressedState


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
    if not isinstance(key, CompressedState):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    for unsupported in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"the {ATTN_IMPLEMENTATION!r} attention does not support {unsupported}")
    if dropout:
        raise NotImplementedError("compressed caches are for inference; attention dropout must be 0")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return key.layer.attend(module, query, attention_mask, scaling), None


def register() -> None:
    """Register the attention function and its mask (boolean SDPA masks) under ``"qjl"``."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, qjl_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
