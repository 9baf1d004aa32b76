"""GPU tier: every CUDA op against its PyTorch reference (run with `pytest -m cuda` on a GPU machine).

Oracles and tolerances (docs/DESIGN.md section 6, csrc/README.md):
- quantize_keys: sign bits bit-exact wherever the float64 sketch is farther from 0 than
  SIGN_MARGIN x sum_j |S_ij k_j| (float32 sums in another order may round a near-zero coordinate to
  the other sign: the documented rounding-tie exception); norms within NORM_RTOL[dtype].
- key_scores: both paths compute in float32 from the same inputs (S q included: exact float32 on
  the CUDA path whatever torch.backends.cuda.matmul.allow_tf32 says; the reference runs with TF32 off
  in the tests that compare against it), so they differ only by summation order:
  |cuda - ref| <= SCORE_ATOL[dtype] * ||q|| * ||k||.
- quantize_values: codes, scales and mins bit-exact against the CPU reference (the reference run on
  CUDA divides by 2^b - 1 through a float32 reciprocal, a different rounding).
- value_matmul: the same dequantized values on both paths, float32 sums in another order:
  |cuda - ref| <= MATMUL_RTOL * (|weights| @ |dequant(V)|).
"""

import math

import pytest
import torch

import qjl_kernel
from qjl_kernel import QuantizedKeys, reference
from qjl_kernel import ops as qjl_ops
from op_oracles import (
    assert_matmul_close,
    NORM_RTOL,
    SCORE_ATOL,
    assert_safe_signs_equal,
    generator,
    keys_case,
    narrowed,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(qjl_ops._cuda_ops() is None, reason="qjl_kernel._C is not built (pip install -e . with nvcc)"),
]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SEEDS = [0]
# (batch, kv_heads, gqa_ratio, n_groups, group, head_dim, m, m_o, n_out)
KEY_CASES = [
    (1, 1, 1, 2, 32, 128, 256, 256, 8),  # paper configuration, MHA
    (2, 8, 4, 3, 32, 128, 256, 256, 8),  # Llama-3-8B shapes, GQA 4
    (4, 2, 8, 2, 32, 64, 64, 64, 0),  # no outliers, GQA 8
    (1, 4, 1, 2, 32, 256, 1024, 512, 8),  # head_dim 256, large sketch
    (3, 2, 4, 2, 20, 128, 520, 128, 8),  # partial group (20 tokens), m not a multiple of 32
    (2, 1, 8, 1, 40, 64, 128, 0, 0),  # group longer than a warp, no outlier sketch
    (1, 2, 2, 2, 16, 64, 256, 64, 64),  # every channel an outlier
]
QUERY_LENGTHS = [1, 3]
# (leading shape, tokens, head_dim, group_size, bits)
VALUE_CASES = [
    ((1, 1), 37, 128, 32, 2),
    ((2, 8), 130, 128, 32, 4),
    ((4, 2), 5, 64, 64, 2),
    ((2, 4), 64, 256, 128, 4),
    ((1, 3), 33, 128, 8, 2),  # group smaller than a packed word (16 codes)
    ((3,), 17, 64, 16, 4),  # rank 3 values
]
GQA_RATIOS = [1, 4, 8]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", KEY_CASES)
def test_quantize_keys_matches_reference(case, dtype, seed):
    keys, outliers, proj, m_o = keys_case(case, dtype, "cuda", seed)
    got = qjl_kernel.quantize_keys(keys, outliers, proj, m_o)
    want = reference.quantize_keys_ref(keys, outliers, proj, m_o)
    assert qjl_kernel.backend_for(keys) == "cuda"
    assert_safe_signs_equal(got, want, keys, outliers, proj, m_o)
    for name in ("inlier_norms", "outlier_norms"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=NORM_RTOL[dtype], atol=1e-6)
    assert torch.equal(got.outlier_indices, want.outlier_indices)


