// Host side of the qjl CUDA ops: argument checks (device, dtype, shape, layout, ranges), output
// allocation, device guard and current stream, then the launchers of kernels.h.
#include "ops.h"

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "decode_checks.h"
#include "kernels.h"

#define QJL_CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor, got device ", (x).device())
#define QJL_CHECK_SAME_DEVICE(x, y)                                                                      \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on one device, got ", (x).device(), \
              " and ", (y).device())
#define QJL_CHECK_DTYPE(x, dt) \
  TORCH_CHECK((x).scalar_type() == (dt), #x " must have dtype ", (dt), ", got ", (x).scalar_type())
#define QJL_CHECK_DIM(x, n) TORCH_CHECK((x).dim() == (n), #x " must have rank " #n ", got shape ", (x).sizes())

namespace qjl {
namespace {

constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kMinTokensPerSplit = 256;  // value_matmul: fewest tokens a block reduces

Fp fp_kind(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return Fp::kHalf;
    case at::kBFloat16:
      return Fp::kBFloat16;
    case at::kFloat:
      return Fp::kFloat;
    default:
      TORCH_CHECK(false, name, " must be float16, bfloat16 or float32, got ", t.scalar_type());
  }
}

View3 view3(const at::Tensor& t) { return View3{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

View4 view4(const at::Tensor& t, Fp kind) {
  return View4{t.data_ptr(), kind, t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// True when dims [first, dim) of t are dense (sizes of 1 may have any stride).
bool inner_dense(const at::Tensor& t, int64_t first) {
  if (t.numel() == 0) return true;  // nothing is read (e.g. outlier bits when m_o = 0)
  int64_t expected = 1;
  for (int64_t i = t.dim() - 1; i >= first; --i) {
    if (t.size(i) != 1 && t.stride(i) != expected) return false;
    expected *= t.size(i);
  }
  return true;
}

// Rows of packed sign bits that may be read as aligned uint32 words.
bool word_aligned(const at::Tensor& t, int64_t row_bytes) {
  return row_bytes % 4 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 4 == 0 && t.stride(0) % 4 == 0 &&
         t.stride(1) % 4 == 0 && t.stride(2) % 4 == 0;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

float qjl_scale(int64_t m) { return m > 0 ? static_cast<float>(std::sqrt(M_PI / 2.0) / static_cast<double>(m)) : 0.f; }

// The projection S for key_scores and decode_attention. Callers should pass S in float32 (the caches
// keep it so): it is then read in place through its strides, [m, d] contiguous or any view; another
// dtype costs one conversion per call. The score kernels gather columns of S, so they read S^T
// dense: a float32 S that is the transposed view of a dense [d, m] tensor serves as it is, else
// the S q prologue (launch_query_sketch) writes S^T into the op's workspace in the same launch.
struct Projection {
  at::Tensor s;       // float32 [m, d]
  bool dense_t;       // s.t() is dense: no S^T to write
};

Projection float_projection(const at::Tensor& projection) {
  at::Tensor s = projection.scalar_type() == at::kFloat ? projection : projection.to(at::kFloat);
  return {s, s.numel() > 0 && s.t().is_contiguous()};
}

// Launches the S q prologue into `sketch` ([rows, m]); S^T into `proj_t` unless S provides it;
// column sums into `column_sums` when not null. Returns the S^T the score kernels read.
const float* sketch_queries(const at::Tensor& query, Fp query_kind, const Projection& p, int64_t m_o,
                            float* sketch, float* proj_t, float* column_sums, cudaStream_t stream) {
  QuerySketchArgs q{};
  q.query = view4(query, query_kind);
  q.proj = p.s.data_ptr<float>();
  q.ps0 = p.s.stride(0);
  q.ps1 = p.s.stride(1);
  q.q_sketch = sketch;
  q.proj_t = p.dense_t ? nullptr : proj_t;
  q.column_sums = column_sums;
  q.rows = query.size(0) * query.size(1) * query.size(2);
  q.H_q = static_cast<int>(query.size(1));
  q.L = static_cast<int>(query.size(2));
  q.d = static_cast<int>(query.size(3));
  q.m = static_cast<int>(p.s.size(0));
  q.m_o = static_cast<int>(m_o);
  TORCH_CHECK(query_sketch_blocks(q) <= INT32_MAX, "too many query rows for one launch: ", query.sizes());
  launch_query_sketch(q, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return p.dense_t ? p.s.data_ptr<float>() : proj_t;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_keys_cuda(const at::Tensor& keys,
                                                                              const at::Tensor& outlier_indices,
                                                                              const at::Tensor& projection,
                                                                              int64_t outlier_sketch_dim) {
  QJL_CHECK_CUDA(keys);
  QJL_CHECK_SAME_DEVICE(keys, outlier_indices);
  QJL_CHECK_SAME_DEVICE(keys, projection);
  QJL_CHECK_DIM(keys, 5);
  QJL_CHECK_DIM(outlier_indices, 4);
  QJL_CHECK_DIM(projection, 2);
  const Fp key_kind = fp_kind(keys, "keys");
  QJL_CHECK_DTYPE(outlier_indices, at::kByte);
  TORCH_CHECK(projection.is_floating_point(), "projection must be floating point, got ", projection.scalar_type());
  TORCH_CHECK(keys.is_contiguous(), "keys must be contiguous");
  TORCH_CHECK(outlier_indices.is_contiguous(), "outlier_indices must be contiguous");
  const int64_t B = keys.size(0), H = keys.size(1), N = keys.size(2), G = keys.size(3), d = keys.size(4);
  TORCH_CHECK(outlier_indices.size(0) == B && outlier_indices.size(1) == H && outlier_indices.size(2) == N,
              "outlier_indices must be [B, H_kv, n_groups, n_out] = [", B, ", ", H, ", ", N, ", n_out], got ",
              outlier_indices.sizes());
  const int64_t n_out = outlier_indices.size(3);
  TORCH_CHECK(d >= 1 && d <= 256, "head_dim must be in [1, 256] (outlier indices are uint8), got ", d);
  TORCH_CHECK(n_out <= d, "outlier_indices has ", n_out, " channels per group, more than head_dim ", d);
  TORCH_CHECK(projection.size(1) == d, "projection must be [m, ", d, "], got ", projection.sizes());
  const int64_t m = projection.size(0), m_o = outlier_sketch_dim;
  TORCH_CHECK(m > 0 && m % 8 == 0 && m <= (1 << 24), "sketch size m must be a positive multiple of 8, got ", m);
  TORCH_CHECK(m_o >= 0 && m_o % 8 == 0 && m_o <= m, "outlier_sketch_dim must be a multiple of 8 in [0, m = ", m,
              "], got ", m_o);
  TORCH_CHECK(n_out == 0 || m_o > 0, "outlier_sketch_dim must be > 0 when outlier_indices selects channels");
  TORCH_CHECK(G <= INT32_MAX, "group size too large: ", G);

  const c10::cuda::CUDAGuard guard(keys.device());
  const auto bytes = keys.options().dtype(at::kByte);
  at::Tensor bits = at::empty({B, H, N, G, m / 8}, bytes);
  at::Tensor outlier_bits = at::empty({B, H, N, G, m_o / 8}, bytes);
  at::Tensor inlier_norms = at::empty({B, H, N, G}, keys.options());
  at::Tensor outlier_norms = at::empty({B, H, N, G}, keys.options());
  const int64_t groups = B * H * N;
  if (groups == 0 || G == 0) return {bits, outlier_bits, inlier_norms, outlier_norms};
  TORCH_CHECK(groups * ceil_div(G, kQuantizeKeysTile) <= INT32_MAX, "too many keys for one launch: ", keys.sizes());

  // S is read in place through its strides (a float32 S costs no copy); lanes walk coordinates i,
  // so S^T dense (the layout QJLSketch keeps on GPUs) reads coalesced.
  const Projection p = float_projection(projection);
  QuantizeKeysArgs a{keys.data_ptr(),
                     key_kind,
                     outlier_indices.data_ptr<uint8_t>(),
                     p.s.data_ptr<float>(),
                     p.s.stride(0),
                     p.s.stride(1),
                     bits.data_ptr<uint8_t>(),
                     outlier_bits.data_ptr<uint8_t>(),
                     inlier_norms.data_ptr(),
                     outlier_norms.data_ptr(),
                     groups,
                     static_cast<int>(G),
                     static_cast<int>(d),
                     static_cast<int>(m),
                     static_cast<int>(m_o),
                     static_cast<int>(n_out)};
  launch_quantize_keys(a, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {bits, outlier_bits, inlier_norms, outlier_norms};
}

at::Tensor key_scores_cuda(const at::Tensor& query, const at::Tensor& bits, const at::Tensor& outlier_bits,
                           const at::Tensor& inlier_norms, const at::Tensor& outlier_norms,
                           const at::Tensor& outlier_indices, const at::Tensor& projection) {
  QJL_CHECK_CUDA(query);
  QJL_CHECK_SAME_DEVICE(query, bits);
  QJL_CHECK_SAME_DEVICE(query, outlier_bits);
  QJL_CHECK_SAME_DEVICE(query, inlier_norms);
  QJL_CHECK_SAME_DEVICE(query, outlier_norms);
  QJL_CHECK_SAME_DEVICE(query, outlier_indices);
  QJL_CHECK_SAME_DEVICE(query, projection);
  QJL_CHECK_DIM(query, 4);
  QJL_CHECK_DIM(bits, 5);
  QJL_CHECK_DIM(outlier_bits, 5);
  QJL_CHECK_DIM(inlier_norms, 4);
  QJL_CHECK_DIM(outlier_norms, 4);
  QJL_CHECK_DIM(outlier_indices, 4);
  QJL_CHECK_DIM(projection, 2);
  const Fp query_kind = fp_kind(query, "query");
  QJL_CHECK_DTYPE(bits, at::kByte);
  QJL_CHECK_DTYPE(outlier_bits, at::kByte);
  QJL_CHECK_DTYPE(outlier_indices, at::kByte);
  const Fp inlier_kind = fp_kind(inlier_norms, "inlier_norms");
  const Fp outlier_kind = fp_kind(outlier_norms, "outlier_norms");
  TORCH_CHECK(projection.is_floating_point(), "projection must be floating point, got ", projection.scalar_type());

  const int64_t B = bits.size(0), H_kv = bits.size(1), N = bits.size(2), G = bits.size(3);
  const int64_t m = bits.size(4) * 8, m_o = outlier_bits.size(4) * 8;
  const at::IntArrayRef lead = bits.sizes().slice(0, 4);
  TORCH_CHECK(outlier_bits.sizes().slice(0, 4) == lead, "outlier_bits must be ", lead, " + [m_o/8] like bits, got ",
              outlier_bits.sizes());
  TORCH_CHECK(inlier_norms.sizes() == lead, "inlier_norms must be ", lead, ", got ", inlier_norms.sizes());
  TORCH_CHECK(outlier_norms.sizes() == lead, "outlier_norms must be ", lead, ", got ", outlier_norms.sizes());
  TORCH_CHECK(outlier_indices.size(0) == B && outlier_indices.size(1) == H_kv && outlier_indices.size(2) == N,
              "outlier_indices must be [", B, ", ", H_kv, ", ", N, ", n_out], got ", outlier_indices.sizes());
  const int64_t n_out = outlier_indices.size(3);
  const int64_t H_q = query.size(1), L = query.size(2), d = query.size(3);
  TORCH_CHECK(query.size(0) == B, "query batch ", query.size(0), " does not match keys batch ", B);
  TORCH_CHECK(H_kv > 0 && H_q % H_kv == 0, "query heads (", H_q, ") must be a multiple of KV heads (", H_kv, ")");
  TORCH_CHECK(d >= 1 && d <= 256, "head_dim must be in [1, 256] (outlier indices are uint8), got ", d);
  TORCH_CHECK(n_out <= d, "outlier_indices has ", n_out, " channels per group, more than head_dim ", d);
  TORCH_CHECK(projection.size(0) == m && projection.size(1) == d, "projection must be [m = ", m, ", d = ", d,
              "] (m from bits), got ", projection.sizes());
  TORCH_CHECK(m > 0, "bits must hold a sketch of m > 0 coordinates");
  TORCH_CHECK(m_o <= m, "outlier sketch (", m_o, ") larger than the sketch m (", m, ")");
  TORCH_CHECK(inner_dense(bits, 3) && inner_dense(outlier_bits, 3),
              "bits and outlier_bits must be dense in their last two dims [G, m/8] (views along dims 0..2 are fine)");
  TORCH_CHECK(inner_dense(inlier_norms, 3) && inner_dense(outlier_norms, 3) && inner_dense(outlier_indices, 3),
              "inlier_norms, outlier_norms and outlier_indices must be dense in their last dim");

  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor out = at::empty({B, H_q, L, N * G}, query.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const int64_t R = (H_q / H_kv) * L;  // query rows per KV head, contiguous in [B, H_q, L]
  TORCH_CHECK(R <= INT32_MAX && N <= INT32_MAX && G <= INT32_MAX, "too many query rows or key groups for one launch");

  // S q in exact float32 (never TF32, whatever torch.backends.cuda.matmul.allow_tf32 says), and S^T.
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Projection p = float_projection(projection);
  const int64_t rows = B * H_q * L;
  at::Tensor workspace = at::empty({rows * m + (p.dense_t ? 0 : d * m)}, query.options().dtype(at::kFloat));
  float* sketch = workspace.data_ptr<float>();
  KeyScoresArgs a{};
  a.proj_t = sketch_queries(query, query_kind, p, m_o, sketch, sketch + rows * m, nullptr, stream);
  a.q_sketch = sketch;
  a.query = view4(query, query_kind);
  a.bits = view3(bits);
  a.outlier_bits = view3(outlier_bits);
  a.inlier_norms = view3(inlier_norms);
  a.outlier_norms = view3(outlier_norms);
  a.outlier_indices = view3(outlier_indices);
  a.inlier_kind = inlier_kind;
  a.outlier_kind = outlier_kind;
  a.out = out.data_ptr<float>();
  a.B = static_cast<int>(B);
  a.H_kv = static_cast<int>(H_kv);
  a.ratio = static_cast<int>(H_q / H_kv);
  a.L = static_cast<int>(L);
  a.R = static_cast<int>(R);
  a.N = static_cast<int>(N);
  a.G = static_cast<int>(G);
  a.d = static_cast<int>(d);
  a.m = static_cast<int>(m);
  a.m_o = static_cast<int>(m_o);
  a.n_out = static_cast<int>(n_out);
  a.scale_in = qjl_scale(m);
  a.scale_out = qjl_scale(m_o);
  a.in_words = word_aligned(bits, m / 8);
  a.out_words = word_aligned(outlier_bits, m_o / 8);
  int rows_per_warp = 0, warps = 0;
  size_t smem = 0;
  TORCH_CHECK(key_scores_config(a, &rows_per_warp, &warps, &smem), "key_scores: sketch sizes m = ", m, ", m_o = ", m_o,
              " with ", n_out, " outliers need more than 48 KiB of shared memory per query row");
  TORCH_CHECK(key_scores_blocks(a, rows_per_warp, warps) <= INT32_MAX, "key_scores: too many query rows x key groups (",
              R, " x ", N, ") for one launch");
  TORCH_CHECK(launch_key_scores(a, rows_per_warp, warps, smem, stream), "key_scores: no kernel for ", rows_per_warp,
              " rows per warp");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_values_cuda(const at::Tensor& values, int64_t group_size,
                                                                    int64_t bits) {
  QJL_CHECK_CUDA(values);
  const Fp kind = fp_kind(values, "values");
  TORCH_CHECK(values.dim() >= 2, "values must be [..., T, d], got shape ", values.sizes());
  TORCH_CHECK(values.is_contiguous(), "values must be contiguous");
  TORCH_CHECK(bits == 2 || bits == 4, "bits must be 2 or 4, got ", bits);
  const int64_t d = values.size(-1);
  TORCH_CHECK(group_size > 0 && d % group_size == 0, "group_size must be a positive divisor of head_dim ", d,
              ", got ", group_size);
  const int64_t per_word = 32 / bits;
  TORCH_CHECK(d % per_word == 0, "values head_dim ", d, " must be a multiple of ", per_word, " to pack ", bits,
              "-bit codes");
  const int64_t n_groups = d / group_size;
  TORCH_CHECK(2 * n_groups <= kQuantizeValuesStatsFloats, "head_dim / group_size must be at most ",
              kQuantizeValuesStatsFloats / 2, ", got ", n_groups);

  const c10::cuda::CUDAGuard guard(values.device());
  std::vector<int64_t> code_shape(values.sizes().begin(), values.sizes().end());
  std::vector<int64_t> group_shape = code_shape;
  code_shape.back() = d / per_word;
  group_shape.back() = n_groups;
  at::Tensor codes = at::empty(code_shape, values.options().dtype(at::kInt));
  at::Tensor scales = at::empty(group_shape, values.options());
  at::Tensor mins = at::empty(group_shape, values.options());
  const int64_t rows = d > 0 ? values.numel() / d : 0;
  if (rows == 0) return {codes, scales, mins};
  TORCH_CHECK(rows <= INT32_MAX, "too many value rows for one launch: ", rows);

  QuantizeValuesArgs a{values.data_ptr(), kind,
                       codes.data_ptr<int32_t>(), scales.data_ptr(),
                       mins.data_ptr(), rows,
                       static_cast<int>(d), static_cast<int>(group_size),
                       static_cast<int>(bits)};
  TORCH_CHECK(launch_quantize_values(a, at::cuda::getCurrentCUDAStream()), "quantize_values: no kernel for bits = ",
              bits, ", group_size = ", group_size, ", head_dim = ", d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, scales, mins};
}

at::Tensor value_matmul_cuda(const at::Tensor& weights, const at::Tensor& codes, const at::Tensor& scales,
                             const at::Tensor& mins, int64_t bits, int64_t group_size) {
  QJL_CHECK_CUDA(weights);
  QJL_CHECK_SAME_DEVICE(weights, codes);
  QJL_CHECK_SAME_DEVICE(weights, scales);
  QJL_CHECK_SAME_DEVICE(weights, mins);
  QJL_CHECK_DIM(weights, 4);
  QJL_CHECK_DIM(codes, 4);
  QJL_CHECK_DIM(scales, 4);
  QJL_CHECK_DIM(mins, 4);
  const Fp weight_kind = fp_kind(weights, "weights");
  QJL_CHECK_DTYPE(codes, at::kInt);
  const Fp value_kind = fp_kind(scales, "scales");
  TORCH_CHECK(mins.scalar_type() == scales.scalar_type(), "mins must have the dtype of scales (",
              scales.scalar_type(), "), got ", mins.scalar_type());
  TORCH_CHECK(bits == 2 || bits == 4, "bits must be 2 or 4, got ", bits);
  const int64_t B = codes.size(0), H_kv = codes.size(1), T = codes.size(2);
  const int64_t per_word = 32 / bits, d = codes.size(3) * per_word;
  TORCH_CHECK(group_size > 0 && d % group_size == 0, "group_size must be a positive divisor of head_dim ", d,
              ", got ", group_size);
  TORCH_CHECK(codes.size(3) <= kValueMatmulThreads, "head_dim * bits / 32 must be at most ", kValueMatmulThreads,
              " int32 words, got ", codes.size(3));
  const std::vector<int64_t> group_shape{B, H_kv, T, d / group_size};
  TORCH_CHECK(scales.sizes() == at::IntArrayRef(group_shape) && mins.sizes() == at::IntArrayRef(group_shape),
              "scales / mins must be ", at::IntArrayRef(group_shape), ", got ", scales.sizes(), " / ", mins.sizes());
  const int64_t H_q = weights.size(1), L = weights.size(2);
  TORCH_CHECK(weights.size(0) == B && weights.size(3) == T, "weights must be [B = ", B, ", H_q, L, T = ", T,
              "] to match the values, got ", weights.sizes());
  TORCH_CHECK(H_kv > 0 && H_q % H_kv == 0, "weights heads (", H_q, ") must be a multiple of KV heads (", H_kv, ")");
  TORCH_CHECK(inner_dense(codes, 3) && inner_dense(scales, 3) && inner_dense(mins, 3),
              "codes, scales and mins must be dense in their last dim (views along dims 0..2 are fine)");

  const c10::cuda::CUDAGuard guard(weights.device());
  const auto f32 = weights.options().dtype(at::kFloat);
  if (B == 0 || H_q == 0 || L == 0 || d == 0) return at::empty({B, H_q, L, d}, f32);
  if (T == 0) return at::zeros({B, H_q, L, d}, f32);

  const int64_t rows_per_block = kValueMatmulAccumulators / per_word, R = (H_q / H_kv) * L;
  const int64_t row_tiles = ceil_div(R, rows_per_block), bh = B * H_kv;
  TORCH_CHECK(row_tiles <= kMaxGridYZ, "query rows per KV head (", R, ") too many for one launch");
  TORCH_CHECK(bh <= kMaxGridYZ, "batch * KV heads (", bh, ") exceeds ", kMaxGridYZ);
  // Split the tokens so that the grid covers the GPU a few times over.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = ceil_div(4 * sms, row_tiles * bh);
  const int64_t splits_cap = ceil_div(T, kMinTokensPerSplit);
  const int64_t tokens_per_split = ceil_div(T, std::max<int64_t>(1, std::min(wanted, splits_cap)));
  const int64_t splits = ceil_div(T, tokens_per_split);
  TORCH_CHECK(splits <= INT32_MAX, "too many tokens for one launch: ", T);

  at::Tensor partial = at::empty({splits, B, H_q, L, d}, f32);
  ValueMatmulArgs a{};
  a.weights = weights.data_ptr();
  a.ws0 = weights.stride(0);
  a.ws1 = weights.stride(1);
  a.ws2 = weights.stride(2);
  a.ws3 = weights.stride(3);
  a.weight_kind = weight_kind;
  a.codes = view3(codes);
  a.scales = view3(scales);
  a.mins = view3(mins);
  a.value_kind = value_kind;
  a.partial = partial.data_ptr<float>();
  a.B = static_cast<int>(B);
  a.H_kv = static_cast<int>(H_kv);
  a.ratio = static_cast<int>(H_q / H_kv);
  a.L = static_cast<int>(L);
  a.d = static_cast<int>(d);
  a.group_size = static_cast<int>(group_size);
  a.bits = static_cast<int>(bits);
  a.T = T;
  a.tokens_per_split = tokens_per_split;
  a.splits = splits;
  TORCH_CHECK(launch_value_matmul(a, at::cuda::getCurrentCUDAStream()), "value_matmul: no kernel for bits = ", bits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return splits == 1 ? partial.squeeze(0) : partial.sum(0);
}

at::Tensor decode_attention_cuda(const at::Tensor& query, const at::Tensor& bits, const at::Tensor& outlier_bits,
                                 const at::Tensor& inlier_norms, const at::Tensor& outlier_norms,
                                 const at::Tensor& outlier_indices, const at::Tensor& projection,
                                 const at::Tensor& residual_keys, const at::Tensor& value_codes,
                                 const at::Tensor& value_scales, const at::Tensor& value_mins,
                                 const at::Tensor& value_window, const c10::optional<at::Tensor>& mask,
                                 double scaling, int64_t value_bits, int64_t value_group_size) {
  QJL_CHECK_CUDA(query);
  QJL_CHECK_SAME_DEVICE(query, bits);
  QJL_CHECK_SAME_DEVICE(query, outlier_bits);
  QJL_CHECK_SAME_DEVICE(query, inlier_norms);
  QJL_CHECK_SAME_DEVICE(query, outlier_norms);
  QJL_CHECK_SAME_DEVICE(query, outlier_indices);
  QJL_CHECK_SAME_DEVICE(query, projection);
  QJL_CHECK_SAME_DEVICE(query, residual_keys);
  QJL_CHECK_SAME_DEVICE(query, value_codes);
  QJL_CHECK_SAME_DEVICE(query, value_scales);
  QJL_CHECK_SAME_DEVICE(query, value_mins);
  QJL_CHECK_SAME_DEVICE(query, value_window);
  const Fp query_kind = fp_kind(query, "query");
  const Fp inlier_kind = fp_kind(inlier_norms, "inlier_norms");
  const Fp outlier_kind = fp_kind(outlier_norms, "outlier_norms");
  const Fp residual_kind = fp_kind(residual_keys, "residual_keys");
  const Fp scale_kind = fp_kind(value_scales, "value_scales");
  const Fp min_kind = fp_kind(value_mins, "value_mins");
  const Fp window_kind = fp_kind(value_window, "value_window");

  const DecodeShape shape = check_decode_shapes(query, bits, outlier_bits, inlier_norms, outlier_norms,
                                                outlier_indices, projection, residual_keys, value_codes,
                                                value_scales, value_mins, value_window, value_bits, value_group_size);
  const int64_t B = shape.B, H_q = shape.H_q, L = shape.L, d = shape.d, H_kv = shape.H_kv, G = shape.G;
  const int64_t m = shape.m, m_o = shape.m_o, n_out = shape.n_out, T_c = shape.T_c, T = shape.T, T_q = shape.T_q;
  TORCH_CHECK(d >= 1 && d <= 256, "head_dim must be in [1, 256] (outlier indices are uint8), got ", d);
  TORCH_CHECK(inner_dense(bits, 3) && inner_dense(outlier_bits, 3),
              "bits and outlier_bits must be dense in their last two dims [G, m/8] (views along dims 0..2 are fine)");
  TORCH_CHECK(inner_dense(inlier_norms, 3) && inner_dense(outlier_norms, 3) && inner_dense(outlier_indices, 3),
              "inlier_norms, outlier_norms and outlier_indices must be dense in their last dim");
  TORCH_CHECK(inner_dense(residual_keys, 3) && inner_dense(value_window, 3),
              "residual_keys and value_window must be dense in their last dim (views along dims 0..2 are fine)");
  TORCH_CHECK(inner_dense(value_codes, 3) && inner_dense(value_scales, 3) && inner_dense(value_mins, 3),
              "value_codes, value_scales and value_mins must be dense in their last dim");
  const uint8_t* mask_ptr = nullptr;
  int64_t ms0 = 0, ms1 = 0, ms2 = 0;
  if (mask.has_value() && mask->defined()) {
    QJL_CHECK_SAME_DEVICE(query, *mask);
    check_decode_mask(*mask, shape);
    mask_ptr = static_cast<const uint8_t*>(mask->data_ptr());  // bool is one byte, 0 or 1
    ms0 = mask->size(0) == 1 ? 0 : mask->stride(0);
    ms1 = mask->stride(1);
    ms2 = mask->stride(2);
  }

  const c10::cuda::CUDAGuard guard(query.device());
  const auto f32 = query.options().dtype(at::kFloat);
  at::Tensor output = at::empty({B, H_q, L, d}, f32);
  if (B == 0 || H_q == 0) return output;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  DecodeArgs a{};
  a.B = static_cast<int>(B);
  a.H_kv = static_cast<int>(H_kv);
  a.ratio = static_cast<int>(H_q / H_kv);
  a.L = static_cast<int>(L);
  a.d = static_cast<int>(d);
  a.m = static_cast<int>(m);
  a.m_o = static_cast<int>(m_o);
  a.n_out = static_cast<int>(n_out);
  a.G = static_cast<int>(std::max<int64_t>(G, 1));
  a.value_bits = static_cast<int>(value_bits);
  a.value_group = static_cast<int>(T_q > 0 ? value_group_size : 1);
  a.T = T;
  a.T_c = T_c;
  a.T_q = T_q;
  const int64_t R = (H_q / H_kv) * L;  // query rows per KV head
  TORCH_CHECK(B * H_q * L <= INT32_MAX && R <= INT32_MAX && G <= INT32_MAX, "too many query rows for one launch");
  a.row_chunks = static_cast<int>(ceil_div(R, decode_max_rows(a.d, a.value_bits)));
  a.rows_per_block = static_cast<int>(ceil_div(R, a.row_chunks));
  // Token splits: about four blocks per SM, at least 256 tokens each, committed parts in whole groups.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t heads = a.row_chunks * B * H_kv;
  int64_t span = std::max<int64_t>(kMinTokensPerSplit, ceil_div(T, ceil_div(4 * sms, heads)));
  if (T_c > 0) span = ceil_div(span, G) * G;
  a.span = span;
  a.splits = ceil_div(T, span);
  TORCH_CHECK(a.splits * heads <= INT32_MAX, "decode_attention: too many blocks for one launch");
  a.scale_in = qjl_scale(m);
  a.scale_out = qjl_scale(m_o);
  a.logit_scale = static_cast<float>(scaling * 1.4426950408889634);  // log2(e): the kernel uses exp2

  // Workspace: S q [rows, m], S^T [d, m], column sums and max row norm [2 d + 1], split partials
  // [splits, rows, d + 2].
  const int64_t rows_total = B * H_q * L;
  const int64_t sketch_floats = T_c > 0 ? rows_total * m + d * m + 2 * d + 1 : 0;
  const int64_t partial_floats = a.splits > 1 ? a.splits * rows_total * (d + 2) : 0;
  at::Tensor workspace = at::empty({sketch_floats + partial_floats}, f32);
  float* ws = workspace.data_ptr<float>();
  a.query = view4(query, query_kind);
  if (T_c > 0) {
    const Projection p = float_projection(projection);
    a.q_sketch = ws;
    a.column_sums = ws + rows_total * m + d * m;
    a.proj_t = sketch_queries(query, query_kind, p, m_o, ws, ws + rows_total * m, ws + rows_total * m + d * m, stream);
    a.bits = view3(bits);
    a.outlier_bits = view3(outlier_bits);
    a.inlier_norms = view3(inlier_norms);
    a.outlier_norms = view3(outlier_norms);
    a.outlier_indices = view3(outlier_indices);
    a.inlier_kind = inlier_kind;
    a.outlier_kind = outlier_kind;
    a.in_words = word_aligned(bits, m / 8);
    a.out_words = word_aligned(outlier_bits, m_o / 8);
  }
  a.residual = view3(residual_keys);
  a.residual_kind = residual_kind;
  if (T_q > 0) {
    a.codes = view3(value_codes);
    a.scales = view3(value_scales);
    a.mins = view3(value_mins);
  }
  a.scale_kind = scale_kind;
  a.min_kind = min_kind;
  a.window = view3(value_window);
  a.window_kind = window_kind;
  a.mask = mask_ptr;
  a.ms0 = ms0;
  a.ms1 = ms1;
  a.ms2 = ms2;
  a.out = output.data_ptr<float>();
  if (a.splits > 1) {
    a.part_acc = ws + sketch_floats;
    a.part_max = a.part_acc + a.splits * rows_total * d;
    a.part_sum = a.part_max + a.splits * rows_total;
  }

  // Committed scores on tensor cores where the shapes allow (decode_tensor_cores_fit) on sm_80+;
  // QJL_DECODE_TENSOR_CORES=0 forces the CUDA-core path (tests run both).
  const char* tc_env = std::getenv("QJL_DECODE_TENSOR_CORES");
  const bool tc_allowed = tc_env == nullptr || std::string(tc_env) != "0";
  a.tensor_cores = tc_allowed && at::cuda::getCurrentDeviceProperties()->major >= 8 && decode_tensor_cores_fit(a);

  DecodeLayout layout{};
  const size_t max_smem = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(decode_layout(a, max_smem, &layout), "decode_attention: sketch sizes m = ", m, ", m_o = ", m_o,
              " need ", layout.bytes, " bytes of shared memory per block, more than the ", max_smem, " this GPU has");
  TORCH_CHECK(launch_decode_attention(a, layout, stream), "decode_attention: no kernel for ", value_bits,
              "-bit values and ", layout.row_accumulators, " rows per thread");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (a.splits > 1) {
    launch_decode_merge(a, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return output;
}

}  // namespace qjl
