"""Containers for quantized KV state, shared by every backend."""

from __future__ import annotations

from typing import NamedTuple

import torch


class QuantizedKeys(NamedTuple):
    """QJL state of ``T = n_groups * G`` keys per (batch, KV head).

    Shapes (``m`` = sketch size, ``m_o`` = outlier sketch size, ``n_out`` = outlier channels):
      bits            uint8 ``[B, H_kv, n_groups, G, m / 8]``   signs of ``S k_in``
      outlier_bits    uint8 ``[B, H_kv, n_groups, G, m_o / 8]`` signs of ``S[:m_o] k_out``
      inlier_norms    ``[B, H_kv, n_groups, G]``  ``||k_in||``, any float dtype (the ops return the
                      keys' dtype; the caches store float32, which cannot overflow)
      outlier_norms   ``[B, H_kv, n_groups, G]``  ``||k_out||``, likewise
      outlier_indices uint8 ``[B, H_kv, n_groups, n_out]`` outlier channels of each group

    ``k_in`` is the key with its group's outlier channels zeroed, ``k_out = k - k_in``. We store
    ``||k_in||`` rather than the original's ``||k||`` (same number of bits): recovering ``||k_in||``
    from ``sqrt(||k||^2 - ||k_out||^2)`` loses precision in fp16 when outliers dominate the norm.
    """

    bits: torch.Tensor
    outlier_bits: torch.Tensor
    inlier_norms: torch.Tensor
    outlier_norms: torch.Tensor
    outlier_indices: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.bits.shape[2] * self.bits.shape[3]

    @property
    def sketch_dim(self) -> int:
        return self.bits.shape[-1] * 8

    @property
    def outlier_sketch_dim(self) -> int:
        return self.outlier_bits.shape[-1] * 8

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self)


class QuantizedValues(NamedTuple):
    """Per-token grouped ``bits``-bit quantization of values ``[..., T, d]``.

      codes   int32 ``[..., T, d * bits / 32]`` packed as in :mod:`qjl_kernel.packing`
      scales  ``[..., T, d / group_size]`` in the values' dtype
      mins    ``[..., T, d / group_size]`` in the values' dtype
    A value is reconstructed as ``mins + code * scales`` per group of ``group_size`` channels.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    bits: int
    group_size: int

    @property
    def head_dim(self) -> int:
        return self.codes.shape[-1] * 32 // self.bits

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[-2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins))
