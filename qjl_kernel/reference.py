"""Pure-PyTorch reference implementations of the four QJL ops.

These are the specification every backend is tested against, and the CPU path. They compute in
float32 whatever the input dtype, run on any device, and assume inputs already validated by the
public functions in :mod:`qjl_kernel.ops`.

Estimator (docs/DESIGN.md section 1): for a key split into inlier part ``k_in`` (outlier channels
zeroed) and outlier part ``k_out``, with projection ``S`` (``m x d``) and query ``q``::

    score = c / m   * ||k_in||  * <S q_in,           sign(S k_in)>
          + c / m_o * ||k_out|| * <S[:m_o, O] q_O,    sign(S[:m_o] k_out)>,    c = sqrt(pi / 2)

with ``S q_in = S q - S[:, O] q_O``. ``c = sqrt(pi/2)`` makes the estimate unbiased for Gaussian
``S``; with rows orthogonalized to norm ``sqrt(d)`` the exact constant is larger by a factor close
to ``1 + 1/(4d)`` (0.2% at d = 128). We keep ``sqrt(pi/2)``, as the paper and its code do.
"""

from __future__ import annotations

import math

import torch

from .packing import pack_codes, pack_sign_bits, unpack_codes, unpack_signs
from .types import QuantizedKeys, QuantizedValues

QJL_SCALE = math.sqrt(math.pi / 2)

# Query rows processed at once by key_scores_ref; bounds the [.., L, n_groups, m] temporaries.
_QUERY_CHUNK = 64


def _outlier_mask(outlier_indices: torch.Tensor, head_dim: int) -> torch.Tensor:
    """uint8 ``[..., n_out]`` -> float32 ``[..., d]`` with 1 on outlier channels."""
    mask = torch.zeros(*outlier_indices.shape[:-1], head_dim, device=outlier_indices.device)
    return mask.scatter_(-1, outlier_indices.long(), 1.0)


def quantize_keys_ref(
    keys: torch.Tensor,
    outlier_indices: torch.Tensor,
    projection: torch.Tensor,
    outlier_sketch_dim: int,
) -> QuantizedKeys:
    """Sketch keys into QJL sign bits and norms.

    Args:
      keys: ``[B, H_kv, n_groups, G, d]``, any float dtype.
      outlier_indices: integer ``[B, H_kv, n_groups, n_out]``, distinct channels per group
        (``n_out`` may be 0).
      projection: ``S``, ``[m, d]``.
      outlier_sketch_dim: ``m_o``, the outlier part uses the first ``m_o`` rows of ``S``.
    Returns:
      :class:`QuantizedKeys`; norms in the keys' dtype, indices as uint8.
    """
    k = keys.float()
    s = projection.float()
    mask = _outlier_mask(outlier_indices, k.shape[-1]).unsqueeze(-2)  # [B, H, N, 1, d]
    k_out = k * mask
    k_in = k - k_out
    bits = pack_sign_bits(k_in @ s.T)
    outlier_bits = pack_sign_bits(k_out @ s[:outlier_sketch_dim].T)
    return QuantizedKeys(
        bits=bits,
        outlier_bits=outlier_bits,
        inlier_norms=k_in.norm(dim=-1).to(keys.dtype),
        outlier_norms=k_out.norm(dim=-1).to(keys.dtype),
        outlier_indices=outlier_indices.to(torch.uint8),
    )


def key_scores_ref(query: torch.Tensor, keys: QuantizedKeys, projection: torch.Tensor) -> torch.Tensor:
    """QJL estimates of ``<q, k>`` for every query row and stored key.

    Args:
      query: ``[B, H_q, L, d]`` with ``H_q = r * H_kv`` (query head ``h`` reads KV head ``h // r``).
      keys: :class:`QuantizedKeys` with ``T = n_groups * G`` tokens.
      projection: ``S``, ``[m, d]``, the one the keys were quantized with.
    Returns:
      float32 ``[B, H_q, L, T]`` (unscaled: no ``1/sqrt(d)``).
    """
    batch, q_heads, length, dim = query.shape
    kv_heads, n_groups, group = keys.bits.shape[1:4]
    ratio = q_heads // kv_heads
    s = projection.float()
    m, m_o = s.shape[0], keys.outlier_sketch_dim
    n_out = keys.outlier_indices.shape[-1]
    # The whole result first: a size this machine cannot hold fails here, at once, with torch's
    # allocation error, instead of after chunk upon chunk of work has filled the memory.
    out = torch.empty(batch, q_heads, length, n_groups * group, dtype=torch.float32, device=query.device)

    signs_in = unpack_signs(keys.bits)  # [B, Hkv, N, G, m]
    signs_out = unpack_signs(keys.outlier_bits)  # [B, Hkv, N, G, m_o]
    idx = keys.outlier_indices.long()  # [B, Hkv, N, n_out]
    s_cols = s.T[idx]  # [B, Hkv, N, n_out, m]: the columns S[:, O] of each group
    norm_in = keys.inlier_norms.float()[:, :, None, None]  # [B, Hkv, 1, 1, N, G]
    norm_out = keys.outlier_norms.float()[:, :, None, None]

    q_all = query.float().view(batch, kv_heads, ratio, length, dim)
    for start in range(0, length, _QUERY_CHUNK):
        q = q_all[:, :, :, start : start + _QUERY_CHUNK]  # [B, Hkv, r, l, d]
        l = q.shape[3]
        q_sketch = q @ s.T  # [B, Hkv, r, l, m]
        inlier = torch.einsum("bhrlm,bhngm->bhrlng", q_sketch, signs_in)
        scores = QJL_SCALE / m * norm_in * inlier
        if n_out:
            q_exp = q.unsqueeze(4).expand(batch, kv_heads, ratio, l, n_groups, dim)
            idx_exp = idx[:, :, None, None].expand(batch, kv_heads, ratio, l, n_groups, n_out)
            q_outlier = torch.gather(q_exp, -1, idx_exp)  # q_O: [B, Hkv, r, l, N, n_out]
            outlier_sketch = torch.einsum("bhrlno,bhnom->bhrlnm", q_outlier, s_cols)  # S[:, O] q_O
            scores = scores - QJL_SCALE / m * norm_in * torch.einsum(
                "bhrlnm,bhngm->bhrlng", outlier_sketch, signs_in
            )
            if m_o:
                scores = scores + QJL_SCALE / m_o * norm_out * torch.einsum(
                    "bhrlnm,bhngm->bhrlng", outlier_sketch[..., :m_o], signs_out
                )
        out[:, :, start : start + l] = scores.reshape(batch, q_heads, l, n_groups * group)
    return out


