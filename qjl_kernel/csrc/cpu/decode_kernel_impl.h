// The fused CPU decode-attention task, written once and compiled per instruction set.
//
// Included by decode_kernel_{scalar,avx2,avx512}.cpp after they set QJL_ISA_LEVEL (0, 1, 2), the
// target pragma and QJL_TASK_NAME. Everything here has internal linkage (anonymous namespace) except
// the entry point, so nothing compiled for AVX-512 can be linked into a caller that runs elsewhere.
//
// Per task (batch b, KV head h, tokens [t0, t1)) and for all query rows of that KV head at once:
//  1. logits of committed keys straight from the sign bits: <v, sign(Sk)> = 2 * sum(v_i : bit_i = 1)
//     - sum(v), with v = S q_in per group (S q minus the group's outlier columns times q_O), plus the
//     outlier sketch term; one read of a key's bits serves every query row of the KV head (GQA);
//  2. logits of residual keys exactly; scaling and mask;
//  3. max, exp, sum (the task's part of an online softmax; the host merges tasks by log-sum-exp);
//  4. values: 2/4-bit codes dequantized in registers (code * scale + min), window values read
//     as they are, accumulated with the unnormalized probabilities.
#pragma once

#include <cstdint>
#include <cstring>

#if QJL_ISA_LEVEL > 0
#include <immintrin.h>
#endif

#include "decode_kernel.h"

namespace qjl {
namespace cpu {
namespace {

constexpr float kLowest = -3.40282346638528859811704183484516925e+38f;  // -FLT_MAX: a masked logit
constexpr int kLanes = 16;                                               // partial sums of dot()
constexpr int64_t kValueBlock = 32;  // tokens whose values are dequantized together

// Where batch b, KV head h's part of a HeadStrided tensor starts.
template <typename T>
inline const T* head_part(const HeadStrided<T>& x, int64_t b, int64_t h) {
  return x.data + b * x.batch_stride + h * x.head_stride;
}

inline int32_t float_bits(float x) {
  int32_t i;
  std::memcpy(&i, &x, 4);
  return i;
}

inline float bits_float(int32_t i) {
  float x;
  std::memcpy(&x, &i, 4);
  return x;
}

// exp(x) for x <= 0 within ~2 ulp (Cephes expf polynomial); 0 below -87.3. Branch-free, so loops
// of it vectorize.
inline float exp_nonpositive(float x) {
  const bool underflow = x < -87.3365f;
  x = underflow ? -87.3365f : x;
  const float shifter = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  const int32_t ni = float_bits(t) - float_bits(shifter);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.f;
  const float result = y * bits_float((ni + 127) << 23);
  return underflow ? 0.f : result;
}

// sum a[i] * b[i] with kLanes independent partial sums (vectorizes without reassociation flags).
inline float dot(const float* a, const float* b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] += a[i + j] * b[i + j];
  }
  float total = 0.f;
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// ---------------------------------------------------------------------------------------------
// Per-ISA primitives.
//
// weighted_masked_sums<NR>: for NR query rows sharing one key's bit strings,
//   out[r] = wa * sum(v[r][i] : bit i of `bits` set) + wb * sum(u[r][i] : bit i of `obits` set),
// bits least significant first; m and m_o are multiples of 8 (m_o may be 0). The bits are read once
// for all rows, and the two sums are combined before the one horizontal reduction per row.
// dequantize_word<BITS>: the 32 / BITS codes of one int32 word -> code * s + z.
// accumulate_rows: acc[0..d) += sum_i p[i] * value[i][0..d), accumulators held in registers.
#if QJL_ISA_LEVEL == 2
inline float reduce(__m512 x) { return _mm512_reduce_add_ps(x); }

template <int NR>
inline void weighted_masked_sums(const float* const* v, const uint8_t* bits, int64_t m, float wa,
                                 const float* const* u, const uint8_t* obits, int64_t m_o, float wb, float* out) {
  __m512 acc[NR], oacc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = oacc[r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= m; i += 16) {
    uint16_t word;
    std::memcpy(&word, bits + i / 8, 2);
    const __mmask16 k = static_cast<__mmask16>(word);
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_mask_add_ps(acc[r], k, acc[r], _mm512_loadu_ps(v[r] + i));
  }
  if (i < m) {  // one byte left
    const __mmask16 k = static_cast<__mmask16>(bits[i / 8]);
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_mask_add_ps(acc[r], k, acc[r], _mm512_maskz_loadu_ps(0xFF, v[r] + i));
  }
  for (i = 0; i + 16 <= m_o; i += 16) {
    uint16_t word;
    std::memcpy(&word, obits + i / 8, 2);
    const __mmask16 k = static_cast<__mmask16>(word);
    for (int r = 0; r < NR; ++r) oacc[r] = _mm512_mask_add_ps(oacc[r], k, oacc[r], _mm512_loadu_ps(u[r] + i));
  }
  if (i < m_o) {
    const __mmask16 k = static_cast<__mmask16>(obits[i / 8]);
    for (int r = 0; r < NR; ++r) oacc[r] = _mm512_mask_add_ps(oacc[r], k, oacc[r], _mm512_maskz_loadu_ps(0xFF, u[r] + i));
  }
  const __m512 a = _mm512_set1_ps(wa), b = _mm512_set1_ps(wb);
  for (int r = 0; r < NR; ++r) out[r] = reduce(_mm512_fmadd_ps(oacc[r], b, _mm512_mul_ps(acc[r], a)));
}

// The sums of four vectors: lane j of the result is the sum of the 16 lanes of x[j].
inline __m128 reduce4(__m512 x0, __m512 x1, __m512 x2, __m512 x3) {
  // 512 -> 256 bits per vector, two vectors per register: [x0 halves summed | x1 halves summed]
  const __m512 t01 = _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, 0x44), _mm512_shuffle_f32x4(x0, x1, 0xEE));
  const __m512 t23 = _mm512_add_ps(_mm512_shuffle_f32x4(x2, x3, 0x44), _mm512_shuffle_f32x4(x2, x3, 0xEE));
  // 256 -> 128 bits: 128-bit lane j holds four partial sums of x[j]
  const __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(t01, t23, 0x88), _mm512_shuffle_f32x4(t01, t23, 0xDD));
  // within each 128-bit lane
  __m512 r = _mm512_add_ps(q, _mm512_permute_ps(q, 0xB1));
  r = _mm512_add_ps(r, _mm512_permute_ps(r, 0x4E));
  return _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, r));
}

