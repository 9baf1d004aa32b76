// The qjl op registry: every op's schema, declared once, and its implementations per backend.
// Fake (meta) implementations for torch.compile / opcheck live in ../_fake.py; the pure-PyTorch
// references that define the semantics live in ../reference.py.
#include <Python.h>
#include <torch/library.h>

#include "cpu/cpu_ops.h"
#if defined(QJL_WITH_CUDA)
#include "ops.h"
#endif

TORCH_LIBRARY(qjl, m) {
  // Keys [B, H_kv, N, G, d] (f16/bf16/f32), uint8 outlier channels [B, H_kv, N, n_out], S [m, d]
  // -> (uint8 signs of S k_in [.., G, m/8], uint8 signs of S[:m_o] k_out [.., G, m_o/8], ||k_in||, ||k_out||).
  m.def(
      "quantize_keys(Tensor keys, Tensor outlier_indices, Tensor projection, int outlier_sketch_dim)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  // Query [B, H_q, L, d] x QJL key state (quantize_keys' outputs + indices) -> float32 [B, H_q, L, N*G].
  m.def(
      "key_scores(Tensor query, Tensor bits, Tensor outlier_bits, Tensor inlier_norms, Tensor outlier_norms,"
      " Tensor outlier_indices, Tensor projection) -> Tensor");
  // Values [..., T, d] -> (int32 codes [..., T, d*bits/32], scales [..., T, d/group_size], mins [same]).
  m.def("quantize_values(Tensor values, int group_size, int bits) -> (Tensor, Tensor, Tensor)");
  // Weights [B, H_q, L, T] @ dequant(codes, scales, mins of [B, H_kv, T, d]) -> float32 [B, H_q, L, d].
  m.def("value_matmul(Tensor weights, Tensor codes, Tensor scales, Tensor mins, int bits, int group_size) -> Tensor");
  // Fused attention of query [B, H_q, L, d] over one layer: T_c committed QJL keys (quantize_keys'
  // outputs + indices, S) then exact residual keys [B, H_kv, R, d]; T_q quantized values (codes,
  // scales, mins) then the exact window [B, H_kv, W, d], T_c + R = T_q + W; optional bool mask
  // [B, L, T] (None: causal over the L newest tokens) -> float32 [B, H_q, L, d].
  m.def(
      "decode_attention(Tensor query, Tensor bits, Tensor outlier_bits, Tensor inlier_norms, Tensor outlier_norms,"
      " Tensor outlier_indices, Tensor projection, Tensor residual_keys, Tensor value_codes, Tensor value_scales,"
      " Tensor value_mins, Tensor value_window, Tensor? mask, float scaling, int value_bits, int value_group_size)"
      " -> Tensor");
  // The instruction set the CPU kernels use ("avx512", "avx2" or "scalar"; QJL_CPU_ISA forces one).
  m.def("cpu_isa() -> str", &qjl::cpu::cpu_isa);
}

TORCH_LIBRARY_IMPL(qjl, CPU, m) {
  m.impl("decode_attention", &qjl::cpu::decode_attention_cpu);
  m.impl("quantize_values", &qjl::cpu::quantize_values_cpu);
}

#if defined(QJL_WITH_CUDA)
TORCH_LIBRARY_IMPL(qjl, CUDA, m) {
  m.impl("quantize_keys", &qjl::quantize_keys_cuda);
  m.impl("key_scores", &qjl::key_scores_cuda);
  m.impl("quantize_values", &qjl::quantize_values_cuda);
  m.impl("value_matmul", &qjl::value_matmul_cuda);
  m.impl("decode_attention", &qjl::decode_attention_cuda);
}
#endif

// `import qjl_kernel._C` runs the registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "qjl ops, registered as torch.ops.qjl", -1, nullptr};
  return PyModule_Create(&module);
}
