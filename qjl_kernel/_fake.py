"""Fake (meta) implementations of the ``torch.ops.qjl`` ops, for FakeTensor, ``torch.compile`` and
``torch.library.opcheck``. They compute output shapes and dtypes without touching data and repeat
the CUDA ops' shape and dtype checks (``csrc/ops.cpp``), so bad calls fail while tracing too.

Imported by :mod:`qjl_kernel.ops` right after the extension registers the op schemas.
"""

from __future__ import annotations

import torch
from torch.library import register_fake

_KERNEL_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _require(cond, message: str) -> None:
    torch._check(cond, lambda: message)


def _float(name: str, t: torch.Tensor) -> None:
    _require(t.dtype in _KERNEL_FLOATS, f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


def _dtype(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    _require(t.dtype == dtype, f"{name} must have dtype {dtype}, got {t.dtype}")


def _rank(name: str, t: torch.Tensor, rank: int) -> None:
    _require(t.dim() == rank, f"{name} must have rank {rank}, got shape {tuple(t.shape)}")


@register_fake("qjl::quantize_keys")
def _quantize_keys_fake(keys, outlier_indices, projection, outlier_sketch_dim):
    _rank("keys", keys, 5)
    _rank("outlier_indices", outlier_indices, 4)
    _rank("projection", projection, 2)
    _float("keys", keys)
    _dtype("outlier_indices", outlier_indices, torch.uint8)
    b, h, n, g, d = keys.shape
    m = projection.shape[0]
    _require(tuple(outlier_indices.shape[:3]) == (b, h, n), "outlier_indices must be [B, H_kv, n_groups, n_out]")
    _require(projection.shape[1] == d, f"projection must be [m, {d}]")
    _require(m % 8 == 0 and outlier_sketch_dim % 8 == 0, "sketch sizes must be multiples of 8")
    _require(0 <= outlier_sketch_dim <= m, "outlier_sketch_dim must be in [0, m]")
    bits = keys.new_empty((b, h, n, g, m // 8), dtype=torch.uint8)
    outlier_bits = keys.new_empty((b, h, n, g, outlier_sketch_dim // 8), dtype=torch.uint8)
    return bits, outlier_bits, keys.new_empty((b, h, n, g)), keys.new_empty((b, h, n, g))


@register_fake("qjl::key_scores")
def _key_scores_fake(query, bits, outlier_bits, inlier_norms, outlier_norms, outlier_indices, projection):
    _rank("query", query, 4)
    _rank("bits", bits, 5)
    _rank("outlier_bits", outlier_bits, 5)
    _rank("inlier_norms", inlier_norms, 4)
    _rank("outlier_norms", outlier_norms, 4)
    _rank("outlier_indices", outlier_indices, 4)
    _float("query", query)
    _float("inlier_norms", inlier_norms)
    _float("outlier_norms", outlier_norms)
    for name, t in (("bits", bits), ("outlier_bits", outlier_bits), ("outlier_indices", outlier_indices)):
        _dtype(name, t, torch.uint8)
    b, h_kv, n, g, m8 = bits.shape
    lead = (b, h_kv, n, g)
    _require(tuple(outlier_bits.shape[:4]) == lead, "outlier_bits must share [B, H_kv, n_groups, G] with bits")
    _require(tuple(inlier_norms.shape) == lead, f"inlier_norms must be {lead}")
    _require(tuple(outlier_norms.shape) == lead, f"outlier_norms must be {lead}")
    _require(tuple(outlier_indices.shape[:3]) == lead[:3], "outlier_indices must be [B, H_kv, n_groups, n_out]")
    batch, h_q, length, d = query.shape
    _require(batch == b, "query batch does not match keys batch")
    _require(h_q % h_kv == 0, "query heads must be a multiple of KV heads")
    _require(tuple(projection.shape) == (m8 * 8, d), "projection must be [m, d] with m from bits")
    return query.new_empty((batch, h_q, length, n * g), dtype=torch.float32)


@register_fake("qjl::quantize_values")
def _quantize_values_fake(values, group_size, bits):
    _float("values", values)
    _require(values.dim() >= 2, "values must be [..., T, d]")
    _require(bits in (2, 4), f"bits must be 2 or 4, got {bits}")
    d = values.shape[-1]
    _require(group_size > 0 and d % group_size == 0, "group_size must be a positive divisor of head_dim")
    _require(d % (32 // bits) == 0, f"head_dim must be a multiple of {32 // bits} for {bits}-bit codes")
    lead = tuple(values.shape[:-1])
    codes = values.new_empty((*lead, d * bits // 32), dtype=torch.int32)
    return codes, values.new_empty((*lead, d // group_size)), values.new_empty((*lead, d // group_size))


@register_fake("qjl::value_matmul")
def _value_matmul_fake(weights, codes, scales, mins, bits, group_size):
    _rank("weights", weights, 4)
    _rank("codes", codes, 4)
    _float("weights", weights)
    _float("scales", scales)
    _dtype("codes", codes, torch.int32)
    _require(mins.dtype == scales.dtype, "mins must have the dtype of scales")
    _require(bits in (2, 4), f"bits must be 2 or 4, got {bits}")
    b, h_kv, t, words = codes.shape
    d = words * 32 // bits
    _require(group_size > 0 and d % group_size == 0, "group_size must be a positive divisor of head_dim")
    groups = (b, h_kv, t, d // group_size)
    _require(tuple(scales.shape) == groups and tuple(mins.shape) == groups, f"scales / mins must be {groups}")
    batch, h_q, length, tokens = weights.shape
    _require(batch == b and tokens == t, "weights must be [B, H_q, L, T] matching the values")
    _require(h_q % h_kv == 0, "weights heads must be a multiple of KV heads")
    return weights.new_empty((batch, h_q, length, d), dtype=torch.float32)


@register_fake("qjl::decode_attention")
def _decode_attention_fake(query, bits, outlier_bits, inlier_norms, outlier_norms, outlier_indices, projection,
                           residual_keys, value_codes, value_scales, value_mins, value_window, mask, scaling,
                           value_bits, value_group_size):
    for name, t, rank in (("query", query, 4), ("bits", bits, 5), ("outlier_bits", outlier_bits, 5),
                          ("residual_keys", residual_keys, 4), ("value_codes", value_codes, 4),
                          ("value_window", value_window, 4)):
        _rank(name, t, rank)
    for name, t in (("query", query), ("inlier_norms", inlier_norms), ("outlier_norms", outlier_norms),
                    ("residual_keys", residual_keys), ("value_scales", value_scales), ("value_mins", value_mins),
                    ("value_window", value_window)):
        _float(name, t)
    for name, t in (("bits", bits), ("outlier_bits", outlier_bits), ("outlier_indices", outlier_indices)):
        _dtype(name, t, torch.uint8)
    _dtype("value_codes", value_codes, torch.int32)
    _require(value_bits in (2, 4), f"value_bits must be 2 or 4, got {value_bits}")
    b, h_q, length, d = query.shape
    h_kv = bits.shape[1]
    _require(length > 0, "query must hold at least one row (L > 0)")
    _require(h_kv > 0 and h_q % h_kv == 0, "query heads must be a multiple of KV heads")
    tokens = bits.shape[2] * bits.shape[3] + residual_keys.shape[2]
    _require(value_codes.shape[2] + value_window.shape[2] == tokens, "keys and values must cover the same tokens")
    if mask is not None:
        _dtype("mask", mask, torch.bool)
        _require(mask.dim() == 3 and mask.shape[1] == length and mask.shape[2] == tokens, "mask must be [B, L, T]")
    return query.new_empty((b, h_q, length, d), dtype=torch.float32)
