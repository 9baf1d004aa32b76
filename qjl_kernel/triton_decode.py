"""Triton kernel of the fused op ``decode_attention`` (spec: :func:`reference.decode_attention_ref`).

Same positional arguments as ``torch.ops.qjl.decode_attention`` (the op's "no keys" / "no values"
placeholders included, as :mod:`qjl_kernel.ops` builds them); callers go through
:func:`qjl_kernel.ops.decode_attention_unchecked`, which picks the backend. Arguments are taken as
validated: stored state is read through the strides of dims 0..2 with dense inner dims.

Split-K flash decoding, two launches at most, no host synchronization (CUDA-graph friendly):

1. ``_decode_kernel``, one program per (token split, tile of up to 4 query rows, batch x KV head). A
   program takes the query rows of its KV head (``H_q / H_kv`` heads x ``L`` positions; 4 for Llama-3
   decode), so a stored bit is read once per KV head and row tile. Prologue: ``S q``, kept as bfloat16
   terms in a small per-program scratch (L1/L2-resident). Then tile by tile (32 tokens; a tile never
   straddles a key group): logits of committed keys from the sign bits, ``v . sign`` with
   ``v = S q - S[:, O] q_O`` for the group's outlier channels ``O`` plus ``u . sign_out`` with
   ``u = S[:m_o, O] q_O`` (``u`` and ``v`` are rebuilt only when a group's channel set differs from
   the previous group's), exact logits of residual keys, scaling, mask, online softmax, then ``p @ V``
   with 2-/4-bit codes dequantized in registers (``code * scale + min``) or window values read as they
   are. Per-split row max, row sum and unnormalized output are written out.
2. ``_merge_kernel`` combines the splits by log-sum-exp (not launched when one split covers the
   tokens: the first kernel then writes the normalized output).

Precision (``qjl_kernel/TRITON.md``): no TF32 anywhere. A float32 ``x`` truncated to bfloat16
(``hi``), the remainder truncated again (``mid``) and what is left (``lo``, at most 8 significant
bits) sum to ``x`` exactly; the bfloat16 tensor-core dots multiply such terms by operands exact in
bfloat16 (+-1 signs, the terms of ``V``), so every product is exact and only the float32 accumulation
rounds, as in an IEEE dot. Tensor-core tiles have 16 rows and decode has 4, so the terms are stacked
along the rows (row ``j * BLOCK_R + r`` holds term ``j`` of row ``r``) instead of costing separate dots.
``S q``, ``S[:, O] q_O`` and exact keys use Triton's ``input_precision="bf16x6"``. Under the
interpreter, whose ``tl.dot`` multiplies bfloat16 operands' raw bits, the same values go through IEEE
float32 dots.
"""

from __future__ import annotations

import math
import weakref

import torch

from .triton_ops import interpreted, unavailable_reason

try:
    import triton
    import triton.language as tl
except Exception:  # not importable: triton_ops.TRITON_ERROR says why, and ops never dispatches here
    import types

    triton = None
    tl = types.SimpleNamespace(constexpr=None)

_MAX_ROWS = 4  # query rows per program: 4 stacked terms x 4 rows fill a 16-row tensor-core tile
_MIN_TOKENS_PER_SPLIT = 512  # fewest tokens a program handles (its S q prologue reads all of S^T)
_PROGRAMS_PER_SM = 2  # splits aim at about this many programs per SM
_MERGE_SPLITS = 64  # splits the merge kernel reads at once
# bfloat16 terms of S q (and of S[:m_o, O] q_O) in the sign-bit dots: 3 = exact (the products are
# exact, as in an IEEE float32 dot), 2 = hi/lo rounded to nearest (relative error <= 2^-16 per entry).
SKETCH_TERMS = 3


def _pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << max(0, int(n) - 1).bit_length())


# ----------------------------------------------------------------------------------------------
# Device helpers (inlined into the kernels).
# ----------------------------------------------------------------------------------------------