constexpr int kTokenBlock = 4;  // keys scored together: independent add chains, shared query loads

// Accumulate, for NR rows and kTokenBlock keys, the masked sums of one bit string into acc.
template <int NR>
inline void masked_pass(const float* const* v, const uint8_t* bits, int64_t stride, int64_t m,
                        __m512 (&acc)[NR][kTokenBlock]) {
  const __m512 one = _mm512_set1_ps(1.f);
  int64_t i = 0;
  for (; i + 16 <= m; i += 16) {
    __mmask16 k[kTokenBlock];  // loaded straight into mask registers (kmovw from memory)
    for (int j = 0; j < kTokenBlock; ++j) k[j] = _load_mask16(reinterpret_cast<__mmask16*>(const_cast<uint8_t*>(bits + j * stride + i / 8)));
    for (int r = 0; r < NR; ++r) {
      const __m512 x = _mm512_loadu_ps(v[r] + i);
      // Half of the masked adds run as masked x * 1 + acc (the same exactly rounded sum) so that
      // they issue on the FMA pipes while the others use the add pipes.
      for (int j = 0; j < kTokenBlock; j += 2) {
        acc[r][j] = _mm512_mask_add_ps(acc[r][j], k[j], acc[r][j], x);
        acc[r][j + 1] = _mm512_mask3_fmadd_ps(x, one, acc[r][j + 1], k[j + 1]);
      }
    }
  }
  if (i < m) {  // one byte left
    for (int r = 0; r < NR; ++r) {
      const __m512 x = _mm512_maskz_loadu_ps(0xFF, v[r] + i);
      for (int j = 0; j < kTokenBlock; ++j) {
        const __mmask16 k = static_cast<__mmask16>(bits[j * stride + i / 8]);
        acc[r][j] = _mm512_mask_add_ps(acc[r][j], k, acc[r][j], x);
      }
    }
  }
}

// For NR rows and kTokenBlock keys: out[r * kTokenBlock + j] = wa[j] * S_in + wb[j] * S_out, the
// weighted sums of v[r] over the inlier bits and of u[r] over the outlier bits (m_o may be 0).
// The inlier pass's vectors wait in memory, scaled, while the outlier pass runs, so each pass
// holds only NR x kTokenBlock accumulators; one reduction per row and key.
template <int NR>
inline void weighted_sums_block(const float* const* v, const uint8_t* bits, int64_t stride, int64_t m, const float* wa,
                                const float* const* u, const uint8_t* obits, int64_t ostride, int64_t m_o,
                                const float* wb, float* out) {
  __m512 acc[NR][kTokenBlock];
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < kTokenBlock; ++j) acc[r][j] = _mm512_setzero_ps();
  masked_pass<NR>(v, bits, stride, m, acc);
  if (m_o > 0) {
    alignas(64) float partial[NR][kTokenBlock][16];
    for (int r = 0; r < NR; ++r) {
      for (int j = 0; j < kTokenBlock; ++j) {
        _mm512_store_ps(partial[r][j], _mm512_mul_ps(acc[r][j], _mm512_set1_ps(wa[j])));
        acc[r][j] = _mm512_setzero_ps();
      }
    }
    asm volatile("" ::: "memory");  // keep the partial sums in memory during the second pass
    masked_pass<NR>(u, obits, ostride, m_o, acc);
    for (int r = 0; r < NR; ++r) {
      for (int j = 0; j < kTokenBlock; ++j) {
        acc[r][j] = _mm512_fmadd_ps(acc[r][j], _mm512_set1_ps(wb[j]), _mm512_load_ps(partial[r][j]));
      }
      _mm_storeu_ps(out + r * kTokenBlock, reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
    }
    return;
  }
  const __m128 scale = _mm_loadu_ps(wa);
  for (int r = 0; r < NR; ++r) {
    _mm_storeu_ps(out + r * kTokenBlock, _mm_mul_ps(scale, reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3])));
  }
}

template <int BITS>
inline void dequantize_word(uint32_t word, float s, float z, float* out) {
  if (BITS == 2) {
    const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i codes = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(word)), shifts),
                                           _mm512_set1_epi32(3));
    _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(codes), _mm512_set1_ps(s), _mm512_set1_ps(z)));
  } else {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i codes = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts),
                                           _mm256_set1_epi32(15));
    _mm256_storeu_ps(out, _mm256_fmadd_ps(_mm256_cvtepi32_ps(codes), _mm256_set1_ps(s), _mm256_set1_ps(z)));
  }
}

