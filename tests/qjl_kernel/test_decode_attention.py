"""CPU tier for the fused op ``decode_attention``: the C++ CPU kernel (``torch.ops.qjl.decode_attention``)
against its spec ``reference.decode_attention_ref``, on every instruction set this CPU has, plus
opcheck, the fake implementation, argument errors and views of larger cache buffers."""

from __future__ import annotations

import functools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import qjl_kernel
from models import QJLSketch, select_outliers
from qjl_kernel import ops as qjl_ops
from qjl_kernel import reference

if not qjl_ops._HAS_CPU_KERNELS:
    _NO_KERNEL = f"the C++ CPU kernel of decode_attention is not loaded: {qjl_kernel.backend_info().reason}"
elif qjl_ops.forced_backend() != "auto":
    _NO_KERNEL = f"QJL_BACKEND forces the {qjl_ops.forced_backend()!r} backend: the CPU kernel does not run"
else:
    _NO_KERNEL = None
needs_cpu_kernel = pytest.mark.skipif(_NO_KERNEL is not None, reason=_NO_KERNEL or "")

# Kernel vs reference: max|out - ref| <= RTOL[dtype] * max|ref| + ATOL_FLOOR.
# Both sides compute in float32 from the same stored numbers (the kernel converts float16 / bfloat16
# inputs, norms, scales and mins to float32 exactly as the reference's ``.float()`` does), so the
# only difference is summation order (logits, softmax sums, the log-sum-exp merge of token chunks):
# the half-precision inputs get float32's tolerance. Measured on this file's cases (every ISA):
# at most 3e-6 relative (the T > 4096 cases), 1-2e-6 elsewhere, half-precision inputs no worse.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
# The outputs are softmax averages of N(0, 1) values; with diffuse attention they cancel to well
# below the values' own size (~1), while the rounding errors scale with the values. The floor, about
# 8 float32 ulps at 1.0, only matters for a case whose max|ref| falls below 0.1.
ATOL_FLOOR = 1e-6

ISAS = ("scalar", "avx2", "avx512")


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
    key_dtype=None,
    value_dtype=None,
    seed=0,
):
    """Arguments ``(query, keys, projection, residual_keys, values, value_window)`` of a layer with
    ``committed`` QJL tokens (a multiple of ``group``; 0 -> keys None) then ``residual`` exact keys,
    ``quantized`` quantized values (0 -> values None) then the exact window; planted outlier channels."""
    assert committed % group == 0
    tokens = committed + residual
    window = tokens - quantized
    assert window >= 0
    gen = torch.Generator().manual_seed(seed)
    key_dtype = key_dtype or dtype
    value_dtype = value_dtype or dtype
    grouped = torch.randn(batch, kv_heads, committed // group, group, dim, generator=gen)
    grouped[..., :3] *= 8  # planted outlier channels
    residual_keys = torch.randn(batch, kv_heads, residual, dim, generator=gen)
    residual_keys[..., :3] *= 8
    values = torch.randn(batch, kv_heads, tokens, dim, generator=gen)
    query = torch.randn(batch, kv_heads * ratio, length, dim, generator=gen).to(dtype)
    projection = QJLSketch(dim, m, seed=seed).projection
    keys = None
    if committed:
        keys = qjl_kernel.quantize_keys(grouped.to(key_dtype), select_outliers(grouped, n_out), projection, m_o)
    qvalues = None
    if quantized:
        qvalues = qjl_kernel.quantize_values(values[:, :, :quantized].to(value_dtype), group_size, bits)
    return query, keys, projection, residual_keys.to(key_dtype), qvalues, values[:, :, quantized:].to(value_dtype)


def padding_mask(batch, length, tokens, seed=0, fully_masked=(), left_padding=()):
    """bool ``[B, L, T]``: causal over the ``L`` newest tokens, ~10% random holes, ``left_padding``
    ``(b, n)`` hides batch ``b``'s first ``n`` tokens, ``fully_masked`` ``(b, l)`` rows see nothing."""
    gen = torch.Generator().manual_seed(seed)
    mask = reference.causal_mask(length, tokens).expand(batch, length, tokens).clone()
    mask &= torch.rand(batch, length, tokens, generator=gen) > 0.1
    mask[..., -1] = True  # every row keeps its own position (unless fully masked below)
    for b, n in left_padding:
        mask[b, :, :n] = False
    for b, l in fully_masked:
        mask[b, l] = False
    return mask


def run_both(args, mask=None, scaling=None):
    """(kernel output, reference output) of the same arguments."""
    out = qjl_kernel.decode_attention(*args, mask=mask, scaling=scaling)
    with qjl_kernel.use_backend("reference"):
        ref = qjl_kernel.decode_attention(*args, mask=mask, scaling=scaling)
    return out, ref


def assert_kernel_close(out, ref, dtype=torch.float32):
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = (out - ref).abs().max().item()
    bound = RTOL[dtype] * ref.abs().max().item() + ATOL_FLOOR
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g} (max|ref| {ref.abs().max().item():.3g})"


