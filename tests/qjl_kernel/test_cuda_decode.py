"""GPU tier for the fused op ``decode_attention``: the CUDA kernel (``torch.ops.qjl.decode_attention``
on CUDA tensors, csrc/decode_attention.cu) against its spec ``reference.decode_attention_ref``.

Run with ``pytest -m cuda`` on a GPU machine; skipped without a GPU or without the extension's CUDA
kernel. Imports only torch, qjl_kernel and the shared oracles (no models / transformers).

Tolerance: max|out - ref| <= RTOL[dtype] * max|ref| + ATOL_FLOOR. Both sides compute in float32 from
the same stored numbers (the kernel reads float16 / bfloat16 inputs, norms, scales and mins as float32,
as the reference's ``.float()`` does; S q in exact float32, the reference's matmuls with TF32 off), so
the differences are summation order (logits, softmax sums, the log-sum-exp merge of token splits) and
exp2 in log2 units (ex2.approx, 2 ulp), and, on the tensor-core scoring path, S q carried as fp16
hi + lo parts (22 significant bits, float32 accumulation): half-precision inputs get float32's
tolerance. Both scoring paths measured 1e-6 to 1e-5 relative on CPU emulation of these cases (8e-6 at
the 64k-token benchmark shape); 2e-5 leaves room for 64k-token sums. The CPU kernel meets 1e-5.
"""

from __future__ import annotations

import pytest
import torch

import qjl_kernel
from qjl_kernel import QuantizedKeys, reference
from qjl_kernel import ops as qjl_ops
from op_oracles import generator

RTOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
ATOL_FLOOR = 1e-6  # ~8 float32 ulps at 1.0: matters only when max|ref| < 0.05 (diffuse attention)


def _cuda_kernel_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if qjl_ops._extension_ops() is None:
        return "qjl_kernel._C is not built (pip install -e . with nvcc)"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("qjl::decode_attention", "CUDA"):
        return "the extension was built without the CUDA kernel of decode_attention"
    return None


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(_cuda_kernel_reason() is not None, reason=_cuda_kernel_reason() or ""),
]


# Committed keys are scored on tensor cores where the shapes allow (m, m_o multiples of 128, key
# group a multiple of 16) and on CUDA cores otherwise; QJL_DECODE_TENSOR_CORES=0 forces the latter.
SCORING_PATHS = ["tensor-cores", "cuda-cores"]


@pytest.fixture(params=SCORING_PATHS)
def scoring_path(request, monkeypatch):
    monkeypatch.setenv("QJL_DECODE_TENSOR_CORES", "1" if request.param == "tensor-cores" else "0")
    return request.param