def _bf16_part(x, ROUND: tl.constexpr):
    """float32 ``x`` cut to bfloat16 precision (a float32 holding a bfloat16 value): truncated, or rounded
    to nearest even by hand when ``ROUND`` (the interpreter's float32 -> bfloat16 cast truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    if ROUND:
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


def _split(x, TERMS: tl.constexpr):
    """float32 ``x`` -> ``(hi, mid, lo)`` float32 tensors holding bfloat16 values. ``TERMS == 3``:
    truncations, ``hi + mid + lo == x`` exactly (each step leaves at most 16, then 8 significant bits,
    and every subtraction is exact). ``TERMS == 2``: ``hi`` and ``mid`` rounded to nearest,
    ``|x - hi - mid| <= 2^-16 |x|``, ``lo = 0``."""
    hi = _bf16_part(x, TERMS == 2)
    rest = x - hi  # exact
    mid = _bf16_part(rest, TERMS == 2)
    lo = rest - mid
    if TERMS == 2:
        lo = tl.zeros_like(lo)
    return hi, mid, lo


def _signs(base, tok, t_ok, k0, row_bytes, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    """+-1 of sketch coordinates ``k0 + [0, BLOCK_K)`` of tokens ``tok`` as float32 ``[BLOCK_K, BLOCK_T]``
    (coordinate i is bit i % 8 of byte i // 8, 1 -> +1, 0 -> -1; 0 past ``8 * row_bytes``), decoded in
    registers; a token's bytes sit at ``base + tok * row_bytes``."""
    offs_j = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    j_ok = offs_j < row_bytes
    byte = tl.load(base + tok[None, :] * row_bytes + offs_j[:, None], mask=j_ok[:, None] & t_ok[None, :], other=0)
    bit = (byte.to(tl.int32)[:, None, :] >> tl.arange(0, 8)[None, :, None]) & 1  # [BK / 8, 8, BT]
    sign = tl.where(j_ok[:, None, None], tl.where(bit == 1, 1.0, -1.0), 0.0)
    return tl.reshape(sign, [BLOCK_K, BLOCK_T])  # row 8 j + i


def _store_terms(base, x, plane, where, TERMS: tl.constexpr):
    """Store the bfloat16 terms of float32 ``x`` (``_split``) at ``base + where``, ``+ plane`` (and
    ``+ 2 plane``), in the scratch's dtype (bfloat16 when compiled: exact)."""
    hi, mid, lo = _split(x, TERMS)
    dtype = base.dtype.element_ty
    tl.store(base + where, hi.to(dtype))
    tl.store(base + plane + where, mid.to(dtype))
    if TERMS == 3:
        tl.store(base + 2 * plane + where, lo.to(dtype))


def _dot_exact(a, b, acc, DOT_BF16: tl.constexpr):
    """``acc + a @ b`` for operands holding values exact in bfloat16: every product is exact, the sums
    float32. A bfloat16 tensor-core dot when ``DOT_BF16``, else an IEEE float32 dot of the same values
    (the interpreter, whose ``tl.dot`` multiplies bfloat16 operands' raw bits)."""
    if DOT_BF16:
        acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


def _term_sum(x, TERMS_P2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stacked rows ``[TERMS_P2 * BLOCK_R, BLOCK_N]`` (row ``j * BLOCK_R + r``: term ``j`` of row ``r``) ->
    the sum over the terms, repeated on every stacked row of ``r``."""
    total = tl.sum(tl.reshape(x, [TERMS_P2, BLOCK_R, BLOCK_N]), axis=0)
    return tl.reshape(tl.broadcast_to(total[None, :, :], [TERMS_P2, BLOCK_R, BLOCK_N]), [TERMS_P2 * BLOCK_R, BLOCK_N])


def _sketch_dot(terms, bits_base, tok, t_ok, rows, n, row_bytes, TERMS: tl.constexpr, TERMS_P2: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                DOT_BF16: tl.constexpr):
    """``sum_i a[r, i] * sign[t, i]`` for the ``8 * row_bytes`` sketch coordinates of tokens ``tok`` (their
    bit strings at ``bits_base + tok * row_bytes``) and ``a`` stored as ``TERMS`` bfloat16 terms at
    ``terms`` (``[TERMS_P2, BLOCK_R, BLOCK_M]``, planes past ``TERMS`` unread): one dot of the stacked terms
    ``[TERMS_P2 * BLOCK_R, BLOCK_K]`` (they fill the rows a small ``BLOCK_R`` leaves empty in a
    tensor-core tile) per chunk of coordinates, then the sum over the terms. ``[TERMS_P2 * BLOCK_R,
    BLOCK_T]``, stacked rows."""
    acc = tl.zeros([TERMS_P2 * BLOCK_R, BLOCK_T], dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(terms + rows[:, None] * BLOCK_M + offs_k[None, :],
                    mask=(rows < TERMS * BLOCK_R)[:, None] & (offs_k < n)[None, :], other=0.0,
                    eviction_policy="evict_last")
        acc = _dot_exact(a, _signs(bits_base, tok, t_ok, k0, row_bytes, BLOCK_K, BLOCK_T), acc, DOT_BF16)
    return _term_sum(acc, TERMS_P2, BLOCK_R, BLOCK_T)


# ----------------------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------------------


def _decode_kernel(
    q_ptr, q_s0, q_s1, q_s2,
    st_ptr,
    bits_ptr, b_s0, b_s1, b_s2,
    obits_ptr, ob_s0, ob_s1, ob_s2,
    nin_ptr, ni_s0, ni_s1, ni_s2,
    nout_ptr, no_s0, no_s1, no_s2,
    idx_ptr, ix_s0, ix_s1, ix_s2,
    rk_ptr, rk_s0, rk_s1, rk_s2,
    codes_ptr, c_s0, c_s1, c_s2,
    scales_ptr, sc_s0, sc_s1, sc_s2,
    mins_ptr, mn_s0, mn_s1, mn_s2,
    win_ptr, w_s0, w_s1, w_s2,
    mask_ptr, mk_s0, mk_s1, mk_s2,
    scratch_ptr, sq_ptr, acc_ptr, max_ptr, sum_ptr,
    H_kv, ratio, L, R, T, T_c, T_q, d, G, m, m_o, n_out, span, group_tiles,
    scale_in, scale_out, scaling,
    HAS_KEYS: tl.constexpr, WITH_OUTLIERS: tl.constexpr, ADD_OUTLIER_SKETCH: tl.constexpr,
    HAS_QUANT: tl.constexpr, HAS_MASK: tl.constexpr, SINGLE_SPLIT: tl.constexpr, DOT_BF16: tl.constexpr,
    PRECISION: tl.constexpr, SKETCH_TERMS: tl.constexpr, BITS: tl.constexpr, VGS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_MC: tl.constexpr, BLOCK_O: tl.constexpr,
):
    # query [B, H_q, L, d] and stored state [B, H_kv, ...] through the strides of dims 0..2, inner
    # dims dense; S^T [d, m] float32 dense; mask uint8 [B or 1, L, T] (stride 0 for a broadcast batch).
    # Rows of KV head (b, h): r = j * L + l for query head h * ratio + j, position l. The program works on
    # STACK = 4 * BLOCK_R stacked rows, row s = term * BLOCK_R + r: tensor-core tiles have 16 rows and
    # decode has few (4 for GQA 4), so the bfloat16 terms of a float32 operand (S q, p) fill the rest.
    # scratch [programs, 2, 4, BLOCK_R, BLOCK_M]: the terms of v and of u (a missing term stays 0).
    # sq [programs, BLOCK_R, BLOCK_M] float32: S q. acc [splits, B * H_kv * R, d] float32 (the output
    # itself when SINGLE_SPLIT), max / sum [splits, B * H_kv * R].
    PER_WORD: tl.constexpr = 32 // BITS
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    PLANE: tl.constexpr = BLOCK_R * BLOCK_M
    STACK: tl.constexpr = 4 * BLOCK_R
    split = tl.program_id(0)
    pid_r = tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // H_kv).to(tl.int64)
    h = (bh % H_kv).to(tl.int64)
    program = (bh.to(tl.int64) * tl.num_programs(1) + pid_r) * tl.num_programs(0) + split
    v_terms = scratch_ptr + program * (8 * PLANE)
    u_terms = v_terms + 4 * PLANE
    sq_saved = sq_ptr + program * PLANE

    stacked = tl.arange(0, STACK)  # stacked rows
    term = stacked // BLOCK_R
    local_r = stacked % BLOCK_R
    offs_r = pid_r * BLOCK_R + local_r
    r_ok = offs_r < R
    l_row = offs_r % L
    # Scalar int64 bases per (batch, KV head), int32 offsets within a head (half the registers).
    q_head = q_ptr + b * q_s0 + h * ratio * q_s1
    q_row = (offs_r // L) * q_s1 + l_row * q_s2  # [STACK]
    bits_head = bits_ptr + b * b_s0 + h * b_s1
    obits_head = obits_ptr + b * ob_s0 + h * ob_s1
    nin_head = nin_ptr + b * ni_s0 + h * ni_s1
    nout_head = nout_ptr + b * no_s0 + h * no_s1
    idx_head = idx_ptr + b * ix_s0 + h * ix_s1
    rk_head = rk_ptr + b * rk_s0 + h * rk_s1
    codes_head = codes_ptr + b * c_s0 + h * c_s1
    scales_head = scales_ptr + b * sc_s0 + h * sc_s1
    mins_head = mins_ptr + b * mn_s0 + h * mn_s1
    win_head = win_ptr + b * w_s0 + h * w_s1
    t_start = split * span
    t_stop = tl.minimum(T, t_start + span)

    # ---- prologue: S q; the terms of v = S q go to this program's scratch ----------------------
    real_r = tl.arange(0, BLOCK_R)
    real_ok = pid_r * BLOCK_R + real_r < R
    real_q_row = ((pid_r * BLOCK_R + real_r) // L) * q_s1 + ((pid_r * BLOCK_R + real_r) % L) * q_s2
    if HAS_KEYS:
        for m0 in range(0, m, BLOCK_MC):  # chunks of sketch coordinates bound the registers for any m
            offs_m = m0 + tl.arange(0, BLOCK_MC)
            m_ok = offs_m < m
            where = real_r[:, None] * BLOCK_M + offs_m[None, :]
            sq = tl.zeros([BLOCK_R, BLOCK_MC], dtype=tl.float32)
            for k0 in range(0, d, BLOCK_DK):
                offs_k = k0 + tl.arange(0, BLOCK_DK)
                k_ok = offs_k < d
                q_k = tl.load(q_head + real_q_row[:, None] + offs_k[None, :], mask=real_ok[:, None] & k_ok[None, :],
                              other=0.0)
                s_k = tl.load(st_ptr + offs_k[:, None] * m + offs_m[None, :], mask=k_ok[:, None] & m_ok[None, :],
                              other=0.0)
                sq = tl.dot(q_k.to(tl.float32), s_k, sq, input_precision=PRECISION)
            _store_terms(v_terms, sq, PLANE, where, SKETCH_TERMS)
            if WITH_OUTLIERS:
                tl.store(sq_saved + where, sq)  # kept in memory, not in registers across the loop
        tl.debug_barrier()  # the scratch is read by other threads than those that wrote it
    offs_o = tl.arange(0, BLOCK_O)
    o_ok = offs_o < n_out
    previous = tl.full([BLOCK_O], -1, dtype=tl.int32)  # outlier channels of the last group seen (sorted)

    # ---- tiles: whole key groups of committed tokens, then residual tokens -------------------
    group0 = t_start // G
    committed_stop = tl.minimum(t_stop, T_c)
    committed_tiles = tl.where(committed_stop > t_start, (committed_stop - t_start) // G * group_tiles, 0)
    residual_start = tl.maximum(t_start, T_c)
    residual_tiles = tl.where(t_stop > residual_start, (t_stop - residual_start + BLOCK_T - 1) // BLOCK_T, 0)

    mask_head = mask_ptr + b * mk_s0
    mask_row = l_row * mk_s1
    visible = T - L + l_row  # causal rule: row l sees tokens <= T - L + l
    offs_c = tl.arange(0, BLOCK_D)
    c_ok = offs_c < d

    row_max = tl.full([STACK], float("-inf"), dtype=tl.float32)  # each row's state, on its 4 stacked rows
    row_sum = tl.zeros([STACK], dtype=tl.float32)
    acc = tl.zeros([STACK, BLOCK_D], dtype=tl.float32)  # stacked row s: term s // BLOCK_R of p, times V
    for i in range(0, committed_tiles + residual_tiles):
        committed = i < committed_tiles
        n = group0 + i // group_tiles  # the tile's key group (committed tiles)
        t0 = tl.where(committed, n * G + (i % group_tiles) * BLOCK_T, residual_start + (i - committed_tiles) * BLOCK_T)
        t_lim = tl.where(committed, n * G + G, t_stop)
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < t_lim

        # -- logits [STACK, BT] (every stacked row of r holds row r's)
        score = tl.zeros([STACK, BLOCK_T], dtype=tl.float32)
        if HAS_KEYS:
            if committed:
                n64 = n.to(tl.int64)
                if WITH_OUTLIERS:
                    idx = tl.load(idx_head + n64 * ix_s2 + offs_o, mask=o_ok, other=0)
                    idx = tl.sort(tl.where(o_ok, idx.to(tl.int32), 1 << 20))  # canonical order, padding last
                    if tl.max((idx != previous).to(tl.int32), axis=0) > 0:  # another channel set: new u, v
                        cols = tl.where(o_ok, idx, 0)
                        q_o = tl.load(q_head + real_q_row[:, None] + cols[None, :],
                                      mask=real_ok[:, None] & o_ok[None, :], other=0.0).to(tl.float32)  # q_O
                        tl.debug_barrier()  # every thread is done reading the previous terms
                        for m0 in range(0, m, BLOCK_MC):
                            offs_m = m0 + tl.arange(0, BLOCK_MC)
                            m_ok = offs_m < m
                            where = real_r[:, None] * BLOCK_M + offs_m[None, :]
                            s_o = tl.load(st_ptr + cols[:, None] * m + offs_m[None, :],
                                          mask=o_ok[:, None] & m_ok[None, :], other=0.0)  # rows O of S^T
                            u = tl.dot(q_o, s_o, input_precision=PRECISION)  # S[:, O] q_O: [BR, BMC]
                            _store_terms(v_terms, tl.load(sq_saved + where) - u, PLANE, where, SKETCH_TERMS)
                            if ADD_OUTLIER_SKETCH:
                                _store_terms(u_terms, tl.where((offs_m < m_o)[None, :], u, 0.0), PLANE, where,
                                             SKETCH_TERMS)
                        tl.debug_barrier()
                        previous = idx
                tok = offs_t - n * G  # position within the group
                dot_in = _sketch_dot(v_terms, bits_head + n64 * b_s2, tok, t_ok, stacked, m, m // 8, SKETCH_TERMS, 4,
                                     BLOCK_R, BLOCK_T, BLOCK_K, BLOCK_M, DOT_BF16)
                norm_in = tl.load(nin_head + n64 * ni_s2 + tok, mask=t_ok, other=0.0)
                score = (scale_in * norm_in.to(tl.float32))[None, :] * dot_in
                if ADD_OUTLIER_SKETCH:
                    dot_out = _sketch_dot(u_terms, obits_head + n64 * ob_s2, tok, t_ok, stacked, m_o, m_o // 8,
                                          SKETCH_TERMS, 4, BLOCK_R, BLOCK_T, BLOCK_K, BLOCK_M, DOT_BF16)
                    norm_out = tl.load(nout_head + n64 * no_s2 + tok, mask=t_ok, other=0.0)
                    score += (scale_out * norm_out.to(tl.float32))[None, :] * dot_out
        if i >= committed_tiles:  # exact keys (q read on every stacked row)
            rt = offs_t - T_c
            for k0 in range(0, d, BLOCK_DK):
                offs_k = k0 + tl.arange(0, BLOCK_DK)
                k_ok = offs_k < d
                q_k = tl.load(q_head + q_row[:, None] + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
                k = tl.load(rk_head + rt[None, :] * rk_s2 + offs_k[:, None], mask=k_ok[:, None] & t_ok[None, :],
                            other=0.0)
                score = tl.dot(q_k.to(tl.float32), k.to(tl.float32), score, input_precision=PRECISION)

        # -- scaling, mask, online softmax (on every stacked row: cheap, and no layout change)
        if HAS_MASK:
            allowed = tl.load(mask_head + mask_row[:, None] + offs_t[None, :] * mk_s2,
                              mask=r_ok[:, None] & t_ok[None, :], other=0) != 0
        else:
            allowed = offs_t[None, :] <= visible[:, None]
        logit = tl.where(allowed, score * scaling, -3.4028234663852886e38)  # reference.MASKED_LOGIT
        logit = tl.where(t_ok[None, :], logit, float("-inf"))  # lanes past the tile: no weight
        new_max = tl.maximum(row_max, tl.max(logit, axis=1))
        alpha = tl.exp(row_max - new_max)
        p = tl.exp(logit - new_max[:, None])  # [STACK, BT]
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        row_max = new_max
        p_hi, p_mid, p_lo = _split(p, 3)
        p_term = tl.where(term[:, None] == 0, p_hi, tl.where(term[:, None] == 1, p_mid,
                                                              tl.where(term[:, None] == 2, p_lo, 0.0)))

        # -- values [BT, BD]: dequantized in registers (code * scale + min) or read (window); exact terms
        value = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        if HAS_QUANT:
            if t0 < T_q:
                q_ok = (t_ok & (offs_t < T_q))[:, None] & c_ok[None, :]
                word = tl.load(codes_head + offs_t[:, None] * c_s2 + (offs_c // PER_WORD)[None, :], mask=q_ok, other=0)
                code = ((word >> ((offs_c % PER_WORD) * BITS)[None, :]) & CODE_MASK).to(tl.float32)
                group = (offs_c // VGS)[None, :]
                scale = tl.load(scales_head + offs_t[:, None] * sc_s2 + group, mask=q_ok, other=0.0).to(tl.float32)
                low = tl.load(mins_head + offs_t[:, None] * mn_s2 + group, mask=q_ok, other=0.0).to(tl.float32)
                value = code * scale + low
        if tl.minimum(t_lim, t0 + BLOCK_T) > T_q:  # the tile holds window tokens
            w_ok = (t_ok & (offs_t >= T_q))[:, None] & c_ok[None, :]
            window = tl.load(win_head + (offs_t - T_q)[:, None] * w_s2 + offs_c[None, :], mask=w_ok, other=0.0)
            value += window.to(tl.float32)  # disjoint from the quantized tokens: exact
        v_hi, v_mid, v_lo = _split(value, 3)
        acc = acc * alpha[:, None]
        acc = _dot_exact(p_term, v_hi, acc, DOT_BF16)
        acc = _dot_exact(p_term, v_mid, acc, DOT_BF16)
        acc = _dot_exact(p_term, v_lo, acc, DOT_BF16)

    # ---- partials (or the output): rows of the first stacked block, terms summed -------------
    out = _term_sum(acc, 4, BLOCK_R, BLOCK_D)
    rows = bh.to(tl.int64) * R + offs_r  # [STACK]: row of [B * H_q * L]
    first = r_ok & (term == 0)
    store_ok = first[:, None] & c_ok[None, :]
    if SINGLE_SPLIT:
        tl.store(acc_ptr + rows[:, None] * d + offs_c[None, :], out / row_sum[:, None], mask=store_ok)
    else:
        n_rows = tl.num_programs(2).to(tl.int64) * R
        base = split.to(tl.int64) * n_rows
        tl.store(acc_ptr + (base + rows)[:, None] * d + offs_c[None, :], out, mask=store_ok)
        tl.store(max_ptr + base + rows, row_max, mask=first)
        tl.store(sum_ptr + base + rows, row_sum, mask=first)


def _merge_kernel(acc_ptr, max_ptr, sum_ptr, out_ptr, rows, d, splits,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # acc [splits, rows, d], max / sum [splits, rows] -> out [rows, d]: log-sum-exp over the splits.
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < d
    top = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        s = s0 + offs_s
        top = tl.maximum(top, tl.load(max_ptr + s.to(tl.int64) * rows + row, mask=s < splits, other=float("-inf")))
    best = tl.max(top, axis=0)  # float32 min for a row that sees nothing: every split then weighs 1
    total = tl.zeros([BLOCK_S], dtype=tl.float32)
    out = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        s = s0 + offs_s
        s_ok = s < splits
        sv = s.to(tl.int64)
        weight = tl.exp(tl.load(max_ptr + sv * rows + row, mask=s_ok, other=float("-inf")) - best)
        total += weight * tl.load(sum_ptr + sv * rows + row, mask=s_ok, other=0.0)
        part = tl.load(acc_ptr + (sv * rows + row)[:, None] * d + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                       other=0.0)
        out += tl.sum(weight[:, None] * part, axis=0)
    tl.store(out_ptr + row * d + offs_d, out / tl.sum(total, axis=0), mask=d_ok)


# ----------------------------------------------------------------------------------------------
# Wrapping for this process's mode: helpers must be JIT functions when compiled, interpreted
# functions under TRITON_INTERPRET=1 (the mode is fixed once triton is imported).
# ----------------------------------------------------------------------------------------------

_KERNELS: dict[str, object] = {}


def _wrap(fn):
    if interpreted():
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    return triton.runtime.jit.JITFunction(fn)


if triton is not None:
    _bf16_part = _wrap(_bf16_part)
    _split = _wrap(_split)
    _signs = _wrap(_signs)
    _store_terms = _wrap(_store_terms)
    _dot_exact = _wrap(_dot_exact)
    _term_sum = _wrap(_term_sum)
    _sketch_dot = _wrap(_sketch_dot)


def _kernel(name: str):
    if name not in _KERNELS:
        _KERNELS[name] = _wrap({"decode": _decode_kernel, "merge": _merge_kernel}[name])
    return _KERNELS[name]


# S^T (float32 [d, m], dense) of each projection seen: the kernel reads S by columns (the prologue's
# S q and the columns of a group's outlier channels), which are rows of S^T. Keyed by the projection
# object (weakly: a freed projection's entry is never reused) and its version counter, so a call
# costs no launch once the projection has been seen.
_PROJECTION_T: dict[int, tuple] = {}


def _projection_t(projection: torch.Tensor) -> torch.Tensor:
    key = id(projection)
    hit = _PROJECTION_T.get(key)
    if hit is not None and hit[0]() is projection and hit[1] == projection._version:
        return hit[2]
    s_t = projection.detach().to(torch.float32).t().contiguous()
    if len(_PROJECTION_T) > 64:
        _PROJECTION_T.clear()
    _PROJECTION_T[key] = (weakref.ref(projection), projection._version, s_t)
    return s_t


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _inner_dense(t: torch.Tensor, dims: int) -> torch.Tensor:
    expected = 1
    for size, stride in zip(reversed(t.shape[t.dim() - dims:]), reversed(t.stride()[t.dim() - dims:])):
        if size != 1 and stride != expected:
            return t.contiguous()
        expected *= size
    return t


def decode_attention(query, bits, outlier_bits, inlier_norms, outlier_norms, outlier_indices, projection,
                     residual_keys, value_codes, value_scales, value_mins, value_window, mask, scaling,
                     value_bits, value_group_size, *, tokens_per_split: int | None = None,
                     sketch_terms: int = SKETCH_TERMS):
    """The fused decode step (the op's positional arguments; empty key / value parts as
    :mod:`qjl_kernel.ops` passes them) -> float32 ``[B, H_q, L, d]`` as
    :func:`reference.decode_attention_ref`. ``tokens_per_split`` forces the split length and
    ``sketch_terms`` the bfloat16 terms of ``S q`` (tests)."""
    B, H_q, L, d = query.shape
    _, H_kv, N, G, m8 = bits.shape
    m, m_o, n_out = m8 * 8, outlier_bits.shape[-1] * 8, outlier_indices.shape[-1]
    T_c, R_keys = N * G, residual_keys.shape[2]
    T, T_q = T_c + R_keys, value_codes.shape[2]
    dev = query.device
    reason = unavailable_reason(dev)
    if reason is not None:
        raise RuntimeError(f"qjl_kernel Triton backend: {reason}")
    out = torch.empty(B, H_q, L, d, dtype=torch.float32, device=dev)
    if out.numel() == 0:
        return out

    has_keys, has_quant = T_c > 0, T_q > 0
    query = _inner_dense(query, 1)
    residual_keys = _inner_dense(residual_keys, 1)
    value_window = _inner_dense(value_window, 1)
    compiled = not interpreted()
    dot_dtype = torch.bfloat16 if compiled else torch.float32
    if has_keys:
        s_t = _projection_t(projection)
    else:
        s_t, G = query, 1  # unread placeholder; no key groups to align splits to
    ratio = H_q // H_kv
    rows = ratio * L
    block_r = min(_pow2(rows), _MAX_ROWS)
    row_tiles = triton.cdiv(rows, block_r)
    heads = B * H_kv

    if tokens_per_split is None:
        splits = triton.cdiv(T, _MIN_TOKENS_PER_SPLIT)
        if dev.type == "cuda":
            sms = torch.cuda.get_device_properties(dev).multi_processor_count
            splits = max(1, min(splits, triton.cdiv(_PROGRAMS_PER_SM * sms, heads * row_tiles)))
        tokens_per_split = triton.cdiv(T, splits)
    span = triton.cdiv(tokens_per_split, G) * G  # splits start on key-group boundaries
    splits = triton.cdiv(T, span)

    block_t = min(max(_pow2(G), 16), 64) if has_keys else 32
    if d > 128:  # the value tile [BLOCK_T, d] and the accumulators would spill (scripts/triton_static.py)
        block_t = 16
    group_size = value_group_size if has_quant else d  # unread without quantized values
    if mask is not None:
        mask_t = mask.view(torch.uint8)
        mask_strides = (mask_t.stride(0) if mask_t.shape[0] == B else 0, mask_t.stride(1), mask_t.stride(2))
    else:
        mask_t, mask_strides = query, (0, 0, 0)
    single = splits == 1
    if single:
        acc, row_max, row_sum = out, out, out
    else:
        acc = torch.empty(splits, B * H_q * L, d, dtype=torch.float32, device=dev)
        row_max = torch.empty(splits, B * H_q * L, dtype=torch.float32, device=dev)
        row_sum = torch.empty_like(row_max)
    block_m = _pow2(m, 16)
    # Each program's terms of v and u (rewritten when a group brings other outlier channels); bfloat16
    # when compiled, float32 holding the same values in the interpreter (see _dot_exact).
    programs = splits * row_tiles * heads
    plane = block_r * block_m if has_keys else 0
    scratch = torch.empty(max(1, programs * 8 * plane), dtype=dot_dtype, device=dev)
    sq_saved = torch.empty(max(1, programs * plane) if n_out else 1, dtype=torch.float32, device=dev)
    kernel_args = (
        query, *_strides3(query),
        s_t,
        bits, *_strides3(bits),
        outlier_bits, *_strides3(outlier_bits),
        inlier_norms, *_strides3(inlier_norms),
        outlier_norms, *_strides3(outlier_norms),
        outlier_indices, *_strides3(outlier_indices),
        residual_keys, *_strides3(residual_keys),
        value_codes, *_strides3(value_codes),
        value_scales, *_strides3(value_scales),
        value_mins, *_strides3(value_mins),
        value_window, *_strides3(value_window),
        mask_t, *mask_strides,
        scratch, sq_saved, acc, row_max, row_sum,
        H_kv, ratio, L, rows, T, T_c, T_q, d, G, m, m_o, n_out, span, triton.cdiv(G, block_t),
        math.sqrt(math.pi / 2) / m if has_keys else 0.0,
        math.sqrt(math.pi / 2) / m_o if m_o else 0.0,
        float(scaling),
    )
    with _device(dev):
        _kernel("decode")[(splits, row_tiles, heads)](
            *kernel_args,
            HAS_KEYS=has_keys, WITH_OUTLIERS=has_keys and n_out > 0,
            ADD_OUTLIER_SKETCH=has_keys and n_out > 0 and m_o > 0,
            HAS_QUANT=has_quant, HAS_MASK=mask is not None, SINGLE_SPLIT=single, DOT_BF16=compiled,
            PRECISION="bf16x6" if compiled else "ieee", SKETCH_TERMS=sketch_terms, BITS=value_bits,
            VGS=group_size,
            BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_D=_pow2(d, 16), BLOCK_DK=16,
            BLOCK_K=min(block_m, 32), BLOCK_M=block_m, BLOCK_MC=min(block_m, 128), BLOCK_O=_pow2(n_out, 16),
            num_warps=8, num_stages=1,
        )
        if not single:
            _kernel("merge")[(B * H_q * L,)](
                acc, row_max, row_sum, out, B * H_q * L, d, splits,
                BLOCK_S=min(_pow2(splits), _MERGE_SPLITS), BLOCK_D=_pow2(d, 16), num_warps=4,
            )
    return out


def _device(device: torch.device):
    """Launch under the tensors' device (Triton uses the current device and stream)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    import contextlib

    return contextlib.nullcontext()
