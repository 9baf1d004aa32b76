"""The CPU decode kernel's key loop against this CPU's limit (a script, not a test).

The fused CPU kernel (qjl_kernel/csrc/cpu/decode_kernel_impl.h, ``masked_pass``) scores a committed
key with one masked 16-lane float add per 16 sign bits and query row: (m + m_o) x rows / 16 adds per
token and KV head, the bits read once for all rows. This script compiles that loop alone (4 keys x 3
rows in flight, half the adds issued as masked FMAs, as the kernel does), the same loop without
masks (the ceiling, not a score), the other ways to sum floats under a bit mask (+-1 FMAs, a mix),
and nibble-table lookups (``vpermps`` on 16 keys' transposed bits, with tables built once or
rebuilt per 32-token group as the per-group outlier correction requires), and, with AVX-512 VNNI,
the sums in fixed point (int8 dot products on bytes made from the bits, v rounded to 15 or 22 bits
in 2 or 3 int8 pieces, with each width's largest error next to float32's); it times each on one
core and turns the kernel's masked rate into the least time a decode step's key scores can take on
this machine with every thread busy. Set against exact attention's time at the same size
(``benchmarks/bench_cpu.py``), it bounds the ratio a kernel built on masked adds can reach.

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

# Key-scoring loops over T tokens x m bits for NR query rows (4 keys x 3 rows in flight), one variant
# per argv[1]; prints the best of 9 runs in seconds.
SOURCE = r"""
#include <immintrin.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
constexpr int kM = 512, kTokens = 32768, kRows = 3, kBlock = 4, kGroup = 32, kPositions = kM / 4;
alignas(64) static float v[kRows][kM];
alignas(64) static float tables[kRows][kPositions][16];
alignas(64) static int8_t piece[3][kRows][kM];  // v in fixed point: Q = 16384 a + 128 b + c (or 128 a + b)
static std::vector<uint8_t> bits;

enum Variant { kMasked, kPlain, kSignFma, kMaskedAndSignFma, kLutFixed, kLutGroups };

template <int V>
__attribute__((noinline)) float score_all() {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512i to_top = _mm512_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16);
  __m512 total = _mm512_setzero_ps();
  for (int t = 0; t < kTokens; t += kBlock) {
    __m512 acc[kRows][kBlock];
    for (int r = 0; r < kRows; ++r)
      for (int j = 0; j < kBlock; ++j) acc[r][j] = _mm512_setzero_ps();
    const uint8_t* b = bits.data() + static_cast<size_t>(t) * (kM / 8);
    for (int i = 0; i < kM; i += 16) {
      __mmask16 k[kBlock];
      __m512 sign[kBlock];  // +-1 from the bit (V = kSignFma, kMaskedAndSignFma)
      for (int j = 0; j < kBlock; ++j) {
        k[j] = _load_mask16((__mmask16*)(b + j * (kM / 8) + i / 8));
        if (V == kSignFma || (V == kMaskedAndSignFma && (j & 1))) {
          const __m512i top = _mm512_sllv_epi32(_mm512_set1_epi32(static_cast<int>(k[j])), to_top);
          sign[j] = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(
              top, _mm512_set1_epi32(static_cast<int>(0x80000000u)), _mm512_set1_epi32(0x3f800000), 0xEA));
        }
      }
      for (int r = 0; r < kRows; ++r) {
        const __m512 x = _mm512_loadu_ps(v[r] + i);
        for (int j = 0; j < kBlock; j += 2) {
          if (V == kMasked) {  // the kernel's form
            acc[r][j] = _mm512_mask_add_ps(acc[r][j], k[j], acc[r][j], x);
            acc[r][j + 1] = _mm512_mask3_fmadd_ps(x, one, acc[r][j + 1], k[j + 1]);
          } else if (V == kPlain) {
            acc[r][j] = _mm512_add_ps(acc[r][j], x);
            acc[r][j + 1] = _mm512_fmadd_ps(x, one, acc[r][j + 1]);
          } else if (V == kSignFma) {
            acc[r][j] = _mm512_fmadd_ps(x, sign[j], acc[r][j]);
            acc[r][j + 1] = _mm512_fmadd_ps(x, sign[j + 1], acc[r][j + 1]);
          } else {
            acc[r][j] = _mm512_mask_add_ps(acc[r][j], k[j], acc[r][j], x);
            acc[r][j + 1] = _mm512_fmadd_ps(x, sign[j + 1], acc[r][j + 1]);
          }
        }
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int j = 0; j < kBlock; ++j) total = _mm512_add_ps(total, acc[r][j]);
  }
  return _mm512_reduce_add_ps(total);
}

