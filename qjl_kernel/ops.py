"""The public QJL ops: one function per op, checked arguments, backend dispatch.

Each function validates its arguments (errors name the argument), then runs the CUDA kernels
(``torch.ops.qjl.*`` from the extension ``qjl_kernel._C``, sources in ``csrc/``) when the extension
is built and every tensor is on a GPU, else the pure-PyTorch reference. float64 inputs always use
the reference (the kernels read float16, bfloat16 and float32). :func:`backend_info` says which
backend is active and why.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch

from . import _checks, reference
from .types import QuantizedKeys, QuantizedValues

_KERNEL_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _load_extension():
    """Import the extension (registers ``torch.ops.qjl``) and its fake kernels; never raises."""
    try:
        from . import _C
    except (ImportError, OSError) as exc:  # not built, or built against another torch/CUDA
        return None, None, f"{type(exc).__name__}: {exc}"
    from . import _fake  # noqa: F401  (registers the fake implementations)

    return torch.ops.qjl, getattr(_C, "__file__", "qjl_kernel._C"), None


_OPS, _EXTENSION_PATH, _EXTENSION_ERROR = _load_extension()


def _cuda_ops():
    """The compiled op namespace ``torch.ops.qjl``, or None when the extension is not built."""
    return _OPS


class BackendInfo(NamedTuple):
    """Which backend the ops use: ``active`` is ``"cuda"`` when CUDA tensors run the kernels."""

    active: str
    extension: str | None  # path of the loaded extension
    reason: str

    def __str__(self) -> str:
        return f"qjl_kernel backend: {self.active} ({self.reason})"


def backend_info() -> BackendInfo:
    """Which backend the ops use and why (CPU tensors always use the reference)."""
    if _OPS is None:
        return BackendInfo(
            "reference",
            None,
            f"CUDA extension qjl_kernel._C not loaded ({_EXTENSION_ERROR}); build it with "
            "`pip install --no-build-isolation -e .` on a machine with nvcc and a CUDA build of torch",
        )
    if not torch.cuda.is_available():
        return BackendInfo("reference", _EXTENSION_PATH, "CUDA extension loaded but no GPU is visible")
    return BackendInfo(
        "cuda", _EXTENSION_PATH, "CUDA extension loaded; CUDA tensors use the kernels, CPU tensors the reference"
    )


BACKENDS = ("auto", "reference", "cuda")
_forced_backend = "auto"


def set_backend(name: str) -> None:
    """Force a backend for every op: ``"auto"`` (default: CUDA kernels for CUDA tensors when the
    extension is built, else the reference), ``"reference"`` or ``"cuda"`` (an error when the
    kernels cannot run). The environment variable ``QJL_BACKEND`` sets the initial choice."""
    global _forced_backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _forced_backend = name


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("reference"): ...`` runs the block with a forced backend."""
    previous = _forced_backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def backend_for(*tensors: torch.Tensor) -> str:
    """Name of the backend the ops use for these tensors: ``"cuda"`` or ``"reference"``."""
    if _forced_backend == "reference":
        return "reference"
    runnable = _cuda_ops() is not None and all(t.is_cuda for t in tensors)
    if _forced_backend == "cuda" and not runnable:
        why = _EXTENSION_ERROR if _OPS is None else "not every tensor is on a GPU"
        raise RuntimeError(f"the qjl_kernel backend is forced to 'cuda' but the kernels cannot run: {why}")
    return "cuda" if runnable else "reference"


set_backend(os.environ.get("QJL_BACKEND", "auto"))


def _use_cuda(*tensors: torch.Tensor, floats: tuple[torch.Tensor, ...] = ()) -> bool:
    return backend_for(*tensors) == "cuda" and all(t.dtype in _KERNEL_FLOATS for t in floats)


def _dense_inner(t: torch.Tensor, dims: int) -> torch.Tensor:
    """``t`` itself when its last ``dims`` dims are dense (views along leading dims are fine), else a
    contiguous copy; the kernels read leading dims through strides."""
    expected = 1
    for size, stride in zip(reversed(t.shape[t.dim() - dims :]), reversed(t.stride()[t.dim() - dims :])):
        if size != 1 and stride != expected:
            return t.contiguous()
        expected *= size
    return t


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
    if _use_cuda(keys, outlier_indices, projection, floats=(keys,)):
        indices = outlier_indices.to(torch.uint8).contiguous()
        bits, outlier_bits, inlier_norms, outlier_norms = _OPS.quantize_keys.default(
            keys.contiguous(), indices, projection, outlier_sketch_dim
        )
        return QuantizedKeys(bits, outlier_bits, inlier_norms, outlier_norms, indices)
    return reference.quantize_keys_ref(keys, outlier_indices, projection, outlier_sketch_dim)


def key_scores(query: torch.Tensor, keys: QuantizedKeys, projection: torch.Tensor) -> torch.Tensor:
    """QJL estimates of ``<q, k>``: query ``[B, H_q, L, d]`` (or ``[B, H_q, d]``) -> float32
    ``[B, H_q, L, T]`` (or ``[B, H_q, T]``), ``H_q`` any multiple of ``H_kv`` (MHA and GQA).
    Scores are not multiplied by the softmax scale. See :func:`reference.key_scores_ref`."""
    _checks.key_scores_args(query, keys, projection)
    single_row = query.dim() == 3
    if single_row:
        query = query.unsqueeze(2)
    if _use_cuda(query, *keys, projection, floats=(query, keys.inlier_norms, keys.outlier_norms)):
        scores = _OPS.key_scores.default(
            query,
            _dense_inner(keys.bits, 2),
            _dense_inner(keys.outlier_bits, 2),
            _dense_inner(keys.inlier_norms, 1),
            _dense_inner(keys.outlier_norms, 1),
            _dense_inner(keys.outlier_indices, 1),
            projection,
        )
    else:
        scores = reference.key_scores_ref(query, keys, projection)
    return scores.squeeze(2) if single_row else scores


def quantize_values(values: torch.Tensor, group_size: int, bits: int) -> QuantizedValues:
    """Quantize values ``[..., T, d]`` per token in groups of ``group_size`` channels to
    ``bits`` (2 or 4) bits. See :func:`reference.quantize_values_ref`."""
    _checks.quantize_values_args(values, group_size, bits)
    if _use_cuda(values, floats=(values,)):
        codes, scales, mins = _OPS.quantize_values.default(values.contiguous(), group_size, bits)
        return QuantizedValues(codes, scales, mins, bits, group_size)
    return reference.quantize_values_ref(values, group_size, bits)


def value_matmul(weights: torch.Tensor, values: QuantizedValues) -> torch.Tensor:
    """``weights [B, H_q, L, T] @ dequant(values [B, H_kv, T, d])`` -> float32 ``[B, H_q, L, d]``,
    ``H_q`` any multiple of ``H_kv``. See :func:`reference.value_matmul_ref`."""
    _checks.value_matmul_args(weights, values)
    codes, scales, mins = values.codes, values.scales, values.mins
    if _use_cuda(weights, codes, scales, mins, floats=(scales, mins)) and scales.dtype == mins.dtype:
        # float64 weights: the reference reads them as float32 too.
        w = weights if weights.dtype in _KERNEL_FLOATS else weights.float()
        return _OPS.value_matmul.default(
            w,
            _dense_inner(codes, 1),
            _dense_inner(scales, 1),
            _dense_inner(mins, 1),
            values.bits,
            values.group_size,
        )
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
