"""KIVI keys (Liu et al., 2024): per-channel asymmetric quantization over groups of tokens.

Same storage policy as QJL's keys (exact residual, commits of ``buffer_size`` tokens in groups of
``group_size``) so the two methods differ only in how committed keys are represented. Each
channel of each group of ``group_size`` tokens gets its own scale and min: the per-token grouped
value quantizer applied to the transposed group, so it reuses ``quantize_values``.
"""

from __future__ import annotations

import torch

import qjl_kernel
from qjl_kernel import QuantizedValues

from .key_store import KeyStore, exact_scores


class KIVIKeyStore(KeyStore):
    """KIVI keys of one layer. Committed state: :class:`QuantizedValues` of the transposed groups,
    codes ``[B, H_kv, n_groups, d, G * bits / 32]``, scales/mins ``[B, H_kv, n_groups, d, 1]``."""

    def __init__(self, bits: int, group_size: int, buffer_size: int) -> None:
        super().__init__(group_size, buffer_size)
        if bits not in (2, 4):
            raise ValueError(f"KIVI key bits must be 2 or 4, got {bits}")
        if group_size % (32 // bits):
            raise ValueError(f"KIVI group_size ({group_size}) must be a multiple of {32 // bits} for {bits}-bit keys")
        self.bits = bits

    def quantize(self, keys: torch.Tensor, valid: torch.Tensor) -> QuantizedValues:
        """Invalid (padding) tokens are replaced by their group's per-channel minimum over valid
        tokens, so they change no scale or min."""
        batch, heads, tokens, dim = keys.shape
        groups = tokens // self.group_size
        grouped = keys.reshape(batch, heads, groups, self.group_size, dim)
        valid_g = valid.view(batch, 1, groups, self.group_size, 1)
        fill = grouped.masked_fill(~valid_g, float("inf")).amin(dim=3, keepdim=True)
        fill = torch.where(torch.isinf(fill), torch.zeros_like(fill), fill)  # all-padding groups
        grouped = torch.where(valid_g, grouped, fill)
        return qjl_kernel.quantize_values(grouped.transpose(-1, -2), self.group_size, self.bits)

    def dequantize_state(self, state: QuantizedValues) -> torch.Tensor:
        grouped = qjl_kernel.dequantize_values(state)  # [B, H, N, d, G]
        return grouped.transpose(-1, -2).flatten(2, 3)

    def scores(self, state: QuantizedValues, query: torch.Tensor) -> torch.Tensor:
        return exact_scores(query, self.dequantize_state(state))

    def _wrap(self, tensors) -> QuantizedValues:
        return QuantizedValues(*tensors, self.bits, self.group_size)