inline void accumulate_rows(const float* p, int64_t n, const float* const* value, int64_t d, float* acc) {
  int64_t c = 0;
  for (; c + 64 <= d; c += 64) {
    // Even and odd tokens accumulate separately: eight independent FMA chains.
    __m512 a0 = _mm512_loadu_ps(acc + c), a1 = _mm512_loadu_ps(acc + c + 16);
    __m512 a2 = _mm512_loadu_ps(acc + c + 32), a3 = _mm512_loadu_ps(acc + c + 48);
    __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps(), b2 = _mm512_setzero_ps(), b3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 2 <= n; i += 2) {
      const __m512 w = _mm512_set1_ps(p[i]), u = _mm512_set1_ps(p[i + 1]);
      const float* x = value[i] + c;
      const float* y = value[i + 1] + c;
      a0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x), a0);
      a1 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 16), a1);
      a2 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 32), a2);
      a3 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 48), a3);
      b0 = _mm512_fmadd_ps(u, _mm512_loadu_ps(y), b0);
      b1 = _mm512_fmadd_ps(u, _mm512_loadu_ps(y + 16), b1);
      b2 = _mm512_fmadd_ps(u, _mm512_loadu_ps(y + 32), b2);
      b3 = _mm512_fmadd_ps(u, _mm512_loadu_ps(y + 48), b3);
    }
    if (i < n) {
      const __m512 w = _mm512_set1_ps(p[i]);
      const float* x = value[i] + c;
      a0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x), a0);
      a1 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 16), a1);
      a2 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 32), a2);
      a3 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 48), a3);
    }
    _mm512_storeu_ps(acc + c, _mm512_add_ps(a0, b0));
    _mm512_storeu_ps(acc + c + 16, _mm512_add_ps(a1, b1));
    _mm512_storeu_ps(acc + c + 32, _mm512_add_ps(a2, b2));
    _mm512_storeu_ps(acc + c + 48, _mm512_add_ps(a3, b3));
  }
  for (; c < d; c += 16) {
    const __mmask16 k = d - c >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (d - c)) - 1u);
    __m512 a0 = _mm512_maskz_loadu_ps(k, acc + c);
    for (int64_t i = 0; i < n; ++i) a0 = _mm512_fmadd_ps(_mm512_set1_ps(p[i]), _mm512_maskz_loadu_ps(k, value[i] + c), a0);
    _mm512_mask_storeu_ps(acc + c, k, a0);
  }
}
#elif QJL_ISA_LEVEL == 1
inline float reduce(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// The 8 bits of a byte as an all-ones / all-zeros float mask per lane.
inline __m256 byte_mask(uint8_t byte) {
  const __m256i select = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i b = _mm256_set1_epi32(byte);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b, select), select));
}

template <int NR>
inline void weighted_masked_sums(const float* const* v, const uint8_t* bits, int64_t m, float wa,
                                 const float* const* u, const uint8_t* obits, int64_t m_o, float wb, float* out) {
  __m256 acc[NR], oacc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = oacc[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < m; i += 8) {
    const __m256 keep = byte_mask(bits[i / 8]);
    for (int r = 0; r < NR; ++r) acc[r] = _mm256_add_ps(acc[r], _mm256_and_ps(keep, _mm256_loadu_ps(v[r] + i)));
  }
  for (int64_t i = 0; i < m_o; i += 8) {
    const __m256 keep = byte_mask(obits[i / 8]);
    for (int r = 0; r < NR; ++r) oacc[r] = _mm256_add_ps(oacc[r], _mm256_and_ps(keep, _mm256_loadu_ps(u[r] + i)));
  }
  const __m256 a = _mm256_set1_ps(wa), b = _mm256_set1_ps(wb);
  for (int r = 0; r < NR; ++r) out[r] = reduce(_mm256_fmadd_ps(oacc[r], b, _mm256_mul_ps(acc[r], a)));
}

template <int BITS>
inline void dequantize_word(uint32_t word, float s, float z, float* out) {
  const __m256i w = _mm256_set1_epi32(static_cast<int>(word));
  const __m256 scale = _mm256_set1_ps(s), zero = _mm256_set1_ps(z);
  if (BITS == 2) {
    const __m256i lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
    const __m256i three = _mm256_set1_epi32(3);
    const __m256 c_lo = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(w, lo), three));
    const __m256 c_hi = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(w, hi), three));
    _mm256_storeu_ps(out, _mm256_fmadd_ps(c_lo, scale, zero));
    _mm256_storeu_ps(out + 8, _mm256_fmadd_ps(c_hi, scale, zero));
  } else {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i codes = _mm256_and_si256(_mm256_srlv_epi32(w, shifts), _mm256_set1_epi32(15));
    _mm256_storeu_ps(out, _mm256_fmadd_ps(_mm256_cvtepi32_ps(codes), scale, zero));
  }
}

