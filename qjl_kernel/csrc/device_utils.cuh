// Device helpers shared by the qjl kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels.h"

namespace qjl {

__device__ __forceinline__ float load_fp(const void* p, int64_t i, Fp kind) {
  switch (kind) {
    case Fp::kHalf:
      return __half2float(static_cast<const __half*>(p)[i]);
    case Fp::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:  // Fp::kFloat; the host maps every other dtype to an error
      return static_cast<const float*>(p)[i];
  }
}

// Stores v rounded to nearest even, as torch's .to(dtype) does; returns the stored value as float.
__device__ __forceinline__ float store_fp(void* p, int64_t i, Fp kind, float v) {
  switch (kind) {
    case Fp::kHalf: {
      const __half h = __float2half_rn(v);
      static_cast<__half*>(p)[i] = h;
      return __half2float(h);
    }
    case Fp::kBFloat16: {
      const __nv_bfloat16 h = __float2bfloat16_rn(v);
      static_cast<__nv_bfloat16*>(p)[i] = h;
      return __bfloat162float(h);
    }
    default:
      static_cast<float*>(p)[i] = v;
      return v;
  }
}

// Word k of a packed sign-bit row (bits 32k .. 32k + 31, little-endian as packing.py lays them out).
// `words`: the row is 4-byte aligned and may be read as uint32.
__device__ __forceinline__ uint32_t sign_word(const uint8_t* row, int k, bool words) {
  if (words) return __ldg(reinterpret_cast<const uint32_t*>(row) + k);
  const uint8_t* p = row + 4 * k;
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) | (static_cast<uint32_t>(p[2]) << 16) |
         (static_cast<uint32_t>(p[3]) << 24);
}

}  // namespace qjl