@pytest.fixture(autouse=True)
def exact_reference():
    """The reference's matmuls in exact float32 (restores the user's TF32 setting)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def make_case(
    *,
    batch=1,
    kv_heads=2,
    ratio=2,
    length=1,
    dim=128,
    m=256,
    m_o=128,
    n_out=8,
    group=32,
    committed=96,
    residual=13,
    quantized=77,
    bits=2,
    group_size=32,
    dtype=torch.float32,
    seed=0,
):
    """``(query, keys, projection, residual_keys, values, window)`` on the GPU: ``committed`` QJL
    tokens (a multiple of ``group``; 0 -> keys None) then ``residual`` exact keys; ``quantized``
    quantized values (0 -> values None) then the exact window. Planted outlier channels; the state
    comes from the references (independent of the CUDA kernels under test)."""
    assert committed % group == 0
    tokens = committed + residual
    assert 0 <= quantized <= tokens
    gen = generator(seed, "cuda")
    grouped = torch.randn(batch, kv_heads, committed // group, group, dim, device="cuda", generator=gen)
    grouped[..., :3] *= 8
    residual_keys = torch.randn(batch, kv_heads, residual, dim, device="cuda", generator=gen)
    residual_keys[..., :3] *= 8
    values = torch.randn(batch, kv_heads, tokens, dim, device="cuda", generator=gen)
    query = torch.randn(batch, kv_heads * ratio, length, dim, device="cuda", generator=gen).to(dtype)
    projection = torch.randn(m, dim, device="cuda", generator=gen)
    keys = None
    if committed:
        outliers = grouped.norm(dim=3).topk(n_out, dim=-1).indices.to(torch.uint8)
        keys = reference.quantize_keys_ref(grouped.to(dtype), outliers, projection, m_o)
    qvalues = None
    if quantized:
        qvalues = reference.quantize_values_ref(values[:, :, :quantized].to(dtype), group_size, bits)
    return query, keys, projection, residual_keys.to(dtype), qvalues, values[:, :, quantized:].to(dtype)


def op_args(query, keys, projection, residual_keys, values, window, mask=None, scaling=None):
    """Positional arguments of ``torch.ops.qjl.decode_attention.default``; absent parts are the
    zero-size placeholders the op reads nothing from."""
    batch, kv_heads, dim = query.shape[0], residual_keys.shape[1], query.shape[-1]
    if keys is None:
        bits = torch.empty(batch, kv_heads, 0, 1, 0, dtype=torch.uint8, device="cuda")
        norms = torch.empty(batch, kv_heads, 0, 1, dtype=query.dtype, device="cuda")
        indices = torch.empty(batch, kv_heads, 0, 0, dtype=torch.uint8, device="cuda")
        key_parts, projection = (bits, bits, norms, norms, indices), torch.empty(0, dim, device="cuda")
    else:
        key_parts = tuple(keys)
    if values is None:
        codes = torch.empty(batch, kv_heads, 0, 0, dtype=torch.int32, device="cuda")
        groups = torch.empty(batch, kv_heads, 0, 0, dtype=window.dtype, device="cuda")
        value_parts, value_bits, group_size = (codes, groups, groups), 2, 1
    else:
        value_parts, value_bits, group_size = (values.codes, values.scales, values.mins), values.bits, values.group_size
    scaling = dim**-0.5 if scaling is None else scaling
    return (query, *key_parts, projection, residual_keys, *value_parts, window, mask, float(scaling), value_bits,
            group_size)


def padding_mask(batch, length, tokens, seed=0, fully_masked=(), left_padding=()):
    """bool ``[B, L, T]`` on the GPU: causal over the ``L`` newest tokens with ~10% random holes,
    ``left_padding`` ``(b, n)`` hides batch ``b``'s first ``n`` tokens, ``fully_masked`` ``(b, l)``
    rows see nothing."""
    gen = torch.Generator().manual_seed(seed)
    mask = reference.causal_mask(length, tokens).expand(batch, length, tokens).clone()
    mask &= torch.rand(batch, length, tokens, generator=gen) > 0.1
    mask[..., -1] = True
    for b, n in left_padding:
        mask[b, :, :n] = False
    for b, l in fully_masked:
        mask[b, l] = False
    return mask.cuda()


def assert_close(out, ref, dtype):
    assert out.dtype == torch.float32 and out.shape == ref.shape and out.device == ref.device
    assert torch.isfinite(out).all()
    err = (out - ref).abs().max().item()
    bound = RTOL[dtype] * ref.abs().max().item() + ATOL_FLOOR
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g} (max|ref| {ref.abs().max().item():.3g})"


def run(args, mask=None, scaling=None):
    """(CUDA kernel output, reference output) of the same state."""
    query, keys, projection, residual_keys, values, window = args
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = torch.ops.qjl.decode_attention.default(*op_args(*args, mask, scaling))
    ref = reference.decode_attention_ref(query, keys, projection, residual_keys, values, window, mask, scaling)
    return out, ref


def check(mask=None, scaling=None, dtype=torch.float32, **case):
    args = make_case(dtype=dtype, **case)
    out, ref = run(args, mask, scaling)
    assert_close(out, ref, dtype)


# --- kernel == reference ------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (head dim, value group size): the group size divides d.
HEAD_DIMS = [(64, 32), (96, 32), (128, 32), (256, 64)]


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dim,group_size", HEAD_DIMS)
def test_head_dims(dim, group_size, bits, scoring_path):
    # 109 tokens: not a multiple of the key group; 77 quantized values then a window of 32
    check(dim=dim, group_size=group_size, bits=bits, m=256, m_o=128, n_out=6, ratio=4, seed=dim + bits)


# (m, m_o, n_out): sketches of 64..1024 bits, m_o = 0 without outliers and > 0 with them; multiples
# of 128 take the tensor-core-friendly shapes, 200 / 24 and 64 the general ones.
SKETCHES = [(64, 0, 0), (64, 64, 4), (256, 0, 0), (256, 256, 8), (512, 128, 8), (1024, 0, 0), (1024, 512, 16),
            (200, 24, 6), (256, 0, 8)]


@pytest.mark.parametrize("sketch", SKETCHES, ids=lambda s: f"m{s[0]}-mo{s[1]}-out{s[2]}")
@pytest.mark.parametrize("ratio", [1, 2, 3, 4, 8])
def test_gqa_and_sketch_sizes(ratio, sketch, scoring_path):
    m, m_o, n_out = sketch
    check(ratio=ratio, m=m, m_o=m_o, n_out=n_out, dim=128, kv_heads=2, committed=4 * 32, residual=7, quantized=100,
          bits=4 if ratio % 2 else 2, seed=ratio * 7 + m)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 3])
def test_input_dtypes_and_query_lengths(dtype, length):
    check(dtype=dtype, batch=2, ratio=4, length=length, seed=length)


@pytest.mark.parametrize(
    "length,ratio,kv_heads",
    [(2, 2, 2), (5, 3, 2), (9, 8, 1), (16, 8, 1)],
    ids=["L2", "L5", "L9-rows72", "L16-rows128"],
)
def test_more_query_rows_than_a_block(length, ratio, kv_heads, scoring_path):
    """Rows per KV head beyond one block's 32 (row chunks), causal over the newest L tokens."""
    check(length=length, ratio=ratio, kv_heads=kv_heads, committed=64, group=32, residual=19, quantized=70)


