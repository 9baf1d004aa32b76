// Host side of the fused CPU decode attention (torch.ops.qjl.decode_attention on CPU tensors):
// argument checks, float32 staging of the small inputs, S q once per query row, tasks over
// (batch, KV head, token chunk) run with at::parallel_for, partial results merged by log-sum-exp.
// The spec is qjl_kernel/reference.py::decode_attention_ref.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "../decode_checks.h"
#include "cpu_ops.h"
#include "decode_kernel.h"

#define QJL_CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got device ", (x).device())
#define QJL_CHECK_FLOAT(x)                                                                                        \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||                             \
                  (x).scalar_type() == at::kBFloat16,                                                            \
              #x " must be float16, bfloat16 or float32, got ", (x).scalar_type())

namespace qjl {
namespace cpu {
namespace {

constexpr int64_t kMaxSpan = 4096;   // tokens per task: logits of one task stay in L2
constexpr int64_t kMinSpan = 256;    // fewest tokens worth a task of its own
constexpr int64_t kMinParallelWork = 1 << 15;  // token x KV head x query-row count worth the thread pool

// True when dims [first, dim) of t are dense (sizes of 1 may have any stride; empty tensors are).
bool inner_dense(const at::Tensor& t, int64_t first) {
  if (t.numel() == 0) return true;
  int64_t expected = 1;
  for (int64_t i = t.dim() - 1; i >= first; --i) {
    if (t.size(i) != 1 && t.stride(i) != expected) return false;
    expected *= t.size(i);
  }
  return true;
}

// Which task kernel runs: QJL_CPU_ISA (scalar | avx2 | avx512) if set, else the widest this CPU
// and this build support, capped by ATEN_CPU_CAPABILITY (default | avx2 | avx512) like ATen's own.
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

bool cpu_has(Isa isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (isa == Isa::kAvx512) {
    return avx512_compiled() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  if (isa == Isa::kAvx2) return avx2_compiled() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == Isa::kScalar;
}

Isa parse_isa(const std::string& name, const char* variable) {
  if (name == "scalar" || name == "default") return Isa::kScalar;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "avx512") return Isa::kAvx512;
  TORCH_CHECK(false, variable, " must be one of scalar, avx2, avx512 (got '", name, "')");
}

Isa choose_isa() {
  if (const char* forced = std::getenv("QJL_CPU_ISA"); forced != nullptr && *forced) {
    const Isa isa = parse_isa(forced, "QJL_CPU_ISA");
    TORCH_CHECK(cpu_has(isa), "QJL_CPU_ISA=", forced, " but this CPU or build does not support it");
    return isa;
  }
  Isa cap = Isa::kAvx512;
  if (const char* aten = std::getenv("ATEN_CPU_CAPABILITY"); aten != nullptr && *aten) {
    std::string name(aten);
    for (auto& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    if (name == "default" || name == "avx2" || name == "avx512") cap = parse_isa(name, "ATEN_CPU_CAPABILITY");
  }
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2}) {
    if (static_cast<int>(isa) <= static_cast<int>(cap) && cpu_has(isa)) return isa;
  }
  return Isa::kScalar;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kScalar:
      return "scalar";
  }
  TORCH_CHECK(false, "unknown ISA");
}

DecodeTaskFn task_for(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return &decode_task_avx512;
    case Isa::kAvx2:
      return &decode_task_avx2;
    case Isa::kScalar:
      return &decode_task_scalar;
  }
  TORCH_CHECK(false, "unknown ISA");
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
HeadStrided<T> head_strided(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1)};
}

}  // namespace

std::string cpu_isa() { return isa_name(choose_isa()); }

