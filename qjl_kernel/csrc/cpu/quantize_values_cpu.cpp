// CPU kernel of quantize_values (spec: qjl_kernel/reference.py::quantize_values_ref), bit-identical to
// the reference: per token and group of channels, min and scale = (max - min) / (2^b - 1) in float32,
// both rounded to the values' dtype before the codes round((v - min) / scale) (half to even) are
// computed; a constant group gets scale 0 and codes 0. A group with a NaN gets NaN scale and min (torch.amin
// / amax propagate NaN; std::min / std::max would skip it), and a value whose quotient (v - min) / scale is
// not finite gets code 0 (casting NaN to an integer is undefined). Used every decode step for the value that
// leaves the exact window and for a prompt's values, where the reference's dozen tensor ops dominate.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_ops.h"

namespace qjl {
namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_values_cpu(const at::Tensor& values, int64_t group_size,
                                                                   int64_t bits) {
  TORCH_CHECK(values.device().is_cpu(), "values must be a CPU tensor, got device ", values.device());
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kHalf ||
                  values.scalar_type() == at::kBFloat16,
              "values must be float16, bfloat16 or float32, got ", values.scalar_type());
  TORCH_CHECK(values.dim() >= 2, "values must be [..., T, d], got shape ", values.sizes());
  TORCH_CHECK(bits == 2 || bits == 4, "bits must be 2 or 4, got ", bits);
  const int64_t d = values.size(-1), per_word = 32 / bits;
  TORCH_CHECK(group_size > 0 && d % group_size == 0, "group_size must be a positive divisor of head_dim ", d,
              ", got ", group_size);
  TORCH_CHECK(d % per_word == 0, "head_dim ", d, " must be a multiple of ", per_word, " for ", bits, "-bit codes");
  const at::Tensor x = values.contiguous();
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  std::vector<int64_t> code_shape = lead, group_shape = lead;
  code_shape.push_back(d / per_word);
  group_shape.push_back(d / group_size);
  at::Tensor codes = at::empty(code_shape, x.options().dtype(at::kInt));
  at::Tensor scales = at::empty(group_shape, x.options());
  at::Tensor mins = at::empty(group_shape, x.options());
  const int64_t rows = d == 0 ? 0 : x.numel() / d, groups = d / group_size, words = d / per_word;
  const float levels = static_cast<float>((1 << bits) - 1);
  const uint32_t max_code = (1u << bits) - 1u;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_values_cpu", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    scalar_t* scale_out = scales.data_ptr<scalar_t>();
    scalar_t* min_out = mins.data_ptr<scalar_t>();
    uint32_t* code_out = reinterpret_cast<uint32_t*>(codes.data_ptr<int32_t>());
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> row(d);
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t c = 0; c < d; ++c) row[c] = static_cast<float>(in[t * d + c]);
        uint32_t* word = code_out + t * words;
        std::fill(word, word + words, 0u);
        for (int64_t g = 0; g < groups; ++g) {
          const float* v = row.data() + g * group_size;
          float lo = v[0], hi = v[0];
          bool nan = std::isnan(v[0]);
          for (int64_t i = 1; i < group_size; ++i) {
            lo = std::min(lo, v[i]);
            hi = std::max(hi, v[i]);
            nan = nan || std::isnan(v[i]);
          }
          if (nan) lo = hi = std::numeric_limits<float>::quiet_NaN();
          const scalar_t min_stored = static_cast<scalar_t>(lo);
          const float min_f = static_cast<float>(min_stored);
          const scalar_t scale_stored = static_cast<scalar_t>((hi - min_f) / levels);
          const float scale_f = static_cast<float>(scale_stored);
          const float safe = scale_f > 0.f ? scale_f : 1.f;
          min_out[t * groups + g] = min_stored;
          scale_out[t * groups + g] = scale_stored;
          for (int64_t i = 0; i < group_size; ++i) {
            const float quotient = (v[i] - min_f) / safe;
            // round half to even, like torch.round; a non-finite quotient (NaN or infinite input) gets 0
            const float q = std::isfinite(quotient) ? std::nearbyint(quotient) : 0.f;
            const uint32_t code = q <= 0.f ? 0u : (q >= levels ? max_code : static_cast<uint32_t>(q));
            const int64_t c = g * group_size + i;
            word[c / per_word] |= code << ((c % per_word) * bits);
          }
        }
      }
    });
  });
  return {codes, scales, mins};
}

}  // namespace cpu
}  // namespace qjl
