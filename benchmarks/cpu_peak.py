"""The CPU decode kernel's key loop against this CPU's limit (a script, not a test).

The fused CPU kernel (qjl_kernel/csrc/cpu/decode_kernel_impl.h, ``masked_pass``) scores a committed
key with one masked 16-lane float add per 16 sign bits and query row: (m + m_o) x rows / 16 adds per
token and KV head, the bits read once for all rows. This script compiles that loop alone (4 keys x 3
rows in flight, half the adds issued as masked FMAs, as the kernel does) and the same loop without
masks, times both on one core, and turns the masked rate into the least time a decode step's key
scores can take on this machine with every thread busy. Set against exact attention's time at the
same size (``benchmarks/bench_cpu.py``), it bounds the ratio any kernel built on masked adds can reach.

    python benchmarks/cpu_peak.py [--tokens 32768] [--threads 2]

Needs a C++ compiler and an AVX-512 CPU (it says so and exits 0 otherwise).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# One key-scoring loop: T tokens x m bits, NR rows, 4 tokens at a time; argv[1] = 1 drops the masks.
SOURCE = r"""
#include <immintrin.h>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
constexpr int kM = 512, kTokens = 32768, kRows = 3, kBlock = 4;
template <bool kMasked>
__attribute__((noinline)) float score_all(const uint8_t* bits, const float (*v)[kM]) {
  const __m512 one = _mm512_set1_ps(1.f);
  __m512 total = _mm512_setzero_ps();
  for (int t = 0; t < kTokens; t += kBlock) {
    __m512 acc[kRows][kBlock];
    for (int r = 0; r < kRows; ++r)
      for (int j = 0; j < kBlock; ++j) acc[r][j] = _mm512_setzero_ps();
    const uint8_t* b = bits + static_cast<size_t>(t) * (kM / 8);
    for (int i = 0; i < kM; i += 16) {
      __mmask16 k[kBlock];
      for (int j = 0; j < kBlock; ++j) k[j] = _load_mask16((__mmask16*)(b + j * (kM / 8) + i / 8));
      for (int r = 0; r < kRows; ++r) {
        const __m512 x = _mm512_loadu_ps(v[r] + i);
        for (int j = 0; j < kBlock; j += 2) {
          if (kMasked) {
            acc[r][j] = _mm512_mask_add_ps(acc[r][j], k[j], acc[r][j], x);
            acc[r][j + 1] = _mm512_mask3_fmadd_ps(x, one, acc[r][j + 1], k[j + 1]);
          } else {
            acc[r][j] = _mm512_add_ps(acc[r][j], x);
            acc[r][j + 1] = _mm512_fmadd_ps(x, one, acc[r][j + 1]);
          }
        }
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int j = 0; j < kBlock; ++j) total = _mm512_add_ps(total, acc[r][j]);
  }
  return _mm512_reduce_add_ps(total);
}
int main(int argc, char** argv) {
  const bool masked = argc < 2 || std::strcmp(argv[1], "1") != 0;
  std::vector<uint8_t> bits(static_cast<size_t>(kTokens) * kM / 8);
  for (auto& x : bits) x = static_cast<uint8_t>(std::rand());
  alignas(64) static float v[kRows][kM];
  for (int r = 0; r < kRows; ++r)
    for (int i = 0; i < kM; ++i) v[r][i] = 1e-3f * i + r;
  double best = 1e30;
  float sink = 0.f;
  for (int rep = 0; rep < 9; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    sink += masked ? score_all<true>(bits.data(), v) : score_all<false>(bits.data(), v);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (s < best) best = s;
  }
  const double adds = static_cast<double>(kTokens) * kRows * (kM / 16);
  std::printf("%.6e %g\n", adds / best, sink);
  return 0;
}
"""

SHAPES = {"smollm2 (9/3, d=64)": (9, 3), "llama (32/8, d=128)": (32, 8)}
LAYERS = {"general (m=256, m_o=256)": 256 + 256, "initial (m=512, m_o=128)": 512 + 128}


def has_avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def rates(compiler: str) -> tuple[float, float]:
    """Masked and unmasked 16-lane adds per second on one core."""
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.cpp", Path(tmp) / "peak"
        src.write_text(SOURCE)
        subprocess.run([compiler, "-O3", "-mavx512f", "-std=c++17", str(src), "-o", str(exe)], check=True)
        masked = float(subprocess.run([str(exe), "0"], check=True, capture_output=True, text=True).stdout.split()[0])
        plain = float(subprocess.run([str(exe), "1"], check=True, capture_output=True, text=True).stdout.split()[0])
    return masked, plain


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32768, help="cached tokens of the decode step")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores the kernel runs on")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.threads < 1:
        parser.error("--tokens and --threads must be positive")
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None or not has_avx512():
        print("cpu_peak: needs a C++ compiler and an AVX-512 CPU; nothing measured")
        return 0
    masked, plain = rates(compiler)
    print(f"one core: {masked / 1e9:.2f} G masked 16-lane adds/s, {plain / 1e9:.2f} G unmasked "
          f"(masking costs {plain / masked:.2f}x)")
    print(f"\nleast time of a decode step's committed-key scores at {args.tokens} tokens on {args.threads} "
          f"thread(s), masked adds at that rate:")
    for shape, (q_heads, kv_heads) in SHAPES.items():
        for layer, bits in LAYERS.items():
            adds = bits * (q_heads // kv_heads) / 16 * args.tokens * kv_heads
            print(f"  {shape:20} {layer:26} {adds / (masked * args.threads) * 1e3:8.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
