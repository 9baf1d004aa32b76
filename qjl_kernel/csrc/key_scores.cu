// key_scores: QJL estimates of <q, k> from stored sign bits (MHA and GQA in one kernel).
//
//   score = c/m   * ||k_in||  * <S q - S[:, O] q_O, sign_in>
//         + c/m_o * ||k_out|| * <S[:m_o, O] q_O,   sign_out>      c = sqrt(pi / 2)
//
// S q comes from launch_query_sketch (exact float32). A warp owns one key group (G tokens sharing
// outlier channels O) and a tile of RT query rows of its KV head (query head h reads KV head
// h // ratio, so those rows are contiguous in [B, H_q, L]): it builds u = S q - S[:, O] q_O and
// S[:m_o, O] q_O for its rows in shared memory, then each lane takes one token and walks its sign
// bits 32 at a time, adding +-u by flipping the float's sign bit (no multiply, no unpacking).
// The stored state may be a view along the token/group dim (dims 0..2 strided, inner dims dense);
// the query is read through its strides. One flat grid: (batch * KV head, warp's group block, row
// tile), row tile fastest so the blocks reading one group's bits run together; any number of
// query rows (chunked prefill: ratio * L > 65535) fits.
#include "device_utils.cuh"

#include <algorithm>

namespace qjl {
namespace {

constexpr size_t kSmemBudget = 48 * 1024;  // per block, no opt-in needed
constexpr int kMaxWarps = 4;

// acc[r] += sum_b (bit b of `flips` set ? -vec[r][b] : vec[r][b]) for NB bits; vec 16-byte aligned.
template <int RT, int NB>
__device__ __forceinline__ void add_signed(uint32_t flips, const float* vec, int stride, float (&acc)[RT]) {
#pragma unroll
  for (int q = 0; q < NB / 4; ++q) {
    uint32_t f[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) f[e] = (flips << (31 - (4 * q + e))) & 0x80000000u;
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      const float4 v = *reinterpret_cast<const float4*>(vec + r * stride + 4 * q);
      acc[r] += __uint_as_float(__float_as_uint(v.x) ^ f[0]);
      acc[r] += __uint_as_float(__float_as_uint(v.y) ^ f[1]);
      acc[r] += __uint_as_float(__float_as_uint(v.z) ^ f[2]);
      acc[r] += __uint_as_float(__float_as_uint(v.w) ^ f[3]);
    }
  }
}

// acc[r] = <vec[r], signs> for one token's packed signs (nbits a multiple of 8; bit i of byte j is
// coordinate 8j + i, 1 = positive). `words`: the row may be read as aligned little-endian uint32.
template <int RT>
__device__ __forceinline__ void sign_dot(const uint8_t* row, int nbits, const float* vec, int stride, bool words,
                                         float (&acc)[RT]) {
#pragma unroll
  for (int r = 0; r < RT; ++r) acc[r] = 0.f;
  const int nwords = nbits >> 5;
  for (int k = 0; k < nwords; ++k) {
    const uint32_t w = sign_word(row, k, words);
    add_signed<RT, 32>(~w, vec + 32 * k, stride, acc);
  }
  for (int jb = nwords * 4; jb < (nbits >> 3); ++jb) {
    add_signed<RT, 8>(~static_cast<uint32_t>(row[jb]), vec + 8 * jb, stride, acc);
  }
}

template <int RT>
__global__ void key_scores_kernel(const KeyScoresArgs a, int warp_floats, int64_t row_tiles, int64_t group_blocks) {
  extern __shared__ __align__(16) float smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int N = a.N, G = a.G, d = a.d, m = a.m, m_o = a.m_o, n_out = a.n_out, R = a.R;
  const int64_t tile = blockIdx.x % row_tiles, rest = blockIdx.x / row_tiles;
  const int64_t g = (rest % group_blocks) * (blockDim.x >> 5) + warp;
  if (g >= N) return;  // warp-uniform; only warp-level syncs below
  const int r0 = static_cast<int>(tile) * RT;
  const int rows = min(RT, R - r0);
  const int bh = static_cast<int>(rest / group_blocks), b = bh / a.H_kv, h = bh - b * a.H_kv;
  const int64_t row0 = static_cast<int64_t>(bh) * R + r0;  // first query row of this tile
  const int64_t T = static_cast<int64_t>(N) * G;

  float* su = smem + static_cast<int64_t>(warp) * warp_floats;  // [RT][m]   S q - S[:, O] q_O
  float* sc = su + RT * m;                                      // [RT][m_o] S[:m_o, O] q_O
  float* sqo = sc + RT * m_o;                                   // [RT][n_out] q_O
  int* sidx = reinterpret_cast<int*>(sqo + RT * n_out);         // [n_out]

  const uint8_t* gidx = static_cast<const uint8_t*>(a.outlier_indices.ptr) + a.outlier_indices.offset(b, h, g);
  for (int o = lane; o < n_out; o += 32) sidx[o] = min(static_cast<int>(gidx[o]), d - 1);  // range checked in Python
  __syncwarp();
  for (int e = lane; e < RT * n_out; e += 32) {
    const int r = e / n_out, o = e - r * n_out;
    const int rr = r0 + r;  // row of KV head h: query head h * ratio + rr / L, position rr % L
    sqo[e] = r < rows ? load_fp(a.query.ptr, a.query.offset(b, h * a.ratio + rr / a.L, rr % a.L, sidx[o]),
                                a.query.kind)
                      : 0.f;
  }
  __syncwarp();
  for (int i = lane; i < m; i += 32) {
    float c[RT];
#pragma unroll
    for (int r = 0; r < RT; ++r) c[r] = 0.f;
    for (int o = 0; o < n_out; ++o) {
      const float s = __ldg(a.proj_t + static_cast<int64_t>(sidx[o]) * m + i);
#pragma unroll
      for (int r = 0; r < RT; ++r) c[r] = fmaf(s, sqo[r * n_out + o], c[r]);
    }
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      su[r * m + i] = r < rows ? __ldg(a.q_sketch + (row0 + r) * m + i) - c[r] : 0.f;
      if (i < m_o) sc[r * m_o + i] = c[r];
    }
  }
  __syncwarp();

