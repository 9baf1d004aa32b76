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
