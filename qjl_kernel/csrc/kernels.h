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
  const float* proj;               // S, [m, d] float32, element (i, j) at i * ps_i + j * ps_j
  int64_t ps_i, ps_j;              // S^T dense (ps_i = 1) reads coalesced; other layouts in place
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

// A [B, H, L, d] float tensor of any strides (query rows), read in place in any kernel float dtype.
struct View4 {
  const void* ptr;
  Fp kind;
  int64_t s0, s1, s2, s3;
  __host__ __device__ __forceinline__ int64_t offset(int64_t i0, int64_t i1, int64_t i2, int64_t i3) const {
    return i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3;
  }
};

// S q for every query row, in exact float32 (fmaf over channels in order, never TF32), plus what
// the score kernels need of S: S^T dense (coalesced reads of S's columns) and column sums.
struct QuerySketchArgs {
  View4 query;           // [B, H_q, L, d]
  const float* proj;     // S, [m, d] float32 with strides (ps0, ps1)
  int64_t ps0, ps1;
  float* q_sketch;       // out: [B*H_q*L, m] dense
  float* proj_t;         // out: S^T [d, m] dense, or nullptr when the caller has it already
  float* column_sums;    // out: [2 d + 1]: sum_{i<m} S[i][c], sum_{i<m_o} S[i][c], max_i ||S_i||; or nullptr
  int64_t rows;          // B*H_q*L
  int H_q, L, d, m, m_o;
};
// Blocks of one launch (the host checks they fit grid.x).
int64_t query_sketch_blocks(const QuerySketchArgs& a);
void launch_query_sketch(const QuerySketchArgs& a, cudaStream_t stream);

struct KeyScoresArgs {
  const float* q_sketch;  // S q, [B*H_q*L, m] dense float32 (launch_query_sketch)
  View4 query;            // q, [B, H_q, L, d], any strides
  const float* proj_t;    // S^T, [d, m] dense float32
  View3 bits, outlier_bits, inlier_norms, outlier_norms, outlier_indices;
  Fp inlier_kind, outlier_kind;
  float* out;  // [B*H_q*L, N*G]
  int B, H_kv, ratio, L, R, N, G, d, m, m_o, n_out;  // R = query rows per KV head = ratio * L
  float scale_in, scale_out;
  bool in_words, out_words;  // sign rows readable as aligned uint32 words
};
// Picks rows per warp and warps per block; false when the sketch does not fit in shared memory.
bool key_scores_config(const KeyScoresArgs& a, int* rows_per_warp, int* warps, size_t* smem_bytes);
// Blocks of one launch (grid.x, so any number of query rows up to 2^31 - 1 blocks in all).
int64_t key_scores_blocks(const KeyScoresArgs& a, int rows_per_warp, int warps);
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