def check(mask=None, scaling=None, dtype=torch.float32, **case):
    args = make_case(dtype=dtype, **case)
    out, ref = run_both(args, mask, scaling)
    assert out.shape == args[0].shape
    assert_kernel_close(out, ref, dtype)


@needs_cpu_kernel
def test_cpu_tensors_run_the_kernel(monkeypatch):
    """Guards the comparisons below against testing the reference against itself."""

    def refuse(*args, **kwargs):
        raise AssertionError("decode_attention ran the reference under the 'auto' backend")

    monkeypatch.setattr(reference, "decode_attention_ref", refuse)
    assert qjl_ops.forced_backend() == "auto", "QJL_BACKEND forces a backend: the kernel would not run"
    out = qjl_kernel.decode_attention(*make_case())
    assert out.shape == (1, 4, 1, 128)


# --- 1. kernel == reference ---------------------------------------------------------------------

# (head dim, value group size): the group size divides d; d = 80 takes 16.
DIMS = [(64, 32), (80, 16), (96, 32), (128, 32), (256, 64)]


@needs_cpu_kernel
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dim,group_size", DIMS)
def test_head_dims(dim, group_size, bits):
    # 2-bit codes need d % 16 == 0: all of DIMS qualify. 109 tokens: not a multiple of the key group.
    check(dim=dim, group_size=group_size, bits=bits, m=256, m_o=64, n_out=4, seed=dim + bits)


# (m, m_o, n_out): m_o = 0 with no outliers, m_o > 0 with outliers (m_o = 24 and m = 200 leave one
# byte over a 16-bit word: the AVX-512 tails).
SKETCHES = [(64, 0, 0), (64, 64, 4), (256, 0, 0), (256, 128, 8), (1024, 0, 0), (1024, 256, 16), (200, 24, 6)]


@needs_cpu_kernel
@pytest.mark.parametrize("sketch", SKETCHES, ids=lambda s: f"m{s[0]}-mo{s[1]}-out{s[2]}")
@pytest.mark.parametrize("ratio", [1, 2, 3, 4, 8])
def test_gqa_and_sketch_sizes(ratio, sketch):
    m, m_o, n_out = sketch
    check(ratio=ratio, m=m, m_o=m_o, n_out=n_out, dim=64, kv_heads=2, committed=64, group=16, residual=7,
          quantized=50, bits=4, seed=ratio * 7 + m)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_input_dtypes(dtype):
    check(dtype=dtype, batch=2, ratio=4, length=3)


@needs_cpu_kernel
def test_mixed_dtypes():
    """Query, keys and values each in their own dtype (the reference reads them all as float32)."""
    args = make_case(dtype=torch.float16, key_dtype=torch.bfloat16, value_dtype=torch.float32, length=2)
    out, ref = run_both(args)
    assert_kernel_close(out, ref, torch.float16)


@needs_cpu_kernel
@pytest.mark.parametrize("bits,group_size", [(2, 8), (4, 4), (4, 128)], ids=["2bit-g8", "4bit-g4", "4bit-g128"])
def test_value_groups_across_code_words(bits, group_size):
    """Groups smaller than a packed int32 word (16 2-bit / 8 4-bit codes) and one group per token."""
    check(bits=bits, group_size=group_size, quantized=90, seed=group_size)


