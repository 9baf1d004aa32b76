// decode_attention: attention of a step's query rows over one layer's compressed KV state, fused.
// Spec: qjl_kernel/reference.py::decode_attention_ref (the CPU kernel, cpu/decode_attention_cpu.cpp,
// implements the same rules: empty parts, causal default mask, finite masked logit, uniform softmax
// of a fully masked row).
//
// Split-K flash decoding. Block = (token split, chunk of <= 32 query rows of one KV head, batch * KV
// head); 128 threads walk the split in tiles of <= 128 tokens:
//  1. logits of the tile's tokens for the block's rows into shared memory (log2 units):
//     - committed keys from their sign bits: <v, sign> = 2 sum(v_i : bit_i = 1) - sum(v), with
//       v = S q - S[:, O] q_O and u = S[:m_o, O] q_O rebuilt per key group (O = the group's outlier
//       channels; a group whose outlier list equals its predecessor's in the tile shares its buffer), stored
//       with up to 4 rows interleaved, so one 16-byte shared load feeds 4 predicated adds (4 rows,
//       or 4 coordinates of one row); sum(v) = sum(S q) - sum_o q_o colsum_m(S)[o] needs no pass;
//       on tensor cores instead when the shapes allow (m and m_o multiples of 128, G of 16; below);
//     - residual keys exactly (fmaf over channels);
//     - times scaling * log2(e); masked positions get -FLT_MAX (finite, as the reference);
//  2. online softmax per row: running max and sum, the value accumulators rescaled per tile;
//  3. values: thread = (token slot, half code word, row group); 2/4-bit codes are dequantized in
//     registers with sum_t p_t (s_t c_t + z_t) = sum_t (p_t s_t) c_t + sum_t p_t z_t per group, the
//     code c as float(2^23 + (half & mask << k)) - 2^23 = c 2^k (exact, no shift; the accumulator of
//     channel j carries 2^k, removed at the end); window values are read as they are.
// The block's partial result (max, sum, unnormalized acc[d] per row) goes to a workspace merged by
// decode_merge_kernel (log-sum-exp); with one split the block normalizes and writes the output.
// Every sum is float32; no host synchronization; one or two launches after the S q prologue.
#include "device_utils.cuh"

#include <algorithm>
#include <cfloat>

