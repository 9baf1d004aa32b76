"""CPU tier for the extension: it always builds with its CPU kernels, builds its CUDA kernels where nvcc
is, registers every op with the expected schema, and its fake (meta) implementations give shapes,
dtypes and clear errors without a GPU."""

import os
import shutil

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import qjl_kernel
from qjl_kernel import ops as qjl_ops

HAVE_NVCC = shutil.which("nvcc") is not None or qjl_ops._cuda_ops() is not None
CUDA_DISABLED = os.environ.get("QJL_BUILD_CUDA", "").strip() == "0"
needs_extension = pytest.mark.skipif(
    qjl_ops._extension_ops() is None, reason=f"qjl_kernel._C not loaded: {qjl_kernel.backend_info().reason}"
)

EXPECTED_SCHEMAS = {
    "quantize_keys": "qjl::quantize_keys(Tensor keys, Tensor outlier_indices, Tensor projection, "
    "int outlier_sketch_dim) -> (Tensor, Tensor, Tensor, Tensor)",
    "key_scores": "qjl::key_scores(Tensor query, Tensor bits, Tensor outlier_bits, Tensor inlier_norms, "
    "Tensor outlier_norms, Tensor outlier_indices, Tensor projection) -> Tensor",
    "quantize_values": "qjl::quantize_values(Tensor values, int group_size, int bits) -> (Tensor, Tensor, Tensor)",
    "value_matmul": "qjl::value_matmul(Tensor weights, Tensor codes, Tensor scales, Tensor mins, int bits, "
    "int group_size) -> Tensor",
    "decode_attention": "qjl::decode_attention(Tensor query, Tensor bits, Tensor outlier_bits, Tensor inlier_norms, "
    "Tensor outlier_norms, Tensor outlier_indices, Tensor projection, Tensor residual_keys, Tensor value_codes, "
    "Tensor value_scales, Tensor value_mins, Tensor value_window, Tensor? mask, float scaling, int value_bits, "
    "int value_group_size) -> Tensor",
    "cpu_isa": "qjl::cpu_isa() -> str",
}

B, H_KV, RATIO, N, G, D, M, M_O, N_OUT, L, T = 2, 2, 4, 3, 32, 128, 256, 128, 8, 1, 100


@pytest.mark.skipif(not HAVE_NVCC, reason="no nvcc on this machine: the CUDA kernels are not expected to be built")
@pytest.mark.skipif(CUDA_DISABLED, reason="QJL_BUILD_CUDA=0: built without CUDA kernels on purpose")
def test_extension_builds_where_nvcc_is():
    info = qjl_kernel.backend_info()
    assert qjl_ops._cuda_ops() is not None, f"nvcc is present but the CUDA kernels are not loaded: {info.reason}"
    assert info.extension is not None


def test_extension_has_cpu_kernels():
    """The CPU kernels need only a C++ compiler: every build has them."""
    info = qjl_kernel.backend_info()
    assert qjl_ops._HAS_CPU_KERNELS, f"the extension or its CPU kernels did not load: {info.reason}"
    assert qjl_kernel.cpu_isa() in ("avx512", "avx2", "scalar")
    assert qjl_kernel.cpu_isa() in info.reason


def test_backend_info_says_why():
    info = qjl_kernel.backend_info()
    assert info.active in ("cuda", "reference") and info.reason
    assert str(info).startswith("qjl_kernel backend:")
    assert qjl_kernel.backend_for(torch.zeros(1)) == "reference"


@needs_extension
@pytest.mark.parametrize("op", sorted(EXPECTED_SCHEMAS))
def test_schema(op):
    assert str(getattr(torch.ops.qjl, op).default._schema) == EXPECTED_SCHEMAS[op]


def _key_inputs(device, dtype=torch.float16):
    keys = torch.empty(B, H_KV, N, G, D, device=device, dtype=dtype)
    idx = torch.empty(B, H_KV, N, N_OUT, device=device, dtype=torch.uint8)
    proj = torch.empty(M, D, device=device)
    return keys, idx, proj


