"""The Triton kernel of the fused op ``decode_attention`` (qjl_kernel/triton_decode.py) against its spec
``reference.decode_attention_ref``.

CPU tier (CI): the kernel runs under Triton's interpreter on CPU tensors. As in test_triton_ops.py
(whose docstring says why), the interpreted cases run in ONE child process started with
``TRITON_INTERPRET=1``: this file run as a script with the selected case keys
(``python tests/qjl_kernel/test_triton_decode.py OUT.json KEY...``) reports each case (None or the
traceback) as JSON; when pytest itself runs with ``TRITON_INTERPRET=1`` the cases run in-process.
The dispatch of ``qjl_kernel.ops`` to the fused kernels is tested here without Triton.

GPU tier (``pytest -m cuda``): the compiled kernel at the benchmark shapes (Llama-3-8B: 32 query / 8 KV
heads, d = 128, m = m_o = 256, 8 outliers per 32-token group, 2-bit values in groups of 32, buffer 128,
bfloat16; 8k and 64k tokens), d = 96 and GQA 8, several dtypes, and replay in a CUDA graph.

Oracle and tolerances: ``max|out - ref| <= RTOL[...] * max|ref| + ATOL``. The kernel multiplies
exact bfloat16 terms of its float32 operands (their products are exact), so interpreted it differs
from the reference by float32 summation order only, whatever the input dtype (inputs are read as
float32 exactly as the reference's ``.float()``): RTOL_INTERPRETED, as the C++ CPU kernel's test
(measured: at most 1.2e-6). Compiled, ``S q``, ``S[:, O] q_O`` and exact keys run as Triton's
``bf16x6`` dots (relative error ~2^-22 per product) and ``exp`` as ``ex2.approx``: RTOL_COMPILED.
``sketch_terms=2`` (hi/lo ``S q``, error <= 2^-16 |S q| per coordinate; measured 3.4e-6) gets
RTOL_TWO_TERMS.
"""

from __future__ import annotations

import sys

import torch

import qjl_kernel
from qjl_kernel import QuantizedKeys, reference, triton_decode, triton_ops
from qjl_kernel import ops as qjl_ops
from interpreted_cases import case_error, child_main, child_results, triton_mark
from op_oracles import generator, narrowed


RTOL_INTERPRETED = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
RTOL_COMPILED = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
RTOL_TWO_TERMS = 5e-5  # any dtype: the hi/lo split (2^-16 per coordinate; measured 3e-6 interpreted)
ATOL = 1e-6  # the outputs are averages of N(0, 1) values; this floor only matters below max|ref| ~ 0.1

BASE = dict(batch=1, kv_heads=2, ratio=4, length=1, dim=128, m=256, m_o=128, n_out=8, group=32, committed=64,
            residual=13, quantized=50, bits=2, group_size=32, dtype=torch.float32, seed=0)