at::Tensor decode_attention_cpu(const at::Tensor& query, const at::Tensor& bits, const at::Tensor& outlier_bits,
                                const at::Tensor& inlier_norms, const at::Tensor& outlier_norms,
                                const at::Tensor& outlier_indices, const at::Tensor& projection,
                                const at::Tensor& residual_keys, const at::Tensor& value_codes,
                                const at::Tensor& value_scales, const at::Tensor& value_mins,
                                const at::Tensor& value_window, const c10::optional<at::Tensor>& mask,
                                double scaling, int64_t value_bits, int64_t value_group_size) {
  for (const at::Tensor* t : {&query, &bits, &outlier_bits, &inlier_norms, &outlier_norms, &outlier_indices,
                              &projection, &residual_keys, &value_codes, &value_scales, &value_mins, &value_window}) {
    TORCH_CHECK(t->device().is_cpu(), "decode_attention (CPU kernel): every tensor must be on the CPU, got ",
                t->device());
  }
  QJL_CHECK_FLOAT(query);
  QJL_CHECK_FLOAT(inlier_norms);
  QJL_CHECK_FLOAT(outlier_norms);
  QJL_CHECK_FLOAT(residual_keys);
  QJL_CHECK_FLOAT(value_scales);
  QJL_CHECK_FLOAT(value_mins);
  QJL_CHECK_FLOAT(value_window);

  const DecodeShape shape = check_decode_shapes(query, bits, outlier_bits, inlier_norms, outlier_norms,
                                                outlier_indices, projection, residual_keys, value_codes,
                                                value_scales, value_mins, value_window, value_bits, value_group_size);
  const int64_t B = shape.B, H_q = shape.H_q, L = shape.L, d = shape.d, H_kv = shape.H_kv, G = shape.G;
  const int64_t m = shape.m, m_o = shape.m_o, n_out = shape.n_out, T_c = shape.T_c, T = shape.T, T_q = shape.T_q;
  TORCH_CHECK(inner_dense(bits, 2) && inner_dense(outlier_bits, 2) && inner_dense(inlier_norms, 2) &&
                  inner_dense(outlier_norms, 2) && inner_dense(outlier_indices, 2),
              "the committed key tensors must be dense from their group axis on (views along B and H_kv are fine)");
  TORCH_CHECK(inner_dense(value_codes, 2) && inner_dense(value_scales, 2) && inner_dense(value_mins, 2),
              "value_codes / value_scales / value_mins must be dense from their token axis on");
  if (n_out > 0 && outlier_indices.numel() > 0) {
    const int64_t high = outlier_indices.max().item<int64_t>();
    TORCH_CHECK(high < d, "outlier_indices must lie in [0, ", d, "), got ", high);
  }

  auto f32 = query.options().dtype(at::kFloat);
  at::Tensor output = at::empty({B, H_q, L, d}, f32);
  if (B == 0 || d == 0) return output;

  // float32 staging. Queries, residual keys and the window are small; the per-token state (norms,
  // scales, mins) is read in place when float32 and converted once here otherwise.
  const at::Tensor q = query.to(at::kFloat).contiguous();
  const at::Tensor proj = T_c > 0 ? projection.to(at::kFloat) : at::empty({0, d}, f32);
  const at::Tensor proj_t = proj.t().contiguous();                                   // [d, m]
  const at::Tensor sketch = T_c > 0 ? at::matmul(q, proj.t()).contiguous() : at::empty({0}, f32);  // [B, H_q, L, m]
  const at::Tensor sketch_sums = T_c > 0 ? sketch.sum(-1).contiguous() : at::empty({0}, f32);
  const at::Tensor channel_sums_m = T_c > 0 ? proj_t.sum(1).contiguous() : at::empty({0}, f32);
  const at::Tensor channel_sums_mo =
      T_c > 0 ? proj_t.narrow(1, 0, m_o).sum(1).contiguous() : at::empty({0}, f32);
  const at::Tensor norms_in = inlier_norms.to(at::kFloat), norms_out = outlier_norms.to(at::kFloat);
  const at::Tensor scales = value_scales.to(at::kFloat), mins = value_mins.to(at::kFloat);
  const at::Tensor residual = residual_keys.to(at::kFloat).contiguous();
  const at::Tensor window = value_window.to(at::kFloat).contiguous();
  at::Tensor mask_u8;
  if (mask.has_value() && mask->defined()) {
    QJL_CHECK_CPU(*mask);
    check_decode_mask(*mask, shape);
    mask_u8 = mask->expand({B, L, T}).contiguous();
  }

  DecodeArgs a;
  a.kv_heads = H_kv;
  a.rows = (H_q / H_kv) * L;
  a.length = L;
  a.dim = d;
  a.tokens = T;
  a.query = q.data_ptr<float>();
  a.committed = T_c;
  a.group = G;
  if (T_c > 0) {
    a.query_sketch = sketch.data_ptr<float>();
    a.sketch_sums = sketch_sums.data_ptr<float>();
    a.projection_t = proj_t.data_ptr<float>();
    a.channel_sums_m = channel_sums_m.data_ptr<float>();
    a.channel_sums_mo = channel_sums_mo.data_ptr<float>();
    a.m = m;
    a.m_o = m_o;
    a.n_out = n_out;
    a.bits = head_strided<uint8_t>(bits);
    a.outlier_bits = head_strided<uint8_t>(outlier_bits);
    a.inlier_norms = head_strided<float>(norms_in);
    a.outlier_norms = head_strided<float>(norms_out);
    a.outlier_indices = head_strided<uint8_t>(outlier_indices);
    a.inlier_scale = static_cast<float>(std::sqrt(M_PI / 2.0) / static_cast<double>(m));
    a.outlier_scale = m_o > 0 ? static_cast<float>(std::sqrt(M_PI / 2.0) / static_cast<double>(m_o)) : 0.f;
  }
  a.residual = residual.data_ptr<float>();
  a.quantized = T_q;
  a.value_bits = value_bits;
  a.value_group = value_group_size;
  if (T_q > 0) {
    a.words = d * value_bits / 32;
    a.codes = head_strided<int32_t>(value_codes);
    a.scales = head_strided<float>(scales);
    a.mins = head_strided<float>(mins);
  }
  a.window = window.data_ptr<float>();
  a.mask = mask_u8.defined() ? static_cast<const uint8_t*>(mask_u8.data_ptr()) : nullptr;  // bool is one byte, 0 or 1
  a.scaling = static_cast<float>(scaling);

  // Tasks: (batch, KV head, chunk of tokens). Enough chunks to keep every thread busy, each short
  // enough for its logits to stay in cache and long enough to be worth a task.
  const int64_t threads = at::get_num_threads(), heads = B * H_kv;
  const int64_t wanted = std::max<int64_t>(1, ceil_div(4 * threads, heads));
  int64_t chunks = std::min(wanted, ceil_div(T, kMinSpan));
  chunks = std::max(chunks, ceil_div(T, kMaxSpan));
  int64_t span = ceil_div(T, chunks);
  if (G > 1) span = ceil_div(span, G) * G;  // chunks start on key-group boundaries
  chunks = ceil_div(T, span);
  const int64_t tasks = heads * chunks, rows = a.rows;

  std::vector<float> row_max(tasks * rows), row_sum(tasks * rows), row_acc(tasks * rows * d);
  const DecodeTaskFn task = task_for(choose_isa());
  const int64_t workspace = decode_workspace_floats(a, span);
  // Small steps run on the calling thread: waking the pool costs more than they take.
  const int64_t grain = T * heads * rows < kMinParallelWork ? tasks : 1;
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(workspace);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t chunk = i % chunks, bh = i / chunks;
      const int64_t t0 = chunk * span, t1 = std::min(T, t0 + span);
      task(a, bh / H_kv, bh % H_kv, t0, t1, &row_max[i * rows], &row_sum[i * rows], &row_acc[i * rows * d],
           scratch.data());
    }
  });

  // Merge the chunks of each (batch, KV head) by log-sum-exp.
  float* out = output.data_ptr<float>();  // [B, H_kv, rows, d]: rows of a KV head are its query heads x L
  {  // (a few microseconds: no parallel region)
    for (int64_t bh = 0; bh < heads; ++bh) {
      for (int64_t r = 0; r < rows; ++r) {
        float mx = -std::numeric_limits<float>::max();
        for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, row_max[(bh * chunks + c) * rows + r]);
        float total = 0.f;
        float* o = out + (bh * rows + r) * d;
        std::fill(o, o + d, 0.f);
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t i = bh * chunks + c;
          const float w = std::exp(row_max[i * rows + r] - mx);
          total += w * row_sum[i * rows + r];
          const float* acc = &row_acc[(i * rows + r) * d];
          for (int64_t k = 0; k < d; ++k) o[k] += w * acc[k];
        }
        const float inv = 1.f / total;
        for (int64_t k = 0; k < d; ++k) o[k] *= inv;
      }
    }
  }
  return output;
}

}  // namespace cpu
}  // namespace qjl

