"""Triton kernels for the four QJL ops: same signatures and semantics as ``torch.ops.qjl.*`` (the
CUDA extension) and the references in :mod:`qjl_kernel.reference` (the spec).

Callers go through :mod:`qjl_kernel.ops`, which checks arguments and picks the backend; the functions
here take already-validated tensors laid out as the CUDA ops take them (``quantize_*`` inputs dense,
stored state dense in its inner dims, dims 0..2 strided: ``buffer.narrow(2, 0, n)`` views cost no copy).

Interpreter vs compiled: Triton decides when it is imported whether ``@triton.jit`` functions (its
own ``tl.sum``/``tl.max`` included) are compiled or run by its interpreter (``TRITON_INTERPRET=1``),
so one process is in one mode. Compiled, the kernels run on GPU tensors; interpreted, they run on CPU
tensors (and on GPU tensors through host copies), which is how CI tests them.

Kernel design (numerics in ``qjl_kernel/TRITON.md``):

- quantize_keys: program per (group, 32-token tile, tile of sketch rows); outlier channels (repeats
  collapsed) read from the indices; ``k_in S^T`` by ``tl.dot`` in IEEE float32 over chunks of 16
  channels (the whole head dimension at once spilled), ``k_out S^T`` from the gathered outlier
  channels alone; signs packed eight to a byte with a reshape + shifted sum. Norms with ``sqrt_rn``,
  rounded to nearest even.
- key_scores: ``S q`` by a small kernel of float32 multiply-adds (a torch matmul may run in TF32),
  reading the query and ``S`` through their strides (no copies); then a program per (key group tile,
  tile of query rows of one KV head, batch x KV head) subtracts ``S[:, O] q_O`` per sketch chunk and
  multiplies by +-1 signs decoded from the bytes in registers.
- quantize_values: program per tile of rows; per-group min/max, IEEE division (``div_rn``), scale
  rounded to the storage dtype first, round-half-to-even codes, words packed with a reshape + sum.
- value_matmul: program per (token split, query-row tile, batch x KV head); codes dequantized in
  registers (``code * scale + min`` without FMA contraction, as the reference rounds), token splits
  reduced with one deterministic ``torch.sum``.
"""

from __future__ import annotations

import math
import types

import torch

try:
    import triton
    import triton.language as tl
except Exception as exc:  # not installed, or a broken install: the other backends still run
    triton = None
    tl = types.SimpleNamespace(constexpr=None)  # lets the kernel signatures below be defined
    TRITON_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    TRITON_ERROR = None

TRITON_VERSION: str | None = getattr(triton, "__version__", None)


def interpreted() -> bool:
    """Whether Triton runs in interpreter mode in this process (``TRITON_INTERPRET=1`` at import)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` in this process, or None when they can."""
    if triton is None:
        return f"triton is not importable ({TRITON_ERROR})"
    if device.type == "cuda" or interpreted():
        return None
    return (
        f"tensors on {device} need Triton's interpreter: set TRITON_INTERPRET=1 before triton is imported "
        "(slow; meant for tests), or move them to a GPU"
    )


# Float kinds for stores rounded like torch's .to(dtype) (round to nearest even).
_FP32, _FP16, _BF16 = 0, 1, 2
_KINDS = {torch.float32: _FP32, torch.float16: _FP16, torch.bfloat16: _BF16}
# Elements of the largest 3-D broadcast temporary per program: registers when compiled, numpy
# arrays when interpreted (bigger tiles mean fewer interpreted Python steps).
_BUDGET_COMPILED = 8192
_BUDGET_INTERPRETED = 1 << 16
_MIN_TOKENS_PER_SPLIT = 256  # value_matmul: fewest tokens a program reduces (as the CUDA kernel)


def _pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << max(0, int(n) - 1).bit_length())


# Tests set this to run the interpreter with the compiled tile sizes (chunked loops included).
TILES_AS_COMPILED = False


def _big_tiles() -> bool:
    """Tiles sized for the interpreter (numpy arrays: fewer, bigger steps) rather than for registers."""
    return interpreted() and not TILES_AS_COMPILED