# Interpreted cases: name -> changes to BASE (plus: mask "padding" / "broadcast", tokens_per_split,
# sketch_terms, views, outlier_pattern). Small on purpose: the interpreter runs numpy per op.
CASES_SPEC = {
    # the paper configuration (m = m_o = 256, 8 outliers, 2-bit values in groups of 32), bfloat16
    "paper-d128-gqa4-bf16": dict(m_o=256, dtype=torch.bfloat16),
    "mha-d64-m64-mo0-4bit": dict(ratio=1, dim=64, m=64, m_o=0, n_out=0, bits=4, group_size=16),
    "gqa8-d96-m128-fp16": dict(ratio=8, dim=96, m=128, m_o=64, n_out=4, dtype=torch.float16),
    # groups of 20 tokens (not a multiple of the token block), 4-bit values
    "group20-d64-m136-4bit": dict(dim=64, m=136, m_o=64, n_out=4, group=20, committed=60, residual=7,
                                   quantized=41, bits=4, group_size=32),
    # groups longer than a token block (40 -> two blocks of 32), m = 512
    "group80-d64-m512": dict(ratio=2, dim=64, m=512, m_o=128, n_out=8, group=80, committed=80, residual=5,
                             quantized=70),
    "L3-causal-gqa4": dict(length=3, dim=64, m=64, m_o=64, n_out=4, seed=3),
    "batch2-padding-mask-L3": dict(batch=2, length=3, ratio=2, dim=64, m=128, m_o=64, n_out=4, mask="padding"),
    "batch3-broadcast-mask": dict(batch=3, length=2, ratio=2, dim=64, m=64, m_o=32, n_out=4, mask="broadcast"),
    "no-keys": dict(committed=0, residual=45, quantized=30, dim=64, m=64, m_o=32),
    "no-residual": dict(committed=96, residual=0, quantized=50, dim=64, m=64, m_o=32),
    "no-values": dict(quantized=0, dim=64, m=64, m_o=32, length=2),
    "no-window": dict(quantized=77, dim=64, m=64, m_o=32),
    "exact-only": dict(committed=0, residual=40, quantized=0, dim=64, m=64, m_o=32),
    "values-2bit-groups-of-8": dict(dim=64, m=64, m_o=32, n_out=4, quantized=70, group_size=8),
    # 36 rows per KV head: three tiles of query rows
    "rows36-three-row-tiles": dict(kv_heads=1, ratio=4, length=9, dim=64, m=64, m_o=32, n_out=4),
    # several token splits merged by log-sum-exp; batch 1's first 70 tokens masked (whole splits)
    "splits-merge-padding": dict(batch=2, dim=64, m=64, m_o=32, n_out=4, committed=160, residual=21,
                                 quantized=150, mask="padding", tokens_per_split=32),
    "splits-merge-causal-L2": dict(length=2, dim=64, m=64, m_o=32, n_out=4, committed=96, residual=30,
                                   quantized=100, tokens_per_split=48, group=16),
    "sketch-terms-2": dict(dim=64, m=128, m_o=64, n_out=4, sketch_terms=2),
    # committed state and values as views of larger cache buffers (garbage beyond), as the cache passes them
    "cache-buffer-views": dict(dim=64, m=64, m_o=32, n_out=4, views=True, dtype=torch.bfloat16),
    # consecutive groups with the same outlier channels in another order, and a repeated channel:
    # the kernel reuses u / v for an equal channel set
    "outlier-sets-reordered": dict(dim=64, m=64, m_o=32, n_out=4, committed=128, outlier_pattern="reordered"),
    "outlier-sets-repeated": dict(dim=64, m=64, m_o=32, n_out=4, committed=128, outlier_pattern="repeated"),
}


# ---------------------------------------------------------------------------------------------
# Cases: the op's arguments as the cache passes them.
# ---------------------------------------------------------------------------------------------


def _outliers(grouped, n_out, pattern):
    """uint8 ``[B, H, N, n_out]``: each group's top-norm channels, or a fixed pattern of channel sets."""
    batch, heads, groups = grouped.shape[:3]
    if pattern is None:
        return grouped.float().norm(dim=-2).topk(n_out, dim=-1).indices.to(torch.uint8)
    sets = {"reordered": [[5, 9, 17, 30], [30, 17, 9, 5], [9, 5, 30, 17], [5, 9, 17, 31]],
            "repeated": [[5, 5, 17, 30], [5, 17, 17, 30], [5, 17, 17, 30], [5, 17, 30, 5]]}[pattern]
    rows = [sets[i % len(sets)][:n_out] for i in range(groups)]
    return torch.tensor(rows, dtype=torch.uint8).expand(batch, heads, groups, n_out).contiguous()