@needs_cpu_kernel
def test_custom_scaling():
    check(scaling=0.3, length=2)


@needs_cpu_kernel
@pytest.mark.parametrize(
    "case",
    [
        # several 4096-token chunks merged by log-sum-exp; the key and value splits fall inside chunks
        dict(committed=65 * 80, group=80, residual=37, quantized=5000),
        # three chunks, GQA, 4-bit values
        dict(committed=8320, group=128, residual=5, quantized=8000, ratio=4, bits=4, kv_heads=1),
    ],
    ids=["T5237", "T8325"],
)
def test_many_token_chunks(case):
    check(dim=64, m=64, m_o=32, n_out=4, group_size=32, **case)


@needs_cpu_kernel
def test_many_token_chunks_with_padding():
    """A chunk whose every position is masked (4500 left-padding tokens) must get weight 0 in the
    merge, and a fully masked row must stay uniform over all chunks."""
    batch, length, tokens = 2, 2, 64 * 80 + 37
    mask = padding_mask(batch, length, tokens, left_padding=[(1, 4500)], fully_masked=[(0, 1)])
    check(mask=mask, batch=batch, length=length, dim=64, m=64, m_o=32, n_out=4, group=64,
          committed=64 * 80, residual=37, quantized=5000, seed=5)


@needs_cpu_kernel
@pytest.mark.parametrize("mask_batch", [3, 1], ids=["per-batch", "broadcast"])
def test_padding_mask(mask_batch):
    length, tokens = 3, 96 + 13
    mask = padding_mask(mask_batch, length, tokens, left_padding=[(0, 20)], fully_masked=[(mask_batch - 1, 0)])
    check(mask=mask, batch=3, length=length, ratio=2)


@needs_cpu_kernel
def test_fully_masked_row_is_uniform():
    """The reference gives a row with nothing to attend a uniform softmax (finite masked logit)."""
    args = make_case(batch=2, length=1)
    mask = torch.ones(2, 1, 109, dtype=torch.bool)
    mask[1] = False
    out, ref = run_both(args, mask)
    assert_kernel_close(out, ref)
    dense = torch.cat([reference.dequantize_values_ref(args[4]), args[5].float()], dim=2)  # [B, H_kv, T, d]
    uniform = dense[1].mean(dim=1).repeat_interleave(2, dim=0)  # [H_q, d]
    torch.testing.assert_close(out[1, :, 0], uniform, rtol=1e-5, atol=1e-6)


@needs_cpu_kernel
@pytest.mark.parametrize(
    "length,ratio,case",
    [
        (2, 2, {}),
        (5, 3, dict(committed=64, group=64, residual=1, quantized=60)),
        (9, 8, dict(kv_heads=1)),  # 72 rows per KV head: more than the kernel's 64-row block
        (4, 1, dict(committed=0, residual=3, quantized=0)),  # L > T: the first rows see nothing
    ],
    ids=["L2", "L5", "L9-rows72", "L4-T3"],
)
def test_causal_rows(length, ratio, case):
    check(length=length, ratio=ratio, **case)


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


@needs_cpu_kernel
@pytest.mark.parametrize("name", list(EMPTY_PARTS))
def test_empty_parts(name):
    committed, residual, quantized = EMPTY_PARTS[name]
    args = make_case(committed=committed, residual=residual, quantized=quantized, length=2, batch=2)
    assert (args[1] is None) == (committed == 0) and (args[4] is None) == (quantized == 0)
    if args[1] is None:
        args = (args[0], None, None, *args[3:])  # no projection either
    out, ref = run_both(args)
    assert_kernel_close(out, ref)


