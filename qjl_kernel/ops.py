"""The public QJL ops: one function per op, checked arguments, backend dispatch.

Each function validates its arguments (errors name the argument), then runs one of three backends:

- ``cuda``: the CUDA kernels (``torch.ops.qjl.*`` from the extension ``qjl_kernel._C``, ``csrc/``);
- ``triton``: the Triton kernels of :mod:`qjl_kernel.triton_ops` and, for the fused
  ``decode_attention``, :mod:`qjl_kernel.triton_decode` (compiled for GPU tensors; CPU tensors only
  under Triton's interpreter, ``TRITON_INTERPRET=1``, which is how CI tests them);
- ``reference``: the pure-PyTorch references (:mod:`qjl_kernel.reference`, the spec).

``auto`` (the default) picks CUDA when the extension is built and every tensor is on a GPU, else
Triton when it is importable and every tensor is on a GPU, else the reference. ``QJL_BACKEND`` /
:func:`set_backend` / :func:`use_backend` force one. Every op follows the same choice (the fused
``decode_attention`` also has a C++ kernel for CPU tensors, and falls back to a composition of the
other ops on a CUDA build without its fused kernel); float64 inputs always use the reference (the
kernels read float16, bfloat16 and float32).
:func:`backend_for` names the backend for given tensors, :func:`backend_info` says what is available.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import NamedTuple

import torch

from . import _checks, reference, triton_decode, triton_ops
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


def _has_kernel(op: str, key: str) -> bool:
    return _OPS is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"qjl::{op}", key)


_HAS_CUDA_KERNELS = _has_kernel("key_scores", "CUDA")
_HAS_CPU_KERNELS = _has_kernel("decode_attention", "CPU")
_HAS_CUDA_DECODE = _has_kernel("decode_attention", "CUDA")  # the fused CUDA kernel, when the build has it
if _OPS is not None and not _HAS_CUDA_KERNELS:
    _EXTENSION_ERROR = "the extension was built without CUDA kernels (no nvcc or a CPU-only torch at build time)"


def _extension_ops():
    """The compiled op namespace ``torch.ops.qjl``, or None when the extension is not built."""
    return _OPS


def _cuda_ops():
    """``torch.ops.qjl`` when the extension holds the CUDA kernels, else None."""
    return _OPS if _HAS_CUDA_KERNELS else None


def cpu_isa() -> str | None:
    """The instruction set of the C++ CPU kernels (``"avx512"``, ``"avx2"`` or ``"scalar"``; the
    environment variable ``QJL_CPU_ISA`` forces one), or None when the extension is not built."""
    return torch.ops.qjl.cpu_isa() if _HAS_CPU_KERNELS else None


class BackendInfo(NamedTuple):
    """Which backend the ops use for GPU tensors (``active``: ``"cuda"``, ``"triton"`` or
    ``"reference"``; CPU tensors use the reference unless a backend is forced) and why."""

    active: str
    extension: str | None  # path of the loaded extension
    reason: str
    triton: str | None = None  # version of the importable Triton, None when it is not importable

    def __str__(self) -> str:
        return f"qjl_kernel backend: {self.active} ({self.reason})"


def _triton_summary() -> str:
    if triton_ops.TRITON_ERROR is not None:
        return f"Triton not importable ({triton_ops.TRITON_ERROR})"
    mode = "interpreter (TRITON_INTERPRET=1)" if triton_ops.interpreted() else "compiled"
    return f"Triton {triton_ops.TRITON_VERSION} importable, {mode}"


def backend_info() -> BackendInfo:
    """Which backend the ops use for GPU tensors and why (CPU tensors use the reference unless a
    backend is forced); the reason also says what Triton and the extension offer."""
    triton_version = triton_ops.TRITON_VERSION if triton_ops.TRITON_ERROR is None else None
    if _OPS is None:
        extension = (
            f"extension qjl_kernel._C not loaded ({_EXTENSION_ERROR}); build it with "
            "`pip install --no-build-isolation -e .` (its CUDA kernels need nvcc and a CUDA build of torch)"
        )
    elif not _HAS_CUDA_KERNELS:
        extension = f"extension loaded with CPU kernels only ({cpu_isa()})"
    else:
        extension = f"extension loaded with CUDA and CPU kernels ({cpu_isa()})"
    gpu = torch.cuda.is_available()
    forced = forced_backend()
    if forced != "auto":
        active = forced
        why = f"forced to {forced!r} (QJL_BACKEND / set_backend / use_backend)"
    elif gpu and _HAS_CUDA_KERNELS:
        active, why = "cuda", "CUDA tensors use the CUDA kernels, CPU tensors the reference"
    elif gpu and triton_version is not None:
        active, why = "triton", "CUDA tensors use the Triton kernels, CPU tensors the reference"
    else:
        active = "reference"
        why = "no GPU is visible" if not gpu else "neither the CUDA extension nor Triton can run"
    cpu = (
        f"CPU tensors run decode_attention in the C++ kernel ({cpu_isa()})"
        if _HAS_CPU_KERNELS and forced != "reference"
        else "CPU tensors run decode_attention as its reference"
    )
    return BackendInfo(active, _EXTENSION_PATH, f"{why}; {cpu}; {extension}; {_triton_summary()}", triton_version)


BACKENDS = ("auto", "reference", "triton", "cuda")
_process_backend = "auto"  # set_backend / QJL_BACKEND
_thread = threading.local()  # .backend: a use_backend block's choice, for its own thread only


def forced_backend() -> str:
    """The backend the ops of this thread are forced to: the innermost :func:`use_backend` block
    running on this thread, else the process-wide choice (:func:`set_backend`, ``QJL_BACKEND``)."""
    return getattr(_thread, "backend", _process_backend)


def set_backend(name: str) -> None:
    """Force a backend for every op: ``"auto"`` (default: CUDA kernels for CUDA tensors when the
    extension is built, else Triton kernels for CUDA tensors when Triton is importable, else the
    reference), ``"reference"``, ``"triton"`` or ``"cuda"`` (the last two raise when their kernels
    cannot run; ``"triton"`` runs CPU tensors under Triton's interpreter when the process was started
    with ``TRITON_INTERPRET=1``). The environment variable ``QJL_BACKEND`` sets the initial choice."""
    global _process_backend
    _process_backend = _checked_backend(name)


def _checked_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("reference"): ...`` runs the block with a forced backend. The choice holds
    for the thread that runs the block (other threads keep theirs), and leaving the block restores
    what that thread had, whatever other threads' blocks do meanwhile."""
    missing = object()
    previous = getattr(_thread, "backend", missing)
    _thread.backend = _checked_backend(name)
    try:
        yield
    finally:
        if previous is missing:
            del _thread.backend
        else:
            _thread.backend = previous


