// CUDA implementations of the qjl ops (schemas in torch_bindings.cpp, references in ../reference.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace qjl {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_keys_cuda(const at::Tensor& keys,
                                                                              const at::Tensor& outlier_indices,
                                                                              const at::Tensor& projection,
                                                                              int64_t outlier_sketch_dim);

at::Tensor key_scores_cuda(const at::Tensor& query, const at::Tensor& bits, const at::Tensor& outlier_bits,
                           const at::Tensor& inlier_norms, const at::Tensor& outlier_norms,
                           const at::Tensor& outlier_indices, const at::Tensor& projection);

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_values_cuda(const at::Tensor& values, int64_t group_size,
                                                                    int64_t bits);

at::Tensor value_matmul_cuda(const at::Tensor& weights, const at::Tensor& codes, const at::Tensor& scales,
                             const at::Tensor& mins, int64_t bits, int64_t group_size);

// Fused decode attention (schema in torch_bindings.cpp; spec reference.py::decode_attention_ref).
at::Tensor decode_attention_cuda(const at::Tensor& query, const at::Tensor& bits, const at::Tensor& outlier_bits,
                                 const at::Tensor& inlier_norms, const at::Tensor& outlier_norms,
                                 const at::Tensor& outlier_indices, const at::Tensor& projection,
                                 const at::Tensor& residual_keys, const at::Tensor& value_codes,
                                 const at::Tensor& value_scales, const at::Tensor& value_mins,
                                 const at::Tensor& value_window, const c10::optional<at::Tensor>& mask,
                                 double scaling, int64_t value_bits, int64_t value_group_size);

}  // namespace qjl