def assert_scores_close(got, want, state, query, dtype):
    """|got - want| <= SCORE_ATOL[dtype] * ||q|| * ||k|| for every query row and key."""
    assert got.shape == want.shape and got.dtype == torch.float32
    ratio = query.shape[1] // state.bits.shape[1]
    k_norm = (state.inlier_norms.float() ** 2 + state.outlier_norms.float() ** 2).sqrt()
    k_norm = k_norm.flatten(2).repeat_interleave(ratio, dim=1)[:, :, None, :]  # [B, H_q, 1, T]
    bound = SCORE_ATOL[dtype] * query.float().norm(dim=-1, keepdim=True) * k_norm + 1e-6
    err = (got - want).abs()
    assert (err <= bound).all(), f"max error / bound {(err / bound).max():.3g}"


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("length", QUERY_LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", KEY_CASES)
def test_key_scores_matches_reference(case, dtype, length, strided):
    keys, outliers, proj, m_o = keys_case(case, dtype, "cuda", 0)
    batch, kv_heads, ratio, *_ , d = case[:6]
    state = reference.quantize_keys_ref(keys, outliers, proj, m_o)
    query = torch.randn(batch, kv_heads * ratio, length, d, device="cuda", generator=generator(7, "cuda")).to(dtype)
    want = reference.key_scores_ref(query, state, proj)
    if strided:
        state = QuantizedKeys(*(narrowed(t, 3) for t in state))
    got = qjl_kernel.key_scores(query, state, proj)
    assert_scores_close(got, want, state, query, dtype)


# Defects of a static review (issue 15), one test each.
@pytest.fixture
def tf32_off():
    """The reference's own matmuls in exact float32 (restores the user's setting)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def test_key_scores_ignore_allow_tf32(tf32_off):
    """S q is summed in exact float32 by the op's own kernel, whatever allow_tf32 says (at::matmul
    used TF32 when the user enabled it: 10-bit products)."""
    keys, outliers, proj, m_o = keys_case(KEY_CASES[1], torch.bfloat16, "cuda", 0)
    state = reference.quantize_keys_ref(keys, outliers, proj, m_o)
    query = torch.randn(2, 32, 3, 128, device="cuda", generator=generator(3, "cuda"), dtype=torch.bfloat16) * 4
    exact = qjl_kernel.key_scores(query, state, proj)
    torch.backends.cuda.matmul.allow_tf32 = True
    with_tf32 = qjl_kernel.key_scores(query, state, proj)
    assert torch.equal(exact, with_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    assert_scores_close(exact, reference.key_scores_ref(query, state, proj), state, query, torch.bfloat16)


def test_key_scores_more_than_65535_rows_per_kv_head(tf32_off):
    """Chunked prefill: ratio * L = 4 * 16400 query rows per KV head (once a grid dimension capped at 65535)."""
    keys, outliers, proj, m_o = keys_case((1, 1, 4, 1, 32, 64, 64, 64, 4), torch.float16, "cuda", 0)
    state = reference.quantize_keys_ref(keys, outliers, proj, m_o)
    query = torch.randn(1, 4, 16400, 64, device="cuda", generator=generator(5, "cuda"), dtype=torch.float16)
    got = qjl_kernel.key_scores(query, state, proj)
    assert_scores_close(got, reference.key_scores_ref(query, state, proj), state, query, torch.float16)


def test_key_scores_over_64k_tokens(tf32_off):
    """65536 keys (2048 groups of 32) per KV head, Llama-3-8B shapes, paper configuration."""
    keys, outliers, proj, m_o = keys_case((1, 2, 4, 2048, 32, 128, 256, 256, 8), torch.bfloat16, "cuda", 0)
    state = qjl_kernel.quantize_keys(keys, outliers, proj, m_o)
    query = torch.randn(1, 8, 1, 128, device="cuda", generator=generator(6, "cuda"), dtype=torch.bfloat16)
    got = qjl_kernel.key_scores(query, state, proj)
    assert_scores_close(got, reference.key_scores_ref(query, state, proj), state, query, torch.bfloat16)


@pytest.mark.parametrize("strided", [False, True])
def test_key_scores_without_outlier_sketch(strided, tf32_off):
    """m_o = 0 and no outliers (config/qjl_runtime_llama3.json): the outlier bits are [.., G, 0]
    (an empty tensor counts as dense; the density check once rejected it), GQA 4."""
    keys, outliers, proj, m_o = keys_case((2, 8, 4, 3, 32, 128, 256, 0, 0), torch.bfloat16, "cuda", 0)
    state = qjl_kernel.quantize_keys(keys, outliers, proj, m_o)
    assert state.outlier_bits.shape[-1] == 0
    if strided:
        state = QuantizedKeys(*(narrowed(t, 5) for t in state))
    query = torch.randn(2, 32, 2, 128, device="cuda", generator=generator(8, "cuda"), dtype=torch.bfloat16)
    got = qjl_kernel.key_scores(query, state, proj)
    assert_scores_close(got, reference.key_scores_ref(query, state, proj), state, query, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_key_scores_head_dim_96(dtype, tf32_off):
    keys, outliers, proj, m_o = keys_case((2, 2, 3, 3, 32, 96, 256, 128, 6), dtype, "cuda", 0)
    state = qjl_kernel.quantize_keys(keys, outliers, proj, m_o)
    query = torch.randn(2, 6, 3, 96, device="cuda", generator=generator(9, "cuda")).to(dtype)
    got = qjl_kernel.key_scores(query, state, proj)
    assert_scores_close(got, reference.key_scores_ref(query, state, proj), state, query, dtype)


def test_key_scores_non_contiguous_query(tf32_off):
    """The model's query: [B, L, H_q, d] transposed to [B, H_q, L, d], read through its strides."""
    keys, outliers, proj, m_o = keys_case(KEY_CASES[1], torch.float16, "cuda", 0)
    state = qjl_kernel.quantize_keys(keys, outliers, proj, m_o)
    query = torch.randn(2, 3, 32, 128, device="cuda", generator=generator(4, "cuda"), dtype=torch.float16).transpose(1, 2)
    assert not query.is_contiguous()
    got = qjl_kernel.key_scores(query, state, proj)
    assert torch.equal(got, qjl_kernel.key_scores(query.contiguous(), state, proj))
    assert_scores_close(got, reference.key_scores_ref(query, state, proj), state, query, torch.float16)