def _triton_unavailable(tensors: tuple[torch.Tensor, ...]) -> str | None:
    """Why the Triton kernels cannot run on these tensors, or None."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return f"the tensors are on several devices {sorted(map(str, devices))}"
    device = devices.pop() if devices else torch.device("cpu")
    return triton_ops.unavailable_reason(device)


def backend_for(*tensors: torch.Tensor) -> str:
    """Name of the backend the ops use for these tensors: ``"cuda"``, ``"triton"`` or ``"reference"``
    (float64 inputs use the reference whatever this says)."""
    forced = forced_backend()
    if forced == "reference":
        return "reference"
    on_gpu = bool(tensors) and all(t.is_cuda for t in tensors)
    cuda_runnable = _cuda_ops() is not None and on_gpu
    if forced == "cuda":
        if not cuda_runnable:
            why = _EXTENSION_ERROR if not _HAS_CUDA_KERNELS else "not every tensor is on a GPU"
            raise RuntimeError(f"the qjl_kernel backend is forced to 'cuda' but the kernels cannot run: {why}")
        return "cuda"
    if forced == "triton":
        why = _triton_unavailable(tensors)
        if why is not None:
            raise RuntimeError(f"the qjl_kernel backend is forced to 'triton' but the kernels cannot run: {why}")
        return "triton"
    if cuda_runnable:
        return "cuda"
    if on_gpu and triton_ops.TRITON_ERROR is None:
        return "triton"
    return "reference"


set_backend(os.environ.get("QJL_BACKEND", "auto"))


def ops_label(device: torch.device | str) -> str:
    """What runs this thread's ops for tensors on ``device``, for reports: ``"cuda"``,
    ``"triton"``, ``"cpu kernels (<isa>)"`` (the C++ CPU kernels: fused decode attention and value
    quantization; the other ops on the CPU are their references) or ``"reference"``."""
    probe = torch.empty(0, device=device)
    if _cpu_kernels_run(probe, floats=(probe,)):
        return f"cpu kernels ({cpu_isa()})"
    return backend_for(probe)


def _cpu_kernels_run(*tensors: torch.Tensor, floats=()) -> bool:
    """Whether the C++ CPU kernels take these tensors: the extension has them, no backend is
    forced, every tensor is on the CPU and the float ones are float16 / bfloat16 / float32."""
    return (
        forced_backend() == "auto"
        and _HAS_CPU_KERNELS
        and all(t.device.type == "cpu" for t in tensors)
        and all(t.dtype in _KERNEL_FLOATS for t in floats)
    )


def _kernels(*tensors: torch.Tensor, floats: tuple[torch.Tensor, ...] = ()):
    """The kernel namespace (``torch.ops.qjl`` style: ``.quantize_keys(...)`` etc.) for these
    tensors, or None for the reference."""
    backend = backend_for(*tensors)
    if backend == "reference" or not all(t.dtype in _KERNEL_FLOATS for t in floats):
        return None
    return _CUDA_KERNELS if backend == "cuda" else triton_ops


class _CudaKernels:
    """``torch.ops.qjl.*.default`` under the names of :mod:`qjl_kernel.triton_ops`."""

    @staticmethod
    def quantize_keys(*args):
        return _OPS.quantize_keys.default(*args)

    @staticmethod
    def key_scores(*args):
        return _OPS.key_scores.default(*args)

    @staticmethod
    def quantize_values(*args):
        return _OPS.quantize_values.default(*args)

    @staticmethod
    def value_matmul(*args):
        return _OPS.value_matmul.default(*args)


_CUDA_KERNELS = _CudaKernels()


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
    kernels = _kernels(keys, outlier_indices, projection, floats=(keys,))
    if kernels is not None:
        indices = outlier_indices.to(torch.uint8).contiguous()
        bits, outlier_bits, inlier_norms, outlier_norms = kernels.quantize_keys(
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
    kernels = _kernels(query, *keys, projection, floats=(query, keys.inlier_norms, keys.outlier_norms))
    if kernels is not None and query.shape[2]:  # L = 0 launches nothing: the reference returns the empty result
        scores = kernels.key_scores(
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
    if _cpu_kernels_run(values, floats=(values,)):
        # The C++ CPU kernel, bit-identical to the reference (csrc/cpu/quantize_values_cpu.cpp).
        codes, scales, mins = _OPS.quantize_values.default(values, group_size, bits)
        return QuantizedValues(codes, scales, mins, bits, group_size)
    kernels = _kernels(values, floats=(values,))
    if kernels is not None:
        codes, scales, mins = kernels.quantize_values(values.contiguous(), group_size, bits)
        return QuantizedValues(codes, scales, mins, bits, group_size)
    return reference.quantize_values_ref(values, group_size, bits)


def value_matmul(weights: torch.Tensor, values: QuantizedValues) -> torch.Tensor:
    """``weights [B, H_q, L, T] @ dequant(values [B, H_kv, T, d])`` -> float32 ``[B, H_q, L, d]``,
    ``H_q`` any multiple of ``H_kv``. See :func:`reference.value_matmul_ref`."""
    _checks.value_matmul_args(weights, values)
    codes, scales, mins = values.codes, values.scales, values.mins
    kernels = _kernels(weights, codes, scales, mins, floats=(scales, mins))
    if kernels is not None and scales.dtype == mins.dtype:
        # float64 weights: the reference reads them as float32 too.
        w = weights if weights.dtype in _KERNEL_FLOATS else weights.float()
        return kernels.value_matmul(
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
    _checks.dequantize_keys_args(keys, projection)
    return reference.dequantize_keys_ref(keys, projection)


def dequantize_values(values: QuantizedValues) -> torch.Tensor:
    """:class:`QuantizedValues` -> float32 ``[..., T, d]``. Slow path, reference only."""
    _checks.quantized_values(values, rank=None)
    return reference.dequantize_values_ref(values)


def _empty_keys(query: torch.Tensor, kv_heads: int) -> tuple[torch.Tensor, ...]:
    """Tensors of a :class:`QuantizedKeys` holding no token, for the op's schema."""
    batch, device = query.shape[0], query.device
    bits = torch.empty(batch, kv_heads, 0, 1, 0, dtype=torch.uint8, device=device)
    norms = torch.empty(batch, kv_heads, 0, 1, dtype=query.dtype, device=device)
    indices = torch.empty(batch, kv_heads, 0, 0, dtype=torch.uint8, device=device)
    return bits, bits, norms, norms, indices