inline void accumulate_rows(const float* p, int64_t n, const float* const* value, int64_t d, float* acc) {
  int64_t c = 0;
  for (; c + 32 <= d; c += 32) {
    __m256 a0 = _mm256_loadu_ps(acc + c), a1 = _mm256_loadu_ps(acc + c + 8);
    __m256 a2 = _mm256_loadu_ps(acc + c + 16), a3 = _mm256_loadu_ps(acc + c + 24);
    for (int64_t i = 0; i < n; ++i) {
      const __m256 w = _mm256_set1_ps(p[i]);
      const float* x = value[i] + c;
      a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x), a0);
      a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 8), a1);
      a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 16), a2);
      a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 24), a3);
    }
    _mm256_storeu_ps(acc + c, a0);
    _mm256_storeu_ps(acc + c + 8, a1);
    _mm256_storeu_ps(acc + c + 16, a2);
    _mm256_storeu_ps(acc + c + 24, a3);
  }
  for (; c < d; ++c) {
    float x = acc[c];
    for (int64_t i = 0; i < n; ++i) x += p[i] * value[i][c];
    acc[c] = x;
  }
}
#else
template <int NR>
inline void weighted_masked_sums(const float* const* v, const uint8_t* bits, int64_t m, float wa,
                                 const float* const* u, const uint8_t* obits, int64_t m_o, float wb, float* out) {
  for (int r = 0; r < NR; ++r) {
    float in[8] = {}, ou[8] = {};
    for (int64_t i = 0; i < m; i += 8) {
      const uint32_t byte = bits[i / 8];
      for (int j = 0; j < 8; ++j) in[j] += ((byte >> j) & 1u) ? v[r][i + j] : 0.f;
    }
    for (int64_t i = 0; i < m_o; i += 8) {
      const uint32_t byte = obits[i / 8];
      for (int j = 0; j < 8; ++j) ou[j] += ((byte >> j) & 1u) ? u[r][i + j] : 0.f;
    }
    float total = 0.f;
    for (int j = 0; j < 8; ++j) total += wa * in[j] + wb * ou[j];
    out[r] = total;
  }
}

template <int BITS>
inline void dequantize_word(uint32_t word, float s, float z, float* out) {
  constexpr int kPerWord = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  for (int j = 0; j < kPerWord; ++j) out[j] = static_cast<float>((word >> (j * BITS)) & kMask) * s + z;
}

inline void accumulate_rows(const float* p, int64_t n, const float* const* value, int64_t d, float* acc) {
  for (int64_t i = 0; i < n; ++i) {
    const float w = p[i];
    const float* x = value[i];
    for (int64_t c = 0; c < d; ++c) acc[c] += w * x[c];
  }
}
#endif

// weighted_masked_sums over any number of rows, in blocks of up to 4 rows.
inline void weighted_masked_sums_rows(const float* const* v, const float* const* u, int64_t rows, const uint8_t* bits,
                                      int64_t m, float wa, const uint8_t* obits, int64_t m_o, float wb, float* out) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) weighted_masked_sums<4>(v + r, bits, m, wa, u + r, obits, m_o, wb, out + r);
  switch (rows - r) {
    case 3:
      weighted_masked_sums<3>(v + r, bits, m, wa, u + r, obits, m_o, wb, out + r);
      break;
    case 2:
      weighted_masked_sums<2>(v + r, bits, m, wa, u + r, obits, m_o, wb, out + r);
      break;
    case 1:
      weighted_masked_sums<1>(v + r, bits, m, wa, u + r, obits, m_o, wb, out + r);
      break;
    default:
      break;
  }
}

#if QJL_ISA_LEVEL == 2
// weighted_sums_block over any number of rows, in blocks of up to 4 rows.
inline void weighted_sums_block_rows(const float* const* v, const float* const* u, int64_t rows, const uint8_t* bits,
                                     int64_t stride, int64_t m, const float* wa, const uint8_t* obits,
                                     int64_t ostride, int64_t m_o, const float* wb, float* out) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    weighted_sums_block<4>(v + r, bits, stride, m, wa, u + r, obits, ostride, m_o, wb, out + r * kTokenBlock);
  }
  switch (rows - r) {
    case 3:
      weighted_sums_block<3>(v + r, bits, stride, m, wa, u + r, obits, ostride, m_o, wb, out + r * kTokenBlock);
      break;
    case 2:
      weighted_sums_block<2>(v + r, bits, stride, m, wa, u + r, obits, ostride, m_o, wb, out + r * kTokenBlock);
      break;
    case 1:
      weighted_sums_block<1>(v + r, bits, stride, m, wa, u + r, obits, ostride, m_o, wb, out + r * kTokenBlock);
      break;
    default:
      break;
  }
}
#endif

constexpr int kSketchRows = 4;  // query rows whose u and v are formed together (one read of each column)

// For rows r < NR: acc_r = sum_k coef[r][k] S^T[channels[k]], then v_r = base_v[r] - acc_r over m
// entries and u_r = base_u[r] + acc_r over the first mu (base_u null: u_r = acc_r). With base_v = S q,
// no base_u and coef = q over a group's outlier channels O: u = S[:, O] q_O and v = S q - u = S q_in.
// With a channel set C's u and v as bases and the channels where O and C differ (coef +q for those
// added to C, -q for those removed): the same u and v, from fewer columns. Each column is read once
// for all rows.
template <int NR>
inline void outlier_sketch(const float (*coef)[256], const uint8_t* channels, int64_t n, const float* projection_t,
                           int64_t m, int64_t mu, const float* const* base_v, const float* const* base_u,
                           float* const* u, float* const* v) {
#if QJL_ISA_LEVEL == 2
  for (int64_t i = 0; i < m; i += 16) {
    const __mmask16 k = m - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (m - i)) - 1u);
    __m512 acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t o = 0; o < n; ++o) {
      const __m512 col = _mm512_maskz_loadu_ps(k, projection_t + channels[o] * m + i);
      for (int r = 0; r < NR; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(coef[r][o]), col, acc[r]);
    }
    for (int r = 0; r < NR; ++r) _mm512_mask_storeu_ps(v[r] + i, k, _mm512_sub_ps(_mm512_maskz_loadu_ps(k, base_v[r] + i), acc[r]));
    if (i < mu) {
      const __mmask16 ku = mu - i >= 16 ? k : static_cast<__mmask16>(k & ((1u << (mu - i)) - 1u));
      for (int r = 0; r < NR; ++r) {
        const __m512 x = base_u[r] != nullptr ? _mm512_add_ps(_mm512_maskz_loadu_ps(ku, base_u[r] + i), acc[r]) : acc[r];
        _mm512_mask_storeu_ps(u[r] + i, ku, x);
      }
    }
  }
