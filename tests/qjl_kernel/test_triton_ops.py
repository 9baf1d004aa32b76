"""Triton kernels (qjl_kernel/triton_ops.py) against the references, and against the CUDA kernels.

CPU tier (CI): each kernel runs under Triton's interpreter on CPU tensors. Interpreter mode is fixed
for a whole process when triton is imported (``tl.sum`` and friends are themselves ``@triton.jit``
functions), and other test modules import triton long before this one (transformers does), so the
interpreted cases run in ONE child process started with ``TRITON_INTERPRET=1``: this file run as a
script with the selected case keys (``python tests/qjl_kernel/test_triton_ops.py OUT.json KEY...``),
which runs the same check functions and reports each case (None or the traceback) as JSON. The rest
of the suite is untouched. When pytest itself runs with ``TRITON_INTERPRET=1`` the cases run in-process.

GPU tier (``pytest -m cuda``): the compiled kernels against the references and the CUDA kernels.

Oracles and tolerances (as tests/qjl_kernel/test_cuda_ops.py):
- quantize_keys: sign bits bit-exact wherever the float64 sketch is farther from 0 than
  SIGN_MARGIN x sum_j |S_ij k_j| (float32 sums in another order may round a coordinate within
  rounding of 0 to the other sign); norms within NORM_RTOL[dtype]; indices equal.
- key_scores: float32 from the same inputs, summation order only: |err| <= SCORE_ATOL[dtype] ||q|| ||k||.
- quantize_values: codes, scales and mins bit-exact.
- value_matmul: the same dequantized values, float32 sums in another order:
  |err| <= MATMUL_RTOL[dtype] x (|weights| @ |dequant(V)|).
"""

from __future__ import annotations

import sys

import torch

import qjl_kernel
from qjl_kernel import QuantizedKeys, reference, triton_ops
from qjl_kernel import ops as qjl_ops
from interpreted_cases import case_error, child_main, child_results, triton_mark
from op_oracles import (
    assert_matmul_close,
    NORM_RTOL,
    SCORE_ATOL,
    assert_safe_signs_equal,
    generator,
    keys_case,
    narrowed,
)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # float16: GPU tier only
# (batch, kv_heads, gqa_ratio, n_groups, group, head_dim, m, m_o, n_out)
KEY_CASES = [
    (1, 2, 1, 2, 32, 128, 256, 256, 8),  # paper configuration, MHA, head_dim 128
    (2, 1, 4, 2, 20, 64, 64, 64, 0),  # GQA 4, partial group (20 tokens), no outliers, m = 64
    (1, 2, 4, 1, 40, 64, 512, 128, 8),  # group longer than a token tile, m = 512
    (1, 1, 1, 2, 16, 128, 136, 64, 8),  # m not a power of 2, m_o < m
    (1, 1, 8, 1, 24, 96, 128, 0, 0),  # GQA 8, head_dim 96, m_o = 0 (no outlier bits at all)
]
# (query length, state as a narrowed view of a bigger buffer as the cache passes it, query a
# non-contiguous view)
SCORE_LAYOUTS = [(1, True, False), (3, False, False), (2, False, True)]
# Cases run under the interpreter with the compiled tile sizes (the chunked loops over channels):
# the paper configuration, and head_dim 96 with outliers and GQA 8.
COMPILED_TILE_KEY_CASES = [KEY_CASES[0], (1, 1, 8, 1, 32, 96, 128, 64, 6)]
# (leading shape, tokens, head_dim, group_size, bits)
VALUE_CASES = [
    ((1, 2), 37, 128, 32, 2),
    ((2, 1), 20, 64, 64, 4),
    ((1, 1), 33, 128, 8, 2),  # group smaller than a packed word (16 codes)
    ((3,), 17, 64, 16, 4),  # rank 3 values
    ((1, 1), 40, 96, 32, 2),  # head_dim 96
]
GQA_RATIOS = [1, 4, 8]
LONG_TOKENS = 600  # value_matmul over several token splits (256 tokens each at least)


# ---------------------------------------------------------------------------------------------
# Checks: each raises AssertionError on a mismatch. `device` is "cpu" (interpreter) or "cuda".
# ---------------------------------------------------------------------------------------------