def _budget() -> int:
    return _BUDGET_INTERPRETED if _big_tiles() else _BUDGET_COMPILED


def _float32(projection: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The projection as float32 on ``device``: itself when it already is (the kernels read it through
    its strides, so no layout copy either)."""
    return projection.to(device=device, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Kernels. No kernel calls another of ours: each is self-contained.
# ----------------------------------------------------------------------------------------------


def _quantize_keys_kernel(
    keys_ptr, idx_ptr, s_ptr, s_s0, s_s1, bits_ptr, obits_ptr, nin_ptr, nout_ptr,
    G, d, m, m_o, n_out,
    NORM_KIND: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    # keys [groups * G, d] dense; idx uint8 [groups, n_out]; S [m, d] float32 read through its strides;
    # bits [groups * G, m / 8], obits [groups * G, m_o / 8]; norms [groups * G] in the keys' dtype.
    pid = tl.program_id(0)
    pid_m = tl.program_id(1)
    tiles = (G + BLOCK_T - 1) // BLOCK_T
    group = (pid // tiles).to(tl.int64)
    offs_t = (pid % tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < G
    rows = group * G + offs_t  # [BT] global token rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # sketch rows of this program
    m_ok = offs_m < m

    # Outlier channels of this group; a channel named twice counts once (the reference's scatter
    # mask), so later repeats become -1 like the padding.
    offs_o = tl.arange(0, BLOCK_O)
    idx = tl.load(idx_ptr + group * n_out + offs_o, mask=offs_o < n_out, other=0).to(tl.int32)
    idx = tl.where(offs_o < n_out, idx, -1)
    earlier = (idx[:, None] == idx[None, :]) & (offs_o[None, :] < offs_o[:, None])
    idx = tl.where(tl.sum(earlier.to(tl.int32), axis=1) == 0, idx, -1)
    o_ok = idx >= 0

    # Inlier sketch k_in S^T, a chunk of BLOCK_K channels at a time: the FMA dot holds a chunk of its
    # operands per thread, not the whole head dimension (which spilled).
    sketch = tl.zeros([BLOCK_T, BLOCK_M], dtype=tl.float32)
    sq_in = tl.zeros([BLOCK_T], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < d
        k = tl.load(keys_ptr + rows[:, None] * d + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        is_out = tl.max((idx[:, None] == offs_k[None, :]).to(tl.int32), axis=0) > 0  # [BK]
        k_in = tl.where(is_out[None, :], 0.0, k.to(tl.float32))
        sq_in += tl.sum(k_in * k_in, axis=1)
        s_t = tl.load(s_ptr + offs_m[None, :] * s_s0 + offs_k[:, None] * s_s1, mask=k_ok[:, None] & m_ok[None, :],
                      other=0.0)  # S^T chunk [BK, BM]
        sketch = tl.dot(k_in, s_t, sketch, input_precision="ieee")
    # Outlier part from the outlier channels alone: k_out [BT, BO] gathered, S[:, O]^T [BO, BM].
    k_out = tl.load(keys_ptr + rows[:, None] * d + idx[None, :], mask=t_ok[:, None] & o_ok[None, :], other=0.0)
    k_out = k_out.to(tl.float32)

    if pid_m == 0:
        norm_in = tl.sqrt_rn(sq_in)
        norm_out = tl.sqrt_rn(tl.sum(k_out * k_out, axis=1))
        if NORM_KIND == 2:  # bfloat16, round to nearest even by hand (the interpreter truncates)
            b_in = norm_in.to(tl.uint32, bitcast=True)
            b_in = (b_in + 0x7FFF + ((b_in >> 16) & 1)) >> 16
            b_out = norm_out.to(tl.uint32, bitcast=True)
            b_out = (b_out + 0x7FFF + ((b_out >> 16) & 1)) >> 16
            tl.store(nin_ptr + rows, b_in.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=t_ok)
            tl.store(nout_ptr + rows, b_out.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=t_ok)
        else:
            tl.store(nin_ptr + rows, norm_in.to(nin_ptr.dtype.element_ty), mask=t_ok)
            tl.store(nout_ptr + rows, norm_out.to(nout_ptr.dtype.element_ty), mask=t_ok)

    shifts = (offs_m % 8)[None, :]
    offs_b = pid_m * (BLOCK_M // 8) + tl.arange(0, BLOCK_M // 8)
    byte = tl.sum(tl.reshape((sketch > 0).to(tl.int32) << shifts, [BLOCK_T, BLOCK_M // 8, 8]), axis=2)
    row_bytes = m // 8
    tl.store(bits_ptr + rows[:, None] * row_bytes + offs_b[None, :], byte.to(tl.uint8),
             mask=t_ok[:, None] & (offs_b < row_bytes)[None, :])

    if pid_m * BLOCK_M < m_o:  # the outlier sketch uses the first m_o rows of S
        s_o = tl.load(s_ptr + offs_m[None, :] * s_s0 + idx[:, None] * s_s1,
                      mask=o_ok[:, None] & (offs_m < m_o)[None, :], other=0.0)  # S[:m_o, O]^T [BO, BM]
        sketch = tl.dot(k_out, s_o, input_precision="ieee")
        byte = tl.sum(tl.reshape((sketch > 0).to(tl.int32) << shifts, [BLOCK_T, BLOCK_M // 8, 8]), axis=2)
        out_bytes = m_o // 8
        tl.store(obits_ptr + rows[:, None] * out_bytes + offs_b[None, :], byte.to(tl.uint8),
                 mask=t_ok[:, None] & (offs_b < out_bytes)[None, :])


def _project_queries_kernel(
    q_ptr, q_s0, q_s1, q_s2, q_s3, s_ptr, s_s0, s_s1, out_ptr,
    H_q, L, rows, d, m,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # out [rows, m] float32 = q [B, H_q, L, d] (any strides, rows in (b, head, l) order) x S^T, S [m, d]
    # through its strides; float32 multiply-adds (never TF32, whatever torch's matmul flags say).
    pid_r = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < rows
    q_row = (offs_r // (H_q * L)) * q_s0 + ((offs_r // L) % H_q) * q_s1 + (offs_r % L) * q_s2  # [BR]
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < m
    acc = tl.zeros([BLOCK_R, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < d
        q = tl.load(q_ptr + q_row[:, None] + offs_k[None, :] * q_s3, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        s_t = tl.load(s_ptr + offs_m[None, :] * s_s0 + offs_k[:, None] * s_s1, mask=k_ok[:, None] & m_ok[None, :],
                      other=0.0)  # [BK, BM]
        acc += tl.sum(q.to(tl.float32)[:, :, None] * s_t[None, :, :], axis=1)
    tl.store(out_ptr + offs_r[:, None] * m + offs_m[None, :], acc, mask=r_ok[:, None] & m_ok[None, :])


def _key_scores_kernel(
    qs_ptr, q_ptr, q_s0, q_s1, q_s2, q_s3, s_ptr, s_s0, s_s1,
    bits_ptr, b_s0, b_s1, b_s2,
    obits_ptr, ob_s0, ob_s1, ob_s2,
    nin_ptr, ni_s0, ni_s1, ni_s2,
    nout_ptr, no_s0, no_s1, no_s2,
    idx_ptr, ix_s0, ix_s1, ix_s2,
    out_ptr,
    H_kv, ratio, L, R, G, T, m, m_o, n_out, scale_in, scale_out,
    WITH_OUTLIERS: tl.constexpr, ADD_OUTLIER_SKETCH: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # qs = S q [B * H_q * L, m] float32 dense (rows of KV head (b, h) are bh * R .. bh * R + R - 1);
    # q [B, H_q, L, d] and S [m, d] through their strides; state [B, H_kv, N, G, ...] read through the
    # strides of dims 0..2; out [B * H_q * L, T] float32.
    pid0 = tl.program_id(0)
    pid_r = tl.program_id(1)
    bh = tl.program_id(2)
    tiles = (G + BLOCK_T - 1) // BLOCK_T
    n = (pid0 // tiles).to(tl.int64)
    offs_t = (pid0 % tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < G
    b = (bh // H_kv).to(tl.int64)
    h = (bh % H_kv).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    qrow = bh.to(tl.int64) * R + offs_r  # [BR]
    q_row = b * q_s0 + (h * ratio + offs_r // L) * q_s1 + (offs_r % L).to(tl.int64) * q_s2  # [BR]

    bits_base = bits_ptr + b * b_s0 + h * b_s1 + n * b_s2
    obits_base = obits_ptr + b * ob_s0 + h * ob_s1 + n * ob_s2
    idx_base = idx_ptr + b * ix_s0 + h * ix_s1 + n * ix_s2

    acc_in = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    acc_out = tl.zeros([BLOCK_R, BLOCK_T], dtype=tl.float32)
    for i0 in range(0, m, BLOCK_M):
        offs_m = i0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m
        u = tl.load(qs_ptr + qrow[:, None] * m + offs_m[None, :], mask=r_ok[:, None] & m_ok[None, :], other=0.0)
        c = tl.zeros([BLOCK_R, BLOCK_M], dtype=tl.float32)  # S[:, O] q_O for this chunk
        if WITH_OUTLIERS:
            for o in range(0, n_out):
                j = tl.load(idx_base + o).to(tl.int64)
                q_o = tl.load(q_ptr + q_row + j * q_s3, mask=r_ok, other=0.0).to(tl.float32)  # [BR]
                s_col = tl.load(s_ptr + offs_m * s_s0 + j * s_s1, mask=m_ok, other=0.0)  # [BM]
                c += q_o[:, None] * s_col[None, :]
            u = u - c
        byte = tl.load(bits_base + offs_t[:, None] * (m // 8) + (offs_m // 8)[None, :],
                       mask=t_ok[:, None] & m_ok[None, :], other=0).to(tl.int32)
        sign = tl.where(((byte >> (offs_m % 8)[None, :]) & 1) == 1, 1.0, -1.0)
        sign = tl.where(t_ok[:, None] & m_ok[None, :], sign, 0.0)  # [BT, BM]
        acc_in += tl.sum(u[:, None, :] * sign[None, :, :], axis=2)
        if ADD_OUTLIER_SKETCH:
            mo_ok = offs_m < m_o
            obyte = tl.load(obits_base + offs_t[:, None] * (m_o // 8) + (offs_m // 8)[None, :],
                            mask=t_ok[:, None] & mo_ok[None, :], other=0).to(tl.int32)
            osign = tl.where(((obyte >> (offs_m % 8)[None, :]) & 1) == 1, 1.0, -1.0)
            osign = tl.where(t_ok[:, None] & mo_ok[None, :], osign, 0.0)
            acc_out += tl.sum(c[:, None, :] * osign[None, :, :], axis=2)

    norm_in = tl.load(nin_ptr + b * ni_s0 + h * ni_s1 + n * ni_s2 + offs_t, mask=t_ok, other=0.0).to(tl.float32)
    result = scale_in * norm_in[None, :] * acc_in
    if ADD_OUTLIER_SKETCH:
        norm_out = tl.load(nout_ptr + b * no_s0 + h * no_s1 + n * no_s2 + offs_t, mask=t_ok, other=0.0)
        result += scale_out * norm_out.to(tl.float32)[None, :] * acc_out
    cols = n * G + offs_t
    tl.store(out_ptr + qrow[:, None] * T + cols[None, :], result, mask=r_ok[:, None] & t_ok[None, :])


def _quantize_values_kernel(
    v_ptr, codes_ptr, scales_ptr, mins_ptr, rows, d,
    GROUP_SIZE: tl.constexpr, GROUPS: tl.constexpr, BITS: tl.constexpr, KIND: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # values [rows, d] dense -> codes int32 [rows, d * BITS / 32], scales / mins [rows, GROUPS].
    PER_WORD: tl.constexpr = 32 // BITS
    LEVELS: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0)
    offs_r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = offs_r < rows
    d_ok = offs_d < d
    ok = r_ok[:, None] & d_ok[None, :]
    v = tl.load(v_ptr + offs_r[:, None] * d + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    group_of = offs_d // GROUP_SIZE

    mn_ch = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)  # each channel's group min / scale, as stored
    sc_ch = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for g in tl.static_range(GROUPS):
        sel = (group_of == g) & d_ok
        lo = tl.min(tl.where(sel[None, :], v, float("inf")), axis=1)
        hi = tl.max(tl.where(sel[None, :], v, float("-inf")), axis=1)
        # A group with a NaN gets NaN min and scale, as the reference's amin / amax (tl.min skips NaN).
        has_nan = tl.max(tl.where(sel[None, :] & (v != v), 1, 0), axis=1) > 0
        lo = tl.where(has_nan, float("nan"), lo)
        hi = tl.where(has_nan, float("nan"), hi)
        # min is one of the values: exact in the storage dtype. scale = (max - min) / levels in IEEE
        # float32, then rounded to the storage dtype before the codes are computed.
        sc = tl.math.div_rn(hi - lo, LEVELS * 1.0)
        if KIND == 2:  # bfloat16: round to nearest even by hand (the interpreter truncates)
            sb = sc.to(tl.uint32, bitcast=True)
            sb = ((sb + 0x7FFF + ((sb >> 16) & 1)) >> 16) << 16
            sc = sb.to(tl.float32, bitcast=True)
        elif KIND == 1:
            sc = sc.to(tl.float16).to(tl.float32)
        tl.store(scales_ptr + offs_r * GROUPS + g, sc.to(scales_ptr.dtype.element_ty), mask=r_ok)
        tl.store(mins_ptr + offs_r * GROUPS + g, lo.to(mins_ptr.dtype.element_ty), mask=r_ok)
        mn_ch = tl.where(sel[None, :], lo[:, None], mn_ch)
        sc_ch = tl.where(sel[None, :], sc[:, None], sc_ch)

    x = tl.math.div_rn(v - mn_ch, tl.where(sc_ch > 0, sc_ch, 1.0))
    # A non-finite quotient (NaN or infinite inputs) gets code 0, as in the reference.
    x = tl.where((x == x) & (tl.abs(x) < float("inf")), x, 0.0)
    # Round half to even: adding 2^23 leaves no fraction bits (0 <= x < 2^22 here).
    x = (x + 8388608.0) - 8388608.0
    code = tl.minimum(tl.maximum(x, 0.0), LEVELS * 1.0).to(tl.uint32)
    code = tl.where(ok, code, 0)
    shifted = code << ((offs_d % PER_WORD) * BITS).to(tl.uint32)[None, :]
    words = tl.sum(tl.reshape(shifted, [BLOCK_R, BLOCK_D // PER_WORD, PER_WORD]), axis=2)  # disjoint bit fields
    n_words = d // PER_WORD
    offs_w = tl.arange(0, BLOCK_D // PER_WORD)
    tl.store(codes_ptr + offs_r[:, None] * n_words + offs_w[None, :], words.to(tl.int32, bitcast=True),
             mask=r_ok[:, None] & (offs_w < n_words)[None, :])


def _value_matmul_kernel(
    w_ptr, w_s0, w_s1, w_s2, w_s3,
    codes_ptr, c_s0, c_s1, c_s2,
    scales_ptr, s_s0, s_s1, s_s2,
    mins_ptr, m_s0, m_s1, m_s2,
    partial_ptr,
    H_kv, ratio, L, R, T, d, tokens_per_split,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # weights [B, H_q, L, T] any strides; codes / scales / mins [B, H_kv, T, ...] through the strides
    # of dims 0..2, inner dim dense; partial [splits, B * H_q * L, d] float32.
    PER_WORD: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    split = tl.program_id(0)
    pid_r = tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // H_kv).to(tl.int64)
    h = (bh % H_kv).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    head = h * ratio + offs_r // L
    w_row = b * w_s0 + head * w_s1 + (offs_r % L).to(tl.int64) * w_s2  # [BR]
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < d
    word_of = offs_d // PER_WORD
    shift = (offs_d % PER_WORD) * BITS
    group_of = offs_d // GROUP_SIZE
    codes_base = codes_ptr + b * c_s0 + h * c_s1
    scales_base = scales_ptr + b * s_s0 + h * s_s1
    mins_base = mins_ptr + b * m_s0 + h * m_s1

    t_begin = split * tokens_per_split
    t_end = tl.minimum(T, t_begin + tokens_per_split)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < t_end
        tv = offs_t.to(tl.int64)
        w = tl.load(w_ptr + w_row[:, None] + tv[None, :] * w_s3, mask=r_ok[:, None] & t_ok[None, :], other=0.0)
        ok = t_ok[:, None] & d_ok[None, :]
        word = tl.load(codes_base + tv[:, None] * c_s2 + word_of[None, :], mask=ok, other=0)
        code = ((word >> shift[None, :]) & MASK).to(tl.float32)
        scale = tl.load(scales_base + tv[:, None] * s_s2 + group_of[None, :], mask=ok, other=0.0).to(tl.float32)
        low = tl.load(mins_base + tv[:, None] * m_s2 + group_of[None, :], mask=ok, other=0.0).to(tl.float32)
        value = code * scale + low  # two roundings (launched with enable_fp_fusion=False), as the reference
        acc += tl.sum(w.to(tl.float32)[:, :, None] * value[None, :, :], axis=1)
    rows = bh.to(tl.int64) * R + offs_r
    n_rows = tl.num_programs(2).to(tl.int64) * R
    dst = partial_ptr + split.to(tl.int64) * n_rows * d + rows[:, None] * d + offs_d[None, :]
    tl.store(dst, acc, mask=r_ok[:, None] & d_ok[None, :])


_KERNEL_FUNCTIONS = {
    f.__name__: f
    for f in (_quantize_keys_kernel, _project_queries_kernel, _key_scores_kernel, _quantize_values_kernel,
              _value_matmul_kernel)
}
_KERNELS: dict[str, object] = {}


def _kernel(name: str):
    """The kernel wrapped for this process's mode (compiled ``JITFunction`` or interpreted)."""
    if name not in _KERNELS:
        if interpreted():
            from triton.runtime.interpreter import InterpretedFunction

            _KERNELS[name] = InterpretedFunction(_KERNEL_FUNCTIONS[name])
        else:
            _KERNELS[name] = triton.runtime.jit.JITFunction(_KERNEL_FUNCTIONS[name])
    return _KERNELS[name]


def _on_device(device: torch.device):
    """Launch under the tensors' device (Triton uses the current device and stream)."""
    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"qjl_kernel Triton backend: {reason}")
    if device.type == "cuda":
        return torch.cuda.device(device)
    import contextlib

    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# Host wrappers: the CUDA ops' signatures (torch.ops.qjl.*).
