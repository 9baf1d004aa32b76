// CPU implementations of the qjl ops (schemas in ../torch_bindings.cpp, references in ../../reference.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

namespace qjl {
namespace cpu {

// Fused attention of a step's query rows over one layer's compressed KV state (decode_attention_ref).
at::Tensor decode_attention_cpu(const at::Tensor& query, const at::Tensor& bits, const at::Tensor& outlier_bits,
                                const at::Tensor& inlier_norms, const at::Tensor& outlier_norms,
                                const at::Tensor& outlier_indices, const at::Tensor& projection,
                                const at::Tensor& residual_keys, const at::Tensor& value_codes,
                                const at::Tensor& value_scales, const at::Tensor& value_mins,
                                const at::Tensor& value_window, const c10::optional<at::Tensor>& mask,
                                double scaling, int64_t value_bits, int64_t value_group_size);

// Per-token grouped low-bit quantization of values (quantize_values_ref), bit-identical to it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_values_cpu(const at::Tensor& values, int64_t group_size,
                                                                   int64_t bits);

// The instruction set the CPU kernels run with now: "avx512", "avx2" or "scalar".
std::string cpu_isa();

}  // namespace cpu
}  // namespace qjl