namespace qjl {
namespace {

constexpr int kThreads = kDecodeThreads;
constexpr int kTile = kDecodeTile;
constexpr int kLgPitch = kTile + 1;  // logits [row][token]: rows one bank apart for the value stage
constexpr float kMaskedLogit = -FLT_MAX;
constexpr int kMaxGroupBuffers = 8;
// Tensor-core B fragments: [k-step][kFragPitch uint2], lane = column * 4 + t at position lane (the
// pitch of 33 spreads the rebuild's stores over the banks; the MMA loads stay conflict-free).
constexpr int kFragPitch = 33;
constexpr size_t kPreferredSmem = 96 * 1024;  // fewer group buffers above this: blocks per SM, L1 for S^T

__host__ __device__ inline int align4(int x) { return (x + 3) & ~3; }

struct Offsets {  // floats from the start of dynamic shared memory
  int stats, q, lg, sum_v, sum_u, bid, chan, qo, vbuf, red, total;
};

// One layout for host and device. The reduction buffer of the end reuses the token loop's space.
__host__ __device__ inline Offsets offsets(const DecodeArgs& a, const DecodeLayout& l) {
  Offsets o;
  const int q_rows = (a.rows_per_block + 3) & ~3;  // rows padded to whole passes (zero rows)
  o.stats = 0;  // 6 x kDecodeMaxRows: max, sum, alpha, sum(S q), 2^E and 2^-E (tensor-core scaling); b, h
  o.q = 6 * kDecodeMaxRows + 4;                     // [q_rows][d] float32 query rows
  o.lg = o.q + align4(q_rows * a.d);  // [row_groups * row_accumulators][kLgPitch] logits, then probabilities
  o.sum_v = o.lg + align4(l.row_groups * l.row_accumulators * kLgPitch);  // [group_buffers][rows_per_pass]
  o.sum_u = o.sum_v + align4(l.group_buffers * l.rows_per_pass);  // [group_buffers][rows_per_pass]
  o.bid = o.sum_u + align4(l.group_buffers * l.rows_per_pass);    // int [tile_groups]: group -> buffer
  o.chan = o.bid + align4(l.tile_groups);                         // int [tile_groups][n_out]
  o.qo = o.chan + align4(l.tile_groups * a.n_out);                // float4 [tile_groups][n_out] (tensor cores)
  o.vbuf = o.qo + 4 * l.tile_groups * a.n_out;                    // [group_buffers][v_floats]
  const int loop_end = o.vbuf + l.group_buffers * l.v_floats;
  o.red = o.lg;  // [row_accumulators * (16 / bits)][kThreads + 32]
  const int red_end = o.red + l.row_accumulators * (16 / a.value_bits) * (kThreads + 32);
  o.total = loop_end > red_end ? loop_end : red_end;
  return o;
}

__host__ __device__ inline int groups_rows(const DecodeLayout& l) { return l.row_groups * l.row_accumulators; }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

__device__ __forceinline__ float pow2(int k) { return __int_as_float((127 + k) << 23); }  // |k| < 127

__device__ __forceinline__ uint32_t half2_bits(__half2 h) {
  uint32_t u;
  memcpy(&u, &h, sizeof(u));
  return u;
}

// acc lane e += v4[q].e for every coordinate of the NB bits of w that is set. v holds RB rows per
// coordinate ([coord][RB]), so a float4 is 4 / RB coordinates and lane e is coordinate e / RB.
template <int RB, int NB>
__device__ __forceinline__ void add_set_bits(uint32_t w, const float4* v4, float4& acc) {
  constexpr int kCoords = 4 / RB;
#pragma unroll
  for (int q = 0; q < NB / kCoords; ++q) {
    const float4 x = v4[q];
    if ((w >> (q * kCoords + 0 / RB)) & 1u) acc.x += x.x;
    if ((w >> (q * kCoords + 1 / RB)) & 1u) acc.y += x.y;
    if ((w >> (q * kCoords + 2 / RB)) & 1u) acc.z += x.z;
    if ((w >> (q * kCoords + 3 / RB)) & 1u) acc.w += x.w;
  }
}

// out[rr] = sum of v[i * RB + rr] over the coordinates i < nbits whose sign bit is set (bit i of
// byte i / 8, packing.py). nbits is a multiple of 8; `words`: the row is readable as aligned words.
template <int RB>
__device__ __forceinline__ void set_bit_sums(const uint8_t* row, int nbits, bool words, const float* v,
                                             float (&out)[RB]) {
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  const float4* v4 = reinterpret_cast<const float4*>(v);
  const int nwords = nbits >> 5;
  for (int k = 0; k < nwords; ++k) {
    const uint32_t w = sign_word(row, k, words);
    add_set_bits<RB, 32>(w, v4 + k * (32 * RB / 4), acc);
  }
  for (int jb = nwords * 4; jb < (nbits >> 3); ++jb) add_set_bits<RB, 8>(row[jb], v4 + jb * (8 * RB / 4), acc);
  if (RB == 4) {
    out[0] = acc.x;
    out[RB > 1 ? 1 : 0] = acc.y;
    out[RB > 2 ? 2 : 0] = acc.z;
    out[RB > 3 ? 3 : 0] = acc.w;
  } else if (RB == 2) {
    out[0] = acc.x + acc.z;
    out[RB > 1 ? 1 : 0] = acc.y + acc.w;
  } else {
    out[0] = (acc.x + acc.y) + (acc.z + acc.w);
  }
}

// acc[ra][j] += ps[ra] * c_j 2^(BITS j) for the codes of one 16-bit half word (see the header).
// magic = 0x4B000000 (2^23) arrives as a kernel argument: held in a register, (half & mask) | magic
// is one LOP3 (two immediates would take two).
template <int BITS, int RA>
__device__ __forceinline__ void add_codes(uint32_t half, uint32_t magic, const float (&ps)[RA],
                                          float (&acc)[RA][16 / BITS]) {
  constexpr uint32_t kMask = (1u << BITS) - 1u;
#pragma unroll
  for (int j = 0; j < 16 / BITS; ++j) {
    const float x = __uint_as_float((half & (kMask << (BITS * j))) | magic) - 8388608.f;
#pragma unroll
    for (int ra = 0; ra < RA; ++ra) acc[ra][j] = fmaf(ps[ra], x, acc[ra][j]);
  }
}

// ---- tensor-core scoring ----------------------------------------------------------------------
// The sums over set bits of 16 tokens x 4 rows are one m16n8k16 fp16 MMA per 16 coordinates:
// A[token][k] = bit ? 2^e_k : 0 and B[k][n] = 2^-e_k v'[k][row n % 4], split as hi (n < 4) + lo
// (n >= 4) fp16 parts (22 significant bits; the two columns are added after the MMA), with
// v' = v 2^-E_r, E_r from |v_i| <= ||S_i|| ||q_r||, so that every B fits fp16. A fragments come
// straight from the packed bits: thread t of a quad owns words t, t + 4, t + 8, ... of each token;
// coordinates a and a + 16 of a word form one half2 register, and one of four shifts (left 10, left
// 5, none, right 1) puts bit a on an exponent bit p in 10..14 of its half, where a lone bit p is
// the power of two 2^(2^(p-10) - 15): one AND per register, no conversion.
__host__ __device__ inline int tc_bit_position(int a) { return a <= 4 ? a + 10 : a <= 9 ? a + 5 : a <= 14 ? a : 14; }
__host__ __device__ inline int tc_slot_exponent(int a) { return (1 << (tc_bit_position(a) - 10)) - 15; }

// The A register holding coordinates a and a + 16 of word w: fp16 pair, each 0 or 2^e_a.
__device__ __forceinline__ uint32_t tc_sign_pair(uint32_t w, int a) {
  const uint32_t shifted = a <= 4 ? w << 10 : a <= 9 ? w << 5 : a <= 14 ? w : w >> 1;
  const int p = tc_bit_position(a);
  return shifted & ((1u << p) | (1u << (p + 16)));
}

// D = A B + C for one warp, m16n8k16, fp16 inputs, fp32 accumulators (PTX fragment layouts).
__device__ __forceinline__ void mma_f16_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                              uint2 b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b.x), "r"(b.y));
#elif defined(__CUDA_ARCH__)
  __trap();  // the host enables tensor cores on compute capability 8.0 and newer only
#endif
}

// The 8 k-steps of one word of two tokens: wa of row gi, wb of row gi + 8 of the 16-token tile;
// b: this lane's B fragments of those steps (kFragPitch apart).
__device__ __forceinline__ void tc_word_mma(float (&c)[4], uint32_t wa, uint32_t wb, const uint2* b) {
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    mma_f16_16816(c, tc_sign_pair(wa, 2 * q), tc_sign_pair(wb, 2 * q), tc_sign_pair(wa, 2 * q + 1),
                  tc_sign_pair(wb, 2 * q + 1), b[q * kFragPitch]);
  }
}

// Stores x[e][rr] (rows rr < 4) of the coordinates {c0, c0 + 16, c0 + 1, c0 + 17} (e = 0..3; c0 even,
// a = c0 mod 16 < 16) of a sketch as B fragments: one uint2 per column, {(c0, c0 + 16) = register
// of pair a, (c0 + 1, c0 + 17) = register of pair a + 1}, each value scaled by 2^-E_r (scale_dn) and
// 2^-e of its pair (s0 = 2^-e_a, s1 = 2^-e_(a+1)), split into fp16 hi (columns 0..3) and lo (4..7).
__device__ __forceinline__ void tc_store_unit(uint2* bf, int step, int t, float s0, float s1, const float (&x)[4][4],
                                              const float* scale_dn) {
#pragma unroll
  for (int rr = 0; rr < 4; ++rr) {
    const float f0 = scale_dn[rr] * s0, f1 = scale_dn[rr] * s1;  // powers of two: exact products
    const float y0 = x[0][rr] * f0, y1 = x[1][rr] * f0, y2 = x[2][rr] * f1, y3 = x[3][rr] * f1;
    const __half2 hi01 = __floats2half2_rn(y0, y1), hi23 = __floats2half2_rn(y2, y3);
    const float2 h01 = __half22float2(hi01), h23 = __half22float2(hi23);
    const __half2 lo01 = __floats2half2_rn(y0 - h01.x, y1 - h01.y), lo23 = __floats2half2_rn(y2 - h23.x, y3 - h23.y);
    bf[step * kFragPitch + rr * 4 + t] = make_uint2(half2_bits(hi01), half2_bits(hi23));
    bf[step * kFragPitch + (rr + 4) * 4 + t] = make_uint2(half2_bits(lo01), half2_bits(lo23));
  }
}

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(float x) { return x; }