# ----------------------------------------------------------------------------------------------


def quantize_keys(keys: torch.Tensor, outlier_indices: torch.Tensor, projection: torch.Tensor, outlier_sketch_dim: int):
    """keys ``[B, H_kv, N, G, d]`` (fp16/bf16/fp32), outlier_indices uint8 ``[B, H_kv, N, n_out]`` ->
    ``(bits, outlier_bits, inlier_norms, outlier_norms)`` as :func:`reference.quantize_keys_ref`."""
    keys = keys.contiguous()
    outlier_indices = outlier_indices.to(torch.uint8).contiguous()
    B, H, N, G, d = keys.shape
    m, m_o, n_out = projection.shape[0], outlier_sketch_dim, outlier_indices.shape[-1]
    dev = keys.device
    bits = torch.empty(B, H, N, G, m // 8, dtype=torch.uint8, device=dev)
    outlier_bits = torch.empty(B, H, N, G, m_o // 8, dtype=torch.uint8, device=dev)
    inlier_norms = torch.empty(B, H, N, G, dtype=keys.dtype, device=dev)
    outlier_norms = torch.empty_like(inlier_norms)
    groups = B * H * N
    if groups == 0 or G == 0:
        return bits, outlier_bits, inlier_norms, outlier_norms
    s = _float32(projection, dev)
    block_t, block_d = 32, _pow2(d, 16)
    if _big_tiles():  # one chunk of channels, wide sketch tiles: fewer interpreted steps
        block_k, block_m = block_d, max(16, min(_pow2(m), 128))
    else:  # [32, 16] x [16, 64] FMA dots: operands and the [32, 64] sketch stay in registers
        block_k, block_m = 16, max(16, min(_pow2(m), 64))
    grid = (groups * triton.cdiv(G, block_t), triton.cdiv(m, block_m))
    with _on_device(dev):
        _kernel("_quantize_keys_kernel")[grid](
            keys, outlier_indices, s, s.stride(0), s.stride(1), bits, outlier_bits, inlier_norms, outlier_norms,
            G, d, m, m_o, n_out,
            NORM_KIND=_KINDS[keys.dtype], BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_M=block_m,
            BLOCK_O=_pow2(n_out, 16), num_warps=4,
        )
    return bits, outlier_bits, inlier_norms, outlier_norms


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _project_queries(query: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``S q`` in float32 multiply-adds: query ``[B, H_q, L, d]`` (any strides, any float dtype) ->
    ``[B * H_q * L, m]`` float32 dense. Not a torch matmul, which may run in TF32."""
    B, H_q, L, d = query.shape
    m = s.shape[0]
    rows = B * H_q * L
    out = torch.empty(rows, m, dtype=torch.float32, device=query.device)
    block_r = min(_pow2(rows), 16)
    block_m = max(16, min(_pow2(m), 64))
    # [BR, BK, BM] products: 4k in registers, the whole head dimension at once when interpreted
    block_k = _pow2(d, 16) if _big_tiles() else max(1, min(_pow2(d), 4096 // (block_r * block_m)))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(m, block_m))
    _kernel("_project_queries_kernel")[grid](
        query, *query.stride(), s, s.stride(0), s.stride(1), out,
        H_q, L, rows, d, m,
        BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_M=block_m, num_warps=4,
    )
    return out


def key_scores(query, bits, outlier_bits, inlier_norms, outlier_norms, outlier_indices, projection):
    """query ``[B, H_q, L, d]`` (any strides) x stored state (dims 0..2 may be strided) -> float32
    scores ``[B, H_q, L, N * G]`` as :func:`reference.key_scores_ref`."""
    B, H_q, L, d = query.shape
    _, H_kv, N, G, _ = bits.shape
    m, m_o, n_out = bits.shape[-1] * 8, outlier_bits.shape[-1] * 8, outlier_indices.shape[-1]
    T = N * G
    dev = query.device
    out = torch.empty(B, H_q, L, T, dtype=torch.float32, device=dev)
    if out.numel() == 0:
        return out
    s = _float32(projection, dev)
    ratio = H_q // H_kv
    R = ratio * L
    block_r = min(_pow2(R), 8)
    block_t = min(_pow2(G, 2), 32)
    # [BR, BT, BM] products within the budget; compiled, the [BT, BM] sign tile at most 32 x 64 too
    # (one query row per KV head spilled with [32, 256] sign and byte tiles).
    block_m = max(8, min(_pow2(m, 8), _budget() // (block_r * block_t), 256 if _big_tiles() else 64))
    grid = (N * triton.cdiv(G, block_t), triton.cdiv(R, block_r), B * H_kv)
    scale_in = math.sqrt(math.pi / 2) / m
    scale_out = math.sqrt(math.pi / 2) / m_o if m_o else 0.0
    with _on_device(dev):
        q_sketch = _project_queries(query, s)  # S q: [B * H_q * L, m]
        _kernel("_key_scores_kernel")[grid](
            q_sketch, query, *query.stride(), s, s.stride(0), s.stride(1),
            bits, *_strides3(bits),
            outlier_bits, *_strides3(outlier_bits),
            inlier_norms, *_strides3(inlier_norms),
            outlier_norms, *_strides3(outlier_norms),
            outlier_indices, *_strides3(outlier_indices),
            out,
            H_kv, ratio, L, R, G, T, m, m_o, n_out, scale_in, scale_out,
            WITH_OUTLIERS=n_out > 0, ADD_OUTLIER_SKETCH=n_out > 0 and m_o > 0,
            BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_M=block_m, num_warps=4,
        )
    return out


def quantize_values(values: torch.Tensor, group_size: int, bits: int):
    """values ``[..., T, d]`` -> ``(codes, scales, mins)`` bit-exact with :func:`reference.quantize_values_ref`."""
    values = values.contiguous()
    d = values.shape[-1]
    groups = d // group_size
    lead = tuple(values.shape[:-1])
    codes = torch.empty(*lead, d * bits // 32, dtype=torch.int32, device=values.device)
    scales = torch.empty(*lead, groups, dtype=values.dtype, device=values.device)
    mins = torch.empty_like(scales)
    rows = values.numel() // d if d else 0
    if rows == 0:
        return codes, scales, mins
    block_d = _pow2(d, 32 // bits)
    block_r = max(1, min(_pow2(rows), (_budget() // 2) // block_d))
    with _on_device(values.device):
        _kernel("_quantize_values_kernel")[(triton.cdiv(rows, block_r),)](
            values, codes, scales, mins, rows, d,
            GROUP_SIZE=group_size, GROUPS=groups, BITS=bits, KIND=_KINDS[values.dtype],
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
        )
    return codes, scales, mins


def value_matmul(weights, codes, scales, mins, bits: int, group_size: int, *, min_tokens_per_split: int | None = None):
    """weights ``[B, H_q, L, T]`` (any strides) x dequant(codes/scales/mins ``[B, H_kv, T, ...]``, dims
    0..2 may be strided) -> float32 ``[B, H_q, L, d]`` as :func:`reference.value_matmul_ref`."""
    B, H_q, L, T = weights.shape
    H_kv = codes.shape[1]
    d = codes.shape[-1] * 32 // bits
    dev = weights.device
    if B == 0 or H_q == 0 or L == 0 or d == 0:
        return torch.empty(B, H_q, L, d, dtype=torch.float32, device=dev)
    if T == 0:
        return torch.zeros(B, H_q, L, d, dtype=torch.float32, device=dev)
    R = (H_q // H_kv) * L
    block_d = _pow2(d, 16)
    block_r = min(_pow2(R), 8)
    # [BR, BT, BD] products within the budget; compiled, the [BT, BD] code / scale / min tiles at most 2k
    # elements too (one query row per KV head spilled with 64 x 128 tiles).
    block_t = max(2, min(64, _budget() // (block_r * block_d), 1 << 20 if _big_tiles() else 2048 // block_d))
    row_tiles = triton.cdiv(R, block_r)
    least = min_tokens_per_split or _MIN_TOKENS_PER_SPLIT
    splits = triton.cdiv(T, least)
    if dev.type == "cuda":  # enough programs to cover the GPU a few times over
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        splits = max(1, min(splits, triton.cdiv(4 * sms, row_tiles * B * H_kv)))
    tokens_per_split = triton.cdiv(T, splits)
    splits = triton.cdiv(T, tokens_per_split)
    partial = torch.empty(splits, B, H_q, L, d, dtype=torch.float32, device=dev)
    grid = (splits, row_tiles, B * H_kv)
    with _on_device(dev):
        _kernel("_value_matmul_kernel")[grid](
            weights, *weights.stride(),
            codes, *_strides3(codes),
            scales, *_strides3(scales),
            mins, *_strides3(mins),
            partial,
            H_kv, H_q // H_kv, L, R, T, d, tokens_per_split,
            BITS=bits, GROUP_SIZE=group_size, BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_D=block_d,
            num_warps=4, enable_fp_fusion=False,
        )
    return partial[0] if splits == 1 else partial.sum(0)