@pytest.mark.parametrize(
    "group,committed,residual,quantized",
    [(16, 16 * 9, 5, 100), (20, 20 * 7, 3, 140), (32, 32 * 37, 45, 1000), (64, 64 * 19, 1, 1200), (200, 400, 9, 300),
     (1, 40, 9, 30)],
    ids=["G16", "G20", "G32-T1229", "G64-T1217", "G200", "G1"],
)
def test_key_groups_and_token_counts(group, committed, residual, quantized, scoring_path):
    """Any key group size (not a multiple of 16: the general scoring path; longer than a tile of 128
    tokens: split over tiles), token counts that are no multiple of a group, tile or split."""
    check(group=group, committed=committed, residual=residual, quantized=quantized, dim=64, m=128, m_o=64,
          n_out=4, ratio=4, length=2, seed=group)


@pytest.mark.parametrize("bits,group_size,dim", [(2, 8, 128), (4, 4, 128), (4, 128, 128), (2, 12, 96), (4, 6, 96)],
                         ids=["2bit-g8", "4bit-g4", "4bit-g128", "2bit-g12", "4bit-g6"])
def test_value_groups(bits, group_size, dim):
    """Value groups smaller than a packed word, one group per token, and groups that straddle the
    kernel's half-word units (12 and 6 channels: per-channel dequantization)."""
    check(bits=bits, group_size=group_size, dim=dim, quantized=90, seed=group_size)


def test_custom_scaling():
    check(scaling=0.3, length=2)


# (committed, residual, quantized): committed 0 -> keys None, quantized 0 -> values None.
EMPTY_PARTS = {
    "no-keys": (0, 70, 30),
    "no-residual": (96, 0, 50),
    "no-values": (96, 13, 0),
    "no-window": (96, 13, 109),
    "exact-only": (0, 70, 0),
    "compressed-only": (96, 0, 96),
    "no-keys-no-window": (0, 40, 40),
    "no-residual-no-values": (64, 0, 0),
}


@pytest.mark.parametrize("name", list(EMPTY_PARTS))
def test_empty_parts(name):
    committed, residual, quantized = EMPTY_PARTS[name]
    check(committed=committed, residual=residual, quantized=quantized, length=2, batch=2)


