// quantize_keys: QJL sign bits of S k_in and S[:m_o] k_out, plus ||k_in|| and ||k_out||.
//
// One block of 256 threads per (batch, KV head, group, tile of 32 tokens). The tile's keys are
// staged in shared memory as float32 [d][32 (+4 pad)]; each warp computes 32 sketch coordinates
// (lane = coordinate) for the 32 tokens of the tile (registers acc[token]), and __ballot_sync
// packs the 32 signs of one token into the little-endian word of bytes (coordinate 8j + i is bit i
// of byte j, packing.py). Sums run in float32 in channel order; a coordinate whose sum is within
// rounding of 0 may get the other sign than the reference's matmul (documented in csrc/README.md).
#include "device_utils.cuh"

namespace qjl {
namespace {

constexpr int kTile = kQuantizeKeysTile;  // tokens per block (= warp width: lane t owns token t's word)
constexpr int kPad = kTile + 4;   // row stride of the staged keys (16-byte aligned, fewer conflicts)
constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) quantize_keys_kernel(
    const void* __restrict__ keys, Fp key_kind,           // [B*H*N, G, d] dense
    const uint8_t* __restrict__ outlier_indices,          // [B*H*N, n_out] dense
    const float* __restrict__ proj, int64_t ps_i, int64_t ps_j,  // S [m, d]: (i, j) at i * ps_i + j * ps_j
    uint8_t* __restrict__ bits,                           // [B*H*N, G, m/8]
    uint8_t* __restrict__ outlier_bits,                   // [B*H*N, G, m_o/8]
    void* __restrict__ inlier_norms, void* __restrict__ outlier_norms,  // [B*H*N, G], key dtype
    int G, int d, int m, int m_o, int n_out, int tiles_per_group) {
  extern __shared__ __align__(16) float smem[];
  float* ks = smem;                                        // [d][kPad]
  int* is_outlier = reinterpret_cast<int*>(ks + static_cast<int64_t>(d) * kPad);  // [d]
  int* outlier_list = is_outlier + d;                      // [d], ascending channel order
  __shared__ int n_unique;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t group = blockIdx.x / tiles_per_group;     // flat (b, h, n)
  const int t0 = (blockIdx.x % tiles_per_group) * kTile;

  // Stage keys (float32), zero-filling tokens past the group's end.
  const int64_t key_base = (group * G + t0) * static_cast<int64_t>(d);
  for (int e = tid; e < kTile * d; e += kThreads) {
    const int t = e / d, j = e - t * d;
    ks[j * kPad + t] = (t0 + t < G) ? load_fp(keys, key_base + static_cast<int64_t>(t) * d + j, key_kind) : 0.f;
  }
  for (int j = tid; j < d; j += kThreads) is_outlier[j] = 0;
  __syncthreads();
  for (int o = tid; o < n_out; o += kThreads) {
    const int j = outlier_indices[group * n_out + o];
    if (j < d) is_outlier[j] = 1;  // out-of-range indices are rejected in Python; never write past smem
  }
  __syncthreads();
  if (warp == 0) {  // compact the outlier channels (duplicates collapse, as the reference's mask does)
    int count = 0;
    for (int j0 = 0; j0 < d; j0 += 32) {
      const bool flag = j0 + lane < d && is_outlier[j0 + lane];
      const unsigned ballot = __ballot_sync(0xffffffffu, flag);
      if (flag) outlier_list[count + __popc(ballot & ((1u << lane) - 1u))] = j0 + lane;
      count += __popc(ballot);
    }
    if (lane == 0) n_unique = count;
  }
  __syncthreads();
  const int n_o = n_unique;

  // Norms: one warp per token.
  for (int t = warp; t < kTile; t += kThreads / 32) {
    if (t0 + t >= G) break;
    float sum_in = 0.f, sum_out = 0.f;
    for (int j = lane; j < d; j += 32) {
      const float v = ks[j * kPad + t];
      if (is_outlier[j]) sum_out = fmaf(v, v, sum_out); else sum_in = fmaf(v, v, sum_in);
    }
    for (int off = 16; off > 0; off >>= 1) {
      sum_in += __shfl_xor_sync(0xffffffffu, sum_in, off);
      sum_out += __shfl_xor_sync(0xffffffffu, sum_out, off);
    }
    if (lane == 0) {
      const int64_t row = group * G + t0 + t;
      store_fp(inlier_norms, row, key_kind, sqrtf(sum_in));
      store_fp(outlier_norms, row, key_kind, sqrtf(sum_out));
    }
  }

  // Sketch coordinates, 32 per warp task: inlier tasks first, then outlier tasks.
  const int in_tasks = (m + 31) / 32, out_tasks = (m_o + 31) / 32;
  for (int task = warp; task < in_tasks + out_tasks; task += kThreads / 32) {
    const bool inlier = task < in_tasks;
    const int width = inlier ? m : m_o;
    const int base = (inlier ? task : task - in_tasks) * 32;
    const int i = base + lane;
    const bool valid = i < width;
    float acc[kTile];
#pragma unroll
    for (int t = 0; t < kTile; ++t) acc[t] = 0.f;
    const int n_terms = inlier ? d : n_o;
    for (int u = 0; u < n_terms; ++u) {
      int j;
      if (inlier) {
        j = u;
        if (is_outlier[j]) continue;  // block-uniform branch: k_in is zero on outlier channels
      } else {
        j = outlier_list[u];
      }
      const float s = valid ? __ldg(proj + static_cast<int64_t>(i) * ps_i + static_cast<int64_t>(j) * ps_j) : 0.f;
      const float4* krow = reinterpret_cast<const float4*>(ks + j * kPad);
#pragma unroll
      for (int q = 0; q < kTile / 4; ++q) {
        const float4 k4 = krow[q];
        acc[4 * q + 0] = fmaf(s, k4.x, acc[4 * q + 0]);
        acc[4 * q + 1] = fmaf(s, k4.y, acc[4 * q + 1]);
        acc[4 * q + 2] = fmaf(s, k4.z, acc[4 * q + 2]);
        acc[4 * q + 3] = fmaf(s, k4.w, acc[4 * q + 3]);
      }
    }
    // Lane t collects the 32 sign bits of token t for coordinates base..base+31.
    unsigned mine = 0;
#pragma unroll
    for (int t = 0; t < kTile; ++t) {
      const unsigned ballot = __ballot_sync(0xffffffffu, valid && acc[t] > 0.f);
      if (lane == t) mine = ballot;
    }
    const int t = lane;
    if (t0 + t < G) {
      uint8_t* out = inlier ? bits : outlier_bits;
      const int row_bytes = width / 8;
      const int64_t row = group * G + t0 + t;
      uint8_t* dst = out + row * row_bytes + base / 8;
      const int n_bytes = min(4, (width - base) / 8);
      if (n_bytes == 4 && (row_bytes % 4) == 0) {
        *reinterpret_cast<uint32_t*>(dst) = mine;
      } else {
        for (int b = 0; b < n_bytes; ++b) dst[b] = static_cast<uint8_t>(mine >> (8 * b));
      }
    }
  }
}

}  // namespace

size_t quantize_keys_smem_bytes(int d) { return (static_cast<size_t>(d) * kPad + 2 * static_cast<size_t>(d)) * sizeof(float); }

void launch_quantize_keys(const QuantizeKeysArgs& a, cudaStream_t stream) {
  const int tiles = (a.G + kTile - 1) / kTile;
  quantize_keys_kernel<<<static_cast<unsigned>(a.groups * tiles), kThreads, quantize_keys_smem_bytes(a.d), stream>>>(
      a.keys, a.key_kind, a.outlier_indices, a.proj, a.ps_i, a.ps_j, a.bits, a.outlier_bits, a.inlier_norms, a.outlier_norms, a.G,
      a.d, a.m, a.m_o, a.n_out, tiles);
}

}  // namespace qjl