#else
  for (int64_t i = 0; i < m; i += kLanes) {  // kLanes entries at a time, held in registers
    const int64_t width = m - i < kLanes ? m - i : kLanes;
    for (int r = 0; r < NR; ++r) {
      float lanes[kLanes] = {};
      for (int64_t o = 0; o < n; ++o) {
        const float* col = projection_t + channels[o] * m + i;
        for (int64_t j = 0; j < width; ++j) lanes[j] += coef[r][o] * col[j];
      }
      for (int64_t j = 0; j < width; ++j) {
        v[r][i + j] = base_v[r][i + j] - lanes[j];
        if (i + j < mu) u[r][i + j] = base_u[r] != nullptr ? base_u[r][i + j] + lanes[j] : lanes[j];
      }
    }
  }
#endif
}

// outlier_sketch for any nr <= kSketchRows rows.
inline void outlier_sketch_rows(int64_t nr, const float (*coef)[256], const uint8_t* channels, int64_t n,
                                const float* projection_t, int64_t m, int64_t mu, const float* const* base_v,
                                const float* const* base_u, float* const* u, float* const* v) {
  switch (nr) {
    case 4:
      outlier_sketch<4>(coef, channels, n, projection_t, m, mu, base_v, base_u, u, v);
      break;
    case 3:
      outlier_sketch<3>(coef, channels, n, projection_t, m, mu, base_v, base_u, u, v);
      break;
    case 2:
      outlier_sketch<2>(coef, channels, n, projection_t, m, mu, base_v, base_u, u, v);
      break;
    default:
      outlier_sketch<1>(coef, channels, n, projection_t, m, mu, base_v, base_u, u, v);
      break;
  }
}

// How many channels a 256-bit channel set holds.
inline int64_t channel_count(const uint64_t (&set)[4]) {
  return __builtin_popcountll(set[0]) + __builtin_popcountll(set[1]) + __builtin_popcountll(set[2]) +
         __builtin_popcountll(set[3]);
}