// The quantized tokens tt = first, first + step, ... < end of a tile for one thread (half code word,
// RA rows; p_row: its first row's probabilities, zero rows past the block's): per token one word,
// one scale, one min, RA probabilities, then add_codes.
template <int BITS, int RA, typename T>
__device__ __forceinline__ void add_quantized(const T* scales, const T* mins, int64_t s_step, int64_t z_step,
                                              const int32_t* codes, int64_t code_step, int shift, uint32_t magic,
                                              const float* p_row, int first, int end, int step,
                                              float (&acc)[RA][16 / BITS], float (&zacc)[RA]) {
  for (int tt = first; tt < end; tt += step, codes += code_step, scales += s_step, mins += z_step) {
    const uint32_t half = static_cast<uint32_t>(__ldg(codes)) >> shift;
    const float s = to_float(__ldg(scales)), z = to_float(__ldg(mins));
    float ps[RA];
#pragma unroll
    for (int ra = 0; ra < RA; ++ra) {
      const float pr = p_row[ra * kLgPitch + tt];  // rows past the block's are zero
      ps[ra] = pr * s;
      zacc[ra] = fmaf(pr, z, zacc[ra]);
    }
    add_codes<BITS, RA>(half, magic, ps, acc);
  }
}

template <int BITS, int RA>
__global__ void __launch_bounds__(kThreads, 3) decode_kernel(const DecodeArgs a, const DecodeLayout lay,
                                                              uint32_t magic) {
  constexpr int RB = RA < 4 ? RA : 4;  // rows per scoring pass
  constexpr int kCodes = 16 / BITS;    // channels per value unit (half a code word)
  extern __shared__ __align__(16) float smem[];
  const Offsets off = offsets(a, lay);
  float* s_max = smem + off.stats;
  float* s_sum = s_max + kDecodeMaxRows;
  float* s_alpha = s_sum + kDecodeMaxRows;
  float* s_sumsq = s_alpha + kDecodeMaxRows;
  float* s_up = s_sumsq + kDecodeMaxRows;  // 2^E_r
  float* s_dn = s_up + kDecodeMaxRows;     // 2^-E_r
  int* s_head = reinterpret_cast<int*>(s_dn + kDecodeMaxRows);  // b, h
  float* q_s = smem + off.q;
  float* lg = smem + off.lg;
  float* s_sumv = smem + off.sum_v;
  float* s_sumu = smem + off.sum_u;
  int* s_bid = reinterpret_cast<int*>(smem + off.bid);
  int* s_chan = reinterpret_cast<int*>(smem + off.chan);
  float4* s_qo = reinterpret_cast<float4*>(smem + off.qo);
  float* vbuf = smem + off.vbuf;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // 32-bit block arithmetic: the host checks blocks and query rows fit int32.
  const int n_splits = static_cast<int>(a.splits);
  const int split = static_cast<int>(blockIdx.x) % n_splits, rest = static_cast<int>(blockIdx.x) / n_splits;
  const int rc = rest % a.row_chunks, bh = rest / a.row_chunks;
  int b = bh / a.H_kv, h = bh - b * a.H_kv;
  const int R = a.ratio * a.L, d = a.d, m = a.m, m_o = a.m_o, n_out = a.n_out, G = a.G;
  const int r_first = rc * a.rows_per_block;           // first row (of KV head h) of this block
  const int rows = min(a.rows_per_block, R - r_first);
  const int row_base = bh * R + r_first;  // its row in [B*H_q*L]
  const int rows_total = a.B * a.H_kv * R;
  const int64_t t_begin = split * a.span, t_end = min(a.T, t_begin + a.span);
  const int64_t tc_end = min(t_end, a.T_c);
  const bool with_outliers = n_out > 0 && m_o > 0;  // the reference adds the outlier term only then
  const int v_floats = lay.v_floats;

  // Query rows as float32 (zero rows pad the last scoring pass), softmax state, sum(S q) per row.
  const int q_rows = (a.rows_per_block + 3) & ~3;
  for (int e = tid; e < q_rows * d; e += kThreads) {
    const int r = e / d, c = e - r * d;
    float q = 0.f;
    if (r < rows) {
      const int rr = r_first + r;
      q = load_fp(a.query.ptr, a.query.offset(b, h * a.ratio + rr / a.L, rr % a.L, c), a.query.kind);
    }
    q_s[e] = q;
  }
  for (int e = rows * kLgPitch + tid; e < groups_rows(lay) * kLgPitch; e += kThreads) lg[e] = 0.f;  // padding rows
  if (tid < kDecodeMaxRows) {
    s_max[tid] = kMaskedLogit;
    s_sum[tid] = 0.f;
    s_alpha[tid] = 1.f;
  }
  if (tid == 0) {
    s_head[0] = b;
    s_head[1] = h;
  }
  for (int r = warp; r < kDecodeMaxRows; r += kThreads / 32) {
    float sum = 0.f;
    if (r < rows && tc_end > t_begin) {
      const float* sq = a.q_sketch + static_cast<int64_t>(row_base + r) * m;
      for (int i = lane; i < m; i += 32) sum += __ldg(sq + i);
      sum = warp_sum(sum);
    }
    if (lane == 0) s_sumsq[r] = sum;
  }
  if (a.tensor_cores && tc_end > t_begin) {  // E_r: |v_i|, |u_i| <= max_i ||S_i|| ||q_r|| < 2^E_r
    __syncthreads();                         // q_s
    for (int r = warp; r < kDecodeMaxRows; r += kThreads / 32) {
      float norm2 = 0.f;
      if (r < rows) {
        for (int c = lane; c < d; c += 32) norm2 = fmaf(q_s[r * d + c], q_s[r * d + c], norm2);
        norm2 = warp_sum(norm2);
      }
      if (lane == 0) {
        const float bound = sqrtf(norm2) * a.column_sums[2 * d];
        int e = 0;
        if (bound > 0.f && bound < FLT_MAX) frexpf(bound, &e);
        e = max(-100, min(100, e));
        s_up[r] = pow2(e);
        s_dn[r] = pow2(-e);
      }
    }
  }

  // Value stage: thread = (token slot, unit vu = half a code word, row group vrg of RA rows);
  // at most 32 accumulators per thread.
  const int units = lay.value_units, groups = lay.row_groups, slots = lay.value_slots;
  const int vu = tid % units, vrg = (tid / units) % groups, slot = tid / (units * groups);
  const bool v_active = tid < slots * units * groups;  // slot < slots
  const bool one_group = a.value_group % kCodes == 0;  // a unit lies in one value group
  float acc[RA][kCodes], zacc[RA];
#pragma unroll
  for (int ra = 0; ra < RA; ++ra) {
    zacc[ra] = 0.f;
#pragma unroll
    for (int j = 0; j < kCodes; ++j) acc[ra][j] = 0.f;
  }

  const int passes = (rows + RB - 1) / RB;
  const bool shared_v = n_out == 0;  // v = S q for every group: one buffer
  bool shared_built = false;
  for (int64_t t = t_begin; t < t_end;) {
    const bool committed = t < a.T_c;
    int n;
    if (!committed) {
      n = static_cast<int>(min(static_cast<int64_t>(kTile), t_end - t));
    } else if (G <= kTile) {  // t is a group start: whole groups
      n = static_cast<int>(min(static_cast<int64_t>(lay.tile_groups) * G, tc_end - t));
    } else {  // part of one long group
      n = static_cast<int>(min(min(static_cast<int64_t>(kTile), (t / G + 1) * G - t), tc_end - t));
    }
    __syncthreads();  // the previous tile's value stage is done with the probabilities
    // (b, h) reloaded per tile: the tensors' (b, h) offsets are then recomputed per tile instead of
    // occupying ~20 registers for the whole kernel.
    b = s_head[0];
    h = s_head[1];
    // ---- 1. logits ----
    if (committed) {
      const int64_t g_first = t / G;
      const int K = static_cast<int>((t + n - 1) / G - g_first + 1);
      if (n_out > 0) {
        for (int e = tid; e < K * n_out; e += kThreads) {
          const int k = e / n_out, o = e - k * n_out;
          const uint8_t* idx =
              static_cast<const uint8_t*>(a.outlier_indices.ptr) + a.outlier_indices.offset(b, h, g_first + k);
          s_chan[e] = min(static_cast<int>(idx[o]), d - 1);  // range checked in Python; never read past S
        }
        __syncthreads();
        if (warp == 0) {  // a group with its predecessor's channels (in order) shares its buffer
          int previous = 0;
          for (int k = 0; k < K; ++k) {
            bool same = k > 0;
            for (int o0 = 0; o0 < n_out && same; o0 += 32) {
              const bool eq = o0 + lane >= n_out || s_chan[k * n_out + o0 + lane] == s_chan[(k - 1) * n_out + o0 + lane];
              same = __all_sync(0xffffffffu, eq);
            }
            previous = same ? previous : k;
            if (lane == 0) s_bid[k] = previous;
          }
        }
        __syncthreads();
      }
      if (a.tensor_cores) {
        const int J = m >> 7, J_o = m_o >> 7, tc_passes = (rows + 3) >> 2;
        for (int p = 0; p < tc_passes; ++p) {
          const int r0 = 4 * p;
          if (!shared_v || tc_passes > 1 || !shared_built) {
            const int nb = shared_v ? 1 : K;
            for (int e = tid; e < nb * n_out; e += kThreads) {  // q of the pass's rows on the outlier channels
              const int ch = s_chan[e];
              s_qo[e] = make_float4(q_s[r0 * d + ch], q_s[(r0 + 1) * d + ch], q_s[(r0 + 2) * d + ch],
                                    q_s[(r0 + 3) * d + ch]);
            }
            __syncthreads();
            // Unit u of a group: coordinates {c0, c0 + 16, c0 + 1, c0 + 17}, c0 = 32 (u / 8) + 2 (u % 8):
            // one uint2 per B column. C = S[:, O] q_O, v = S q - C (i < m), u = C (i < m_o).
            const int units_per_group = m >> 2;  // a multiple of 8, like kThreads: u % 8 == tid % 8
            const float slot0 = pow2(-tc_slot_exponent(2 * (tid & 7))), slot1 = pow2(-tc_slot_exponent(2 * (tid & 7) + 1));
            for (int e = tid; e < nb * units_per_group; e += kThreads) {
              const int k = e / units_per_group, u = e - k * units_per_group;
              if (!shared_v && s_bid[k] != k) continue;
              const int w = u >> 3, c0 = 32 * w + 2 * (u & 7);
              float c[4][4] = {};
              for (int o = 0; o < n_out; ++o) {
                const int ch = s_chan[k * n_out + o];
                const float4 q = s_qo[k * n_out + o];
                const float* col = a.proj_t + static_cast<int64_t>(ch) * m + c0;
                const float2 s01 = __ldg(reinterpret_cast<const float2*>(col));
                const float2 s16 = __ldg(reinterpret_cast<const float2*>(col + 16));
                const float sv[4] = {s01.x, s16.x, s01.y, s16.y};
#pragma unroll
                for (int x = 0; x < 4; ++x) {
                  c[x][0] = fmaf(sv[x], q.x, c[x][0]);
                  c[x][1] = fmaf(sv[x], q.y, c[x][1]);
                  c[x][2] = fmaf(sv[x], q.z, c[x][2]);
                  c[x][3] = fmaf(sv[x], q.w, c[x][3]);
                }
              }
              uint2* bf = reinterpret_cast<uint2*>(vbuf + k * v_floats);
              // Word w of a sketch is thread w % 4's word w / 4: its 8 k-steps start at 8 (w / 4).
              const int step = 8 * (w >> 2) + (u & 7), t_word = w & 3;
              if (c0 < m_o) tc_store_unit(bf, (m >> 4) + step, t_word, slot0, slot1, c, s_dn + r0);
#pragma unroll
              for (int rr = 0; rr < 4; ++rr) {  // c becomes v = S q - C
                float2 q01 = make_float2(0.f, 0.f), q16 = q01;
                if (r0 + rr < rows) {
                  const float* sq = a.q_sketch + static_cast<int64_t>(row_base + r0 + rr) * m + c0;
                  q01 = __ldg(reinterpret_cast<const float2*>(sq));
                  q16 = __ldg(reinterpret_cast<const float2*>(sq + 16));
                }
                c[0][rr] = q01.x - c[0][rr];
                c[1][rr] = q16.x - c[1][rr];
                c[2][rr] = q01.y - c[2][rr];
                c[3][rr] = q16.y - c[3][rr];
              }
              tc_store_unit(bf, step, t_word, slot0, slot1, c, s_dn + r0);
            }
            for (int e = tid; e < nb * 4; e += kThreads) {
              const int k = e >> 2, rr = e & 3, r = r0 + rr;
              if (!shared_v && s_bid[k] != k) continue;
              float cm = 0.f, cmo = 0.f;
              for (int o = 0; o < n_out; ++o) {
                const int ch = s_chan[k * n_out + o];
                const float qc = q_s[r * d + ch];
                cm = fmaf(qc, a.column_sums[ch], cm);
                cmo = fmaf(qc, a.column_sums[d + ch], cmo);
              }
              s_sumv[k * 4 + rr] = s_sumsq[r] - cm;
              s_sumu[k * 4 + rr] = cmo;
            }
            shared_built = true;
            __syncthreads();
          }
          // Warp w: 16-token tiles w, w + 4, ... (a 16-token tile lies in one key group: G % 16 == 0).
          const int gi = lane >> 2, ti = lane & 3;
          const int tile_offset = static_cast<int>(t - g_first * G);  // < G: 32-bit group arithmetic
          for (int mt = warp; mt < (n >> 4); mt += kThreads / 32) {
            const int k = (tile_offset + 16 * mt) / G;
            const int pos0 = tile_offset + 16 * mt - k * G;
            const int64_t g = g_first + k;
            const int buf = shared_v ? 0 : s_bid[k];
            const uint2* bf = reinterpret_cast<const uint2*>(vbuf + buf * v_floats) + lane;  // [step][kFragPitch]
            float c_in[4] = {0.f, 0.f, 0.f, 0.f}, c_out[4] = {0.f, 0.f, 0.f, 0.f};
            const uint32_t* wa = reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(a.bits.ptr) +
                                                                   a.bits.offset(b, h, g)) +
                                 static_cast<int64_t>(pos0 + gi) * (m >> 5) + ti;
            const uint32_t* wb = wa + 8 * (m >> 5);  // token gi + 8
            for (int j = 0; j < J; ++j) {
              tc_word_mma(c_in, __ldg(wa + 4 * j), __ldg(wb + 4 * j), bf + 8 * j * kFragPitch);
            }
            if (with_outliers) {
              const uint32_t* oa = reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(a.outlier_bits.ptr) +
                                                                     a.outlier_bits.offset(b, h, g)) +
                                   static_cast<int64_t>(pos0 + gi) * (m_o >> 5) + ti;
              const uint32_t* ob = oa + 8 * (m_o >> 5);
              for (int j = 0; j < J_o; ++j) {
                tc_word_mma(c_out, __ldg(oa + 4 * j), __ldg(ob + 4 * j), bf + ((m >> 4) + 8 * j) * kFragPitch);
              }
            }
            // Column n = row n % 4, part n / 4: quad position ti holds columns 2 ti and 2 ti + 1 of tokens
            // gi (c[0], c[1]) and gi + 8 (c[2], c[3]). After adding hi and lo (positions ti and ti ^ 2),
            // position ti writes the rows 2 (ti % 2), 2 (ti % 2) + 1 of token gi + 8 (ti / 2).
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              c_in[e] += __shfl_xor_sync(0xffffffffu, c_in[e], 2);
              c_out[e] += __shfl_xor_sync(0xffffffffu, c_out[e], 2);
            }
            const int side = ti >> 1, pos = pos0 + gi + 8 * side;
            const int64_t tok = t + 16 * mt + gi + 8 * side;
            const float wa_norm =
                a.scale_in * load_fp(a.inlier_norms.ptr, a.inlier_norms.offset(b, h, g) + pos, a.inlier_kind);
            const float wb_norm =
                with_outliers
                    ? a.scale_out * load_fp(a.outlier_norms.ptr, a.outlier_norms.offset(b, h, g) + pos, a.outlier_kind)
                    : 0.f;
#pragma unroll
            for (int cc = 0; cc < 2; ++cc) {
              const int rr = 2 * (ti & 1) + cc, r = r0 + rr;
              if (r >= rows) continue;
              const float s_in = (side ? c_in[2 + cc] : c_in[cc]) * s_up[r];
              const float s_out = (side ? c_out[2 + cc] : c_out[cc]) * s_up[r];
              const float score = wa_norm * (2.f * s_in - s_sumv[buf * 4 + rr]) +
                                  wb_norm * (2.f * s_out - s_sumu[buf * 4 + rr]);
              const int l = (r_first + r) % a.L;
              const bool visible = a.mask != nullptr ? a.mask[b * a.ms0 + l * a.ms1 + tok * a.ms2] != 0
                                                     : tok <= a.T - a.L + l;
              lg[r * kLgPitch + (tok - t)] = visible ? score * a.logit_scale : kMaskedLogit;
            }
          }
          if (tc_passes > 1) __syncthreads();  // the next pass rebuilds the fragments
        }
      } else
      for (int p = 0; p < passes; ++p) {
        const int r0 = p * RB;
        if (!shared_v || passes > 1 || !shared_built) {
          // v[i][rr] = (S q)_i - C_i (i < m), u[i][rr] = C_i (i < m_o), C_i = sum_o S[i][c_o] q[c_o].
          const int nb = shared_v ? 1 : K;
          for (int e = tid; e < nb * m; e += kThreads) {
            const int k = e / m, i = e - k * m;
            if (!shared_v && s_bid[k] != k) continue;
            float c[RB];
#pragma unroll
            for (int rr = 0; rr < RB; ++rr) c[rr] = 0.f;
            for (int o = 0; o < n_out; ++o) {
              const int ch = s_chan[k * n_out + o];
              const float s = __ldg(a.proj_t + static_cast<int64_t>(ch) * m + i);
#pragma unroll
              for (int rr = 0; rr < RB; ++rr) c[rr] = fmaf(s, q_s[(r0 + rr) * d + ch], c[rr]);
            }
            float* vb = vbuf + k * v_floats;
#pragma unroll
            for (int rr = 0; rr < RB; ++rr) {
              const int r = r0 + rr;
              vb[i * RB + rr] = r < rows ? __ldg(a.q_sketch + static_cast<int64_t>(row_base + r) * m + i) - c[rr] : 0.f;
              if (i < m_o) vb[(m + i) * RB + rr] = c[rr];
            }
          }
          for (int e = tid; e < nb * RB; e += kThreads) {
            const int k = e / RB, rr = e - k * RB, r = r0 + rr;
            if (!shared_v && s_bid[k] != k) continue;
            float cm = 0.f, cmo = 0.f;  // sum_i C_i over i < m and i < m_o
            for (int o = 0; o < n_out; ++o) {
              const int ch = s_chan[k * n_out + o];
              const float qc = q_s[r * d + ch];
              cm = fmaf(qc, a.column_sums[ch], cm);
              cmo = fmaf(qc, a.column_sums[d + ch], cmo);
            }
            s_sumv[k * RB + rr] = s_sumsq[r] - cm;
            s_sumu[k * RB + rr] = cmo;
          }
          shared_built = true;
          __syncthreads();
        }
        if (tid < n) {
          const int64_t tok = t + tid, g = tok / G;
          const int pos = static_cast<int>(tok - g * G);
          const int buf = shared_v ? 0 : s_bid[g - g_first];
          const float* vb = vbuf + buf * v_floats;
          const uint8_t* row = static_cast<const uint8_t*>(a.bits.ptr) + a.bits.offset(b, h, g) +
                               static_cast<int64_t>(pos) * (m >> 3);
          float s_in[RB], s_out[RB];
          set_bit_sums<RB>(row, m, a.in_words, vb, s_in);
          const float wa = a.scale_in * load_fp(a.inlier_norms.ptr, a.inlier_norms.offset(b, h, g) + pos, a.inlier_kind);
          float wb = 0.f;
          if (with_outliers) {
            const uint8_t* orow = static_cast<const uint8_t*>(a.outlier_bits.ptr) + a.outlier_bits.offset(b, h, g) +
                                  static_cast<int64_t>(pos) * (m_o >> 3);
            set_bit_sums<RB>(orow, m_o, a.out_words, vb + m * RB, s_out);
            wb = a.scale_out * load_fp(a.outlier_norms.ptr, a.outlier_norms.offset(b, h, g) + pos, a.outlier_kind);
          } else {
#pragma unroll
            for (int rr = 0; rr < RB; ++rr) s_out[rr] = 0.f;
          }
#pragma unroll
          for (int rr = 0; rr < RB; ++rr) {
            const int r = r0 + rr;
            if (r >= rows) break;
            const float score = wa * (2.f * s_in[rr] - s_sumv[buf * RB + rr]) +
                                wb * (2.f * s_out[rr] - s_sumu[buf * RB + rr]);
            const int l = (r_first + r) % a.L;
            const bool visible = a.mask != nullptr ? a.mask[b * a.ms0 + l * a.ms1 + tok * a.ms2] != 0
                                                   : tok <= a.T - a.L + l;
            lg[r * kLgPitch + tid] = visible ? score * a.logit_scale : kMaskedLogit;
          }
        }
        if (passes > 1) __syncthreads();  // the next pass rebuilds the buffers
      }
    } else if (tid < n) {  // residual keys: exact q . k
      const int64_t tok = t + tid;
      const int64_t k_off = a.residual.offset(b, h, tok - a.T_c);
      for (int r0 = 0; r0 < rows; r0 += RB) {
        float dot[RB];
#pragma unroll
        for (int rr = 0; rr < RB; ++rr) dot[rr] = 0.f;
        for (int c = 0; c < d; ++c) {
          const float k = load_fp(a.residual.ptr, k_off + c, a.residual_kind);
#pragma unroll
          for (int rr = 0; rr < RB; ++rr) dot[rr] = fmaf(q_s[(r0 + rr) * d + c], k, dot[rr]);
        }
#pragma unroll
        for (int rr = 0; rr < RB; ++rr) {
          const int r = r0 + rr;
          if (r >= rows) break;
          const int l = (r_first + r) % a.L;
          const bool visible = a.mask != nullptr ? a.mask[b * a.ms0 + l * a.ms1 + tok * a.ms2] != 0
                                                 : tok <= a.T - a.L + l;
          lg[r * kLgPitch + tid] = visible ? dot[rr] * a.logit_scale : kMaskedLogit;
        }
      }
    }
    __syncthreads();

    // ---- 2. online softmax: probabilities in place, running max / sum, rescale factor ----
    for (int r = warp; r < rows; r += kThreads / 32) {
      float* row = lg + r * kLgPitch;
      float mx = kMaskedLogit;
      for (int tt = lane; tt < n; tt += 32) mx = fmaxf(mx, row[tt]);
      const float old_max = s_max[r];
      const float new_max = fmaxf(old_max, warp_max(mx));
      float sum = 0.f;
      for (int tt = lane; tt < n; tt += 32) {
        const float p = exp2f(row[tt] - new_max);  // masked: exp2(-FLT_MAX - max) = 0, or 1 if all masked
        row[tt] = p;
        sum += p;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float alpha = exp2f(old_max - new_max);
        s_alpha[r] = alpha;
        s_sum[r] = s_sum[r] * alpha + sum;
        s_max[r] = new_max;
      }
    }
    __syncthreads();

    // ---- 3. values ----
    if (v_active) {
#pragma unroll
      for (int ra = 0; ra < RA; ++ra) {
        const int r = vrg * RA + ra;
        const float alpha = r < rows ? s_alpha[r] : 1.f;
        if (alpha != 1.f) {
          zacc[ra] *= alpha;
#pragma unroll
          for (int j = 0; j < kCodes; ++j) acc[ra][j] *= alpha;
        }
      }
      // Quantized tokens [0, q_end) of the tile, then window tokens; pointers advance by `slots`
      // tokens, the dtype of scales / mins is fixed per launch (no per-token offsets or switches).
      const int q_end = static_cast<int>(max(static_cast<int64_t>(0), min(static_cast<int64_t>(n), a.T_q - t)));
      const float* p_row = lg + vrg * RA * kLgPitch;
      if (slot < q_end) {
        const int64_t tok0 = t + slot;
        const int32_t* codes = static_cast<const int32_t*>(a.codes.ptr) + a.codes.offset(b, h, tok0) + (vu >> 1);
        const int64_t code_step = slots * a.codes.s2;
        const int shift = (vu & 1) * 16;
        if (one_group) {
          const int grp = vu * kCodes / a.value_group;
          int64_t s_off = a.scales.offset(b, h, tok0) + grp, z_off = a.mins.offset(b, h, tok0) + grp;
          const int64_t s_step = slots * a.scales.s2, z_step = slots * a.mins.s2;
          if (a.scale_kind == Fp::kBFloat16 && a.min_kind == Fp::kBFloat16) {
            add_quantized<BITS, RA>(static_cast<const __nv_bfloat16*>(a.scales.ptr) + s_off,
                                    static_cast<const __nv_bfloat16*>(a.mins.ptr) + z_off, s_step, z_step, codes,
                                    code_step, shift, magic, p_row, slot, q_end, slots, acc, zacc);
          } else if (a.scale_kind == Fp::kHalf && a.min_kind == Fp::kHalf) {
            add_quantized<BITS, RA>(static_cast<const __half*>(a.scales.ptr) + s_off,
                                    static_cast<const __half*>(a.mins.ptr) + z_off, s_step, z_step, codes, code_step,
                                    shift, magic, p_row, slot, q_end, slots, acc, zacc);
          } else if (a.scale_kind == Fp::kFloat && a.min_kind == Fp::kFloat) {
            add_quantized<BITS, RA>(static_cast<const float*>(a.scales.ptr) + s_off,
                                    static_cast<const float*>(a.mins.ptr) + z_off, s_step, z_step, codes, code_step,
                                    shift, magic, p_row, slot, q_end, slots, acc, zacc);
          } else {  // scales and mins in different dtypes
            for (int tt = slot; tt < q_end; tt += slots, codes += code_step, s_off += s_step, z_off += z_step) {
              const float s = load_fp(a.scales.ptr, s_off, a.scale_kind), z = load_fp(a.mins.ptr, z_off, a.min_kind);
              float ps[RA];
#pragma unroll
              for (int ra = 0; ra < RA; ++ra) {
                const float pr = p_row[ra * kLgPitch + tt];
                ps[ra] = pr * s;
                zacc[ra] = fmaf(pr, z, zacc[ra]);
              }
              add_codes<BITS, RA>(static_cast<uint32_t>(__ldg(codes)) >> shift, magic, ps, acc);
            }
          }
        } else {  // the unit spans value groups: dequantize per channel, as the reference rounds
          int64_t s_off = a.scales.offset(b, h, tok0), z_off = a.mins.offset(b, h, tok0);
          const int64_t s_step = slots * a.scales.s2, z_step = slots * a.mins.s2;
          for (int tt = slot; tt < q_end; tt += slots, codes += code_step, s_off += s_step, z_off += z_step) {
            const uint32_t half = static_cast<uint32_t>(__ldg(codes)) >> shift;
#pragma unroll
            for (int j = 0; j < kCodes; ++j) {
              const int grp = (vu * kCodes + j) / a.value_group;
              const float s = load_fp(a.scales.ptr, s_off + grp, a.scale_kind);
              const float z = load_fp(a.mins.ptr, z_off + grp, a.min_kind);
              const float code = static_cast<float>((half >> (BITS * j)) & ((1u << BITS) - 1u));
              const float x = __fadd_rn(__fmul_rn(code, s), z) * pow2(BITS * j);
#pragma unroll
              for (int ra = 0; ra < RA; ++ra) {
                const float pr = p_row[ra * kLgPitch + tt];
                acc[ra][j] = fmaf(pr, x, acc[ra][j]);
              }
            }
          }
        }
      }
      // The exact window: tokens [q_end, n) of the tile in this thread's slot.
      const int w_first = q_end <= slot ? slot : slot + (q_end - slot + slots - 1) / slots * slots;
      for (int tt = w_first; tt < n; tt += slots) {
        const int64_t w_off = a.window.offset(b, h, t + tt - a.T_q);
#pragma unroll
        for (int j = 0; j < kCodes; ++j) {
          const int c = vu * kCodes + j;
          if (c < d) {
            const float x = load_fp(a.window.ptr, w_off + c, a.window_kind) * pow2(BITS * j);
#pragma unroll
            for (int ra = 0; ra < RA; ++ra) {
              const float pr = p_row[ra * kLgPitch + tt];
              acc[ra][j] = fmaf(pr, x, acc[ra][j]);
            }
          }
        }
      }
    }
    t += n;
  }

  // ---- sum the token slots: [accumulator][thread], pitch = units (mod 32): no bank conflicts ----
  __syncthreads();
  float* red = smem + off.red;
  const int pitch = kThreads + (units & 31);
  if (tid < slots * units * groups) {
#pragma unroll
    for (int ra = 0; ra < RA; ++ra)
#pragma unroll
      for (int j = 0; j < kCodes; ++j) red[(ra * kCodes + j) * pitch + tid] = acc[ra][j] * pow2(-BITS * j) + zacc[ra];
  }
  __syncthreads();
  const int per_group = RA * kCodes;
  for (int e = tid; e < groups * per_group * units; e += kThreads) {
    const int u = e % units, ai = (e / units) % per_group, g = e / (units * per_group);
    const int r = g * RA + ai / kCodes, c = u * kCodes + ai % kCodes;
    if (r >= rows || c >= d) continue;
    float sum = 0.f;
    for (int s = 0; s < slots; ++s) sum += red[ai * pitch + (s * groups + g) * units + u];
    const int64_t row = row_base + r;
    if (n_splits == 1) {
      a.out[row * d + c] = sum / s_sum[r];
    } else {
      a.part_acc[(static_cast<int64_t>(split) * rows_total + row) * d + c] = sum;
    }
  }
  if (n_splits > 1 && tid < rows) {
    a.part_max[static_cast<int64_t>(split) * rows_total + row_base + tid] = s_max[tid];
    a.part_sum[static_cast<int64_t>(split) * rows_total + row_base + tid] = s_sum[tid];
  }
}