def _empty_values(window: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Placeholders for "no quantized values" (the kernel reads none of them)."""
    batch, kv_heads = window.shape[:2]
    codes = torch.empty(batch, kv_heads, 0, 0, dtype=torch.int32, device=window.device)
    groups = torch.empty(batch, kv_heads, 0, 0, dtype=window.dtype, device=window.device)
    return codes, groups, groups


def decode_attention(
    query: torch.Tensor,
    keys: QuantizedKeys | None,
    projection: torch.Tensor | None,
    residual_keys: torch.Tensor,
    values: QuantizedValues | None,
    value_window: torch.Tensor,
    mask: torch.Tensor | None = None,
    scaling: float | None = None,
) -> torch.Tensor:
    """Fused attention of a step's query rows ``[B, H_q, L, d]`` over one layer's compressed state:
    ``T_c`` committed QJL ``keys`` (with their ``projection``) then exact ``residual_keys``
    ``[B, H_kv, R, d]``; ``T_q`` quantized ``values`` then the exact ``value_window``
    ``[B, H_kv, W, d]`` (``T_c + R = T_q + W = T``). ``mask`` is bool ``[B or 1, L, T]`` (True =
    attend) or None for the causal rule over the ``L`` newest tokens; ``scaling`` defaults to
    ``d ** -0.5``. Returns float32 ``[B, H_q, L, d]``. See :func:`reference.decode_attention_ref`.

    One fused kernel per backend: CPU tensors run the C++ kernel (``torch.ops.qjl.decode_attention``)
    when the extension is built and the backend is ``auto``; GPU tensors run the Triton kernel
    (:mod:`qjl_kernel.triton_decode`) on the ``triton`` backend, and the CUDA kernel on the ``cuda``
    backend when the extension registers one. Otherwise (a CUDA build without the fused kernel,
    float64 inputs) the step is composed from :func:`key_scores` and :func:`value_matmul` (each on its
    own backend), or from the references when forced to ``"reference"``."""
    _checks.decode_attention_args(query, keys, projection, residual_keys, values, value_window, mask)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if isinstance(scaling, torch.Tensor) or not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise TypeError(f"scaling must be a float, got {type(scaling).__name__}")
    return decode_attention_unchecked(query, keys, projection, residual_keys, values, value_window, mask, scaling)


def decode_attention_unchecked(query, keys, projection, residual_keys, values, value_window, mask, scaling):
    """:func:`decode_attention` without the Python argument checks, for callers whose state is
    consistent by construction (the caches, every decode step of every layer); the C++ kernels
    still check everything they read, the Triton kernel trusts its arguments.

    Backends as :func:`decode_attention` says: the C++ CPU kernel, the Triton kernel
    (``triton_decode.decode_attention``, one or two launches, no host synchronization), the fused CUDA
    kernel (``torch.ops.qjl.decode_attention`` on CUDA tensors, when built), else the composed path."""
    if keys is not None and keys.num_tokens == 0:
        keys = None
    if values is not None and values.num_tokens == 0:
        values = None
    if forced_backend() == "reference":
        return reference.decode_attention_ref(
            query, keys, projection, residual_keys, values, value_window, mask, float(scaling)
        )
    tensors = [query, residual_keys, value_window] + ([] if keys is None else [*keys, projection])
    tensors += [] if values is None else [values.codes, values.scales, values.mins]
    floats = [query, residual_keys, value_window]
    floats += [] if keys is None else [keys.inlier_norms, keys.outlier_norms]
    floats += [] if values is None else [values.scales, values.mins]
    if _cpu_kernels_run(*tensors, floats=floats):
        fused = _OPS.decode_attention.default
    else:
        backend = backend_for(*tensors, *([] if mask is None else [mask]))
        kernel_floats = all(t.dtype in _KERNEL_FLOATS for t in floats)
        if backend == "triton" and kernel_floats:
            fused = triton_decode.decode_attention
        elif backend == "cuda" and kernel_floats and _HAS_CUDA_DECODE:
            fused = _OPS.decode_attention.default
        else:
            return reference.decode_attention_ref(
                query, keys, projection, residual_keys, values, value_window, mask, float(scaling),
                key_scores_fn=key_scores, value_matmul_fn=value_matmul,
            )
    kv_heads = residual_keys.shape[1]
    if keys is None:
        key_parts = _empty_keys(query, kv_heads)
        projection = torch.empty(0, query.shape[-1], device=query.device)
    else:
        key_parts = tuple(keys)  # bits, outlier_bits, inlier_norms, outlier_norms, outlier_indices
    if values is None:
        value_parts, value_bits, group_size = _empty_values(value_window), 2, 1
    else:
        value_parts = (values.codes, values.scales, values.mins)
        value_bits, group_size = values.bits, values.group_size
    return fused(
        query, *key_parts, projection, residual_keys, *value_parts, value_window, mask, float(scaling),
        value_bits, group_size,
    )
