// Kernel launchers of the qjl ops: plain structs of pointers, sizes and strides, no ATen, so the
// .cu files compile quickly. Argument checks, allocation, device guard and stream live in ops.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace qjl {

// Floating dtypes the kernels read and write, chosen at run time (one kernel per op instead of one
// per dtype: loads of keys/norms/scales/weights are a small part of the work).
enum class Fp : int { kHalf = 0, kBFloat16 = 1, kFloat = 2 };

// A tensor whose first three dims may have any stride (views of growable cache buffers along dim 2)
// and whose remaining dims are dense.
struct View3 {
  const void* ptr;
  int64_t s0, s1, s2;
  __host__ __device__ __forceinline__ int64_t offset(int64_t i0, int64_t i1, int64_t i2) const {
    return i0 * s0 + i1 * s1 + i2 * s2;
  }
};

struct QuantizeKeysArgs {
  const void* keys;                // [B*H*N, G, d] dense
  Fp key_kind;                     // also the dtype of the norms
  const uint8_t* outlier_indices;  // [B*H*N, n_out] dense
  const float* proj_t;             // S^T, [d, m] dense float32
  uint8_t* bits;                   // [B*H*N, G, m/8]
  uint8_t* outlier_bits;           // [B*H*N, G, m_o/8]
  void* inlier_norms;              // [B*H*N, G]
  void* outlier_norms;             // [B*H*N, G]
  int64_t groups;                  // B*H*N
  int G, d, m, m_o, n_out;
};
constexpr int kQuantizeKeysTile = 32;  // tokens per block
size_t quantize_keys_smem_bytes(int d);
void launch_quantize_keys(const QuantizeKeysArgs& a, cudaStream_t stream);

struct KeyScoresArgs {
  const float* q_sketch;  // S q, [B*H_q*L, m] dense float32
  const float* query;     // q, [B*H_q*L, d] dense float32
  const float* proj_t;    // S^T, [d, m] dense float32
  View3 bits, outlier_bits, inlier_norms, outlier_norms, outlier_indices;
  Fp inlier_kind, outlier_kind;
  float* out;  // [B*H_q*L, N*G]
  int B, H_kv, R, N, G, d, m, m_o, n_out;  // R = query rows per KV head = (H_q / H_kv) * L
  float scale_in, scale_out;
  bool in_words, out_words;  // sign rows readable as aligned uint32 words
};
// Picks rows per warp and warps per block; false when the sketch does not fit in shared memory.
bool key_scores_config(const KeyScoresArgs& a, int* rows_per_warp, int* warps, size_t* smem_bytes);
// False for an unsupported rows_per_warp (never silently skipped).
bool launch_key_scores(const KeyScoresArgs& a, int rows_per_warp, int warps, size_t smem_bytes, cudaStream_t stream);

struct QuantizeValuesArgs {
  const void* values;  // [rows, d] dense
  Fp kind;             // of values, scales, mins
  int32_t* codes;      // [rows, d * bits / 32]
  void* scales;        // [rows, d / group_size]
  void* mins;
  int64_t rows;
  int d, group_size, bits;
};
constexpr int kQuantizeValuesStatsFloats = 8192;  // shared floats per block for (min, scale) pairs
bool launch_quantize_values(const QuantizeValuesArgs& a, cudaStream_t stream);

struct ValueMatmulArgs {
  const void* weights;  // [B, H_q, L, T], any strides
  int64_t ws0, ws1, ws2, ws3;
  Fp weight_kind;
  View3 codes, scales, mins;  // [B, H_kv, T, W] / [B, H_kv, T, d / group_size], last dim dense
  Fp value_kind;              // of scales and mins
  float* partial;             // [splits, B*H_q*L, d]
  int B, H_kv, ratio, L, d, group_size, bits;
  int64_t T, tokens_per_split, splits;
};
constexpr int kValueMatmulThreads = 128;
constexpr int kValueMatmulAccumulators = 64;  // rows per block * (32 / bits)
bool launch_value_matmul(const ValueMatmulArgs& a, cudaStream_t stream);

}  // namespace qjl