@needs_cpu_kernel
def test_zero_token_states_count_as_none():
    """QuantizedKeys / QuantizedValues holding 0 tokens are the same as None."""
    query, keys, projection, residual_keys, values, window = make_case(committed=96, residual=13, quantized=77)
    empty_keys = keys._replace(**{f: getattr(keys, f)[:, :, :0] for f in keys._fields})
    empty_values = values._replace(codes=values.codes[:, :, :0], scales=values.scales[:, :, :0],
                                   mins=values.mins[:, :, :0])
    exact_keys = torch.randn(*residual_keys.shape[:2], 109, residual_keys.shape[3])
    exact_values = torch.randn_like(exact_keys)
    got = qjl_kernel.decode_attention(query, empty_keys, projection, exact_keys, empty_values, exact_values)
    want = qjl_kernel.decode_attention(query, None, None, exact_keys, None, exact_values)
    assert torch.equal(got, want)


def test_float64_inputs_use_the_reference():
    args = make_case(dtype=torch.float64, key_dtype=torch.float32, value_dtype=torch.float32)
    with qjl_kernel.use_backend("reference"):
        ref = qjl_kernel.decode_attention(*args)
    assert torch.equal(qjl_kernel.decode_attention(*args), ref)


# --- 2. every instruction set -------------------------------------------------------------------

ISA_CASES = {
    "gqa-outliers-mask": dict(batch=2, ratio=4, length=2, mask=True),
    "d80-4bit-no-outliers-causal": dict(dim=80, group_size=16, bits=4, m=64, m_o=0, n_out=0, length=3, ratio=3),
    # d % 16 != 0 (the AVX-512 masked and AVX2 scalar channel tails); 12-channel value groups split
    # the 8-code words (the per-channel dequantization)
    "d72-4bit-g12": dict(dim=72, group_size=12, bits=4, m=64, m_o=16, n_out=4, length=2),
    "many-chunks": dict(dim=64, m=200, m_o=24, n_out=4, group=64, committed=64 * 70, residual=21, quantized=4400),
}


@functools.lru_cache(maxsize=None)
def _isa_case(name):
    """Arguments, mask and reference output of an ISA_CASES entry (shared by the three ISAs)."""
    case = dict(ISA_CASES[name])
    use_mask = case.pop("mask", False)
    args = make_case(seed=11, **case)
    query = args[0]
    tokens = (0 if args[1] is None else args[1].num_tokens) + args[3].shape[2]
    mask = padding_mask(query.shape[0], query.shape[2], tokens, fully_masked=[(1, 0)]) if use_mask else None
    with qjl_kernel.use_backend("reference"):
        ref = qjl_kernel.decode_attention(*args, mask=mask)
    return args, mask, ref


def _force_isa(monkeypatch, isa):
    monkeypatch.setenv("QJL_CPU_ISA", isa)
    try:
        active = qjl_kernel.cpu_isa()
    except RuntimeError as exc:
        pytest.skip(f"QJL_CPU_ISA={isa} cannot run here: {exc}")
    assert active == isa


@needs_cpu_kernel
@pytest.mark.parametrize("name", list(ISA_CASES))
@pytest.mark.parametrize("isa", ISAS)
def test_every_isa_matches_reference(monkeypatch, isa, name):
    _force_isa(monkeypatch, isa)
    args, mask, ref = _isa_case(name)
    assert_kernel_close(qjl_kernel.decode_attention(*args, mask=mask), ref)