@pytest.mark.parametrize("mask_batch", [2, 1], ids=["per-batch", "broadcast"])
def test_padding_mask(mask_batch, scoring_path):
    length, tokens = 3, 96 + 13
    mask = padding_mask(mask_batch, length, tokens, left_padding=[(0, 20)], fully_masked=[(mask_batch - 1, 0)])
    check(mask=mask, batch=2, length=length, ratio=4)


def test_fully_masked_row_is_uniform():
    """A row with nothing to attend gets a uniform softmax, as the reference's finite masked logit."""
    args = make_case(batch=2, length=1)
    mask = torch.ones(2, 1, 109, dtype=torch.bool, device="cuda")
    mask[1] = False
    out, ref = run(args, mask)
    assert_close(out, ref, torch.float32)
    dense = torch.cat([reference.dequantize_values_ref(args[4]), args[5].float()], dim=2)  # [B, H_kv, T, d]
    torch.testing.assert_close(out[1, :, 0], dense[1].mean(dim=1).repeat_interleave(2, dim=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_many_splits_with_padding(dtype, scoring_path):
    """Thousands of tokens: the token splits merged by log-sum-exp. Batch 1's first 4500 tokens are
    padding (splits with every position masked get weight 0), batch 0's second row sees nothing."""
    batch, length = 2, 2
    committed, residual = 64 * 80, 37
    mask = padding_mask(batch, length, committed + residual, left_padding=[(1, 4500)], fully_masked=[(0, 1)])
    check(mask=mask, batch=batch, length=length, dim=128, m=256, m_o=128, n_out=8, group=64, committed=committed,
          residual=residual, quantized=5000, ratio=4, dtype=dtype, seed=5)


# Llama-3-8B attention shapes (32 query / 8 KV heads, d = 128), the paper's key configuration
# (m = m_o = 256, 8 outliers per 32-token group), 2-bit values in groups of 32, bf16: the shapes of
# benchmarks/bench_ops.py. 96 residual keys, a 128-token value window.
@pytest.mark.parametrize("path,tokens", [("tensor-cores", 8192), ("tensor-cores", 65536), ("cuda-cores", 8192)])
def test_benchmark_shapes(path, tokens, monkeypatch):
    monkeypatch.setenv("QJL_DECODE_TENSOR_CORES", "1" if path == "tensor-cores" else "0")
    check(batch=1, kv_heads=8, ratio=4, length=1, dim=128, m=256, m_o=256, n_out=8, group=32, committed=tokens,
          residual=96, quantized=tokens + 96 - 128, bits=2, group_size=32, dtype=torch.bfloat16, seed=11)


def test_scoring_paths_agree(monkeypatch):
    """Tensor-core scores (fp16 hi + lo fragments, 22 significant bits) and CUDA-core scores (float32
    sums) of the same state: the same output within the tolerance, not bit for bit."""
    args = make_case(batch=2, ratio=4, length=2, m=256, m_o=256, n_out=8, committed=32 * 20, residual=17,
                     quantized=600)
    outs = {}
    for path in SCORING_PATHS:
        monkeypatch.setenv("QJL_DECODE_TENSOR_CORES", "1" if path == "tensor-cores" else "0")
        outs[path] = torch.ops.qjl.decode_attention.default(*op_args(*args))
    assert_close(outs["tensor-cores"], outs["cuda-cores"], torch.float32)


# --- layouts ------------------------------------------------------------------------------------


def _in_buffer(t, extra, fill):
    """``t`` as ``buffer.narrow(2, 0, n)`` of a buffer with ``extra`` more entries along dim 2 set to ``fill``."""
    shape = list(t.shape)
    shape[2] += extra
    buf = torch.full(shape, fill, dtype=t.dtype, device=t.device)
    buf.narrow(2, 0, t.shape[2]).copy_(t)
    return buf.narrow(2, 0, t.shape[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_views_of_cache_buffers(dtype):
    """The caches' preallocated buffers: views along the group / token axis with NaN norms / scales,
    0xFF bits and codes beyond the valid tokens must not reach the output, which equals that of
    contiguous copies bit for bit."""
    query, keys, projection, residual_keys, values, window = make_case(batch=2, length=2, ratio=2, dtype=dtype,
                                                                       committed=4 * 32, residual=9, quantized=100)
    views = QuantizedKeys(_in_buffer(keys.bits, 3, 255), _in_buffer(keys.outlier_bits, 3, 255),
                          _in_buffer(keys.inlier_norms, 3, float("nan")), _in_buffer(keys.outlier_norms, 3, float("nan")),
                          _in_buffer(keys.outlier_indices, 3, 1))
    value_views = values._replace(codes=_in_buffer(values.codes, 50, -1), scales=_in_buffer(values.scales, 50, float("nan")),
                                  mins=_in_buffer(values.mins, 50, float("nan")))
    mask = padding_mask(2, 2, keys.num_tokens + 9, fully_masked=[(1, 1)])
    contiguous = (query, keys, projection, residual_keys, values, window)
    strided = (query, views, projection, _in_buffer(residual_keys, 7, float("nan")), value_views,
               _in_buffer(window, 7, float("nan")))
    got = torch.ops.qjl.decode_attention.default(*op_args(*strided, mask))
    want = torch.ops.qjl.decode_attention.default(*op_args(*contiguous, mask))
    assert torch.equal(got, want)
    out, ref = run(contiguous, mask)
    assert_close(got, ref, dtype)


def test_strided_query_projection_and_mask():
    """The model's query [B, L, H, d].transpose(1, 2), S as the transposed view of a dense S^T,
    a mask with another stride order: read in place, the same result."""
    args = make_case(batch=2, length=3, ratio=4)
    query, keys, projection = args[:3]
    mask = padding_mask(2, 3, keys.num_tokens + 13)
    want = torch.ops.qjl.decode_attention.default(*op_args(*args, mask))
    query_t = query.transpose(1, 2).contiguous().transpose(1, 2)
    projection_t = projection.t().contiguous().t()
    mask_t = mask.transpose(1, 2).contiguous().transpose(1, 2)
    got = torch.ops.qjl.decode_attention.default(*op_args(query_t, keys, projection_t, *args[3:], mask_t))
    assert torch.equal(got, want)


def test_views_along_batch_and_heads():
    args = make_case(batch=2, kv_heads=2, ratio=2, length=2)
    query, keys, projection, residual_keys, values, window = args

    def spread(t):  # t as buf[1::2, ::2] of a buffer twice as large along B and H_kv
        buf = torch.zeros(2 * t.shape[0] + 1, 2 * t.shape[1], *t.shape[2:], dtype=t.dtype, device=t.device)
        buf[1::2, ::2] = t
        return buf[1::2, ::2]

    views = QuantizedKeys(*(spread(t) for t in keys))
    value_views = values._replace(codes=spread(values.codes), scales=spread(values.scales), mins=spread(values.mins))
    got = torch.ops.qjl.decode_attention.default(
        *op_args(query, views, projection, spread(residual_keys), value_views, spread(window)))
    assert torch.equal(got, torch.ops.qjl.decode_attention.default(*op_args(*args)))


# Consecutive key groups with equal channel sets share the kernel's rebuilt v / u: patterns where
# the sharing must be exact (same list) and where it must not happen (same set in another order,
# one channel changed, a repeated channel).
OUTLIER_PATTERNS = {
    "all-same": lambda n: [[5, 9, 17, 30]] * n,
    "same-reordered": lambda n: [[5, 9, 17, 30], [30, 17, 9, 5]] * (n // 2),
    "alternating": lambda n: [[5, 9, 17, 30], [5, 9, 17, 31]] * (n // 2),
    "runs": lambda n: [[1, 2, 3, 4]] * (n // 2) + [[1, 2, 3, 60]] * (n - n // 2),
    "repeated-channel": lambda n: [[5, 5, 17, 30], [5, 17, 17, 30]] * (n // 2),
}


@pytest.mark.parametrize("pattern", sorted(OUTLIER_PATTERNS))
def test_outlier_channel_patterns(pattern, scoring_path):
    gen = generator(3, "cuda")
    groups, group, dim, m, m_o = 12, 32, 64, 128, 128
    grouped = torch.randn(1, 2, groups, group, dim, device="cuda", generator=gen)
    indices = torch.tensor(OUTLIER_PATTERNS[pattern](groups), dtype=torch.uint8, device="cuda")
    indices = indices.expand(1, 2, groups, 4).contiguous()
    projection = torch.randn(m, dim, device="cuda", generator=gen)
    keys = reference.quantize_keys_ref(grouped, indices, projection, m_o)
    query = torch.randn(1, 8, 1, dim, device="cuda", generator=gen)
    residual = torch.randn(1, 2, 5, dim, device="cuda", generator=gen)
    window = torch.randn(1, 2, groups * group + 5, dim, device="cuda", generator=gen)
    out, ref = run((query, keys, projection, residual, None, window))
    assert_close(out, ref, torch.float32)


# --- the op around the kernel ------------------------------------------------------------------


def test_ignores_allow_tf32():
    """S q runs in the op's own exact float32 kernel: TF32 matmuls allowed or not, the same output."""
    args = make_case(batch=2, ratio=4, length=2, dtype=torch.bfloat16)
    want = torch.ops.qjl.decode_attention.default(*op_args(*args))
    torch.backends.cuda.matmul.allow_tf32 = True
    assert torch.equal(torch.ops.qjl.decode_attention.default(*op_args(*args)), want)


def test_cuda_graph_replay():
    """No host synchronization: the op (S q prologue, main kernel, split merge) captures into a CUDA
    graph, and replays read the inputs' current contents."""
    args = make_case(dim=64, m=128, m_o=64, n_out=4, group=32, committed=32 * 100, residual=20, quantized=3000, ratio=4)
    call_args = op_args(*args)
    query = call_args[0]
    torch.ops.qjl.decode_attention.default(*call_args)  # warm-up (function attributes, allocator)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.qjl.decode_attention.default(*call_args)
    query.copy_(torch.randn_like(query))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, torch.ops.qjl.decode_attention.default(*call_args))


def test_opcheck():
    args = make_case(batch=2, length=2, dim=64, m=128, m_o=64, n_out=4, group=16, committed=64, residual=5,
                     quantized=40)
    mask = padding_mask(2, 2, 69, fully_masked=[(1, 0)])
    results = torch.library.opcheck(torch.ops.qjl.decode_attention.default, op_args(*args, mask))
    assert set(results.values()) == {"SUCCESS"}, results


def test_python_face_runs_the_fused_kernel(monkeypatch):
    """qjl_kernel.decode_attention on CUDA tensors calls this op, not the composition of the unfused
    ops through the reference's skeleton."""

    def refuse(*args, **kwargs):
        raise AssertionError("decode_attention ran the reference composition on CUDA tensors")

    args = make_case(batch=2, ratio=4, length=1)
    want = torch.ops.qjl.decode_attention.default(*op_args(*args))
    monkeypatch.setattr(reference, "decode_attention_ref", refuse)
    with qjl_kernel.use_backend("auto"):
        got = qjl_kernel.decode_attention(*args)
    assert torch.equal(got, want)


def test_errors_name_the_argument():
    args = list(op_args(*make_case(length=2)))
    with pytest.raises(RuntimeError, match="must be on one device"):
        bad = list(args)
        bad[7] = bad[7].cpu()  # residual keys
        torch.ops.qjl.decode_attention.default(*bad)
    with pytest.raises(RuntimeError, match="mask must be"):
        bad = list(args)
        bad[12] = torch.ones(1, 2, 108, dtype=torch.bool, device="cuda")
        torch.ops.qjl.decode_attention.default(*bad)
    with pytest.raises(RuntimeError, match="value_bits must be 2 or 4"):
        bad = list(args)
        bad[14] = 3
        torch.ops.qjl.decode_attention.default(*bad)
