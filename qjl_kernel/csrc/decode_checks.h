// Rank, integer dtype and shape checks of decode_attention's arguments, shared by its CPU (cpu/decode_attention_cpu.cpp)
// and CUDA (ops.cpp) host code; each backend adds its own device, dtype and layout checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace qjl {

// The sizes of one decode_attention call: query [B, H_q, L, d]; T_c = N * G committed keys (sketch
// m, outlier sketch m_o, n_out outlier channels per group) then R residual keys; T_q quantized values
// then W window values; T = T_c + R = T_q + W tokens.
struct DecodeShape {
  int64_t B, H_q, L, d, H_kv, N, G, m, m_o, n_out, T_c, R, T, T_q, W;
};

// Ranks, the integer dtypes and value_bits first, then every size against the others (each backend
// checks devices and the float dtypes it reads itself).
inline DecodeShape check_decode_shapes(const at::Tensor& query, const at::Tensor& bits,
                                       const at::Tensor& outlier_bits, const at::Tensor& inlier_norms,
                                       const at::Tensor& outlier_norms, const at::Tensor& outlier_indices,
                                       const at::Tensor& projection, const at::Tensor& residual_keys,
                                       const at::Tensor& value_codes, const at::Tensor& value_scales,
                                       const at::Tensor& value_mins, const at::Tensor& value_window,
                                       int64_t value_bits, int64_t value_group_size) {
  const std::pair<const at::Tensor*, const char*> rank4[] = {
      {&query, "query"}, {&inlier_norms, "inlier_norms"}, {&outlier_norms, "outlier_norms"},
      {&outlier_indices, "outlier_indices"}, {&residual_keys, "residual_keys"}, {&value_codes, "value_codes"},
      {&value_scales, "value_scales"}, {&value_mins, "value_mins"}, {&value_window, "value_window"}};
  for (const auto& [t, name] : rank4) TORCH_CHECK(t->dim() == 4, name, " must have rank 4, got shape ", t->sizes());
  TORCH_CHECK(bits.dim() == 5, "bits must have rank 5, got shape ", bits.sizes());
  TORCH_CHECK(outlier_bits.dim() == 5, "outlier_bits must have rank 5, got shape ", outlier_bits.sizes());
  TORCH_CHECK(projection.dim() == 2, "projection must have rank 2, got shape ", projection.sizes());
  TORCH_CHECK(projection.is_floating_point(), "projection must be a float tensor, got ", projection.scalar_type());
  const std::pair<const at::Tensor*, const char*> bytes[] = {
      {&bits, "bits"}, {&outlier_bits, "outlier_bits"}, {&outlier_indices, "outlier_indices"}};
  for (const auto& [t, name] : bytes) {
    TORCH_CHECK(t->scalar_type() == at::kByte, name, " must have dtype ", at::kByte, ", got ", t->scalar_type());
  }
  TORCH_CHECK(value_codes.scalar_type() == at::kInt, "value_codes must have dtype ", at::kInt, ", got ",
              value_codes.scalar_type());
  TORCH_CHECK(value_bits == 2 || value_bits == 4, "value_bits must be 2 or 4, got ", value_bits);
  DecodeShape s;
  s.B = query.size(0), s.H_q = query.size(1), s.L = query.size(2), s.d = query.size(3);
  s.H_kv = bits.size(1), s.N = bits.size(2), s.G = bits.size(3), s.m = bits.size(4) * 8;
  s.m_o = outlier_bits.size(4) * 8, s.n_out = outlier_indices.size(3);
  s.T_c = s.N * s.G, s.R = residual_keys.size(2), s.T = s.T_c + s.R;
  s.T_q = value_codes.size(2), s.W = value_window.size(2);
  const int64_t B = s.B, H_kv = s.H_kv, d = s.d, m = s.m;
  TORCH_CHECK(s.L > 0, "query must hold at least one row (L > 0)");
  TORCH_CHECK(H_kv > 0 && s.H_q % H_kv == 0, "query heads (", s.H_q, ") must be a multiple of KV heads (", H_kv, ")");
  const std::vector<int64_t> lead{B, H_kv, s.N, s.G};
  TORCH_CHECK(bits.size(0) == B, "bits must be [B = ", B, ", H_kv, n_groups, G, m / 8], got ", bits.sizes());
  TORCH_CHECK(outlier_bits.sizes().slice(0, 4) == at::IntArrayRef(lead), "outlier_bits must be ",
              at::IntArrayRef(lead), " + [m_o / 8], got ", outlier_bits.sizes());
  TORCH_CHECK(inlier_norms.sizes() == at::IntArrayRef(lead) && outlier_norms.sizes() == at::IntArrayRef(lead),
              "inlier_norms / outlier_norms must be ", at::IntArrayRef(lead), ", got ", inlier_norms.sizes(), " / ",
              outlier_norms.sizes());
  TORCH_CHECK(outlier_indices.sizes().slice(0, 3) == at::IntArrayRef(lead).slice(0, 3),
              "outlier_indices must be [B, H_kv, n_groups, n_out] = ", at::IntArrayRef(lead).slice(0, 3),
              " + [n_out], got ", outlier_indices.sizes());
  TORCH_CHECK(s.n_out <= d, "outlier_indices selects ", s.n_out, " channels, more than head_dim ", d);
  TORCH_CHECK(s.m_o <= m, "outlier sketch (", s.m_o, " bits) larger than the sketch (", m, " bits)");
  TORCH_CHECK(s.T_c == 0 || m > 0, "bits must hold a sketch of m > 0 coordinates");
  TORCH_CHECK(s.T_c == 0 || (projection.size(0) == m && projection.size(1) == d), "projection must be [m = ", m,
              ", d = ", d, "], got ", projection.sizes());
  TORCH_CHECK(residual_keys.size(0) == B && residual_keys.size(1) == H_kv && residual_keys.size(3) == d,
              "residual_keys must be [B = ", B, ", H_kv = ", H_kv, ", R, d = ", d, "], got ", residual_keys.sizes());
  TORCH_CHECK(value_window.size(0) == B && value_window.size(1) == H_kv && value_window.size(3) == d,
              "value_window must be [B = ", B, ", H_kv = ", H_kv, ", W, d = ", d, "], got ", value_window.sizes());
  TORCH_CHECK(s.T_q + s.W == s.T, "values hold ", s.T_q, " quantized + ", s.W, " window tokens but keys hold ", s.T_c,
              " committed + ", s.R, " residual: the two must cover the same tokens");
  TORCH_CHECK(s.T > 0, "the layer holds no tokens");
  if (s.T_q > 0) {  // no quantized values: the value tensors are placeholders and unread
    const int64_t per_word = 32 / value_bits;
    TORCH_CHECK(value_group_size > 0 && d % value_group_size == 0,
                "value_group_size must be a positive divisor of head_dim ", d, ", got ", value_group_size);
    TORCH_CHECK(d % per_word == 0, "head_dim ", d, " must be a multiple of ", per_word, " for ", value_bits,
                "-bit codes");
    const std::vector<int64_t> code_shape{B, H_kv, s.T_q, d / per_word};
    const std::vector<int64_t> group_shape{B, H_kv, s.T_q, d / value_group_size};
    TORCH_CHECK(value_codes.sizes() == at::IntArrayRef(code_shape), "value_codes must be ",
                at::IntArrayRef(code_shape), ", got ", value_codes.sizes());
    TORCH_CHECK(value_scales.sizes() == at::IntArrayRef(group_shape) &&
                    value_mins.sizes() == at::IntArrayRef(group_shape),
                "value_scales / value_mins must be ", at::IntArrayRef(group_shape), ", got ", value_scales.sizes(),
                " / ", value_mins.sizes());
  }
  return s;
}

// The optional mask: bool [B or 1, L, T] (True = attend).
inline void check_decode_mask(const at::Tensor& mask, const DecodeShape& s) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be bool (True = attend), got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 3 && (mask.size(0) == s.B || mask.size(0) == 1) && mask.size(1) == s.L &&
                  mask.size(2) == s.T,
              "mask must be [B = ", s.B, " (or 1), L = ", s.L, ", T = ", s.T, "], got ", mask.sizes());
}

}  // namespace qjl