@needs_cpu_kernel
def test_unknown_isa_is_refused(monkeypatch):
    monkeypatch.setenv("QJL_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="QJL_CPU_ISA must be one of scalar, avx2, avx512"):
        qjl_kernel.cpu_isa()
    with pytest.raises(RuntimeError, match="QJL_CPU_ISA"):
        qjl_kernel.decode_attention(*make_case())


@needs_cpu_kernel
def test_aten_cpu_capability_caps_the_isa(monkeypatch):
    monkeypatch.delenv("QJL_CPU_ISA", raising=False)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert qjl_kernel.cpu_isa() == "scalar"


# --- 3-4. opcheck and the fake implementation ---------------------------------------------------


def op_args(mask=False, batch=2, length=2, committed=64, residual=5, quantized=40, scaling=0.125):
    """Positional arguments of ``torch.ops.qjl.decode_attention.default`` for a small case."""
    query, keys, projection, residual_keys, values, window = make_case(
        batch=batch, length=length, dim=64, m=64, m_o=32, n_out=4, group=16, committed=committed,
        residual=residual, quantized=quantized, group_size=32, bits=2,
    )
    tokens = committed + residual
    m = padding_mask(batch, length, tokens, fully_masked=[(batch - 1, 0)]) if mask else None
    return (query, *keys, projection, residual_keys, values.codes, values.scales, values.mins, window, m, scaling,
            values.bits, values.group_size)


@needs_cpu_kernel
@pytest.mark.parametrize("mask", [False, True], ids=["causal", "mask"])
def test_opcheck(mask):
    # All four default sub-tests (schema, autograd registration, fake tensor, aot_dispatch_dynamic) apply
    # and pass: the op returns a fresh tensor, mutates nothing, and its fake impl traces dynamically.
    results = torch.library.opcheck(torch.ops.qjl.decode_attention.default, op_args(mask))
    assert set(results.values()) == {"SUCCESS"}, results


@needs_cpu_kernel
def test_direct_op_matches_reference():
    args = op_args(mask=True)
    out = torch.ops.qjl.decode_attention.default(*args)
    query, keys, projection, residual_keys = args[0], qjl_kernel.QuantizedKeys(*args[1:6]), args[6], args[7]
    values = qjl_kernel.QuantizedValues(*args[8:11], args[14], args[15])
    ref = reference.decode_attention_ref(query, keys, projection, residual_keys, values, args[11], args[12], args[13])
    assert_kernel_close(out, ref)


@pytest.mark.skipif(qjl_ops._extension_ops() is None, reason="qjl_kernel._C not loaded: no op to fake")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", [False, True], ids=["causal", "mask"])
def test_fake_shapes(mask, dtype):
    real = op_args(mask, batch=3, length=4)
    real = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in real)
    with FakeTensorMode() as mode:
        fake = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in real)
        out = torch.ops.qjl.decode_attention.default(*fake)
    query = real[0]
    assert out.shape == query.shape and out.dtype == torch.float32 and out.device == query.device


@pytest.mark.skipif(qjl_ops._extension_ops() is None, reason="qjl_kernel._C not loaded: no op to fake")
def test_fake_shapes_on_meta_tensors():
    """No data at all: the placeholders the Python face passes for "no keys" / "no values"."""
    B, H_q, H_kv, L, d, R = 2, 8, 2, 3, 96, 20

    def meta(*shape, dtype=torch.float16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    u8 = torch.uint8
    out = torch.ops.qjl.decode_attention.default(
        meta(B, H_q, L, d),
        meta(B, H_kv, 0, 1, 0, dtype=u8), meta(B, H_kv, 0, 1, 0, dtype=u8),  # bits, outlier_bits
        meta(B, H_kv, 0, 1), meta(B, H_kv, 0, 1), meta(B, H_kv, 0, 0, dtype=u8),  # norms, indices
        meta(0, d, dtype=torch.float32),  # projection
        meta(B, H_kv, R, d),  # residual keys
        meta(B, H_kv, 0, 0, dtype=torch.int32), meta(B, H_kv, 0, 0), meta(B, H_kv, 0, 0),  # codes, scales, mins
        meta(B, H_kv, R, d),  # window
        None, 0.1, 2, 1,
    )
    assert out.shape == (B, H_q, L, d) and out.dtype == torch.float32 and out.device.type == "meta"


# --- 5. bad input -------------------------------------------------------------------------------


def _python_args(**changes):
    query, keys, projection, residual_keys, values, window = make_case(batch=2, length=2)
    args = dict(query=query, keys=keys, projection=projection, residual_keys=residual_keys, values=values,
                value_window=window, mask=None)
    args.update(changes)
    return args


def _bad_python_calls():
    base = _python_args()
    q, rk, win = base["query"], base["residual_keys"], base["value_window"]
    return [
        # 96 committed + 13 residual keys against 77 quantized + 31 window values
        ("token-counts", dict(value_window=win[:, :, 1:]), ValueError,
         r"keys cover 109 tokens \(96 committed \+ 13 residual\) but values cover 108 \(77 quantized \+ 31 window\)"),
        ("mask-shape", dict(mask=torch.ones(2, 2, 108, dtype=torch.bool)), ValueError,
         r"mask must be \[B=2 or 1, L=2, T=109\], got \(2, 2, 108\)"),
        ("mask-batch", dict(mask=torch.ones(3, 2, 109, dtype=torch.bool)), ValueError, "mask must be"),
        ("mask-rank", dict(mask=torch.ones(2, 109, dtype=torch.bool)), ValueError, "mask must have rank 3"),
        ("mask-dtype", dict(mask=torch.ones(2, 2, 109)), TypeError, "mask must have dtype"),
        ("no-rows", dict(query=q[:, :, :0]), ValueError, r"query must hold at least one row \(L > 0\)"),
        ("heads", dict(query=q[:, :3]), ValueError, r"query heads \(3\) must be a multiple of KV heads \(2\)"),
        ("query-rank", dict(query=q[0]), ValueError, "query must have rank 4"),
        ("residual-dim", dict(residual_keys=rk[..., :64]), ValueError, "residual_keys must be"),
        ("window-heads", dict(value_window=win[:, :1]), ValueError, "value_window must be"),
        ("projection-rows", dict(projection=torch.randn(128, 128)), ValueError, "keys were sketched with m = 256"),
        ("values-type", dict(values=tuple(base["values"])), TypeError, "values must be a QuantizedValues"),
        ("keys-type", dict(keys=tuple(base["keys"])), TypeError, "keys must be a QuantizedKeys"),
        ("no-tokens", dict(keys=None, residual_keys=rk[:, :, :0], values=None, value_window=win[:, :, :0]),
         ValueError, "the layer holds no tokens"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_python_calls())), ids=[c[0] for c in _bad_python_calls()])