// ---------------------------------------------------------------------------------------------
// Logits of the committed tokens [t0, t1) (t1 <= committed) into logits[r * span + (t - base)].
inline void committed_logits(const DecodeArgs& a, int64_t b, int64_t h, int64_t t0, int64_t t1, int64_t base,
                             int64_t span, float* logits, float* v_buf, float* u_buf, float* base_v_buf,
                             float* base_u_buf) {
  const int64_t rows = a.rows, m = a.m, m_o = a.m_o, d = a.dim, bh = b * a.kv_heads + h;
  const float* q = a.query + bh * rows * d;
  const float* sq = a.query_sketch + bh * rows * m;
  const float* sq_sums = a.sketch_sums + bh * rows;
  const uint8_t* bits = head_part(a.bits, b, h);
  const uint8_t* obits = head_part(a.outlier_bits, b, h);
  const float* n_in = head_part(a.inlier_norms, b, h);
  const float* n_out = head_part(a.outlier_norms, b, h);
  const uint8_t* indices = head_part(a.outlier_indices, b, h);
  const bool outliers = a.n_out > 0;
  const bool outlier_term = outliers && m_o > 0;
  const int64_t bytes = m / 8, obytes = m_o / 8;

  constexpr int64_t kMaxRowsOnStack = 64;
  const float* v_rows[kMaxRowsOnStack];
  const float* u_rows[kMaxRowsOnStack];
  float v_total[kMaxRowsOnStack], u_total[kMaxRowsOnStack], sums[kMaxRowsOnStack];
  float base_v_total[kMaxRowsOnStack], base_u_total[kMaxRowsOnStack];

  // The base channel set C: the channels in more than half of the task's groups whose outlier
  // channels are distinct. Real keys' outlier channels persist only in part (SmolLM2: a group
  // rarely has the previous group's set, but differs from C in about 4 of 8 channels), so each
  // group's u and v are C's corrected by the channels where the group's set differs from C.
  uint64_t base_set[4] = {0, 0, 0, 0};
  uint8_t base_channels[256];
  int64_t n_base = 0;
  if (outliers) {
    int32_t counts[256] = {};
    int64_t distinct_groups = 0;
    for (int64_t n = t0 / a.group; n * a.group < t1; ++n) {
      const uint8_t* idx = indices + n * a.n_out;
      uint64_t set[4] = {0, 0, 0, 0};
      for (int64_t o = 0; o < a.n_out; ++o) set[idx[o] >> 6] |= 1ull << (idx[o] & 63);
      if (channel_count(set) != a.n_out) continue;
      ++distinct_groups;
      for (int64_t o = 0; o < a.n_out; ++o) ++counts[idx[o]];
    }
    for (int64_t c = 0; c < d; ++c) {
      if (2 * counts[c] > distinct_groups) {
        base_set[c >> 6] |= 1ull << (c & 63);
        base_channels[n_base++] = static_cast<uint8_t>(c);
      }
    }
  }

  float coef[kSketchRows][256];
  const float* from_v[kSketchRows];
  const float* from_u[kSketchRows];
  float* to_u[kSketchRows];
  float* to_v[kSketchRows];
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxRowsOnStack) {
    const int64_t nr = rows - r0 < kMaxRowsOnStack ? rows - r0 : kMaxRowsOnStack;
    // The base u and v of each row (none without a base set: v = S q, u = 0).
    for (int64_t rb = 0; rb < nr && n_base > 0; rb += kSketchRows) {
      const int64_t nb = nr - rb < kSketchRows ? nr - rb : kSketchRows;
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t r = rb + j;
        const float* qr = q + (r0 + r) * d;
        float sum_m = 0.f, sum_mo = 0.f;
        for (int64_t k = 0; k < n_base; ++k) {
          coef[j][k] = qr[base_channels[k]];
          sum_m += coef[j][k] * a.channel_sums_m[base_channels[k]];
          sum_mo += coef[j][k] * a.channel_sums_mo[base_channels[k]];
        }
        base_v_total[r] = sq_sums[r0 + r] - sum_m;
        base_u_total[r] = sum_mo;
        from_v[j] = sq + (r0 + r) * m;
        from_u[j] = nullptr;
        to_u[j] = base_u_buf + r * m;
        to_v[j] = base_v_buf + r * m;
      }
      outlier_sketch_rows(nb, coef, base_channels, n_base, a.projection_t, m, m_o, from_v, from_u, to_u, to_v);
    }
    int64_t t = t0;
    uint64_t previous[4] = {~0ull, ~0ull, ~0ull, ~0ull};  // channel set of the last group's u and v
    while (t < t1) {
      const int64_t n = t / a.group, group_end = (n + 1) * a.group < t1 ? (n + 1) * a.group : t1;
      // v = S q_in = S q - S[:, O] q_O and u = S[:, O] q_O for this group's outlier channels O:
      // kept when the group has the previous group's channels; else from the base set C when O
      // differs from C in fewer than |O| channels; else from O's own list (always so for a list
      // with a repeated channel, which counts twice in u, as in the reference).
      bool same_channels = false, from_base = false;
      int64_t n_diff = 0;
      float sign[256];
      uint8_t diff[256];
      const uint8_t* idx = indices + n * a.n_out;
      if (outliers) {
        uint64_t set[4] = {0, 0, 0, 0};
        for (int64_t o = 0; o < a.n_out; ++o) set[idx[o] >> 6] |= 1ull << (idx[o] & 63);
        const bool distinct = channel_count(set) == a.n_out;
        same_channels = distinct && set[0] == previous[0] && set[1] == previous[1] && set[2] == previous[2] &&
                        set[3] == previous[3];
        for (int i = 0; i < 4; ++i) previous[i] = distinct ? set[i] : ~0ull;
        if (distinct && n_base > 0 && !same_channels) {
          uint64_t added[4], removed[4];
          for (int i = 0; i < 4; ++i) {
            added[i] = set[i] & ~base_set[i];
            removed[i] = base_set[i] & ~set[i];
          }
          from_base = channel_count(added) + channel_count(removed) < a.n_out;
          for (int64_t c = 0; c < d && from_base; ++c) {
            const uint64_t bit = 1ull << (c & 63);
            if ((added[c >> 6] | removed[c >> 6]) & bit) {
              diff[n_diff] = static_cast<uint8_t>(c);
              sign[n_diff++] = (added[c >> 6] & bit) ? 1.f : -1.f;
            }
          }
        }
      }
      if (!outliers) {
        for (int64_t r = 0; r < nr; ++r) {
          v_rows[r] = u_rows[r] = sq + (r0 + r) * m;  // u is unread without outliers
          v_total[r] = sq_sums[r0 + r];
        }
      } else if (from_base && n_diff == 0) {  // O = C
        for (int64_t r = 0; r < nr; ++r) {
          v_rows[r] = base_v_buf + r * m;
          u_rows[r] = base_u_buf + r * m;
          v_total[r] = base_v_total[r];
          u_total[r] = base_u_total[r];
        }
      } else if (!same_channels) {
        const int64_t count = from_base ? n_diff : a.n_out;
        const uint8_t* list = from_base ? diff : idx;
        for (int64_t rb = 0; rb < nr; rb += kSketchRows) {
          const int64_t nb = nr - rb < kSketchRows ? nr - rb : kSketchRows;
          for (int64_t j = 0; j < nb; ++j) {
            const int64_t r = rb + j;
            const float* qr = q + (r0 + r) * d;
            float sum_m = 0.f, sum_mo = 0.f;
            for (int64_t k = 0; k < count; ++k) {
              coef[j][k] = from_base ? sign[k] * qr[list[k]] : qr[list[k]];
              sum_m += coef[j][k] * a.channel_sums_m[list[k]];
              sum_mo += coef[j][k] * a.channel_sums_mo[list[k]];
            }
            v_total[r] = (from_base ? base_v_total[r] : sq_sums[r0 + r]) - sum_m;
            u_total[r] = (from_base ? base_u_total[r] : 0.f) + sum_mo;
            from_v[j] = from_base ? base_v_buf + r * m : sq + (r0 + r) * m;
            from_u[j] = from_base ? base_u_buf + r * m : nullptr;
            to_u[j] = u_buf + r * m;
            to_v[j] = v_buf + r * m;
            v_rows[r] = to_v[j];
            u_rows[r] = to_u[j];
          }
          outlier_sketch_rows(nb, coef, list, count, a.projection_t, m, m_o, from_v, from_u, to_u, to_v);
        }
      }
      // score = wa (2 S_in - sum v) + wb (2 S_out - sum u), wa = c/m ||k_in||, wb = c/m_o ||k_out||,
      // S_in / S_out the sums of v / u over the key's set bits.
#if QJL_ISA_LEVEL == 2
      for (; t + kTokenBlock <= group_end; t += kTokenBlock) {
        alignas(16) float wa[kTokenBlock], wb[kTokenBlock];
        float sums4[kMaxRowsOnStack * kTokenBlock];
        for (int j = 0; j < kTokenBlock; ++j) {
          wa[j] = a.inlier_scale * n_in[t + j];
          wb[j] = outlier_term ? a.outlier_scale * n_out[t + j] : 0.f;
        }
        weighted_sums_block_rows(v_rows, u_rows, nr, bits + t * bytes, bytes, m, wa, obits + t * obytes, obytes,
                                 outlier_term ? m_o : 0, wb, sums4);
        const __m128 wa4 = _mm_load_ps(wa), wb4 = _mm_load_ps(wb), two = _mm_set1_ps(2.f);
        for (int64_t r = 0; r < nr; ++r) {
          const __m128 offset = _mm_add_ps(_mm_mul_ps(wa4, _mm_set1_ps(v_total[r])),
                                           outlier_term ? _mm_mul_ps(wb4, _mm_set1_ps(u_total[r])) : _mm_setzero_ps());
          const __m128 score = _mm_sub_ps(_mm_mul_ps(two, _mm_loadu_ps(sums4 + r * kTokenBlock)), offset);
          _mm_storeu_ps(logits + (r0 + r) * span + (t - base), score);
        }
      }
#endif
      for (; t < group_end; ++t) {
        const float wa = a.inlier_scale * n_in[t];
        const float wb = outlier_term ? a.outlier_scale * n_out[t] : 0.f;
        weighted_masked_sums_rows(v_rows, u_rows, nr, bits + t * bytes, m, wa, obits + t * obytes,
                                  outlier_term ? m_o : 0, wb, sums);
        for (int64_t r = 0; r < nr; ++r) {
          const float offset = wa * v_total[r] + (outlier_term ? wb * u_total[r] : 0.f);
          logits[(r0 + r) * span + (t - base)] = 2.f * sums[r] - offset;
        }
      }
    }
  }
}