// 16 x 16 transpose of 32-bit words.
static inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

// Nibble tables: table[r][p][e] = sum of v[r][4p + j] over the bits j of e (4 FMAs per table).
static void build_tables() {
  const __m512 b0 = _mm512_setr_ps(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1);
  const __m512 b1 = _mm512_setr_ps(0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1);
  const __m512 b2 = _mm512_setr_ps(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
  const __m512 b3 = _mm512_setr_ps(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  for (int r = 0; r < kRows; ++r) {
    for (int p = 0; p < kPositions; ++p) {
      const float* x = v[r] + 4 * p;
      __m512 t = _mm512_mul_ps(_mm512_set1_ps(x[0]), b0);
      t = _mm512_fmadd_ps(_mm512_set1_ps(x[1]), b1, t);
      t = _mm512_fmadd_ps(_mm512_set1_ps(x[2]), b2, t);
      t = _mm512_fmadd_ps(_mm512_set1_ps(x[3]), b3, t);
      _mm512_store_ps(tables[r][p], t);
    }
  }
}

// 16 keys at a time: their bits transposed to word-major, each nibble indexes its position's table.
template <bool kRebuildPerGroup>
__attribute__((noinline)) float score_lut() {
  __m512 total = _mm512_setzero_ps();
  build_tables();
  for (int t = 0; t < kTokens; t += 16) {
    if (kRebuildPerGroup && t % kGroup == 0) {  // each key group has its own v (outlier correction)
      v[0][t % kM] += 1e-7f;
      build_tables();
    }
    __m512i w[16];
    for (int j = 0; j < 16; ++j) w[j] = _mm512_loadu_si512(bits.data() + static_cast<size_t>(t + j) * (kM / 8));
    transpose16(w);  // w[k] lane j: 32-bit word k of key t + j
    __m512 acc[kRows][2];
    for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int k = 0; k < kM / 32; ++k) {
      for (int s = 0; s < 8; ++s) {
        const __m512i idx = _mm512_srli_epi32(w[k], 4 * s);  // vpermps reads the low 4 bits
        for (int r = 0; r < kRows; ++r) {
          acc[r][s & 1] = _mm512_add_ps(acc[r][s & 1], _mm512_permutexvar_ps(idx, _mm512_load_ps(tables[r][8 * k + s])));
        }
      }
    }
    for (int r = 0; r < kRows; ++r) total = _mm512_add_ps(total, _mm512_add_ps(acc[r][0], acc[r][1]));
  }
  return _mm512_reduce_add_ps(total);
}


#ifdef __AVX512VNNI__
// Sums of v over the set bits in fixed point: the bits become bytes (1 or 128 where set) and
// vpdpbusd adds 4 byte products per lane, 64 bits per instruction and piece. kPieces = 2: 15-bit
// Q = 128 a + b in one accumulator; 3: 22-bit Q = 16384 a + (128 b + c), two accumulators. Integer
// sums are exact: the only error is rounding v to Q (score_error below).
template <int kPieces>
__attribute__((noinline)) float score_vnni() {
  constexpr int kKeys = 2;  // keys in flight (more spill the accumulators)
  const __m512i one = _mm512_set1_epi8(1), w128 = _mm512_set1_epi8(static_cast<char>(128));
  __m512 total = _mm512_setzero_ps();
  for (int t = 0; t < kTokens; t += kKeys) {
    __m512i lo[kRows][kKeys], hi[kRows][kKeys];
    for (int r = 0; r < kRows; ++r)
      for (int j = 0; j < kKeys; ++j) lo[r][j] = hi[r][j] = _mm512_setzero_si512();
    const uint8_t* b = bits.data() + static_cast<size_t>(t) * (kM / 8);
    for (int i = 0; i < kM; i += 64) {
      __m512i e1[kKeys], e128[kKeys];
      for (int j = 0; j < kKeys; ++j) {
        const __mmask64 k = _load_mask64((__mmask64*)(b + j * (kM / 8) + i / 8));
        e1[j] = _mm512_maskz_mov_epi8(k, one);
        e128[j] = _mm512_maskz_mov_epi8(k, w128);
      }
      for (int r = 0; r < kRows; ++r) {
        const __m512i a = _mm512_load_si512(piece[0][r] + i), p1 = _mm512_load_si512(piece[1][r] + i);
        for (int j = 0; j < kKeys; ++j) {
          if (kPieces == 2) {
            lo[r][j] = _mm512_dpbusd_epi32(lo[r][j], e128[j], a);
            lo[r][j] = _mm512_dpbusd_epi32(lo[r][j], e1[j], p1);
          } else {
            hi[r][j] = _mm512_dpbusd_epi32(hi[r][j], e1[j], a);
            lo[r][j] = _mm512_dpbusd_epi32(lo[r][j], e128[j], p1);
            lo[r][j] = _mm512_dpbusd_epi32(lo[r][j], e1[j], _mm512_load_si512(piece[2][r] + i));
          }
        }
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int j = 0; j < kKeys; ++j)
        total = _mm512_add_ps(total, _mm512_cvtepi32_ps(_mm512_add_epi32(lo[r][j], _mm512_slli_epi32(hi[r][j], 14))));
  }
  return _mm512_reduce_add_ps(total);
}
#endif

// v of row 0 rounded to `width`-bit fixed point (scaled to its largest |v|) and split into pieces;
// returns the largest error of a key's sum of v over its set bits, relative to the keys' rms sum.
static double quantize_pieces(int width) {
  const int pieces = width > 15 ? 3 : 2;
  double worst = 0.0, square = 0.0;
  for (int r = 0; r < kRows; ++r) {
    double top = 0.0;
    for (int i = 0; i < kM; ++i) top = std::max(top, std::fabs(static_cast<double>(v[r][i])));
    const double step = top / ((1 << (width - 1)) - (pieces == 3 ? 16384 : 128));
    std::vector<double> q(kM);
    for (int i = 0; i < kM; ++i) {
      const long long Q = std::llround(v[r][i] / step);
      const long long c = Q - 128 * std::llround(Q / 128.0), Q1 = (Q - c) / 128;
      if (pieces == 2) {
        piece[0][r][i] = static_cast<int8_t>(Q1), piece[1][r][i] = static_cast<int8_t>(c);
      } else {
        const long long b1 = Q1 - 128 * std::llround(Q1 / 128.0);
        piece[0][r][i] = static_cast<int8_t>((Q1 - b1) / 128), piece[1][r][i] = static_cast<int8_t>(b1);
        piece[2][r][i] = static_cast<int8_t>(c);
      }
      q[i] = static_cast<double>(Q) * step;
    }
    if (r > 0) continue;
    for (int t = 0; t < 1024; ++t) {
      double exact = 0.0, fixed = 0.0;
      float single = 0.f;  // width 24: a float32 sum in order, for comparison
      for (int i = 0; i < kM; ++i) {
        if (bits[static_cast<size_t>(t) * (kM / 8) + i / 8] >> (i % 8) & 1) {
          exact += v[r][i], fixed += q[i], single += v[r][i];
        }
      }
      worst = std::max(worst, std::fabs((width == 24 ? single : fixed) - exact));
      square += exact * exact / 1024;
    }
  }
  return worst / std::sqrt(square);
}

int main(int argc, char** argv) {
  const std::string name = argc > 1 ? argv[1] : "masked";
  bits.resize(static_cast<size_t>(kTokens) * kM / 8);
  for (auto& x : bits) x = static_cast<uint8_t>(std::rand());
  for (int r = 0; r < kRows; ++r)  // S q: entries of both signs, as a projected query's
    for (int i = 0; i < kM; ++i) v[r][i] = std::sin(0.37f * i + r) * (1.f + 1e-3f * i);
  if (name == "error-15" || name == "error-22" || name == "error-f32") {
    std::printf("%.3e\n", quantize_pieces(name == "error-15" ? 15 : name == "error-22" ? 22 : 24));
    return 0;
  }
#ifdef __AVX512VNNI__
  if (name == "vnni-15" || name == "vnni-22") quantize_pieces(name == "vnni-15" ? 15 : 22);
#endif
  float (*fn)() = name == "masked" ? score_all<kMasked>
                  : name == "plain" ? score_all<kPlain>
                  : name == "sign-fma" ? score_all<kSignFma>
                  : name == "masked+sign-fma" ? score_all<kMaskedAndSignFma>
                  : name == "lut-fixed" ? score_lut<false>
                  : name == "lut-groups" ? score_lut<true>
#ifdef __AVX512VNNI__
                  : name == "vnni-15" ? score_vnni<2>
                  : name == "vnni-22" ? score_vnni<3>
#endif
                  : nullptr;
  if (fn == nullptr) {
    std::fprintf(stderr, "unknown variant %s\n", name.c_str());
    return 2;
  }
  double best = 1e30;
  float sink = 0.f;
  for (int rep = 0; rep < 9; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    sink += fn();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (s < best) best = s;
  }
  std::printf("%.6e %g\n", best, sink);
  return 0;
}
"""
VARIANTS = {
    "masked": "merge-masked adds, half as masked FMAs (the kernel's form)",
    "plain": "the same adds without masks (not a score: the ceiling)",
    "sign-fma": "FMAs with +-1 vectors made from the bits",
    "masked+sign-fma": "half masked adds, half +-1 FMAs",
    "lut-fixed": "nibble tables (vpermps), 16 keys per lookup, tables built once",
    "lut-groups": "the same, tables rebuilt every 32-token group",
}
# With AVX-512 VNNI: the same sums in fixed point (exact integer sums of v rounded to 15 or 22 bits)
VNNI_VARIANTS = {
    "vnni-15": "vpdpbusd on bytes made from the bits, v in 15-bit fixed point (2 int8 pieces)",
    "vnni-22": "the same, 22-bit fixed point (3 int8 pieces)",
}
WORK = 32768 * 3 * (512 // 16)  # the loops' 16-lane masked-add equivalents (T x rows x m / 16)


SHAPES = {"smollm2 (9/3, d=64)": (9, 3), "llama (32/8, d=128)": (32, 8)}
LAYERS = {"general (m=256, m_o=256)": 256 + 256, "initial (m=512, m_o=128)": 512 + 128}


def has_avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def has_vnni() -> bool:
    try:
        return "avx512_vnni" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def timings(compiler: str, vnni: bool) -> dict[str, float]:
    """Best seconds of each variant's loop (32768 keys x 512 bits x 3 rows) on one core; with
    ``vnni``, also the fixed-point loops and ``error-15`` / ``error-22``: the largest error of a key's
    sum at that width, relative to the rms sum."""
    flags = ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl"] + (["-mavx512vnni"] if vnni else [])
    names = list(VARIANTS) + (list(VNNI_VARIANTS) + ["error-15", "error-22", "error-f32"] if vnni else [])
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.cpp", Path(tmp) / "peak"
        src.write_text(SOURCE)
        subprocess.run([compiler, "-O3", *flags, "-std=c++17", str(src), "-o", str(exe)], check=True)
        return {name: float(subprocess.run([str(exe), name], check=True, capture_output=True, text=True).stdout.split()[0])
                for name in names}


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
    vnni = has_vnni()
    seconds = timings(compiler, vnni)
    masked = WORK / seconds["masked"]
    print("one core, 32768 keys x 512 sign bits x 3 query rows:")
    for name, what in {**VARIANTS, **(VNNI_VARIANTS if vnni else {})}.items():
        error = f"; largest key-sum error {seconds['error-' + name[5:]]:.1e} of the rms sum" if name in VNNI_VARIANTS else ""
        print(f"  {name:16} {seconds[name] * 1e3:7.3f} ms  {seconds['masked'] / seconds[name]:5.2f}x masked  "
              f"({what}{error})")
    if vnni:
        print(f"  (float32 sums in order: largest key-sum error {seconds['error-f32']:.1e} of the rms sum)")
    print(f"masked rate: {masked / 1e9:.2f} G 16-lane adds/s")
    print(f"\nleast time of a decode step's committed-key scores at {args.tokens} tokens on {args.threads} "
          f"thread(s), masked adds at that rate:")
    for shape, (q_heads, kv_heads) in SHAPES.items():
        for layer, bits in LAYERS.items():
            adds = bits * (q_heads // kv_heads) / 16 * args.tokens * kv_heads
            print(f"  {shape:20} {layer:26} {adds / (masked * args.threads) * 1e3:8.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