def test_python_face_rejects(index):
    _, changes, error, match = _bad_python_calls()[index]
    with pytest.raises(error, match=match):
        qjl_kernel.decode_attention(**_python_args(**changes))


def test_python_face_rejects_bad_scaling():
    with pytest.raises(TypeError, match="scaling must be a float"):
        qjl_kernel.decode_attention(**_python_args(), scaling=torch.tensor(0.1))


def _bad_op_calls():
    """(id, index of the argument to replace, a function of the good args giving the bad value, match)."""
    return [
        ("token-counts", 11, lambda a: a[11][:, :, 1:], "must cover the same tokens"),
        ("no-rows", 0, lambda a: a[0][:, :, :0], r"at least one row \(L > 0\)"),
        ("heads", 0, lambda a: a[0][:, :3], "multiple of KV heads"),
        ("mask-shape", 12, lambda a: torch.ones(2, 2, 68, dtype=torch.bool), "mask must be"),
        ("mask-dtype", 12, lambda a: torch.ones(2, 2, 69), "mask must be bool"),
        ("value-bits", 14, lambda a: 3, "value_bits must be 2 or 4"),
        ("group-size", 15, lambda a: 24, "value_group_size must be a positive divisor"),
        ("bits-dtype", 1, lambda a: a[1].to(torch.int32), "bits must have dtype"),
        ("bits-rank", 1, lambda a: a[1][0], "bits must have rank 5"),
        ("window-rank", 11, lambda a: a[11][0], "value_window must have rank 4"),
        ("codes-dtype", 8, lambda a: a[8].float(), "value_codes must have dtype"),
        ("query-dtype", 0, lambda a: a[0].double(), "query must be float16, bfloat16 or float32"),
        ("codes-shape", 8, lambda a: a[8][:, :, :, :1], "value_codes must be"),
        ("outlier-index", 5, lambda a: torch.full_like(a[5], 200), r"outlier_indices must lie in \[0, 64\)"),
        ("projection", 6, lambda a: a[6][:, :32], "projection must be"),
        ("not-dense", 1, lambda a: torch.cat([a[1], a[1]], dim=-1)[..., ::2], "dense from their group axis"),
    ]