// decode_attention: the fused op (decode_attention.cu). Rows of KV head h are its ratio * L query rows
// (query head h * ratio + r / L, position r % L), contiguous in [B, H_q, L].
struct DecodeArgs {
  View4 query;                 // [B, H_q, L, d]
  const float* q_sketch;       // S q, [B*H_q*L, m] (launch_query_sketch); unread when T_c = 0
  const float* proj_t;         // S^T, [d, m] dense float32
  const float* column_sums;    // [2 d + 1]: sums of S's columns over the first m and m_o rows, max row norm
  View3 bits, outlier_bits;    // [B, H_kv, N, G, m/8] / [.., m_o/8], dims 3.. dense
  View3 inlier_norms, outlier_norms, outlier_indices;  // [B, H_kv, N, G] / [B, H_kv, N, n_out]
  Fp inlier_kind, outlier_kind;
  View3 residual;              // exact keys [B, H_kv, R_len, d], last dim dense
  Fp residual_kind;
  View3 codes, scales, mins;   // [B, H_kv, T_q, d*bits/32] int32 / [B, H_kv, T_q, d/group], last dim dense
  Fp scale_kind, min_kind;
  View3 window;                // exact values [B, H_kv, W, d], last dim dense
  Fp window_kind;
  const uint8_t* mask;         // bool [B or 1, L, T] with strides (ms0 = 0 when broadcast); nullptr: causal
  int64_t ms0, ms1, ms2;
  float* out;                  // [B*H_q*L, d] (one split: the block normalizes and writes it)
  float* part_acc;             // [splits, B*H_q*L, d]: unnormalized sums
  float* part_max;             // [splits, B*H_q*L]: running max (log2 units)
  float* part_sum;             // [splits, B*H_q*L]
  int B, H_kv, ratio, L, d, m, m_o, n_out, G, value_bits, value_group;
  int rows_per_block, row_chunks;  // query rows of a KV head split into row_chunks blocks of <= rows_per_block
  int64_t T, T_c, T_q, span, splits;  // tokens; committed keys; quantized values; tokens per split
  float scale_in, scale_out;   // sqrt(pi/2) / m, sqrt(pi/2) / m_o
  float logit_scale;           // scaling * log2(e): logits are kept in log2 units
  bool in_words, out_words;    // sign rows readable as aligned uint32 words
  bool tensor_cores;           // committed scores on tensor cores (decode_tensor_cores_fit; sm_80+)
};
// The shapes the tensor-core scoring takes: whole 16-token tiles per key group, 128-coordinate
// word blocks per quad of threads, aligned word loads.
inline bool decode_tensor_cores_fit(const DecodeArgs& a) {
  return a.T_c > 0 && a.m % 128 == 0 && a.m_o % 128 == 0 && a.G % 16 == 0 && a.in_words &&
         (a.m_o == 0 || a.out_words);
}
constexpr int kDecodeThreads = 128;
constexpr int kDecodeTile = 128;         // tokens per tile (one per thread when scoring)
constexpr int kDecodeMaxRows = 32;       // query rows per block (more rows: more blocks)
// Shared memory of one block: laid out on the host, passed to the kernel.
struct DecodeLayout {
  int rows_per_pass;     // query rows scored together (1, 2 or 4)
  int row_accumulators;  // rows a thread accumulates values for (1, 2, 4 or 8)
  int value_units;       // ceil(d / (16 / bits)) half code words: threads sharing a token in the value stage
  int row_groups;        // ceil(rows_per_block / row_accumulators)
  int value_slots;       // tokens in flight in the value stage: kDecodeThreads / (value_units * row_groups)
  int group_buffers;     // key groups per tile with their own v / u (1 when n_out = 0)
  int tile_groups;       // key groups a committed tile holds (when G <= kDecodeTile)
  int v_floats;          // floats of one group's v and u: (m + m_o) * rows_per_pass
  size_t bytes;          // dynamic shared memory
};
// Rows one thread accumulates values for at most (32 accumulators of 16 / bits channels each).
constexpr int decode_max_row_accumulators(int value_bits) { return value_bits == 4 ? 8 : 4; }
// The most query rows a block takes for head_dim d: the value stage needs
// ceil(d / (16 / bits)) * ceil(rows / row_accumulators) <= kDecodeThreads.
inline int decode_max_rows(int d, int value_bits) {
  const int units = (d + 16 / value_bits - 1) / (16 / value_bits), cap = decode_max_row_accumulators(value_bits);
  int rows = kDecodeMaxRows;
  while (rows > cap && units * ((rows + cap - 1) / cap) > kDecodeThreads) rows /= 2;
  return rows;
}
// Fills the layout; false when one key group's v / u does not fit in max_bytes.
bool decode_layout(const DecodeArgs& a, size_t max_bytes, DecodeLayout* layout);
// False for an unsupported layout (never silently skipped). Grid: splits * row_chunks * B * H_kv.
bool launch_decode_attention(const DecodeArgs& a, const DecodeLayout& layout, cudaStream_t stream);
// Log-sum-exp merge of the splits into out (when splits > 1).
void launch_decode_merge(const DecodeArgs& a, cudaStream_t stream);

}  // namespace qjl