def dequantize_keys_ref(keys: QuantizedKeys, projection: torch.Tensor) -> torch.Tensor:
    """Unbiased key estimates ``k_hat`` whose dot products equal the QJL scores exactly.

    ``k_hat = c/m ||k_in|| (S^T sign(S k_in)) on inlier channels
            + c/m_o ||k_out|| (S[:m_o]^T sign(S[:m_o] k_out)) on outlier channels``.
    A slow path for attention implementations that need key tensors; returns float32
    ``[B, H_kv, n_groups, G, d]``.
    """
    s = projection.float()
    m, m_o = s.shape[0], keys.outlier_sketch_dim
    mask = _outlier_mask(keys.outlier_indices, s.shape[1]).unsqueeze(-2)  # [B, H, N, 1, d]
    inlier = unpack_signs(keys.bits) @ s * (QJL_SCALE / m) * keys.inlier_norms.float().unsqueeze(-1)
    k_hat = inlier * (1.0 - mask)
    if m_o:
        outlier = unpack_signs(keys.outlier_bits) @ s[:m_o] * (QJL_SCALE / m_o)
        k_hat = k_hat + outlier * keys.outlier_norms.float().unsqueeze(-1) * mask
    return k_hat


def quantize_values_ref(values: torch.Tensor, group_size: int, bits: int) -> QuantizedValues:
    """Asymmetric per-token quantization of groups of ``group_size`` consecutive channels.

    Args:
      values: ``[..., T, d]``, any float dtype.
      group_size: channels per group, divides ``d``.
      bits: 2 or 4.
    Returns:
      :class:`QuantizedValues`. Scale and min are rounded to the values' dtype *before* the codes
      are computed, so that dequantization with the stored constants errs by at most ``scale / 2``
      (up to the rounding of that dtype). A constant group gets scale 0 and codes 0. A group with a
      NaN gets NaN scale and min (it dequantizes to NaN); a value whose quotient
      ``(v - min) / scale`` is not finite (NaN or infinite inputs) gets code 0.
    """
    *lead, tokens, dim = values.shape
    levels = (1 << bits) - 1
    grouped = values.float().reshape(*lead, tokens, dim // group_size, group_size)
    mins = grouped.amin(-1).to(values.dtype)
    # Tensor-by-tensor division: CUDA turns division by a Python scalar into a multiplication by
    # its reciprocal, which rounds differently; this keeps the reference identical on every device.
    spread = grouped.amax(-1) - mins.float()
    scales = torch.div(spread, torch.full_like(spread, levels)).to(values.dtype)
    safe_scales = torch.where(scales > 0, scales.float(), torch.ones_like(scales, dtype=torch.float32))
    quotients = (grouped - mins.float().unsqueeze(-1)) / safe_scales.unsqueeze(-1)
    # A non-finite quotient has no code (casting NaN to an integer is undefined): it is stored as 0.
    codes = torch.round(quotients.nan_to_num_(0.0, 0.0, 0.0))
    codes = codes.clamp_(0, levels).reshape(*lead, tokens, dim)
    return QuantizedValues(pack_codes(codes, bits), scales, mins, bits, group_size)


def dequantize_values_ref(values: QuantizedValues) -> torch.Tensor:
    """:class:`QuantizedValues` -> float32 ``[..., T, d]``."""
    codes = unpack_codes(values.codes, values.bits).float()
    # the group count spelled out: a view with -1 cannot size an empty batch
    grouped = codes.view(*codes.shape[:-1], codes.shape[-1] // values.group_size, values.group_size)
    out = grouped * values.scales.float().unsqueeze(-1) + values.mins.float().unsqueeze(-1)
    return out.flatten(-2)


def gqa_weighted_sum(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """float32 ``weights @ values`` with GQA broadcasting: weights ``[B, H_q, L, T]``, values
    ``[B, H_kv, T, d]`` (query head ``h`` reads KV head ``h // r``) -> ``[B, H_q, L, d]``."""
    batch, q_heads, length, tokens = weights.shape
    kv_heads = values.shape[1]
    w = weights.float().view(batch, kv_heads, q_heads // kv_heads, length, tokens)
    out = w @ values.float().unsqueeze(2)
    return out.view(batch, q_heads, length, values.shape[-1])


def value_matmul_ref(weights: torch.Tensor, values: QuantizedValues) -> torch.Tensor:
    """``weights @ dequant(values)`` with GQA broadcasting.

    Args:
      weights: ``[B, H_q, L, T]`` (attention probabilities or any weights).
      values: :class:`QuantizedValues` of ``[B, H_kv, T, d]`` with ``H_q = r * H_kv``.
    Returns:
      float32 ``[B, H_q, L, d]``.
    """
    return gqa_weighted_sum(weights, dequantize_values_ref(values))


def exact_scores(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """float32 ``q . k`` with GQA: query ``[B, H_q, L, d]``, keys ``[B, H_kv, T, d]`` -> ``[B, H_q, L, T]``."""
    batch, q_heads, length, dim = query.shape
    kv_heads = keys.shape[1]
    q = query.float().view(batch, kv_heads, q_heads // kv_heads, length, dim)
    scores = q @ keys.float().unsqueeze(2).transpose(-1, -2)
    return scores.view(batch, q_heads, length, keys.shape[2])


def causal_mask(length: int, tokens: int, device=None) -> torch.Tensor:
    """bool ``[L, T]``: the ``L`` newest of ``T`` positions see every position up to their own."""
    rows = torch.arange(length, device=device)[:, None] + (tokens - length)
    return torch.arange(tokens, device=device)[None, :] <= rows


# The logit of a masked position. Finite, so that a row with every position masked (a query at a
# padding position) gets a uniform softmax instead of NaN, as transformers' SDPA masks do.
MASKED_LOGIT = torch.finfo(torch.float32).min


def decode_attention_ref(
    query: torch.Tensor,
    keys: QuantizedKeys | None,
    projection: torch.Tensor | None,
    residual_keys: torch.Tensor,
    values: QuantizedValues | None,
    value_window: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    *,
    key_scores_fn=key_scores_ref,
    value_matmul_fn=value_matmul_ref,
) -> torch.Tensor:
    """Attention of a step's query rows over one layer's compressed KV state (the fused op's spec).

    The layer holds ``T`` tokens. Keys: the oldest ``T_c`` as QJL sketches (``keys``), then
    ``R = T - T_c`` exact ``residual_keys``. Values: the oldest ``T_q`` quantized (``values``), then
    ``W = T - T_q`` exact ``value_window``. The two splits are independent.

    Args:
      query: ``[B, H_q, L, d]``, ``H_q = r * H_kv`` (query head ``h`` reads KV head ``h // r``).
      keys: :class:`QuantizedKeys` of ``T_c`` tokens, or None (``T_c = 0``).
      projection: ``S`` (``[m, d]``) of ``keys``; may be None when ``keys`` is None.
      residual_keys: ``[B, H_kv, R, d]``.
      values: :class:`QuantizedValues` of ``[B, H_kv, T_q, d]``, or None (``T_q = 0``).
      value_window: ``[B, H_kv, W, d]``.
      mask: bool ``[B, L, T]`` (True = attend), or None: row ``i`` sees positions
        ``<= T - L + i`` (the causal rule for the step's ``L`` newest tokens).
      scaling: softmax scale (usually ``d ** -0.5``).
      key_scores_fn / value_matmul_fn: the implementations of the two sub-steps (the references
        by default; :mod:`qjl_kernel.ops` passes its dispatching ops for the unfused GPU path).
    Returns:
      float32 ``[B, H_q, L, d]``: ``softmax(scaling * scores, masked) @ values``.
    """
    length = query.shape[2]
    parts = []
    if keys is not None and keys.num_tokens:
        parts.append(key_scores_fn(query, keys, projection))
    if residual_keys.shape[2]:
        parts.append(exact_scores(query, residual_keys))
    scores = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)) * scaling
    tokens = scores.shape[-1]
    allowed = causal_mask(length, tokens, query.device) if mask is None else mask[:, None, :, :tokens]
    probs = torch.softmax(scores.masked_fill(~allowed, MASKED_LOGIT), dim=-1)
    n_quantized = 0 if values is None else values.num_tokens
    output = gqa_weighted_sum(probs[..., n_quantized:], value_window)
    if n_quantized:
        output = output + value_matmul_fn(probs[..., :n_quantized], values)
    return output