@needs_cpu_kernel
@pytest.mark.parametrize("index", range(len(_bad_op_calls())), ids=[c[0] for c in _bad_op_calls()])
def test_op_rejects(index):
    _, position, bad, match = _bad_op_calls()[index]
    args = list(op_args())  # B = 2, L = 2, d = 64, 64 + 5 tokens
    args[position] = bad(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.qjl.decode_attention.default(*args)


@pytest.mark.skipif(qjl_ops._extension_ops() is None, reason="qjl_kernel._C not loaded: no op to fake")
@pytest.mark.parametrize("name", ["token-counts", "no-rows", "heads", "mask-shape", "value-bits"])
def test_fake_rejects(name):
    """The fake implementation refuses what the kernel refuses (so bad calls fail while tracing)."""
    _, position, bad, match = next(c for c in _bad_op_calls() if c[0] == name)
    args = list(op_args())
    args[position] = bad(args)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(RuntimeError, match=match):
            torch.ops.qjl.decode_attention.default(*fake)


# --- 6. views of larger cache buffers -----------------------------------------------------------


def _in_buffer(t, extra, garbage):
    """``t`` as a view ``buffer.narrow(2, 0, n)`` of a buffer with ``extra`` more entries along dim 2,
    those filled with ``garbage`` (a value, or a function of the shape giving a tensor)."""
    shape = list(t.shape)
    shape[2] += extra
    buf = torch.empty(shape, dtype=t.dtype)
    if callable(garbage):
        buf.copy_(garbage(shape).to(t.dtype))
    else:
        buf.fill_(garbage)
    buf.narrow(2, 0, t.shape[2]).copy_(t)
    view = buf.narrow(2, 0, t.shape[2])
    assert not view.is_contiguous() or extra == 0
    return view


def _garbage_bytes(shape):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", [False, True], ids=["causal", "mask"])
def test_views_of_cache_buffers(mask, dtype):
    """Committed keys as views along the group axis, quantized values along the token axis (the
    cache's preallocated buffers): NaN norms / scales and random bits beyond the valid tokens must
    not reach the output, which equals that of contiguous copies bit for bit."""
    query, keys, projection, residual_keys, values, window = make_case(
        batch=2, length=2, ratio=2, dtype=dtype, committed=4 * 32, residual=9, quantized=100
    )
    d = query.shape[-1]
    views = qjl_kernel.QuantizedKeys(
        _in_buffer(keys.bits, 3, _garbage_bytes),
        _in_buffer(keys.outlier_bits, 3, _garbage_bytes),
        _in_buffer(keys.inlier_norms, 3, float("nan")),
        _in_buffer(keys.outlier_norms, 3, float("nan")),
        _in_buffer(keys.outlier_indices, 3, lambda s: torch.randint(0, d, s)),  # valid channels, other ones
    )
    value_views = values._replace(
        codes=_in_buffer(values.codes, 50, -1),
        scales=_in_buffer(values.scales, 50, float("nan")),
        mins=_in_buffer(values.mins, 50, float("nan")),
    )
    residual_view = _in_buffer(residual_keys, 7, float("nan"))
    window_view = _in_buffer(window, 7, float("nan"))
    tokens = keys.num_tokens + residual_keys.shape[2]
    m = padding_mask(2, 2, tokens, fully_masked=[(1, 1)]) if mask else None

    got = qjl_kernel.decode_attention(query, views, projection, residual_view, value_views, window_view, mask=m)
    want = qjl_kernel.decode_attention(query, keys, projection, residual_keys, values, window, mask=m)
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)
    with qjl_kernel.use_backend("reference"):
        ref = qjl_kernel.decode_attention(query, keys, projection, residual_keys, values, window, mask=m)
    assert_kernel_close(got, ref, dtype)