template <int BITS>
inline void dequantize_token(const DecodeArgs& a, const int32_t* codes, const float* scales, const float* mins,
                             float* out) {
  constexpr int kPerWord = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  const int64_t group = a.value_group;
  if (group % kPerWord == 0) {  // every word lies in one group (the usual case)
    const int64_t words_per_group = group / kPerWord, groups = a.dim / group;
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t w = g * words_per_group; w < (g + 1) * words_per_group; ++w) {
        dequantize_word<BITS>(static_cast<uint32_t>(codes[w]), scales[g], mins[g], out + w * kPerWord);
      }
    }
    return;
  }
  for (uint64_t c = 0; c < static_cast<uint64_t>(a.dim); ++c) {
    const uint32_t word = static_cast<uint32_t>(codes[c / kPerWord]);
    const uint32_t code = (word >> ((c % kPerWord) * BITS)) & kMask;
    const uint64_t g = c / static_cast<uint64_t>(group);
    out[c] = static_cast<float>(code) * scales[g] + mins[g];
  }
}

#if QJL_ISA_LEVEL == 2
// The 16 codes of channels [16 j, 16 j + 16) of one token as floats; a token's codes are packed
// 32 / BITS per int32 word, least significant first.
template <int BITS>
inline __m512 codes16(const int32_t* codes, int64_t j) {
  if (BITS == 2) {
    const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i word = _mm512_set1_epi32(codes[j]);
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(word, shifts), _mm512_set1_epi32(3)));
  }
  const __m512i shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  const __m512i words = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(codes[2 * j]), _mm512_set1_epi32(codes[2 * j + 1]));
  return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(words, shifts), _mm512_set1_epi32(15)));
}

// acc[r][0..d) += sum_t p[r][t] * (code_t * scale_t + min_t) over n quantized tokens, for NR rows,
// each token dequantized once in registers for all NR rows (64 channels at a time). Needs d and the
// value group size to be multiples of 16 (every 16-channel vector lies in one group).
template <int BITS, int NR>
inline void accumulate_quantized(const DecodeArgs& a, const int32_t* codes, const float* scales, const float* mins,
                                 int64_t n, const float* const* p, float* const* acc) {
  const int64_t d = a.dim, groups = d / a.value_group, vectors_per_group = a.value_group / 16;
  for (int64_t c = 0; c < d; c += 64) {
    const int nv = d - c >= 64 ? 4 : static_cast<int>((d - c) / 16);
    __m512 sums[NR][4];
    for (int r = 0; r < NR; ++r)
      for (int j = 0; j < 4; ++j) sums[r][j] = j < nv ? _mm512_loadu_ps(acc[r] + c + 16 * j) : _mm512_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      const int32_t* token_codes = codes + t * a.words;
      const float* s = scales + t * groups;
      const float* z = mins + t * groups;
      __m512 w[NR];
      for (int r = 0; r < NR; ++r) w[r] = _mm512_set1_ps(p[r][t]);
      for (int j = 0; j < nv; ++j) {
        const int64_t vec = c / 16 + j, g = vec / vectors_per_group;
        const __m512 value = _mm512_fmadd_ps(codes16<BITS>(token_codes, vec), _mm512_set1_ps(s[g]), _mm512_set1_ps(z[g]));
        for (int r = 0; r < NR; ++r) sums[r][j] = _mm512_fmadd_ps(w[r], value, sums[r][j]);
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int j = 0; j < nv; ++j) _mm512_storeu_ps(acc[r] + c + 16 * j, sums[r][j]);
  }
}
#endif

