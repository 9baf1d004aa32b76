// query_sketch: S q of every query row in exact float32, the prologue of key_scores and
// decode_attention (never at::matmul, which uses TF32 when torch.backends.cuda.matmul.allow_tf32 is
// set; the references compute S q in float32).
//
// Block of 256 threads = (tile of 32 sketch coordinates, tile of 32 query rows); lane = coordinate,
// warp = 4 rows. Channels are staged 32 at a time: the tile of S transposed ([32][33], conflict-free
// both ways) and the query rows as float32; each lane runs fmaf over j = 0..d-1 in order. The blocks
// of row tile 0 also write their columns of S^T (the score kernels gather columns of S, which S^T
// makes coalesced), and one extra block the column sums of S over the first m and m_o rows (for
// sum(v) in decode_attention) and the largest row norm of S (decode_attention's fp16 scaling). S and q are read through their strides: no copy of either is made.
#include "device_utils.cuh"

namespace qjl {
namespace {

constexpr int kThreads = 256;
constexpr int kCoords = 32;  // sketch coordinates per block (lane = coordinate)
constexpr int kRows = 32;    // query rows per block (four per warp)
constexpr int kChunk = 32;   // channels staged at a time
constexpr int kPitch = kCoords + 1;

__global__ void __launch_bounds__(kThreads) query_sketch_kernel(const QuerySketchArgs a, int coord_tiles,
                                                                int64_t sketch_blocks) {
  __shared__ float st[kChunk * kPitch];          // [channel][coordinate]: S^T of this tile
  __shared__ __align__(16) float qs[kRows * kChunk];  // [row][channel]
  const int d = a.d, m = a.m, tid = threadIdx.x;
  if (static_cast<int64_t>(blockIdx.x) == sketch_blocks) {  // the column-sums block
    for (int c = tid; c < d; c += kThreads) {
      float sum = 0.f, sum_o = 0.f;
      for (int i = 0; i < m; ++i) {
        if (i == a.m_o) sum_o = sum;
        sum += a.proj[i * a.ps0 + c * a.ps1];
      }
      if (a.m_o == m) sum_o = sum;
      a.column_sums[c] = sum;
      a.column_sums[d + c] = sum_o;
    }
    float largest = 0.f;  // max_i ||S_i||^2: bounds |(S x)_i| <= ||S_i|| ||x|| for the fp16 scaling
    for (int i = tid; i < m; i += kThreads) {
      float norm2 = 0.f;
      for (int c = 0; c < d; ++c) {
        const float s = a.proj[i * a.ps0 + c * a.ps1];
        norm2 = fmaf(s, s, norm2);
      }
      largest = fmaxf(largest, norm2);
    }
    st[tid] = largest;
    __syncthreads();
    if (tid == 0) {
      for (int e = 1; e < kThreads; ++e) largest = fmaxf(largest, st[e]);
      a.column_sums[2 * d] = sqrtf(largest);
    }
    return;
  }
  const int coord_tile = static_cast<int>(blockIdx.x % coord_tiles);
  const int64_t row_tile = blockIdx.x / coord_tiles;
  const int i0 = coord_tile * kCoords;
  const int64_t r0 = row_tile * kRows;
  const int lane = tid & 31, warp = tid >> 5;
  const int HL = a.H_q * a.L;

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int j0 = 0; j0 < d; j0 += kChunk) {
    __syncthreads();  // the previous chunk is consumed
    for (int e = tid; e < kCoords * kChunk; e += kThreads) {
      const int i = e / kChunk, j = e - i * kChunk;  // j fastest: coalesced along S's rows
      st[j * kPitch + i] = i0 + i < m && j0 + j < d ? a.proj[(i0 + i) * a.ps0 + (j0 + j) * a.ps1] : 0.f;
    }
    for (int e = tid; e < kRows * kChunk; e += kThreads) {
      const int r = e / kChunk, j = e - r * kChunk;
      const int64_t row = r0 + r;
      float q = 0.f;
      if (row < a.rows && j0 + j < d) {
        const int64_t b = row / HL, rest = row - b * HL;
        q = load_fp(a.query.ptr, a.query.offset(b, rest / a.L, rest % a.L, j0 + j), a.query.kind);
      }
      qs[e] = q;
    }
    __syncthreads();
    if (a.proj_t != nullptr && row_tile == 0) {
      for (int e = tid; e < kCoords * kChunk; e += kThreads) {
        const int j = e / kCoords, i = e - j * kCoords;
        if (i0 + i < m && j0 + j < d) a.proj_t[static_cast<int64_t>(j0 + j) * m + i0 + i] = st[j * kPitch + i];
      }
    }
    // Zero padding past d adds fmaf(0, 0, acc) = acc: the sums are exact fp32 in channel order.
#pragma unroll 4
    for (int j = 0; j < kChunk; j += 4) {
      const float s0 = st[j * kPitch + lane], s1 = st[(j + 1) * kPitch + lane];
      const float s2 = st[(j + 2) * kPitch + lane], s3 = st[(j + 3) * kPitch + lane];
#pragma unroll
      for (int rr = 0; rr < 4; ++rr) {
        const float4 q = *reinterpret_cast<const float4*>(qs + (4 * warp + rr) * kChunk + j);
        acc[rr] = fmaf(s0, q.x, acc[rr]);
        acc[rr] = fmaf(s1, q.y, acc[rr]);
        acc[rr] = fmaf(s2, q.z, acc[rr]);
        acc[rr] = fmaf(s3, q.w, acc[rr]);
      }
    }
  }
  const int i = i0 + lane;
#pragma unroll
  for (int rr = 0; rr < 4; ++rr) {
    const int64_t row = r0 + 4 * warp + rr;
    if (i < m && row < a.rows) a.q_sketch[row * m + i] = acc[rr];
  }
}

}  // namespace

int64_t query_sketch_blocks(const QuerySketchArgs& a) {
  return (a.rows + kRows - 1) / kRows * ((a.m + kCoords - 1) / kCoords) + (a.column_sums != nullptr ? 1 : 0);
}

void launch_query_sketch(const QuerySketchArgs& a, cudaStream_t stream) {
  const int coord_tiles = (a.m + kCoords - 1) / kCoords;
  const int64_t sketch_blocks = (a.rows + kRows - 1) / kRows * coord_tiles;
  const int64_t blocks = sketch_blocks + (a.column_sums != nullptr ? 1 : 0);
  query_sketch_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      a, coord_tiles, sketch_blocks);
}

}  // namespace qjl
