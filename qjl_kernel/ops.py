"""The public QJL ops: one function per op, checked arguments, backend dispatch.

Each function validates its arguments (errors name the argument), then runs the fastest backend
available for the inputs. Today that is the pure-PyTorch reference everywhere; the CUDA extension
(``qjl_kernel._C``, see ``csrc/``) plugs in through :func:`_cuda_ops` when it is built.
"""

from __future__ import annotations

import torch

from . import _checks, reference
from .types import QuantizedKeys, QuantizedValues


def _cuda_ops():
    """The compiled op namespace, or None when the extension is not built."""
    return None


def backend_for(*tensors: torch.Tensor) -> str:
    """Name of the backend the ops use for these tensors: ``"cuda"`` or ``"reference"``."""
    if _cuda_ops() is not None and all(t.is_cuda for t in tensors):
        return "cuda"
    return "reference"


def quantize_keys(
    keys: torch.Tensor,
    outlier_indices: torch.Tensor,
    projection: torch.Tensor,
    outlier_sketch_dim: int,
) -> QuantizedKeys:
    """Quantize keys ``[B, H_kv, n_groups, G, d]`` to QJL sign bits and norms.

    ``outlier_indices`` (``[B, H_kv, n_groups, n_out]``, any integer dtype, distinct channels per
    group) selects each group's outlier channels; ``projection`` is ``S`` (``[m, d]``, ``m`` a
    multiple of 8); the outlier part is sketched with the first ``outlier_sketch_dim`` rows of
    ``S`` (a multiple of 8, 0 only when ``n_out == 0``). See :func:`reference.quantize_keys_ref`.
    """
    _checks.quantize_keys_args(keys, outlier_indices, projection, outlier_sketch_dim)
    return reference.quantize_keys_ref(keys, outlier_indices, projection, outlier_sketch_dim)


def key_scores(query: torch.Tensor, keys: QuantizedKeys, projection: torch.Tensor) -> torch.Tensor:
    """QJL estimates of ``<q, k>``: query ``[B, H_q, L, d]`` (or ``[B, H_q, d]``) -> float32
    ``[B, H_q, L, T]`` (or ``[B, H_q, T]``), ``H_q`` any multiple of ``H_kv`` (MHA and GQA).
    Scores are not multiplied by the softmax scale. See :func:`reference.key_scores_ref`."""
    _checks.key_scores_args(query, keys, projection)
    single_row = query.dim() == 3
    if single_row:
        query = query.unsqueeze(2)
    scores = reference.key_scores_ref(query, keys, projection)
    return scores.squeeze(2) if single_row else scores


def quantize_values(values: torch.Tensor, group_size: int, bits: int) -> QuantizedValues:
    """Quantize values ``[..., T, d]`` per token in groups of ``group_size`` channels to
    ``bits`` (2 or 4) bits. See :func:`reference.quantize_values_ref`."""
    _checks.quantize_values_args(values, group_size, bits)
    return reference.quantize_values_ref(values, group_size, bits)


def value_matmul(weights: torch.Tensor, values: QuantizedValues) -> torch.Tensor:
    """``weights [B, H_q, L, T] @ dequant(values [B, H_kv, T, d])`` -> float32 ``[B, H_q, L, d]``,
    ``H_q`` any multiple of ``H_kv``. See :func:`reference.value_matmul_ref`."""
    _checks.value_matmul_args(weights, values)
    return reference.value_matmul_ref(weights, values)


def dequantize_keys(keys: QuantizedKeys, projection: torch.Tensor) -> torch.Tensor:
    """Unbiased key estimates ``k_hat`` (float32 ``[B, H_kv, n_groups, G, d]``) whose dot
    products with any query equal :func:`key_scores` exactly. Slow path, reference only."""
    _checks.quantized_keys(keys)
    return reference.dequantize_keys_ref(keys, projection)


def dequantize_values(values: QuantizedValues) -> torch.Tensor:
    """:class:`QuantizedValues` -> float32 ``[..., T, d]``. Slow path, reference only."""
    if not isinstance(values, QuantizedValues):
        raise TypeError(f"values must be a QuantizedValues, got {type(values).__name__}")
    return reference.dequantize_values_ref(values)
