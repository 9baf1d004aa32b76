// The fused CPU decode-attention task for x86-64 with AVX2 + FMA: the sign bits of a byte select
// 8 projected-query entries through a compare mask. Chosen at run time (decode_attention_cpu.cpp).
#include "decode_kernel.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// System headers first, under the baseline target; only this file's own code gets the wider one.
#include <immintrin.h>

#include <cstring>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#define QJL_ISA_LEVEL 1
#define QJL_TASK_NAME decode_task_avx2
#include "decode_kernel_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif

bool qjl::cpu::avx2_compiled() { return true; }
#else
namespace qjl {
namespace cpu {
bool avx2_compiled() { return false; }
void decode_task_avx2(const DecodeArgs&, int64_t, int64_t, int64_t, int64_t, float*, float*, float*, float*) {}
}  // namespace cpu
}  // namespace qjl
#endif