def _copies_made(fn) -> list[str]:
    """Names of the copy ops (dtype conversions, contiguous copies) fn dispatches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.key for e in prof.key_averages() if e.key in ("aten::_to_copy", "aten::copy_", "aten::clone")]


def test_key_scores_read_a_float32_projection_in_place():
    """No copy of the projection per call when it is float32 (contiguous [m, d] or S^T's view), nor of the query."""
    keys, outliers, proj, m_o = keys_case(KEY_CASES[1], torch.bfloat16, "cuda", 0)
    state = qjl_kernel.quantize_keys(keys, outliers, proj, m_o)
    query = torch.randn(2, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    args = (query, *state[:4], state.outlier_indices)
    assert proj.dtype == torch.float32 and proj.is_contiguous()
    proj_t_view = proj.t().contiguous().t()
    out = torch.ops.qjl.key_scores.default(*args, proj)
    assert torch.equal(out, torch.ops.qjl.key_scores.default(*args, proj_t_view))
    assert _copies_made(lambda: torch.ops.qjl.key_scores.default(*args, proj)) == []
    assert _copies_made(lambda: torch.ops.qjl.key_scores.default(*args, proj_t_view)) == []


def test_quantize_keys_read_a_float32_projection_in_place():
    """quantize_keys reads a float32 projection through its strides: the same state from [m, d]
    contiguous S and from S^T's view (QJLSketch's GPU layout), and no copy of either per call."""
    keys, outliers, proj, m_o = keys_case(KEY_CASES[1], torch.bfloat16, "cuda", 0)
    assert proj.dtype == torch.float32 and proj.is_contiguous()
    proj_t_view = proj.t().contiguous().t()
    ops = torch.ops.qjl.quantize_keys.default
    for got, want in zip(ops(keys, outliers, proj_t_view, m_o), ops(keys, outliers, proj, m_o)):
        assert torch.equal(got, want)
    assert _copies_made(lambda: ops(keys, outliers, proj, m_o)) == []
    assert _copies_made(lambda: ops(keys, outliers, proj_t_view, m_o)) == []


# (head_dim, bits): code words per token W = d * bits / 32 = 6, 8, 10, 16, 32, 8: the reduction's
# pitch kThreads + (W mod 32) for W below, equal to and above a warp, W not dividing 32.
@pytest.mark.parametrize("d,bits", [(96, 2), (128, 2), (80, 4), (256, 2), (256, 4), (64, 4)])
def test_value_matmul_reduction_layout(d, bits):
    """value_matmul's slot reduction (conflict-free [accumulator][thread] layout, once a 16-way
    bank conflict): every word count W, partial row tiles, several token slots per block."""
    state = reference.quantize_values_ref(_values((2, 2), 300, d, torch.float32, 3), 16, bits)
    weights = torch.rand(2, 10, 3, 300, device="cuda", generator=generator(4, "cuda"))
    got = qjl_kernel.value_matmul(weights, state)
    assert_matmul_close(got, reference.value_matmul_ref(weights, state), weights, state, torch.float32)


def test_key_scores_single_row_query():
    keys, outliers, proj, m_o = keys_case(KEY_CASES[1], torch.bfloat16, "cuda", 0)
    state = qjl_kernel.quantize_keys(keys, outliers, proj, m_o)
    query = torch.randn(2, 32, 128, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(
        qjl_kernel.key_scores(query, state, proj), reference.key_scores_ref(query.unsqueeze(2), state, proj).squeeze(2),
        rtol=1e-4, atol=1e-3)


def _values(lead, tokens, d, dtype, seed, ties=False):
    gen = generator(seed, "cuda")
    if ties:  # a coarse grid makes (v - min) / scale hit x.5 exactly: round-half-to-even matters
        v = torch.randint(0, 7, (*lead, tokens, d), device="cuda", generator=gen).float() / 2
    else:
        v = torch.randn(*lead, tokens, d, device="cuda", generator=gen) * 3
    v = v.to(dtype)
    v[..., 0, :] = 1.5  # a constant row: scale 0, codes 0
    return v


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", VALUE_CASES)
def test_quantize_values_bit_exact(case, dtype, ties):
    lead, tokens, d, group_size, bits = case
    values = _values(lead, tokens, d, dtype, 0, ties)
    got = qjl_kernel.quantize_values(values, group_size, bits)
    want = reference.quantize_values_ref(values.cpu(), group_size, bits)
    assert torch.equal(got.codes.cpu(), want.codes)
    assert torch.equal(got.scales.cpu(), want.scales) and got.scales.dtype == dtype
    assert torch.equal(got.mins.cpu(), want.mins)


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("ratio", GQA_RATIOS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", VALUE_CASES[:5])
def test_value_matmul_matches_reference(case, dtype, ratio, strided):
    lead, tokens, d, group_size, bits = case
    batch, kv_heads = lead
    state = reference.quantize_values_ref(_values(lead, tokens, d, dtype, 1), group_size, bits)
    logits = torch.randn(batch, kv_heads * ratio, 2, tokens + 7, device="cuda", generator=generator(2, "cuda"))
    weights = logits.softmax(-1).to(dtype)[..., :tokens]  # a narrowed last dim, as a split softmax gives
    if strided:
        state = state._replace(codes=narrowed(state.codes, 50), scales=narrowed(state.scales, 50),
                               mins=narrowed(state.mins, 50))
    got = qjl_kernel.value_matmul(weights, state)
    want = reference.value_matmul_ref(weights, state)
    assert_matmul_close(got, want, weights, state, dtype)


def test_value_matmul_long_context_splits():
    """Enough tokens to split the reduction over many blocks."""
    state = reference.quantize_values_ref(torch.randn(1, 8, 20000, 128, device="cuda"), 32, 2)
    weights = torch.randn(1, 32, 1, 20000, device="cuda").softmax(-1)
    torch.testing.assert_close(qjl_kernel.value_matmul(weights, state), reference.value_matmul_ref(weights, state),
                               rtol=1e-4, atol=1e-5)


def test_ops_follow_the_input_device():
    """Outputs land on the inputs' device, also when it is not the current one."""
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    values = torch.randn(1, 2, 40, 64, device=device)
    state = qjl_kernel.quantize_values(values, 32, 2)
    assert state.codes.device == device
    out = qjl_kernel.value_matmul(torch.rand(1, 2, 1, 40, device=device), state)
    assert out.device == device


def test_opcheck_every_op():
    ops = torch.ops.qjl
    keys, outliers, proj, m_o = keys_case(KEY_CASES[4], torch.float16, "cuda", 0)
    torch.library.opcheck(ops.quantize_keys.default, (keys, outliers, proj, m_o))
    state = reference.quantize_keys_ref(keys, outliers, proj, m_o)
    query = torch.randn(3, 8, 2, 128, device="cuda")
    torch.library.opcheck(ops.key_scores.default, (query, *state[:4], state.outlier_indices, proj))
    values = _values((2, 2), 19, 64, torch.bfloat16, 0)
    torch.library.opcheck(ops.quantize_values.default, (values, 32, 2))
    q = reference.quantize_values_ref(values, 32, 2)
    weights = torch.rand(2, 4, 1, 19, device="cuda")
    torch.library.opcheck(ops.value_matmul.default, (weights, q.codes, q.scales, q.mins, 2, 32))


def test_cuda_errors_name_the_argument():
    values = torch.randn(4, 64, device="cuda")
    with pytest.raises(RuntimeError, match="values must be float16, bfloat16 or float32"):
        torch.ops.qjl.quantize_values.default(values.double(), 32, 2)
    with pytest.raises(RuntimeError, match="group_size must be a positive divisor"):
        torch.ops.qjl.quantize_values.default(values, 24, 2)
    q = reference.quantize_values_ref(torch.randn(1, 2, 5, 64, device="cuda"), 32, 2)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        torch.ops.qjl.value_matmul.default(torch.rand(1, 2, 1, 5), q.codes, q.scales, q.mins, 2, 32)
    with pytest.raises(RuntimeError, match="weights must be"):
        torch.ops.qjl.value_matmul.default(torch.rand(1, 2, 1, 6, device="cuda"), q.codes, q.scales, q.mins, 2, 32)


def test_compile_traces_the_ops():
    values = torch.randn(1, 2, 40, 64, device="cuda", dtype=torch.float16)
    weights = torch.rand(1, 4, 1, 40, device="cuda")

    def step(v, w):
        q = qjl_kernel.quantize_values(v, 32, 2)
        return qjl_kernel.value_matmul(w, q)

    torch.testing.assert_close(torch.compile(step, fullgraph=True)(values, weights), step(values, weights))


def test_qjl_scale_constant():
    assert math.isclose(qjl_kernel.QJL_SCALE, math.sqrt(math.pi / 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [2, 4])
def test_quantize_values_non_finite_inputs_match_the_reference(bits, dtype):
    """NaN, +inf and -inf inputs: codes bit-identical to the reference's; a group with a NaN gets NaN
    scale and min (fminf / fmaxf skip NaN, so the kernel flags it)."""
    from test_value_ops import _non_finite_values

    values = _non_finite_values(dtype)
    got = qjl_kernel.quantize_values(values.cuda(), 16, bits)
    want = reference.quantize_values_ref(values, 16, bits)
    assert torch.equal(got.codes.cpu(), want.codes)
    for name in ("scales", "mins"):
        assert torch.allclose(getattr(got, name).cpu().float(), getattr(want, name).float(), rtol=0, atol=0,
                              equal_nan=True), name