// out[row] = sum_s 2^(max_s - M) acc_s / sum_s 2^(max_s - M) sum_s, M = max_s max_s.
__global__ void __launch_bounds__(128) decode_merge_kernel(const DecodeArgs a, int64_t rows_total) {
  const int64_t row = blockIdx.x;
  const int64_t splits = a.splits;
  float mx = kMaskedLogit;
  for (int64_t s = 0; s < splits; ++s) mx = fmaxf(mx, a.part_max[s * rows_total + row]);
  float total = 0.f;
  for (int64_t s = 0; s < splits; ++s) total += exp2f(a.part_max[s * rows_total + row] - mx) * a.part_sum[s * rows_total + row];
  const float inv = 1.f / total;
  for (int c = threadIdx.x; c < a.d; c += blockDim.x) {
    float acc = 0.f;
    for (int64_t s = 0; s < splits; ++s) {
      acc += exp2f(a.part_max[s * rows_total + row] - mx) * a.part_acc[(s * rows_total + row) * a.d + c];
    }
    a.out[row * a.d + c] = acc * inv;
  }
}

template <int BITS, int RA>
bool launch_with(const DecodeArgs& a, const DecodeLayout& l, cudaStream_t stream) {
  auto kernel = decode_kernel<BITS, RA>;
  if (l.bytes > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(l.bytes)) !=
          cudaSuccess) {
    return false;
  }
  const int64_t blocks = a.splits * a.row_chunks * a.B * a.H_kv;
  kernel<<<static_cast<unsigned>(blocks), kThreads, l.bytes, stream>>>(a, l, 0x4B000000u);
  return true;
}

}  // namespace

