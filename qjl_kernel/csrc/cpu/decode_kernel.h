// ATen-free interface between the host side of the fused CPU decode attention
// (decode_attention_cpu.cpp) and its per-ISA task kernels (decode_kernel_{scalar,avx2,avx512}.cpp).
//
// The ISA files are compiled with extra target instructions enabled (#pragma GCC target), so they
// include no ATen/c10/std-library headers whose inline functions could be emitted with those
// instructions and then picked by the linker for other callers; this header is plain C++.
#pragma once

#include <cstdint>

namespace qjl {
namespace cpu {

// A tensor whose dims after batch and KV head are dense, read through its batch and head strides.
// (Data only: functions on it live in the ISA files with internal linkage, see above.)
template <typename T>
struct HeadStrided {
  const T* data = nullptr;
  int64_t batch_stride = 0, head_stride = 0;
};

// What every task reads. float pointers are float32; strides are in elements of the pointee.
// "rows" are the query rows of one KV head: row j * L + l is query head h * ratio + j, position l.
struct DecodeArgs {
  int64_t kv_heads = 0, rows = 0, length = 0, dim = 0, tokens = 0;

  // Queries [B, H_kv, rows, d] and their sketches S q [B, H_kv, rows, m] (contiguous), the sketch
  // rows' sums [B, H_kv, rows], and S^T [d, m] with per-channel sums over its first m / m_o columns.
  const float* query = nullptr;
  const float* query_sketch = nullptr;
  const float* sketch_sums = nullptr;
  const float* projection_t = nullptr;
  const float* channel_sums_m = nullptr;
  const float* channel_sums_mo = nullptr;

  // Committed QJL keys: the oldest `committed` tokens, in groups of `group`. Token-major inner
  // layout (n, g, byte) dense; batch and head through strides.
  int64_t committed = 0, group = 1, m = 0, m_o = 0, n_out = 0;
  HeadStrided<uint8_t> bits, outlier_bits, outlier_indices;
  HeadStrided<float> inlier_norms, outlier_norms;
  float inlier_scale = 0.f, outlier_scale = 0.f;  // sqrt(pi/2) / m, sqrt(pi/2) / m_o

  // Exact residual keys [B, H_kv, tokens - committed, d], contiguous.
  const float* residual = nullptr;

  // Quantized values: the oldest `quantized` tokens; codes [.., T_q, words] int32, scales and
  // mins [.., T_q, d / value_group]; then the exact window [B, H_kv, tokens - quantized, d].
  int64_t quantized = 0, value_bits = 2, value_group = 1, words = 0;
  HeadStrided<int32_t> codes;
  HeadStrided<float> scales, mins;
  const float* window = nullptr;

  // uint8 [B, L, tokens] (1 = attend) or null for the causal rule (row l sees t <= T - L + l).
  const uint8_t* mask = nullptr;
  float scaling = 1.f;
};

// Floats of workspace one task over `span` tokens needs.
inline int64_t decode_workspace_floats(const DecodeArgs& a, int64_t span) {
  // logits; v and u of a group and of the base channel set; a dequantized value block
  return a.rows * span + 4 * a.rows * a.m + 32 * a.dim + 64;
}

// One task: batch b, KV head h, tokens [t0, t1). For each row r it writes the largest logit
// row_max[r], the sum of exp(logit - row_max[r]) row_sum[r], and the exp-weighted sum of values
// row_acc[r * d .. r * d + d). Masked positions have the logit -FLT_MAX.
using DecodeTaskFn = void (*)(const DecodeArgs& a, int64_t b, int64_t h, int64_t t0, int64_t t1, float* row_max,
                              float* row_sum, float* row_acc, float* workspace);

void decode_task_scalar(const DecodeArgs&, int64_t, int64_t, int64_t, int64_t, float*, float*, float*, float*);
void decode_task_avx2(const DecodeArgs&, int64_t, int64_t, int64_t, int64_t, float*, float*, float*, float*);
void decode_task_avx512(const DecodeArgs&, int64_t, int64_t, int64_t, int64_t, float*, float*, float*, float*);

// Whether the avx2 / avx512 task kernels were compiled (x86-64 with GCC or Clang).
bool avx2_compiled();
bool avx512_compiled();

}  // namespace cpu
}  // namespace qjl