  const bool with_outliers = n_out > 0 && m_o > 0;  // the reference adds the outlier term only then
  const uint8_t* gbits = static_cast<const uint8_t*>(a.bits.ptr) + a.bits.offset(b, h, g);
  const uint8_t* gobits = static_cast<const uint8_t*>(a.outlier_bits.ptr) + a.outlier_bits.offset(b, h, g);
  const int64_t in_off = a.inlier_norms.offset(b, h, g), out_off = a.outlier_norms.offset(b, h, g);
  for (int pos = lane; pos < G; pos += 32) {
    float acc[RT];
    sign_dot<RT>(gbits + static_cast<int64_t>(pos) * (m >> 3), m, su, m, a.in_words, acc);
    const float norm_in = load_fp(a.inlier_norms.ptr, in_off + pos, a.inlier_kind);
    float result[RT];
#pragma unroll
    for (int r = 0; r < RT; ++r) result[r] = a.scale_in * norm_in * acc[r];
    if (with_outliers) {
      sign_dot<RT>(gobits + static_cast<int64_t>(pos) * (m_o >> 3), m_o, sc, m_o, a.out_words, acc);
      const float norm_out = load_fp(a.outlier_norms.ptr, out_off + pos, a.outlier_kind);
#pragma unroll
      for (int r = 0; r < RT; ++r) result[r] += a.scale_out * norm_out * acc[r];
    }
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      if (r < rows) a.out[(row0 + r) * T + g * G + pos] = result[r];
    }
  }
}

size_t warp_floats_for(int rt, int64_t m, int64_t m_o, int64_t n_out) {
  const int64_t floats = rt * (m + m_o + n_out) + n_out;
  return static_cast<size_t>((floats + 3) / 4 * 4);  // keep every warp's region 16-byte aligned
}

}  // namespace

bool key_scores_config(const KeyScoresArgs& a, int* rows_per_warp, int* warps, size_t* smem_bytes) {
  int rt = a.R >= 8 ? 8 : a.R >= 3 ? 4 : (a.R >= 2 ? 2 : 1);  // rows per warp: 1, 2, 4 or 8
  while (rt > 1 && warp_floats_for(rt, a.m, a.m_o, a.n_out) * sizeof(float) > kSmemBudget) rt /= 2;
  const size_t warp_bytes = warp_floats_for(rt, a.m, a.m_o, a.n_out) * sizeof(float);
  if (warp_bytes > kSmemBudget) return false;
  *rows_per_warp = rt;
  *warps = static_cast<int>(std::min<size_t>(kMaxWarps, kSmemBudget / warp_bytes));
  *smem_bytes = *warps * warp_bytes;
  return true;
}

int64_t key_scores_blocks(const KeyScoresArgs& a, int rows_per_warp, int warps) {
  const int64_t row_tiles = (a.R + rows_per_warp - 1) / rows_per_warp, group_blocks = (a.N + warps - 1) / warps;
  return row_tiles * group_blocks * a.B * a.H_kv;
}

bool launch_key_scores(const KeyScoresArgs& a, int rows_per_warp, int warps, size_t smem_bytes, cudaStream_t stream) {
  const int64_t row_tiles = (a.R + rows_per_warp - 1) / rows_per_warp, group_blocks = (a.N + warps - 1) / warps;
  const dim3 grid(static_cast<unsigned>(key_scores_blocks(a, rows_per_warp, warps)));
  const int warp_floats = static_cast<int>(smem_bytes / sizeof(float) / warps);
  switch (rows_per_warp) {
    case 1:
      key_scores_kernel<1><<<grid, 32 * warps, smem_bytes, stream>>>(a, warp_floats, row_tiles, group_blocks);
      return true;
    case 2:
      key_scores_kernel<2><<<grid, 32 * warps, smem_bytes, stream>>>(a, warp_floats, row_tiles, group_blocks);
      return true;
    case 4:
      key_scores_kernel<4><<<grid, 32 * warps, smem_bytes, stream>>>(a, warp_floats, row_tiles, group_blocks);
      return true;
    case 8:
      key_scores_kernel<8><<<grid, 32 * warps, smem_bytes, stream>>>(a, warp_floats, row_tiles, group_blocks);
      return true;
    default:
      return false;
  }
}

}  // namespace qjl