@needs_cpu_kernel
def test_views_along_batch_and_heads():
    """Committed state selected from a buffer with more batch rows and KV heads (strided B / H_kv)."""
    query, keys, projection, residual_keys, values, window = make_case(batch=2, kv_heads=2, ratio=2, length=2)

    def spread(t):  # t as buf[1::2, ::2] of a buffer twice as large along B and H_kv, NaN / 0xFF elsewhere
        buf = torch.full((2 * t.shape[0] + 1, 2 * t.shape[1], *t.shape[2:]),
                         float("nan") if t.is_floating_point() else 255, dtype=t.dtype)
        if t.dtype == torch.uint8 and t.dim() == 4:  # outlier indices: keep them in range
            buf.fill_(0)
        buf[1::2, ::2] = t
        return buf[1::2, ::2]

    views = qjl_kernel.QuantizedKeys(*(spread(t) for t in keys))
    value_views = values._replace(codes=spread(values.codes), scales=spread(values.scales), mins=spread(values.mins))
    got = qjl_kernel.decode_attention(query, views, projection, residual_keys, value_views, window)
    want = qjl_kernel.decode_attention(query, keys, projection, residual_keys, values, window)
    assert torch.equal(got, want)


# The kernel keeps a group's outlier correction (u = S[:, O] q_O, v = S q - u) for the next group when
# that group has the same outlier channels, and otherwise forms it from the correction of the
# channels in most groups (the base set) plus the channels where the group differs, unless its own
# list is shorter; patterns of channel sets across consecutive groups.
OUTLIER_SET_PATTERNS = {
    # base {5, 9, 17, 30}: equal to it, one channel swapped (one added, one removed), two swapped,
    # all four different (own list), back to the base
    "base-and-swaps": lambda n: ([[5, 9, 17, 30], [5, 9, 17, 44], [5, 9, 40, 30], [5, 9, 17, 30], [6, 7, 8, 10],
                                  [30, 5, 9, 17]] * n)[:n],
    "all-same": lambda n: [[5, 9, 17, 30]] * n,
    "same-reordered": lambda n: [[5, 9, 17, 30], [30, 17, 9, 5]] * (n // 2),
    "alternating": lambda n: [[5, 9, 17, 30], [5, 9, 17, 31]] * (n // 2),
    "runs": lambda n: [[1, 2, 3, 4]] * (n // 2) + [[1, 2, 3, 60]] * (n - n // 2),
    "repeated-channel": lambda n: [[5, 5, 17, 30], [5, 17, 17, 30]] * (n // 2),
}


@needs_cpu_kernel
@pytest.mark.parametrize("q_heads", [6, 20])  # 3 and 10 query rows per KV head (rows formed 4 at a time)
@pytest.mark.parametrize("pattern", sorted(OUTLIER_SET_PATTERNS))
def test_outlier_correction_reuse_across_groups(pattern, q_heads):
    """Consecutive groups with equal (or nearly equal) outlier channel sets: the kernel's reuse of
    the correction must be exact where the sets are equal and never applied where they differ
    (including sets with a repeated channel, which count it twice)."""
    gen = torch.Generator().manual_seed(3)
    groups, group, dim, m, m_o = 12, 16, 64, 128, 64
    grouped = torch.randn(1, 2, groups, group, dim, generator=gen)
    indices = torch.tensor(OUTLIER_SET_PATTERNS[pattern](groups), dtype=torch.uint8)
    indices = indices.expand(1, 2, groups, 4).contiguous()
    projection = QJLSketch(dim, m, seed=3).projection
    if pattern == "repeated-channel":
        # quantize_keys refuses repeated channels; the decode op reads whatever state it is given
        # and must still agree with the reference on such a set.
        keys = qjl_kernel.quantize_keys(grouped, torch.zeros_like(indices) + torch.arange(4, dtype=torch.uint8),
                                        projection, m_o)._replace(outlier_indices=indices)  # fmt: skip
    else:
        keys = qjl_kernel.quantize_keys(grouped, indices, projection, m_o)
    query = torch.randn(1, q_heads, 1, dim, generator=gen)
    residual = torch.randn(1, 2, 5, dim, generator=gen)
    window = torch.randn(1, 2, groups * group + 5, dim, generator=gen)
    args = (query, keys, projection, residual, None, window)
    out, ref = run_both(args)
    assert_kernel_close(out, ref)