bool decode_layout(const DecodeArgs& a, size_t max_bytes, DecodeLayout* layout) {
  DecodeLayout l{};
  const int cap = decode_max_row_accumulators(a.value_bits);
  l.row_accumulators = 1;
  while (l.row_accumulators < a.rows_per_block && l.row_accumulators < cap) l.row_accumulators *= 2;
  l.rows_per_pass = a.tensor_cores || l.row_accumulators >= 4 ? 4 : l.row_accumulators;
  const int per_unit = 16 / a.value_bits;
  l.value_units = (a.d + per_unit - 1) / per_unit;
  l.row_groups = (a.rows_per_block + l.row_accumulators - 1) / l.row_accumulators;
  if (l.value_units * l.row_groups > kDecodeThreads) return false;
  l.value_slots = kDecodeThreads / (l.value_units * l.row_groups);
  // v / u per group: float32 [coordinate][rows_per_pass], or the tensor cores' B fragments
  // ((m + m_o) / 16 k-steps of kFragPitch uint2).
  l.v_floats = a.tensor_cores ? (a.m + a.m_o) / 16 * kFragPitch * 2 : (a.m + a.m_o) * l.rows_per_pass;
  int buffers;
  if (a.n_out == 0) {
    buffers = 1;
    l.tile_groups = a.G <= kDecodeTile ? kDecodeTile / a.G : 1;
  } else {
    buffers = a.G < kDecodeTile ? std::min(kMaxGroupBuffers, kDecodeTile / a.G) : 1;
  }
  for (;; --buffers) {
    l.group_buffers = buffers;
    if (a.n_out > 0) l.tile_groups = buffers;
    l.bytes = static_cast<size_t>(offsets(a, l).total) * sizeof(float);
    if (buffers == 1 || l.bytes <= kPreferredSmem) break;
  }
  *layout = l;
  return l.bytes <= max_bytes;
}

bool launch_decode_attention(const DecodeArgs& a, const DecodeLayout& l, cudaStream_t stream) {
  switch (a.value_bits * 16 + l.row_accumulators) {
    case 2 * 16 + 1:
      return launch_with<2, 1>(a, l, stream);
    case 2 * 16 + 2:
      return launch_with<2, 2>(a, l, stream);
    case 2 * 16 + 4:
      return launch_with<2, 4>(a, l, stream);
    case 4 * 16 + 1:
      return launch_with<4, 1>(a, l, stream);
    case 4 * 16 + 2:
      return launch_with<4, 2>(a, l, stream);
    case 4 * 16 + 4:
      return launch_with<4, 4>(a, l, stream);
    case 4 * 16 + 8:
      return launch_with<4, 8>(a, l, stream);
    default:
      return false;
  }
}

void launch_decode_merge(const DecodeArgs& a, cudaStream_t stream) {
  const int64_t rows_total = static_cast<int64_t>(a.B) * a.H_kv * a.ratio * a.L;
  decode_merge_kernel<<<static_cast<unsigned>(rows_total), 128, 0, stream>>>(a, rows_total);
}

}  // namespace qjl
