"""Argument checks for the public ops. Messages name the offending argument."""

from __future__ import annotations

import torch

from .packing import SUPPORTED_VALUE_BITS
from .types import QuantizedKeys, QuantizedValues

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
# QuantizedKeys stores outlier channel indices as uint8, so a key head holds at most 256 channels.
MAX_KEY_HEAD_DIM = 256


def tensor(name: str, value, *, rank: int | tuple[int, ...] | None = None, dtypes=None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    ranks = (rank,) if isinstance(rank, int) else rank
    if ranks is not None and value.dim() not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ValueError(f"{name} must have rank {want}, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {value.dtype}")


def floating(name: str, value, rank=None) -> None:
    tensor(name, value, rank=rank, dtypes=_FLOAT_DTYPES)


def same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def positive_multiple(name: str, value, multiple: int, *, allow_zero: bool = False) -> None:
    integer(name, value)
    if value < 0 or (value == 0 and not allow_zero) or value % multiple:
        least = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {least} multiple of {multiple}, got {value}")


def projection(value, head_dim: int) -> None:
    floating("projection", value, rank=2)
    if value.shape[1] != head_dim:
        raise ValueError(f"projection must be [m, {head_dim}] to match head_dim, got {tuple(value.shape)}")
    positive_multiple("projection.shape[0] (sketch size m)", value.shape[0], 8)


def integer(name: str, value) -> None:
    """A Python int (not a bool, not a float such as 2.0: the kernels' schemas take int)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def value_bits(bits, name: str = "bits") -> None:
    integer(name, bits)
    if bits not in SUPPORTED_VALUE_BITS:
        raise ValueError(f"{name} must be one of {SUPPORTED_VALUE_BITS}, got {bits!r}")


def group_size_divides(group_size, dim: int, name: str = "group_size") -> None:
    integer(name, group_size)
    if group_size <= 0 or dim % group_size:
        raise ValueError(f"{name} must be a positive divisor of head_dim {dim}, got {group_size}")


def key_head_dim(dim: int) -> None:
    if dim > MAX_KEY_HEAD_DIM:
        raise ValueError(
            f"head_dim must be at most {MAX_KEY_HEAD_DIM} for QJL keys (outlier channel indices are stored "
            f"as uint8), got {dim}"
        )


def quantize_keys_args(keys, outlier_indices, proj, outlier_sketch_dim) -> None:
    floating("keys", keys, rank=5)
    tensor("outlier_indices", outlier_indices, rank=4, dtypes=_INDEX_DTYPES)
    dim = keys.shape[-1]
    key_head_dim(dim)
    projection(proj, dim)
    same_device(keys=keys, outlier_indices=outlier_indices, projection=proj)
    if outlier_indices.shape[:3] != keys.shape[:3]:
        raise ValueError(
            f"outlier_indices must be [B, H_kv, n_groups, n_out] matching keys {tuple(keys.shape[:3])}, "
            f"got {tuple(outlier_indices.shape)}"
        )
    n_out = outlier_indices.shape[-1]
    if n_out > dim:
        raise ValueError(f"outlier_indices has {n_out} channels per group, more than head_dim {dim}")
    if n_out and outlier_indices.numel():
        outlier_channels(outlier_indices, dim)
    positive_multiple("outlier_sketch_dim", outlier_sketch_dim, 8, allow_zero=True)
    if outlier_sketch_dim > proj.shape[0]:
        raise ValueError(
            f"outlier_sketch_dim ({outlier_sketch_dim}) must not exceed the sketch size m ({proj.shape[0]})"
        )
    if n_out and not outlier_sketch_dim:
        raise ValueError("outlier_sketch_dim must be > 0 when outlier_indices selects channels")


def outlier_channels(indices: torch.Tensor, dim: int) -> None:
    """Every index in ``[0, dim)`` and none repeated within a group (a repeat would silently give the
    group fewer outliers than n_out, and the backends need not agree on it; kernels index with these).

    CPU tensors: checked here, with an error naming the values. Other devices: the check runs on the
    device and never reads back to the host (that was a sync per ``quantize_keys``); bad indices fail
    the device's assertion (a device-side assert at the next synchronization), with the same text."""
    idx = indices.long()
    low, high = idx.amin(), idx.amax()
    # Per-group channel counts (indices clamped into range: the range has its own check).
    counts = torch.zeros(*idx.shape[:-1], dim, dtype=torch.int32, device=idx.device)
    counts.scatter_add_(-1, idx.clamp(0, dim - 1), torch.ones_like(idx, dtype=torch.int32))
    repeated = (counts > 1).any()
    if idx.device.type != "cpu":
        ok = (low >= 0) & (high < dim) & ~repeated
        torch._assert_async(ok, f"outlier_indices must lie in [0, {dim}) and name distinct channels within each group")
        return
    low, high, duplicate = torch.stack([low, high, repeated.long()]).tolist()
    if low < 0 or high >= dim:
        raise ValueError(f"outlier_indices must lie in [0, {dim}), got values in [{low}, {high}]")
    if duplicate:
        raise ValueError("outlier_indices must name distinct channels within each group; got a repeated index")


def stored_outlier_channels(indices: torch.Tensor, dim: int) -> None:
    """The uint8 indices of a :class:`QuantizedKeys` lie below ``dim`` (one max; on other devices than
    the CPU a device-side assertion, no read back to the host, as :func:`outlier_channels`)."""
    if not indices.numel():
        return
    high = indices.amax().int()  # int32: a uint8 comparison with dim = 256 would wrap to 0
    if indices.device.type != "cpu":
        torch._assert_async(high < dim, f"keys.outlier_indices must lie in [0, {dim})")
    elif int(high) >= dim:
        raise ValueError(f"keys.outlier_indices must lie in [0, {dim}) (head_dim), got a value {int(high)}")


def quantized_keys(keys, dim: int) -> None:
    """A :class:`QuantizedKeys` for keys of head_dim ``dim``: types, ranks, shapes, index range."""
    if not isinstance(keys, QuantizedKeys):
        raise TypeError(f"keys must be a QuantizedKeys, got {type(keys).__name__}")
    tensor("keys.bits", keys.bits, rank=5, dtypes=(torch.uint8,))
    tensor("keys.outlier_bits", keys.outlier_bits, rank=5, dtypes=(torch.uint8,))
    floating("keys.inlier_norms", keys.inlier_norms, rank=4)
    floating("keys.outlier_norms", keys.outlier_norms, rank=4)
    tensor("keys.outlier_indices", keys.outlier_indices, rank=4, dtypes=(torch.uint8,))
    lead = keys.bits.shape[:4]
    for name in ("outlier_bits", "inlier_norms", "outlier_norms"):
        if getattr(keys, name).shape[:4] != lead:
            raise ValueError(f"keys.{name} must share [B, H_kv, n_groups, G] = {tuple(lead)} with keys.bits")
    if keys.outlier_indices.shape[:3] != lead[:3]:
        raise ValueError(f"keys.outlier_indices must be [B, H_kv, n_groups, n_out] with {tuple(lead[:3])}")
    key_head_dim(dim)
    stored_outlier_channels(keys.outlier_indices, dim)


def quantized_values(values, rank: int | None = 4) -> None:
    """A :class:`QuantizedValues` of ``[B, H_kv, T, d]`` (any rank when ``rank`` is None): types,
    bits, group size, ranks, and scales / mins of one entry per token and channel group."""
    if not isinstance(values, QuantizedValues):
        raise TypeError(f"values must be a QuantizedValues, got {type(values).__name__}")
    value_bits(values.bits, "values.bits")
    tensor("values.codes", values.codes, rank=rank, dtypes=(torch.int32,))
    floating("values.scales", values.scales, rank=rank)
    floating("values.mins", values.mins, rank=rank)
    group_size_divides(values.group_size, values.head_dim, "values.group_size")
    groups = tuple(values.codes.shape[:-1]) + (values.head_dim // values.group_size,)
    if tuple(values.scales.shape) != groups or tuple(values.mins.shape) != groups:
        raise ValueError(
            f"values.scales / values.mins must be {groups} (one per token and group of {values.group_size} of the "
            f"{values.head_dim} channels that {values.bits}-bit codes {tuple(values.codes.shape)} hold), got "
            f"{tuple(values.scales.shape)} / {tuple(values.mins.shape)}"
        )


def key_scores_args(query, keys, proj) -> None:
    floating("query", query, rank=(3, 4))
    quantized_keys(keys, query.shape[-1])
    projection(proj, query.shape[-1])
    same_device(query=query, bits=keys.bits, projection=proj)
    if proj.shape[0] != keys.sketch_dim:
        raise ValueError(f"projection has {proj.shape[0]} rows but keys were sketched with m = {keys.sketch_dim}")
    if keys.outlier_sketch_dim > keys.sketch_dim:
        raise ValueError("keys.outlier_bits is longer than keys.bits: outlier sketch larger than m")
    batch, q_heads = query.shape[:2]
    if keys.bits.shape[0] != batch:
        raise ValueError(f"query batch {batch} does not match keys batch {keys.bits.shape[0]}")
    kv_heads = keys.bits.shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of KV heads ({kv_heads})")


def dequantize_keys_args(keys, proj) -> None:
    floating("projection", proj, rank=2)
    quantized_keys(keys, proj.shape[1])
    if proj.shape[0] != keys.sketch_dim:
        raise ValueError(f"projection has {proj.shape[0]} rows but keys were sketched with m = {keys.sketch_dim}")
    same_device(bits=keys.bits, projection=proj)


def quantize_values_args(values, group_size, bits) -> None:
    floating("values", values)
    if values.dim() < 2:
        raise ValueError(f"values must be [..., T, d], got shape {tuple(values.shape)}")
    value_bits(bits)
    dim = values.shape[-1]
    group_size_divides(group_size, dim)
    per_word = 32 // bits
    if dim % per_word:
        raise ValueError(f"values head_dim {dim} must be a multiple of {per_word} to pack {bits}-bit codes")


def value_matmul_args(weights, values) -> None:
    floating("weights", weights, rank=4)
    quantized_values(values)
    same_device(weights=weights, codes=values.codes)
    batch, kv_heads, tokens = values.codes.shape[:3]
    if weights.shape[0] != batch or weights.shape[-1] != tokens:
        raise ValueError(
            f"weights must be [B={batch}, H_q, L, T={tokens}] to match values, got {tuple(weights.shape)}"
        )
    if weights.shape[1] % kv_heads:
        raise ValueError(f"weights heads ({weights.shape[1]}) must be a multiple of KV heads ({kv_heads})")


def decode_attention_args(query, keys, proj, residual_keys, values, value_window, mask) -> None:
    floating("query", query, rank=4)
    floating("residual_keys", residual_keys, rank=4)
    floating("value_window", value_window, rank=4)
    batch, q_heads, length, dim = query.shape
    if length == 0:
        raise ValueError("query must hold at least one row (L > 0)")
    if dim == 0:
        raise ValueError(f"query must have head_dim d > 0, got shape {tuple(query.shape)}")
    kv_heads = residual_keys.shape[1]
    if residual_keys.shape[0] != batch or residual_keys.shape[3] != dim:
        raise ValueError(f"residual_keys must be [B={batch}, H_kv, R, d={dim}], got {tuple(residual_keys.shape)}")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of KV heads ({kv_heads})")
    if tuple(value_window.shape[:2]) != (batch, kv_heads) or value_window.shape[3] != dim:
        raise ValueError(
            f"value_window must be [B={batch}, H_kv={kv_heads}, W, d={dim}], got {tuple(value_window.shape)}"
        )
    same_device(query=query, residual_keys=residual_keys, value_window=value_window)
    committed = 0
    if keys is not None:
        key_scores_args(query, keys, proj)
        if keys.bits.shape[1] != kv_heads:
            raise ValueError(f"keys have {keys.bits.shape[1]} KV heads but residual_keys have {kv_heads}")
        committed = keys.num_tokens
    quantized = 0
    if values is not None:
        quantized_values(values)
        same_device(query=query, codes=values.codes)
        if tuple(values.codes.shape[:2]) != (batch, kv_heads) or values.head_dim != dim:
            raise ValueError(
                f"values must hold [B={batch}, H_kv={kv_heads}, T_q, d={dim}], got codes {tuple(values.codes.shape)}"
            )
        quantized = values.num_tokens
    tokens = committed + residual_keys.shape[2]
    if quantized + value_window.shape[2] != tokens:
        raise ValueError(
            f"keys cover {tokens} tokens ({committed} committed + {residual_keys.shape[2]} residual) but values "
            f"cover {quantized + value_window.shape[2]} ({quantized} quantized + {value_window.shape[2]} window)"
        )
    if tokens == 0:
        raise ValueError("the layer holds no tokens")
    if mask is not None:
        tensor("mask", mask, rank=3, dtypes=(torch.bool,))
        same_device(query=query, mask=mask)
        if mask.shape[0] not in (1, batch) or tuple(mask.shape[1:]) != (length, tokens):
            raise ValueError(f"mask must be [B={batch} or 1, L={length}, T={tokens}], got {tuple(mask.shape)}")