def _padding_mask(batch, length, tokens, gen, device, broadcast=False):
    """bool ``[B or 1, L, T]``: causal, ~10% holes; batch 1 (when there) loses its first 70 tokens and
    the last batch row 0 sees nothing (a fully masked row: uniform softmax)."""
    rows = 1 if broadcast else batch
    mask = reference.causal_mask(length, tokens, device).expand(rows, length, tokens).clone()
    mask &= torch.rand(rows, length, tokens, generator=gen, device=device) > 0.1
    mask[..., -1] = True
    if rows > 1:
        mask[1, :, :70] = False
        mask[rows - 1, 0] = False
    return mask


def decode_case(spec, device="cpu"):
    """``(args, mask, options)``: ``args = (query, keys, projection, residual_keys, values, window)``."""
    c = dict(BASE, **spec)
    gen = generator(c["seed"], device)
    batch, kv_heads, dim, dtype = c["batch"], c["kv_heads"], c["dim"], c["dtype"]
    committed, residual, quantized, group = c["committed"], c["residual"], c["quantized"], c["group"]
    tokens = committed + residual
    grouped = torch.randn(batch, kv_heads, committed // group, group, dim, generator=gen, device=device)
    grouped[..., :3] *= 8  # planted outlier channels
    projection = torch.randn(c["m"], dim, generator=gen, device=device)
    keys = None
    if committed:
        indices = _outliers(grouped, c["n_out"], c.get("outlier_pattern"))
        keys = reference.quantize_keys_ref(grouped.to(dtype), indices, projection, c["m_o"])
        keys = keys._replace(outlier_indices=indices)  # the repeated pattern keeps its repeats
    residual_keys = torch.randn(batch, kv_heads, residual, dim, generator=gen, device=device)
    residual_keys[..., :3] *= 8
    all_values = torch.randn(batch, kv_heads, tokens, dim, generator=gen, device=device).to(dtype)
    values = None
    if quantized:
        values = reference.quantize_values_ref(all_values[:, :, :quantized], c["group_size"], c["bits"])
    query = torch.randn(batch, kv_heads * c["ratio"], c["length"], dim, generator=gen, device=device).to(dtype)
    window = all_values[:, :, quantized:]
    if c.get("views"):
        keys = QuantizedKeys(*(narrowed(t, 3) for t in keys))
        values = values._replace(codes=narrowed(values.codes, 50), scales=narrowed(values.scales, 50),
                                 mins=narrowed(values.mins, 50))
        window = narrowed(window, 7)
    mask = None
    if c.get("mask"):
        mask = _padding_mask(batch, c["length"], tokens, gen, device, broadcast=c["mask"] == "broadcast")
    options = {k: c[k] for k in ("tokens_per_split", "sketch_terms") if k in c}
    return (query, keys, projection, residual_keys.to(dtype), values, window), mask, options


def op_args(args, mask, scaling):
    """The op's positional arguments (``torch.ops.qjl.decode_attention``) for ``args``."""
    query, keys, projection, residual_keys, values, window = args
    if keys is None:
        keys = qjl_ops._empty_keys(query, residual_keys.shape[1])
        projection = torch.empty(0, query.shape[-1], device=query.device)
    if values is None:
        value_parts, bits, group_size = qjl_ops._empty_values(window), 2, 1
    else:
        value_parts, bits, group_size = (values.codes, values.scales, values.mins), values.bits, values.group_size
    return (query, *keys, projection, residual_keys, *value_parts, window, mask, scaling, bits, group_size)


def assert_decode_close(out, ref, rtol):
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = (out - ref).abs().max().item()
    bound = rtol * ref.abs().max().item() + ATOL
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g} (max|ref| {ref.abs().max().item():.3g})"


