// value_matmul: weights [B, H_q, L, T] @ dequant(values [B, H_kv, T, d]) -> float32 [B, H_q, L, d],
// fused: codes are dequantized in registers (code * scale + min, rounded like the reference) and
// never written to global memory.
//
// Grid (token split, row tile, batch * KV head). In a block of 128 threads, W = d * bits / 32
// threads share a token (one int32 word, 32/bits channels each) and 128 / W tokens are in flight;
// every thread keeps RT rows x 32/bits channels of partial sums (64 floats). Partial sums are
// reduced through shared memory, then across token splits with one deterministic at::sum. The
// reduction array is [accumulator][thread] with a pitch of kThreads + (W mod 32) floats: stores by
// consecutive threads and loads ordered word-fastest both hit 32 distinct banks (the earlier
// [slot][row][channel] layout put the 16 channels of a word 16 floats apart: 16-way conflicts).
// Weights may have any strides; codes/scales/mins may be views along dim 2 (inner dim dense).
#include "device_utils.cuh"

namespace qjl {
namespace {

constexpr int kThreads = kValueMatmulThreads;
constexpr int kAccumulators = kValueMatmulAccumulators;  // RT * (32 / bits) per thread

template <int BITS>
__global__ void __launch_bounds__(kThreads) value_matmul_kernel(const ValueMatmulArgs a) {
  constexpr int kPerWord = 32 / BITS;
  constexpr int RT = kAccumulators / kPerWord;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  __shared__ float red[kAccumulators * (kThreads + 32)];  // [r * kPerWord + j][pitch]

  const int H_kv = a.H_kv, ratio = a.ratio, L = a.L, d = a.d, group_size = a.group_size;
  const int64_t T = a.T, tokens_per_split = a.tokens_per_split;
  const int W = d / kPerWord, slots = kThreads / W;
  const int tid = threadIdx.x, slot = tid / W, w = tid - slot * W;
  const int R = ratio * L, r0 = blockIdx.y * RT, rows = min(RT, R - r0);
  const int bh = blockIdx.z, b = bh / H_kv, h = bh - b * H_kv;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.x) * tokens_per_split;
  const int64_t t_end = min(T, t_begin + tokens_per_split);

  float acc[RT][kPerWord];
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int j = 0; j < kPerWord; ++j) acc[r][j] = 0.f;

  if (slot < slots) {
    int64_t w_row[RT];  // weight row offsets (query head h * ratio + r / L, position r % L)
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      const int rr = min(r0 + r, R - 1);
      w_row[r] = b * a.ws0 + static_cast<int64_t>(h * ratio + rr / L) * a.ws1 + static_cast<int64_t>(rr % L) * a.ws2;
    }
    const int c0 = w * kPerWord;
    const bool one_group = group_size % kPerWord == 0;  // the whole word shares one scale and min
    const int32_t* codes = static_cast<const int32_t*>(a.codes.ptr);
    for (int64_t t = t_begin + slot; t < t_end; t += slots) {
      const uint32_t word = static_cast<uint32_t>(__ldg(codes + a.codes.offset(b, h, t) + w));
      const int64_t s_off = a.scales.offset(b, h, t), m_off = a.mins.offset(b, h, t);
      float wr[RT];
#pragma unroll
      for (int r = 0; r < RT; ++r) wr[r] = r < rows ? load_fp(a.weights, w_row[r] + t * a.ws3, a.weight_kind) : 0.f;
      float scale = 0.f, mn = 0.f;
      if (one_group) {
        scale = load_fp(a.scales.ptr, s_off + c0 / group_size, a.value_kind);
        mn = load_fp(a.mins.ptr, m_off + c0 / group_size, a.value_kind);
      }
#pragma unroll
      for (int j = 0; j < kPerWord; ++j) {
        if (!one_group) {
          scale = load_fp(a.scales.ptr, s_off + (c0 + j) / group_size, a.value_kind);
          mn = load_fp(a.mins.ptr, m_off + (c0 + j) / group_size, a.value_kind);
        }
        // Exact float(code) without I2F: 2^23 + code as a float, minus 2^23.
        const float code = __uint_as_float(0x4B000000u | ((word >> (j * BITS)) & kMask)) - 8388608.f;
        const float v = __fadd_rn(__fmul_rn(code, scale), mn);  // as reference: codes * scales + mins
#pragma unroll
        for (int r = 0; r < RT; ++r) acc[r][j] = fmaf(wr[r], v, acc[r][j]);
      }
    }
  }
  const int pitch = kThreads + (W & 31);  // pitch = W (mod 32)
  if (slot < slots) {
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int j = 0; j < kPerWord; ++j) red[(r * kPerWord + j) * pitch + tid] = acc[r][j];
  }
  __syncthreads();

  const int64_t row0 = static_cast<int64_t>(bh) * R + r0;  // rows of KV head h are contiguous in [B*H_q*L]
  const int64_t n_rows_total = static_cast<int64_t>(gridDim.z) * R;
  float* dst = a.partial + static_cast<int64_t>(blockIdx.x) * n_rows_total * d;
  // e = accumulator * W + word: a warp reads (accumulator * pitch + s * W + word), 32 distinct banks.
  for (int e = tid; e < rows * d; e += kThreads) {
    const int acc_index = e / W, word = e - acc_index * W;
    const int r = acc_index / kPerWord, c = word * kPerWord + (acc_index - r * kPerWord);
    float sum = 0.f;
    for (int s = 0; s < slots; ++s) sum += red[acc_index * pitch + s * W + word];
    dst[(row0 + r) * d + c] = sum;
  }
}

}  // namespace

bool launch_value_matmul(const ValueMatmulArgs& a, cudaStream_t stream) {
  const int rows_per_block = kAccumulators / (32 / a.bits);
  const dim3 grid(static_cast<unsigned>(a.splits),
                  static_cast<unsigned>((a.ratio * a.L + rows_per_block - 1) / rows_per_block),
                  static_cast<unsigned>(a.B * a.H_kv));
  switch (a.bits) {
    case 2:
      value_matmul_kernel<2><<<grid, kThreads, 0, stream>>>(a);
      return true;
    case 4:
      value_matmul_kernel<4><<<grid, kThreads, 0, stream>>>(a);
      return true;
    default:
      return false;
  }
}

}  // namespace qjl
