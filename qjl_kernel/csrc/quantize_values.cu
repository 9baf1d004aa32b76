// quantize_values: per-token asymmetric quantization of groups of `group_size` channels to 2 or 4
// bits, packed 32/bits codes per int32 word (channel c = w * (32/bits) + j at bits [j*bits, (j+1)*bits)).
//
// Bit-for-bit the CPU reference: min and scale = (max - min) / (2^bits - 1) (IEEE float32 division)
// are rounded to the values' dtype first, then code = round_half_even((v - min) / scale) clamped to
// [0, 2^bits - 1], with scale 0 read as 1. A block takes `rows_per_block` rows (tokens): phase 1
// reduces each group (one thread per group), phase 2 packs one int32 word per thread.
#include "device_utils.cuh"

#include <algorithm>

namespace qjl {
namespace {

constexpr int kThreads = 256;
constexpr int kStatsFloats = kQuantizeValuesStatsFloats;

__global__ void __launch_bounds__(kThreads) quantize_values_kernel(const void* __restrict__ values, Fp kind,
                                                                   int32_t* __restrict__ codes, void* __restrict__ scales,
                                                                   void* __restrict__ mins, int64_t rows, int d,
                                                                   int group_size, int bits, int rows_per_block) {
  __shared__ float stats[kStatsFloats];  // [rows_per_block][n_groups][2] = (min, scale) as stored
  const int n_groups = d / group_size;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int nrows = static_cast<int>(min(static_cast<int64_t>(rows_per_block), rows - row0));
  const float levels = static_cast<float>((1 << bits) - 1);

  for (int e = threadIdx.x; e < nrows * n_groups; e += blockDim.x) {
    const int r = e / n_groups, g = e - r * n_groups;
    const int64_t base = (row0 + r) * d + static_cast<int64_t>(g) * group_size;
    float lo = load_fp(values, base, kind), hi = lo;
    bool nan = isnan(lo);
    for (int c = 1; c < group_size; ++c) {
      const float v = load_fp(values, base + c, kind);
      nan = nan || isnan(v);
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
    if (nan) lo = hi = __int_as_float(0x7fc00000);  // a group with a NaN: NaN min and scale (fminf skips NaN)
    const int64_t out = (row0 + r) * n_groups + g;
    const float mn = store_fp(mins, out, kind, lo);  // exact: lo is one of the values
    const float sc = store_fp(scales, out, kind, __fdiv_rn(__fsub_rn(hi, mn), levels));
    stats[2 * e] = mn;
    stats[2 * e + 1] = sc;
  }
  __syncthreads();

  const int per_word = 32 / bits, n_words = d / per_word;
  for (int e = threadIdx.x; e < nrows * n_words; e += blockDim.x) {
    const int r = e / n_words, w = e - r * n_words;
    const int64_t base = (row0 + r) * d + static_cast<int64_t>(w) * per_word;
    uint32_t word = 0;
    for (int j = 0; j < per_word; ++j) {
      const int g = (w * per_word + j) / group_size;
      const float mn = stats[2 * (r * n_groups + g)], sc = stats[2 * (r * n_groups + g) + 1];
      const float v = load_fp(values, base + j, kind);
      const float quotient = __fdiv_rn(__fsub_rn(v, mn), sc > 0.f ? sc : 1.f);
      float q = isfinite(quotient) ? rintf(quotient) : 0.f;  // NaN or infinite inputs: code 0
      q = fminf(fmaxf(q, 0.f), levels);
      word |= static_cast<uint32_t>(q) << (j * bits);
    }
    codes[(row0 + r) * n_words + w] = static_cast<int32_t>(word);
  }
}

}  // namespace

bool launch_quantize_values(const QuantizeValuesArgs& a, cudaStream_t stream) {
  if (a.bits != 2 && a.bits != 4) return false;
  const int per_word = 32 / a.bits, n_groups = a.d / a.group_size;
  if (n_groups < 1 || 2 * n_groups > kStatsFloats) return false;
  // Enough rows per block to give every thread a word, within the shared stats budget.
  const int by_threads = std::max(1, kThreads / std::max(1, a.d / per_word));
  const int rows_per_block = std::min(by_threads, kStatsFloats / (2 * n_groups));
  const int64_t blocks = (a.rows + rows_per_block - 1) / rows_per_block;
  quantize_values_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      a.values, a.kind, a.codes, a.scales, a.mins, a.rows, a.d, a.group_size, a.bits, rows_per_block);
  return true;
}

}  // namespace qjl
