import pytest
import torch

import qjl_kernel
from qjl_kernel.packing import unpack_codes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Extra slack on the scale/2 bound for the rounding of scale and min to the storage dtype
# (relative to the group's magnitude): eps of the dtype times a few ulps.
ROUNDING_SLACK = {torch.float32: 1e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group_size", [16, 32, 64])
def test_round_trip_error_at_most_half_a_step(dtype, bits, group_size):
    values = (torch.randn(2, 3, 17, 64, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    q = qjl_kernel.quantize_values(values, group_size, bits)
    assert q.codes.shape == (2, 3, 17, 64 * bits // 32) and q.codes.dtype == torch.int32
    assert q.scales.shape == (2, 3, 17, 64 // group_size) and q.scales.dtype == dtype
    codes = unpack_codes(q.codes, bits)
    assert codes.min() >= 0 and codes.max() <= (1 << bits) - 1
    error = (qjl_kernel.dequantize_values(q) - values.float()).abs().view(2, 3, 17, -1, group_size)
    magnitude = values.float().abs().view(2, 3, 17, -1, group_size).amax(-1, keepdim=True)
    bound = q.scales.float().unsqueeze(-1) / 2 + ROUNDING_SLACK[dtype] * magnitude
    assert (error <= bound).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_groups_are_exact_and_finite(dtype):
    values = torch.full((1, 1, 4, 32), 1.5, dtype=dtype)
    values[0, 0, 1] = 0.0
    q = qjl_kernel.quantize_values(values, 16, 2)
    assert torch.count_nonzero(q.scales) == 0
    out = qjl_kernel.dequantize_values(q)
    assert torch.isfinite(out).all()
    assert torch.equal(out, values.float())


@pytest.mark.parametrize("ratio", [1, 4])
@pytest.mark.parametrize("bits", [2, 4])
def test_value_matmul_equals_weights_times_dequantized(ratio, bits):
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(2, 2, 40, 64, generator=gen)
    weights = torch.softmax(torch.randn(2, 2 * ratio, 3, 40, generator=gen), -1)
    q = qjl_kernel.quantize_values(values, 32, bits)
    dense = qjl_kernel.dequantize_values(q).repeat_interleave(ratio, dim=1)
    torch.testing.assert_close(qjl_kernel.value_matmul(weights, q), weights @ dense, rtol=1e-5, atol=1e-5)


def test_value_matmul_low_precision_weights():
    values = torch.randn(1, 1, 8, 32, dtype=torch.bfloat16)
    q = qjl_kernel.quantize_values(values, 32, 2)
    weights = torch.softmax(torch.randn(1, 1, 1, 8), -1).to(torch.bfloat16)
    out = qjl_kernel.value_matmul(weights, q)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


CPU_KERNEL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CPU_KERNEL_LAYOUTS = [(2, 32, 64), (4, 32, 64), (2, 8, 64), (4, 4, 64), (2, 64, 64), (2, 16, 80), (4, 32, 128)]


@pytest.mark.skipif(not qjl_kernel.ops._HAS_CPU_KERNELS, reason="qjl_kernel._C has no CPU kernels (not built)")
@pytest.mark.parametrize("dtype", CPU_KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("bits,group_size,dim", CPU_KERNEL_LAYOUTS)
def test_cpu_kernel_is_bit_identical_to_reference(bits, group_size, dim, dtype):
    """The C++ CPU quantize_values (what CPU tensors run) equals quantize_values_ref bit for bit,
    constant groups (scale 0) and half-way codes included."""
    gen = torch.Generator().manual_seed(bits * 1000 + group_size + dim)
    values = (torch.randn(2, 3, 41, dim, generator=gen) * 3).to(dtype)
    values[0, 0, 0, :group_size] = 1.5  # a constant group
    values[0, 0, 1] = torch.arange(dim) % (1 << bits)  # codes exactly on (and between) the levels
    values[0, 0, 2] = (torch.arange(dim) % (1 << bits)).float() * 0.5
    kernel = torch.ops.qjl.quantize_values.default(values, group_size, bits)
    reference = qjl_kernel.reference.quantize_values_ref(values, group_size, bits)
    assert torch.equal(kernel[0], reference.codes)
    assert torch.equal(kernel[1], reference.scales) and kernel[1].dtype == dtype
    assert torch.equal(kernel[2], reference.mins) and kernel[2].dtype == dtype
    with qjl_kernel.use_backend("auto"):  # the public op takes the kernel for CPU tensors
        public = qjl_kernel.quantize_values(values, group_size, bits)
    assert torch.equal(public.codes, reference.codes)


@pytest.mark.skipif(not qjl_kernel.ops._HAS_CPU_KERNELS, reason="qjl_kernel._C has no CPU kernels (not built)")
def test_cpu_kernel_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="bits must be 2 or 4"):
        torch.ops.qjl.quantize_values.default(torch.randn(4, 64), 32, 3)
    with pytest.raises(RuntimeError, match="group_size"):
        torch.ops.qjl.quantize_values.default(torch.randn(4, 64), 24, 2)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        torch.ops.qjl.quantize_values.default(torch.randn(4, 64, dtype=torch.float64), 32, 2)


NAN, INF = float("nan"), float("inf")
# Groups of 16 channels, one row each: what each non-finite input does to its group.
NON_FINITE_GROUPS = {
    "nan": [1.0, NAN],
    "nan-first": [NAN, 1.0],
    "+inf": [1.0, INF],
    "-inf": [-INF, 1.0],
    "+-inf": [-INF, INF],
    "all+inf": [INF, INF],
    "nan-and-inf": [INF, NAN],
}


def _non_finite_values(dtype):
    """[1, 1, len(NON_FINITE_GROUPS), 32]: per row, a group with the non-finite inputs beside a normal group."""
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(1, 1, len(NON_FINITE_GROUPS), 32, generator=gen)
    for row, specials in enumerate(NON_FINITE_GROUPS.values()):
        values[0, 0, row, 3 : 3 + 2 * len(specials) : 2] = torch.tensor(specials)
    return values.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [2, 4])
def test_non_finite_groups_are_defined_in_the_reference(bits, dtype):
    """A group with a NaN gets NaN scale and min (so it dequantizes to NaN); codes of non-finite
    quotients are 0; the finite group beside it is quantized as if alone."""
    values = _non_finite_values(dtype)
    q = qjl_kernel.reference.quantize_values_ref(values, 16, bits)
    has_nan = values[..., :16].isnan().any(-1)
    assert torch.equal(q.scales[..., 0].isnan(), has_nan) and torch.equal(q.mins[..., 0].isnan(), has_nan)
    assert qjl_kernel.reference.dequantize_values_ref(q)[..., :16][has_nan].isnan().all()
    codes = unpack_codes(q.codes, bits)[..., :16]
    quotients = (values[..., :16].float() - q.mins[..., :1].float()) / q.scales[..., :1].float()
    assert (codes[~quotients.isfinite()] == 0).all()
    alone = qjl_kernel.reference.quantize_values_ref(values[..., 16:], 16, bits)
    assert torch.equal(q.scales[..., 1:], alone.scales) and torch.equal(unpack_codes(q.codes, bits)[..., 16:],
                                                                        unpack_codes(alone.codes, bits))


@pytest.mark.skipif(not qjl_kernel.ops._HAS_CPU_KERNELS, reason="qjl_kernel._C has no CPU kernels (not built)")
@pytest.mark.parametrize("dtype", CPU_KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("bits", [2, 4])
def test_cpu_kernel_matches_reference_on_non_finite_inputs(bits, dtype):
    """NaN, +inf and -inf inputs: the C++ kernel's codes equal the reference's bit for bit, and its
    scales and mins equal them with NaN where the reference has NaN (it used to skip a NaN)."""
    values = _non_finite_values(dtype)
    codes, scales, mins = torch.ops.qjl.quantize_values.default(values, 16, bits)
    reference = qjl_kernel.reference.quantize_values_ref(values, 16, bits)
    assert torch.equal(codes, reference.codes)
    torch.testing.assert_close(scales, reference.scales, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(mins, reference.mins, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_empty_batch_gives_empty_results(backend):
    # the reference's dequantization viewed codes with a -1 group count, which an empty batch cannot size
    values = qjl_kernel.quantize_values(torch.randn(0, 2, 5, 64), 32, 2)
    with qjl_kernel.use_backend(backend):
        assert qjl_kernel.dequantize_values(values).shape == (0, 2, 5, 64)
        assert qjl_kernel.value_matmul(torch.randn(0, 4, 1, 5), values).shape == (0, 4, 1, 64)
        out = qjl_kernel.decode_attention(torch.randn(0, 4, 1, 64), None, None, torch.randn(0, 2, 6, 64), values,
                                          torch.randn(0, 2, 1, 64))
        assert out.shape == (0, 4, 1, 64)
