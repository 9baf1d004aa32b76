"""Capture post-RoPE queries and keys of any transformers model, for distortion studies.

A temporary attention function (registered as ``"qjl_capture"``) records what each attention
layer receives — queries and keys after RoPE, exactly what QJL quantizes — and then runs SDPA.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

CAPTURE_IMPLEMENTATION = "qjl_capture"
_RECORDS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _capture_forward(module, query, key, value, attention_mask, **kwargs):
    _RECORDS[module.layer_idx] = (query.detach().float().cpu(), key.detach().float().cpu())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_forward)
AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)


@torch.no_grad()
def capture_queries_keys(model, input_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Run ``model`` on ``input_ids`` ``[1, T]`` (no cache) and return, per layer index, float32
    CPU tensors ``(queries [1, H_q, T, d], keys [1, H_kv, T, d])`` after RoPE."""
    previous = model.config._attn_implementation
    _RECORDS.clear()
    model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
    try:
        model(input_ids=input_ids.to(model.device), use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    records = dict(_RECORDS)
    _RECORDS.clear()
    return records