def check_decode(spec, device="cpu"):
    """Kernel == reference for the case ``spec`` (changes to BASE)."""
    args, mask, options = decode_case(spec, device)
    dtype = args[0].dtype
    scaling = args[0].shape[-1] ** -0.5
    want = reference.decode_attention_ref(*args, mask, scaling)
    if options:  # the kernel itself, with forced splits / terms
        got = triton_decode.decode_attention(*op_args(args, mask, scaling), **options)
    else:  # through the public op with the Triton backend forced: the fused kernel must run
        saved = reference.decode_attention_ref
        reference.decode_attention_ref = _refuse
        try:
            with qjl_kernel.use_backend("triton"):
                got = qjl_kernel.decode_attention(*args, mask=mask)
        finally:
            reference.decode_attention_ref = saved
    if options.get("sketch_terms") == 2:
        rtol = RTOL_TWO_TERMS
    else:
        rtol = (RTOL_INTERPRETED if triton_ops.interpreted() else RTOL_COMPILED)[dtype]
    assert_decode_close(got, want, rtol)
    if mask is not None and mask.shape[0] > 1 and not mask[-1, 0].any():  # the fully masked row: uniform
        values = reference.dequantize_values_ref(args[4]) if args[4] is not None else args[5][:, :, :0].float()
        dense = torch.cat([values, args[5].float()], dim=2)[-1]  # [H_kv, T, d]
        ratio = args[0].shape[1] // dense.shape[0]
        uniform = dense.mean(dim=1).repeat_interleave(ratio, dim=0)
        torch.testing.assert_close(got[-1, :, 0], uniform, rtol=1e-5, atol=1e-5)


def _refuse(*args, **kwargs):
    raise AssertionError("decode_attention ran the composed reference path, not the fused Triton kernel")


CASES = {name: (check_decode, (spec,)) for name, spec in CASES_SPEC.items()}


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
def test_interpreted_triton_decode_matches_reference(key, interpreted_results):
    error = case_error(CASES, key, interpreted_results)
    assert error is None, error


# ---------------------------------------------------------------------------------------------
# Dispatch of qjl_kernel.ops (no Triton needed): which fused kernel decode_attention_unchecked calls.
# ---------------------------------------------------------------------------------------------


def _small_args(committed=32, quantized=20):
    spec = dict(dim=64, m=64, m_o=32, n_out=4, committed=committed, residual=9, quantized=quantized)
    args, _, _ = decode_case(spec)
    return args


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)
        query = args[0]
        return torch.zeros(query.shape, dtype=torch.float32)


@pytest.mark.parametrize("committed,quantized", [(32, 20), (0, 0)], ids=["all-parts", "empty-parts"])
def test_triton_backend_calls_the_fused_triton_kernel(monkeypatch, committed, quantized):
    args = _small_args(committed, quantized)
    recorder = _Recorder()
    monkeypatch.setattr(qjl_ops.triton_decode, "decode_attention", recorder)
    monkeypatch.setattr(qjl_ops, "backend_for", lambda *tensors: "triton")
    monkeypatch.setattr(qjl_ops, "_process_backend", "triton")
    qjl_ops.decode_attention_unchecked(*args, None, 0.125)
    (call,) = recorder.calls
    assert len(call) == 16 and call[12] is None and call[13] == 0.125
    query, residual_keys, window = args[0], args[3], args[5]
    assert call[0] is query and call[7] is residual_keys and call[11] is window
    if committed == 0:  # the "no keys" / "no values" placeholders of the op's schema
        assert call[1].shape[2] == 0 and call[6].shape == (0, query.shape[-1])
        assert call[8].shape[2] == 0 and call[14:] == (2, 1)
    else:
        assert call[1] is args[1].bits and call[6] is args[2] and call[14:] == (2, 32)