def _column_major(projection):
    """The same S seen through a transposed buffer (the kernels read S through its strides)."""
    return projection.t().contiguous().t()


def check_quantize_keys(case, dtype, device="cpu", column_major=False):
    keys, outliers, projection, m_o = keys_case(case, dtype, device)
    if column_major:
        projection = _column_major(projection)
    with qjl_kernel.use_backend("triton"):
        assert qjl_kernel.backend_for(keys) == "triton"
        got = qjl_kernel.quantize_keys(keys, outliers, projection, m_o)
    want = reference.quantize_keys_ref(keys, outliers, projection, m_o)
    assert_safe_signs_equal(got, want, keys, outliers, projection, m_o)
    for name in ("inlier_norms", "outlier_norms"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == dtype
        torch.testing.assert_close(g, w, rtol=NORM_RTOL[dtype], atol=1e-6)
    assert torch.equal(got.outlier_indices, want.outlier_indices)


def check_key_scores(case, dtype, length, strided, transposed=False, device="cpu", column_major=False):
    keys, outliers, projection, m_o = keys_case(case, dtype, device)
    if column_major:
        projection = _column_major(projection)
    batch, kv_heads, ratio, *_ = case
    d = case[5]
    state = reference.quantize_keys_ref(keys, outliers, projection, m_o)
    query = torch.randn(batch, kv_heads * ratio, length, d, device=device, generator=generator(7, device)).to(dtype)
    if transposed:  # the same values as a view of a [B, L, H_q, d + 8] buffer
        buffer = torch.zeros(batch, length, kv_heads * ratio, d + 8, dtype=dtype, device=device)
        buffer[..., :d] = query.transpose(1, 2)
        query = buffer[..., :d].transpose(1, 2)
        assert not query.is_contiguous()
    want = reference.key_scores_ref(query, state, projection)
    if strided:
        state = QuantizedKeys(*(narrowed(t, 3) for t in state))
    with qjl_kernel.use_backend("triton"):
        got = qjl_kernel.key_scores(query, state, projection)
    assert got.shape == want.shape and got.dtype == torch.float32
    k_norm = (state.inlier_norms.float() ** 2 + state.outlier_norms.float() ** 2).sqrt()
    k_norm = k_norm.flatten(2).repeat_interleave(ratio, dim=1)[:, :, None, :]  # [B, H_q, 1, T]
    bound = SCORE_ATOL[dtype] * query.float().norm(dim=-1, keepdim=True) * k_norm + 1e-6
    err = (got - want).abs()
    assert (err <= bound).all(), f"max error / bound {(err / bound).max():.3g}"


def _values(lead, tokens, d, dtype, device, seed=0, ties=False):
    gen = generator(seed, device)
    if ties:  # a coarse grid makes (v - min) / scale hit x.5 exactly: round-half-to-even matters
        v = torch.randint(0, 7, (*lead, tokens, d), device=device, generator=gen).float() / 2
    else:
        v = torch.randn(*lead, tokens, d, device=device, generator=gen) * 3
    v = v.to(dtype)
    v[..., 0, :] = 1.5  # a constant row: scale 0, codes 0
    return v


def check_quantize_values(case, dtype, ties, device="cpu"):
    lead, tokens, d, group_size, bits = case
    values = _values(lead, tokens, d, dtype, device, ties=ties)
    with qjl_kernel.use_backend("triton"):
        got = qjl_kernel.quantize_values(values, group_size, bits)
    want = reference.quantize_values_ref(values.cpu(), group_size, bits)
    assert torch.equal(got.codes.cpu(), want.codes), f"{(got.codes.cpu() != want.codes).sum()} code words differ"
    assert torch.equal(got.scales.cpu(), want.scales) and got.scales.dtype == dtype
    assert torch.equal(got.mins.cpu(), want.mins)


def check_quantize_values_non_finite(dtype, device="cpu"):
    """NaN, +inf and -inf inputs: codes bit-identical to the reference's, scales and mins equal with
    NaN where the reference has NaN (a group with a NaN; tl.min / tl.max skip NaN)."""
    from test_value_ops import _non_finite_values

    values = _non_finite_values(dtype).to(device)
    for bits in (2, 4):
        with qjl_kernel.use_backend("triton"):
            got = qjl_kernel.quantize_values(values, 16, bits)
        want = reference.quantize_values_ref(values.cpu(), 16, bits)
        assert torch.equal(got.codes.cpu(), want.codes), f"{(got.codes.cpu() != want.codes).sum()} code words differ"
        assert torch.allclose(got.scales.cpu().float(), want.scales.float(), rtol=0, atol=0, equal_nan=True)
        assert torch.allclose(got.mins.cpu().float(), want.mins.float(), rtol=0, atol=0, equal_nan=True)


def check_value_matmul(case, dtype, ratio, strided, device="cpu"):
    lead, tokens, d, group_size, bits = case
    batch, kv_heads = lead
    state = reference.quantize_values_ref(_values(lead, tokens, d, dtype, device, seed=1), group_size, bits)
    logits = torch.randn(batch, kv_heads * ratio, 2, tokens + 7, device=device, generator=generator(2, device))
    weights = logits.softmax(-1).to(dtype)[..., :tokens]  # a narrowed last dim, as a split softmax gives
    if strided:
        state = state._replace(codes=narrowed(state.codes, 50), scales=narrowed(state.scales, 50),
                               mins=narrowed(state.mins, 50))
    with qjl_kernel.use_backend("triton"):
        got = qjl_kernel.value_matmul(weights, state)
    want = reference.value_matmul_ref(weights, state)
    assert_matmul_close(got, want, weights, state, dtype)


def check_compiled_tiles(case, dtype, device="cpu"):
    """quantize_keys and key_scores with the tile sizes of the compiled kernels (chunks of channels),
    S passed as a column-major view."""
    triton_ops.TILES_AS_COMPILED = True
    try:
        check_quantize_keys(case, dtype, device, column_major=True)
        check_key_scores(case, dtype, 1, True, False, device, column_major=True)
    finally:
        triton_ops.TILES_AS_COMPILED = False


def check_value_matmul_splits(device="cpu"):
    """Enough tokens for several token splits, reduced by one sum."""
    state = reference.quantize_values_ref(
        torch.randn(1, 2, LONG_TOKENS, 64, device=device, generator=generator(3, device)), 32, 2)
    weights = torch.rand(1, 8, 1, LONG_TOKENS, device=device, generator=generator(4, device)).softmax(-1)
    with qjl_kernel.use_backend("triton"):
        got = qjl_kernel.value_matmul(weights, state)
    torch.testing.assert_close(got, reference.value_matmul_ref(weights, state), rtol=1e-4, atol=1e-5)


def _key_id(case):
    batch, kv_heads, ratio, n_groups, group, d, m, m_o, n_out = case
    return f"b{batch}h{kv_heads}r{ratio}n{n_groups}g{group}d{d}m{m}mo{m_o}o{n_out}"


def _value_id(case):
    lead, tokens, d, group_size, bits = case
    return f"{'x'.join(map(str, lead))}t{tokens}d{d}gs{group_size}b{bits}"


# Every interpreted case: key -> (check, args). Keys are the pytest ids.
CASES: dict[str, tuple] = {}
for _case in KEY_CASES:
    for _dt, _dtype in DTYPES.items():
        CASES[f"quantize_keys-{_key_id(_case)}-{_dt}"] = (check_quantize_keys, (_case, _dtype))
        for _length, _strided, _transposed in SCORE_LAYOUTS:
            _layout = f"L{_length}{'-strided' if _strided else ''}{'-query-view' if _transposed else ''}"
            CASES[f"key_scores-{_key_id(_case)}-{_dt}-{_layout}"] = (
                check_key_scores, (_case, _dtype, _length, _strided, _transposed))
for _case in COMPILED_TILE_KEY_CASES:
    CASES[f"compiled_tiles-{_key_id(_case)}-bf16"] = (check_compiled_tiles, (_case, torch.bfloat16))
for _case in VALUE_CASES:
    for _dt, _dtype in DTYPES.items():
        for _ties in (False, True):
            CASES[f"quantize_values-{_value_id(_case)}-{_dt}{'-ties' if _ties else ''}"] = (
                check_quantize_values, (_case, _dtype, _ties))
        if len(_case[0]) == 2:
            for _ratio in GQA_RATIOS:
                _strided = _ratio != 1
                CASES[f"value_matmul-{_value_id(_case)}-{_dt}-r{_ratio}{'-strided' if _strided else ''}"] = (
                    check_value_matmul, (_case, _dtype, _ratio, _strided))
CASES["value_matmul-splits"] = (check_value_matmul_splits, ())
for _dt, _dtype in DTYPES.items():
    CASES[f"quantize_values-non-finite-{_dt}"] = (check_quantize_values_non_finite, (_dtype,))


if __name__ == "__main__":  # the interpreted child: OUT.json KEY...
    child_main(CASES, sys.argv[1:])


import pytest  # noqa: E402  (the child above needs no pytest)

needs_triton = triton_mark()


@pytest.fixture(scope="module")
def interpreted_results(request, tmp_path_factory):
    """Results of the selected interpreted cases, from one TRITON_INTERPRET=1 child process (None when
    this process already interprets: the cases then run in-process)."""
    return child_results(__file__, CASES, request, tmp_path_factory)


@needs_triton
@pytest.mark.parametrize("key", sorted(CASES))
def test_interpreted_triton_matches_reference(key, interpreted_results):
    error = case_error(CASES, key, interpreted_results)
    assert error is None, error


@needs_triton
def test_forced_triton_on_cpu_without_interpreter_says_how():
    if triton_ops.interpreted():
        pytest.skip("this process runs Triton's interpreter")
    x = torch.randn(1, 1, 4, 32)
    with qjl_kernel.use_backend("triton"):
        with pytest.raises(RuntimeError, match="forced to 'triton'.*TRITON_INTERPRET=1"):
            qjl_kernel.quantize_values(x, 32, 2)
    assert qjl_kernel.backend_for(x) == "reference"  # auto: CPU tensors use the reference


def test_backend_names_and_info():
    assert qjl_kernel.BACKENDS == ("auto", "reference", "triton", "cuda")
    info = qjl_kernel.backend_info()
    assert info.active in ("cuda", "triton", "reference") and "Triton" in info.reason
    assert (info.triton is None) == (triton_ops.TRITON_ERROR is not None)
    with qjl_kernel.use_backend("reference"):
        assert qjl_kernel.backend_info().active == "reference"


def test_ops_run_without_triton(monkeypatch):
    """A failed `import triton` leaves every op on the other backends (auto never picks Triton)."""
    monkeypatch.setattr(triton_ops, "TRITON_ERROR", "ImportError: No module named 'triton'")
    monkeypatch.setattr(triton_ops, "triton", None)
    x = torch.randn(1, 1, 4, 32)
    assert qjl_kernel.backend_for(x) == "reference"
    assert qjl_kernel.backend_info().triton is None
    qjl_kernel.value_matmul(torch.rand(1, 1, 2, 4), qjl_kernel.quantize_values(x, 32, 2))
    with qjl_kernel.use_backend("triton"), pytest.raises(RuntimeError, match="triton is not importable"):
        qjl_kernel.quantize_values(x, 32, 2)


# ---------------------------------------------------------------------------------------------
# GPU tier: compiled kernels.
# ---------------------------------------------------------------------------------------------



def gpu_tier(test):
    """Marks of the GPU tier: compiled Triton kernels on a CUDA GPU."""
    for mark in (
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        needs_triton,
        pytest.mark.skipif(triton_ops.interpreted(), reason="this process runs Triton's interpreter"),
    ):
        test = mark(test)
    return test

needs_cuda_extension = pytest.mark.skipif(qjl_ops._cuda_ops() is None,
                                          reason="qjl_kernel._C is not built (pip install -e . with nvcc)")
GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# Each shape/dtype is a few Triton compilations (~1 s each): the lists stay short so that
# scripts/gpu_check.sh keeps its time budget.
GPU_KEY_CASES = KEY_CASES + [
    (2, 8, 4, 3, 32, 128, 256, 256, 8),  # Llama-3-8B shapes, GQA 4
    (1, 4, 1, 2, 32, 256, 1024, 512, 64),  # head_dim 256, large sketch, many outliers
]
GPU_VALUE_CASES = VALUE_CASES + [((2, 8), 130, 128, 32, 4)]


@gpu_tier
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("case", GPU_KEY_CASES, ids=_key_id)
def test_gpu_triton_keys_match_reference(case, dtype):
    check_quantize_keys(case, dtype, "cuda")
    for length, strided, transposed in SCORE_LAYOUTS:
        check_key_scores(case, dtype, length, strided, transposed, "cuda")


@gpu_tier
@pytest.mark.parametrize("case", COMPILED_TILE_KEY_CASES, ids=_key_id)
def test_gpu_triton_keys_column_major_projection(case):
    check_compiled_tiles(case, torch.bfloat16, "cuda")


@gpu_tier
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("case", GPU_VALUE_CASES, ids=_value_id)
def test_gpu_triton_values_match_reference(case, dtype):
    for ties in (False, True):
        check_quantize_values(case, dtype, ties, "cuda")
    if len(case[0]) == 2:
        for ratio in GQA_RATIOS:
            check_value_matmul(case, dtype, ratio, ratio != 1, "cuda")


@gpu_tier
def test_gpu_triton_long_context_splits():
    state = reference.quantize_values_ref(torch.randn(1, 8, 20000, 128, device="cuda"), 32, 2)
    weights = torch.randn(1, 32, 1, 20000, device="cuda").softmax(-1)
    with qjl_kernel.use_backend("triton"):
        got = qjl_kernel.value_matmul(weights, state)
    torch.testing.assert_close(got, reference.value_matmul_ref(weights, state), rtol=1e-4, atol=1e-5)
    check_value_matmul_splits("cuda")


# The benchmark's shapes (benchmarks/bench_gpu.py): Llama-3-8B, 32 query / 8 KV heads, d = 128,
# m = 256, m_o = 256, 8 outliers, groups of 32 tokens, bfloat16; 2-bit values in groups of 32.
BENCH_KEY_CASE = (1, 8, 4, 2048, 32, 128, 256, 256, 8)  # 65536 tokens


def _score_bound(state, query, ratio, dtype, factor=1.0):
    k_norm = (state.inlier_norms.float() ** 2 + state.outlier_norms.float() ** 2).sqrt()
    k_norm = k_norm.flatten(2).repeat_interleave(ratio, dim=1)[:, :, None, :]
    return factor * SCORE_ATOL[dtype] * query.float().norm(dim=-1, keepdim=True) * k_norm + 1e-6


@gpu_tier
def test_gpu_triton_long_context_at_benchmark_shapes():
    """Key scores and value sums over 65536 tokens at the benchmark's shapes, against the references."""
    dtype = torch.bfloat16
    keys, outliers, projection, m_o = keys_case(BENCH_KEY_CASE, dtype, "cuda")
    with qjl_kernel.use_backend("triton"):
        state = qjl_kernel.quantize_keys(keys, outliers, projection, m_o)
    want_state = reference.quantize_keys_ref(keys, outliers, projection, m_o)
    for name in ("inlier_norms", "outlier_norms"):
        torch.testing.assert_close(getattr(state, name), getattr(want_state, name), rtol=NORM_RTOL[dtype], atol=1e-6)
    agree = (state.bits == want_state.bits).float().mean()
    assert agree > 0.999, f"only {agree:.5f} of the sign bytes agree"  # rounding ties flip a few
    del keys, want_state
    query = torch.randn(1, 32, 1, 128, device="cuda").to(dtype)
    with qjl_kernel.use_backend("triton"):
        got = qjl_kernel.key_scores(query, state, projection)
    want = reference.key_scores_ref(query, state, projection)
    assert got.shape == (1, 32, 1, 65536)
    err = (got - want).abs()
    bound = _score_bound(state, query, 4, dtype)
    assert (err <= bound).all(), f"max error / bound {(err / bound).max():.3g}"

    values = reference.quantize_values_ref(torch.randn(1, 8, 65536, 128, device="cuda").to(dtype), 32, 2)
    weights = torch.randn(1, 32, 1, 65536, device="cuda").softmax(-1).to(dtype)
    with qjl_kernel.use_backend("triton"):
        out = qjl_kernel.value_matmul(weights, values)
    assert_matmul_close(out, reference.value_matmul_ref(weights, values), weights, values, dtype)


@gpu_tier
def test_gpu_triton_key_scores_ignore_tf32():
    """``S q`` stays IEEE float32 when torch lets matmuls use TF32 (inputs rounded to 10 mantissa bits
    give errors up to ~2e-4 of |S| |q| at these shapes, 20x the bound below)."""
    case = GPU_KEY_CASES[-2]  # Llama-3-8B shapes
    dtype = torch.float32
    keys, outliers, projection, m_o = keys_case(case, dtype, "cuda")
    state = reference.quantize_keys_ref(keys, outliers, projection, m_o)
    query = torch.randn(case[0], case[1] * case[2], 1, case[5], device="cuda")
    want = reference.key_scores_ref(query, state, projection)  # TF32 off (torch's default)
    exact = (query.double() @ projection.double().T).flatten(0, 2)
    scale = query.abs().double() @ projection.abs().double().T
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with qjl_kernel.use_backend("triton"):
            got = qjl_kernel.key_scores(query, state, projection)
        sq = triton_ops._project_queries(query, projection)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert ((sq.double() - exact).abs() <= 1e-5 * scale.flatten(0, 2)).all()
    err = (got - want).abs()
    bound = _score_bound(state, query, case[2], dtype)
    assert (err <= bound).all(), f"max error / bound {(err / bound).max():.3g}"


@gpu_tier
@needs_cuda_extension
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("case", GPU_KEY_CASES[:3], ids=_key_id)
def test_gpu_triton_matches_cuda_kernels(case, dtype):
    """Triton and CUDA kernels against each other (same oracles as against the reference)."""
    keys, outliers, projection, m_o = keys_case(case, dtype, "cuda")
    with qjl_kernel.use_backend("triton"):
        tri = qjl_kernel.quantize_keys(keys, outliers, projection, m_o)
    with qjl_kernel.use_backend("cuda"):
        cud = qjl_kernel.quantize_keys(keys, outliers, projection, m_o)
    assert_safe_signs_equal(tri, cud, keys, outliers, projection, m_o)
    batch, kv_heads, ratio = case[:3]
    query = torch.randn(batch, kv_heads * ratio, 2, case[5], device="cuda").to(dtype)
    with qjl_kernel.use_backend("triton"):
        s_tri = qjl_kernel.key_scores(query, cud, projection)
    with qjl_kernel.use_backend("cuda"):
        s_cud = qjl_kernel.key_scores(query, cud, projection)
    k_norm = (cud.inlier_norms.float() ** 2 + cud.outlier_norms.float() ** 2).sqrt()
    k_norm = k_norm.flatten(2).repeat_interleave(ratio, dim=1)[:, :, None, :]
    bound = 2 * SCORE_ATOL[dtype] * query.float().norm(dim=-1, keepdim=True) * k_norm + 1e-6
    assert ((s_tri - s_cud).abs() <= bound).all()

    values = _values((batch, kv_heads), 70, case[5], dtype, "cuda")
    with qjl_kernel.use_backend("triton"):
        v_tri = qjl_kernel.quantize_values(values, 32, 2)
        weights = torch.rand(batch, kv_heads * ratio, 2, 70, device="cuda").softmax(-1)
        o_tri = qjl_kernel.value_matmul(weights, v_tri)
    with qjl_kernel.use_backend("cuda"):
        v_cud = qjl_kernel.quantize_values(values, 32, 2)
        o_cud = qjl_kernel.value_matmul(weights, v_cud)
    assert all(torch.equal(a, b) for a, b in zip(v_tri[:3], v_cud[:3]))
    torch.testing.assert_close(o_tri, o_cud, rtol=1e-5, atol=1e-6)