// acc[r] += sum_t probs[r][t - t0] * value[t] over [t0, t1): blocks of kValueBlock tokens are
// dequantized once (window tokens are read in place), then every row accumulates the block.
template <int BITS>
inline void accumulate_values(const DecodeArgs& a, int64_t b, int64_t h, int64_t t0, int64_t t1, int64_t span,
                              const float* probs, float* acc, float* deq) {
  const int64_t rows = a.rows, d = a.dim, bh = b * a.kv_heads + h;
  const int32_t* codes = head_part(a.codes, b, h);
  const float* scales = head_part(a.scales, b, h);
  const float* mins = head_part(a.mins, b, h);
  const int64_t groups = d / a.value_group, window_len = a.tokens - a.quantized;
  const float* window = a.window + bh * window_len * d;
  const float* value[kValueBlock];
#if QJL_ISA_LEVEL == 2
  if (d % 16 == 0 && a.value_group % 16 == 0 && t0 < a.quantized) {
    // quantized tokens dequantized in registers, up to 4 rows at a time; the window below
    const int64_t end = t1 < a.quantized ? t1 : a.quantized;
    const float* p[4];
    float* out[4];
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      const int64_t nr = rows - r0 < 4 ? rows - r0 : 4;
      for (int64_t r = 0; r < nr; ++r) {
        p[r] = probs + (r0 + r) * span;
        out[r] = acc + (r0 + r) * d;
      }
      const int32_t* c0 = codes + t0 * a.words;
      const float* s0 = scales + t0 * groups;
      const float* z0 = mins + t0 * groups;
      switch (nr) {
        case 4: accumulate_quantized<BITS, 4>(a, c0, s0, z0, end - t0, p, out); break;
        case 3: accumulate_quantized<BITS, 3>(a, c0, s0, z0, end - t0, p, out); break;
        case 2: accumulate_quantized<BITS, 2>(a, c0, s0, z0, end - t0, p, out); break;
        default: accumulate_quantized<BITS, 1>(a, c0, s0, z0, end - t0, p, out); break;
      }
    }
    if (end == t1) return;
    probs += end - t0;  // the window tokens [end, t1) below, with probabilities from column end - t0
    t0 = end;
  }
#endif
  for (int64_t tb = t0; tb < t1; tb += kValueBlock) {
    const int64_t n = t1 - tb < kValueBlock ? t1 - tb : kValueBlock;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = tb + i;
      if (t < a.quantized) {
        dequantize_token<BITS>(a, codes + t * a.words, scales + t * groups, mins + t * groups, deq + i * d);
        value[i] = deq + i * d;
      } else {
        value[i] = window + (t - a.quantized) * d;
      }
    }
    for (int64_t r = 0; r < rows; ++r) accumulate_rows(probs + r * span + (tb - t0), n, value, d, acc + r * d);
  }
}

}  // namespace

void QJL_TASK_NAME(const DecodeArgs& a, int64_t b, int64_t h, int64_t t0, int64_t t1, float* row_max, float* row_sum,
                   float* row_acc, float* workspace) {
  const int64_t rows = a.rows, d = a.dim, span = t1 - t0, bh = b * a.kv_heads + h;
  float* logits = workspace;
  float* v_buf = logits + rows * span;
  float* u_buf = v_buf + rows * a.m;
  float* base_v_buf = u_buf + rows * a.m;
  float* base_u_buf = base_v_buf + rows * a.m;
  float* deq = base_u_buf + rows * a.m;

  // 1-2. logits
  const int64_t split = a.committed < t0 ? t0 : (a.committed < t1 ? a.committed : t1);
  if (split > t0) committed_logits(a, b, h, t0, split, t0, span, logits, v_buf, u_buf, base_v_buf, base_u_buf);
  const float* q = a.query + bh * rows * d;
  const float* residual = a.residual + bh * (a.tokens - a.committed) * d;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t t = split; t < t1; ++t) logits[r * span + (t - t0)] = dot(q + r * d, residual + (t - a.committed) * d, d);
  }
  const float scaling = a.scaling;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t l = r % a.length;
    float* row = logits + r * span;
    if (a.mask != nullptr) {
      const uint8_t* allowed = a.mask + (b * a.length + l) * a.tokens + t0;
      for (int64_t i = 0; i < span; ++i) row[i] = allowed[i] ? row[i] * scaling : kLowest;
    } else {
      const int64_t visible = a.tokens - a.length + l + 1 - t0;  // causal: the first `visible` positions
      for (int64_t i = 0; i < span; ++i) row[i] = i < visible ? row[i] * scaling : kLowest;
    }
    // 3. the task's softmax statistics; logits become unnormalized probabilities
    float lanes[kLanes];
    for (int j = 0; j < kLanes; ++j) lanes[j] = kLowest;
    int64_t i = 0;
    for (; i + kLanes <= span; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) lanes[j] = row[i + j] > lanes[j] ? row[i + j] : lanes[j];
    }
    float mx = kLowest;
    for (int j = 0; j < kLanes; ++j) mx = lanes[j] > mx ? lanes[j] : mx;
    for (; i < span; ++i) mx = row[i] > mx ? row[i] : mx;
    for (i = 0; i < span; ++i) row[i] = exp_nonpositive(row[i] - mx);
    for (int j = 0; j < kLanes; ++j) lanes[j] = 0.f;
    for (i = 0; i + kLanes <= span; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) lanes[j] += row[i + j];
    }
    float total = 0.f;
    for (int j = 0; j < kLanes; ++j) total += lanes[j];
    for (; i < span; ++i) total += row[i];
    row_max[r] = mx;
    row_sum[r] = total;
  }

  // 4. values
  for (int64_t i = 0; i < rows * d; ++i) row_acc[i] = 0.f;
  if (a.value_bits == 4) {
    accumulate_values<4>(a, b, h, t0, t1, span, logits, row_acc, deq);
  } else {
    accumulate_values<2>(a, b, h, t0, t1, span, logits, row_acc, deq);
  }
}

}  // namespace cpu
}  // namespace qjl