def test_cuda_backend_calls_the_fused_cuda_kernel_when_built(monkeypatch):
    args = _small_args()
    recorder = _Recorder()
    fake_ops = type("FakeOps", (), {"decode_attention": type("Op", (), {"default": staticmethod(recorder)})})
    monkeypatch.setattr(qjl_ops, "_OPS", fake_ops)
    monkeypatch.setattr(qjl_ops, "backend_for", lambda *tensors: "cuda")
    monkeypatch.setattr(qjl_ops, "_process_backend", "cuda")
    monkeypatch.setattr(qjl_ops, "_HAS_CUDA_DECODE", True)
    qjl_ops.decode_attention_unchecked(*args, None, 0.125)
    assert len(recorder.calls) == 1
    # without the fused CUDA kernel: the composed path (key_scores + softmax + value_matmul)
    monkeypatch.setattr(qjl_ops, "_HAS_CUDA_DECODE", False)
    composed = []
    monkeypatch.setattr(reference, "decode_attention_ref", lambda *a, **k: composed.append(k) or "composed")
    assert qjl_ops.decode_attention_unchecked(*args, None, 0.125) == "composed"
    assert composed[0]["key_scores_fn"] is qjl_ops.key_scores and len(recorder.calls) == 1


# ---------------------------------------------------------------------------------------------
# GPU tier: the compiled kernel.
# ---------------------------------------------------------------------------------------------


def gpu_tier(test):
    """Marks of the GPU tier: the compiled Triton kernel on a CUDA GPU."""
    for mark in (
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        needs_triton,
        pytest.mark.skipif(triton_ops.interpreted(), reason="this process runs Triton's interpreter"),
    ):
        test = mark(test)
    return test


# Llama-3-8B shapes, paper configuration: (name, spec); `tokens` = committed + residual.
def _llama3(tokens, **changes):
    buffer = 128
    committed = (tokens - tokens % buffer) - buffer  # the newest block still in the residual, as the cache keeps it
    spec = dict(kv_heads=8, ratio=4, dim=128, m=256, m_o=256, n_out=8, group=32, committed=committed,
                residual=tokens - committed, quantized=committed, bits=2, group_size=32, dtype=torch.bfloat16)
    spec.update(changes)
    return spec


GPU_CASES = {
    "llama3-8k-bf16": _llama3(8192),
    "llama3-64k-bf16": _llama3(65536),
    "llama3-8k-L4-mask": dict(_llama3(8192), batch=2, length=4, mask="padding"),
    "llama3-4k-fp16": _llama3(4096, dtype=torch.float16),
    "llama3-4k-fp32": _llama3(4096, dtype=torch.float32),
    "llama3-4k-mha": _llama3(4096, ratio=1, kv_heads=32),
    "d96-gqa8": _llama3(4096, dim=96, kv_heads=4, ratio=8),
    "d80-4bit-g16": _llama3(2048, dim=80, bits=4, group_size=16, m=128, m_o=64, n_out=4),
    "d256-m512": _llama3(2048, dim=256, kv_heads=2, m=512, m_o=128, n_out=16, group_size=64),
    "runtime-no-outliers": _llama3(8192, m_o=0, n_out=0),
    "sketch-terms-2": dict(_llama3(8192), sketch_terms=2),
}


@gpu_tier
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_triton_decode_matches_reference(name):
    check_decode(GPU_CASES[name], "cuda")


@gpu_tier
def test_gpu_triton_decode_in_a_cuda_graph():
    """No host synchronization and no data-dependent host branch: the step can be captured once and
    replayed after the state changes in place, and the replay equals an eager call."""
    args, _, _ = decode_case(_llama3(4096), "cuda")
    query = args[0]
    with qjl_kernel.use_backend("triton"):
        qjl_kernel.decode_attention(*args)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = qjl_kernel.decode_attention(*args)
        query.copy_(torch.randn_like(query))
        args[5].copy_(torch.randn_like(args[5]))  # the window
        graph.replay()
        torch.cuda.synchronize()
        eager = qjl_kernel.decode_attention(*args)
    assert torch.equal(out, eager)


@gpu_tier
def test_gpu_triton_decode_launches_at_most_two_kernels():
    args, _, _ = decode_case(_llama3(8192), "cuda")
    with qjl_kernel.use_backend("triton"):
        qjl_kernel.decode_attention(*args)  # compile and cache S^T first
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            qjl_kernel.decode_attention(*args)
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert 1 <= len(kernels) <= 2, [e.name for e in kernels]

