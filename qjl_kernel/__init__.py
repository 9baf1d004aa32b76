"""QJL ops: 1-bit quantized JL sketches of keys and grouped low-bit values.

Four ops, each with a pure-PyTorch reference (:mod:`qjl_kernel.reference`) that is the spec and
the CPU path:

- :func:`quantize_keys`   keys -> sign bits of ``S k_in`` and ``S[:m_o] k_out`` + norms
- :func:`key_scores`      query x stored keys -> unbiased estimates of ``<q, k>`` (MHA and GQA)
- :func:`quantize_values` values -> packed 2/4-bit codes, per-group scales and mins
- :func:`value_matmul`    weights x dequant(values), GQA-aware
- :func:`decode_attention` one step's attention over a layer's compressed state, fused (C++ CPU
  kernel; composed from the ops above elsewhere)

Backends: ``reference``, ``triton`` (:mod:`qjl_kernel.triton_ops`) and ``cuda`` (the extension);
``auto`` picks CUDA, else Triton for GPU tensors, else the reference (``qjl_kernel/TRITON.md``).
:func:`backend_for` says which implementation runs for given tensors, :func:`backend_info` what is
available and why.
"""

from .ops import (
    BACKENDS,
    BackendInfo,
    backend_for,
    backend_info,
    cpu_isa,
    decode_attention,
    dequantize_keys,
    dequantize_values,
    key_scores,
    ops_label,
    quantize_keys,
    quantize_values,
    set_backend,
    use_backend,
    value_matmul,
)
from .reference import QJL_SCALE
from .types import QuantizedKeys, QuantizedValues

__all__ = [
    "BACKENDS",
    "BackendInfo",
    "QJL_SCALE",
    "QuantizedKeys",
    "QuantizedValues",
    "backend_for",
    "backend_info",
    "cpu_isa",
    "decode_attention",
    "dequantize_keys",
    "dequantize_values",
    "key_scores",
    "ops_label",
    "quantize_keys",
    "quantize_values",
    "set_backend",
    "use_backend",
    "value_matmul",
]