def _state(device, norm_dtype=torch.float16):
    bits = torch.empty(B, H_KV, N, G, M // 8, device=device, dtype=torch.uint8)
    obits = torch.empty(B, H_KV, N, G, M_O // 8, device=device, dtype=torch.uint8)
    norms = torch.empty(B, H_KV, N, G, device=device, dtype=norm_dtype)
    idx = torch.empty(B, H_KV, N, N_OUT, device=device, dtype=torch.uint8)
    return bits, obits, norms, norms.clone(), idx


def _value_state(device, bits=2, gs=32, dtype=torch.float16):
    codes = torch.empty(B, H_KV, T, D * bits // 32, device=device, dtype=torch.int32)
    scales = torch.empty(B, H_KV, T, D // gs, device=device, dtype=dtype)
    return codes, scales, scales.clone()


@needs_extension
def test_cpu_tensors_are_refused_by_the_dispatcher():
    """Ops without a CPU kernel: the dispatcher names the op and the backend."""
    keys = torch.randn(1, 1, 1, 8, 64)
    with pytest.raises(NotImplementedError, match=r"qjl::quantize_keys.*'CPU' backend"):
        torch.ops.qjl.quantize_keys.default(keys, torch.zeros(1, 1, 1, 0, dtype=torch.uint8), torch.randn(64, 64), 0)


@needs_extension
def test_fake_shapes_on_meta_tensors():
    ops = torch.ops.qjl
    bits, obits, n_in, n_out = ops.quantize_keys.default(*_key_inputs("meta"), M_O)
    assert bits.shape == (B, H_KV, N, G, M // 8) and bits.dtype == torch.uint8
    assert obits.shape == (B, H_KV, N, G, M_O // 8) and obits.dtype == torch.uint8
    assert n_in.shape == n_out.shape == (B, H_KV, N, G) and n_in.dtype == torch.float16

    query = torch.empty(B, H_KV * RATIO, L, D, device="meta", dtype=torch.bfloat16)
    scores = ops.key_scores.default(query, *_state("meta"), torch.empty(M, D, device="meta"))
    assert scores.shape == (B, H_KV * RATIO, L, N * G) and scores.dtype == torch.float32

    values = torch.empty(B, H_KV, T, D, device="meta", dtype=torch.bfloat16)
    codes, scales, mins = ops.quantize_values.default(values, 32, 4)
    assert codes.shape == (B, H_KV, T, D * 4 // 32) and codes.dtype == torch.int32
    assert scales.shape == mins.shape == (B, H_KV, T, D // 32) and scales.dtype == torch.bfloat16

    weights = torch.empty(B, H_KV * RATIO, L, T, device="meta", dtype=torch.float16)
    out = ops.value_matmul.default(weights, *_value_state("meta"), 2, 32)
    assert out.shape == (B, H_KV * RATIO, L, D) and out.dtype == torch.float32


@needs_extension
def test_fake_tensor_mode_on_cuda_device():
    """What torch.compile traces: fake CUDA tensors, no GPU needed."""
    with FakeTensorMode():
        values = torch.empty(B, H_KV, T, D, device="cuda", dtype=torch.float16)
        codes, scales, mins = torch.ops.qjl.quantize_values.default(values, 32, 2)
        weights = torch.empty(B, H_KV * RATIO, L, T, device="cuda", dtype=torch.float32)
        out = torch.ops.qjl.value_matmul.default(weights, codes, scales, mins, 2, 32)
    assert out.shape == (B, H_KV * RATIO, L, D) and out.device.type == "cuda" and out.dtype == torch.float32


@needs_extension
@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: torch.ops.qjl.quantize_keys.default(*_key_inputs("meta", torch.float64), M_O), "keys must be float16"),
        (lambda: torch.ops.qjl.quantize_keys.default(_key_inputs("meta")[0][0], *_key_inputs("meta")[1:], M_O),
         "keys must have rank 5"),
        (lambda: torch.ops.qjl.quantize_keys.default(*_key_inputs("meta"), 12), "multiples of 8"),
        (lambda: torch.ops.qjl.key_scores.default(
            torch.empty(B, 3, L, D, device="meta"), *_state("meta"), torch.empty(M, D, device="meta")),
         "multiple of KV heads"),
        (lambda: torch.ops.qjl.key_scores.default(
            torch.empty(B, H_KV, L, D, device="meta"), *_state("meta"), torch.empty(M + 8, D, device="meta")),
         "projection must be"),
        (lambda: torch.ops.qjl.quantize_values.default(torch.empty(4, 64, device="meta"), 32, 3), "bits must be 2 or 4"),
        (lambda: torch.ops.qjl.quantize_values.default(torch.empty(4, 64, device="meta"), 24, 2), "group_size"),
        (lambda: torch.ops.qjl.value_matmul.default(
            torch.empty(B, H_KV, L, T + 1, device="meta"), *_value_state("meta"), 2, 32), "weights must be"),
        (lambda: torch.ops.qjl.value_matmul.default(
            torch.empty(B, H_KV, L, T, device="meta"), _value_state("meta")[0].float(), *_value_state("meta")[1:], 2, 32),
         "codes must have dtype"),
    ],
)
def test_fake_rejects_bad_arguments(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


@needs_extension
def test_opcheck_on_meta_tensors():
    """The schema / fake-tensor parts of opcheck that run without a GPU (the GPU tier runs all of it)."""
    values = torch.randn(2, 3, 17, 64, device="meta")
    torch.library.opcheck(
        torch.ops.qjl.quantize_values.default, (values, 32, 2), test_utils=("test_schema", "test_faketensor")
    )
