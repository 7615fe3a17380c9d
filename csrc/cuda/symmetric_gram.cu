// out = alpha * X X^T + beta * C for a batch of row-major bf16 matrices X (rows x cols), C and out
// symmetric (rows x rows): Newton-Schulz's two symmetric products per iteration, A = X X^T and
// B = b A + c A A (A A = A A^T because A is symmetric). Only the tiles on or above the diagonal
// are computed (half the FLOPs of a GEMM), each written to its place and, transposed, to its
// mirror, so out is exactly symmetric. Tensor cores through WMMA (bf16 in, fp32 accumulation, the
// epilogue in fp32, one rounding to bf16), as torch's bf16 bmm/baddbmm with fp32 compute.
// Compiled here, not yet run on a GPU.
#include <cuda_bf16.h>
#include <mma.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cuda/cuda_check.h"
#include "ops.h"

namespace fusedopt {
namespace cuda {
namespace {

using namespace nvcuda;

constexpr int kTile = 128;              // output tile, both sides
constexpr int kStepK = 32;              // k columns staged per iteration
constexpr int kThreads = 256;           // 8 warps as 2 x 4, each owning 64 x 32 of the tile
constexpr int kWarpRows = 64;
constexpr int kWarpCols = 32;
constexpr int kFragRows = kWarpRows / 16;
constexpr int kFragCols = kWarpCols / 16;
constexpr int kLd = kStepK + 8;         // smem row stride in bf16: 80 bytes keeps 16-byte rows, shifts banks
constexpr int kStageLd = 20;            // fp32 stride of a warp's 16 x 16 epilogue staging
constexpr int kChunks = kTile * kStepK / 8 / kThreads;  // 16-byte loads per thread per operand tile

struct GramArgs {
  const __nv_bfloat16* x;
  const __nv_bfloat16* c;  // nullptr: beta is ignored
  __nv_bfloat16* out;
  int64_t rows;
  int64_t cols;
  float alpha;
  float beta;
  int tiles;        // tiles per side
  bool vector_ok;   // cols % 8 == 0: rows start 16-byte aligned
};

// Upper-triangle tile number t (row by row over ti <= tj) -> (ti, tj). At most a few dozen
// iterations (tiles per side), once per block.
__device__ void tile_of(int t, int tiles, int* ti, int* tj) {
  int i = 0;
  while (t >= tiles - i) {
    t -= tiles - i;
    ++i;
  }
  *ti = i;
  *tj = i + t;
}

// Rows [row0, row0 + kTile) x columns [k0, k0 + kStepK) of x into registers; zeros outside.
__device__ void load_tile(const GramArgs& a, const __nv_bfloat16* x, int64_t row0, int64_t k0, uint4 (&reg)[kChunks]) {
#pragma unroll
  for (int s = 0; s < kChunks; ++s) {
    const int q = threadIdx.x + s * kThreads;
    const int64_t r = row0 + q / (kStepK / 8);
    const int64_t k = k0 + (q % (kStepK / 8)) * 8;
    if (a.vector_ok && r < a.rows && k + 8 <= a.cols) {
      reg[s] = *reinterpret_cast<const uint4*>(x + r * a.cols + k);
    } else {
      __align__(16) __nv_bfloat16 v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = (r < a.rows && k + e < a.cols) ? x[r * a.cols + k + e] : __float2bfloat16(0.0f);
      reg[s] = *reinterpret_cast<const uint4*>(v);
    }
  }
}

__device__ void store_tile(const uint4 (&reg)[kChunks], __nv_bfloat16* smem) {
#pragma unroll
  for (int s = 0; s < kChunks; ++s) {
    const int q = threadIdx.x + s * kThreads;
    *reinterpret_cast<uint4*>(smem + (q / (kStepK / 8)) * kLd + (q % (kStepK / 8)) * 8) = reg[s];
  }
}

__global__ void __launch_bounds__(kThreads) symmetric_gram_kernel(const GramArgs a) {
  __shared__ __align__(128) unsigned char smem_raw[2 * kTile * kLd * sizeof(__nv_bfloat16)];
  __nv_bfloat16* As = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* Bs = As + kTile * kLd;

  int ti, tj;
  tile_of(blockIdx.x, a.tiles, &ti, &tj);
  const int64_t matrix = blockIdx.y;
  const __nv_bfloat16* x = a.x + matrix * a.rows * a.cols;
  const int64_t row_a = int64_t(ti) * kTile, row_b = int64_t(tj) * kTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wr = warp / (kTile / kWarpCols), wc = warp % (kTile / kWarpCols);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFragRows][kFragCols];
#pragma unroll
  for (int i = 0; i < kFragRows; ++i)
#pragma unroll
    for (int j = 0; j < kFragCols; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  uint4 ra[kChunks], rb[kChunks];
  load_tile(a, x, row_a, 0, ra);
  load_tile(a, x, row_b, 0, rb);
  for (int64_t k0 = 0; k0 < a.cols; k0 += kStepK) {
    store_tile(ra, As);
    store_tile(rb, Bs);
    __syncthreads();
    if (k0 + kStepK < a.cols) {  // the next step's loads are in flight while this one computes
      load_tile(a, x, row_a, k0 + kStepK, ra);
      load_tile(a, x, row_b, k0 + kStepK, rb);
    }
#pragma unroll
    for (int kk = 0; kk < kStepK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[kFragRows];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb[kFragCols];
#pragma unroll
      for (int i = 0; i < kFragRows; ++i) wmma::load_matrix_sync(fa[i], As + (wr * kWarpRows + i * 16) * kLd + kk, kLd);
      // B = X^T of the column tile: element (k, j) is X[j][k], i.e. Bs read column-major.
#pragma unroll
      for (int j = 0; j < kFragCols; ++j) wmma::load_matrix_sync(fb[j], Bs + (wc * kWarpCols + j * 16) * kLd + kk, kLd);
#pragma unroll
      for (int i = 0; i < kFragRows; ++i)
#pragma unroll
        for (int j = 0; j < kFragCols; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }

  // Epilogue, one 16 x 16 fragment at a time through this warp's staging area (the operand tiles
  // are free now): pass 1 writes the element (coalesced along rows), pass 2 its mirror (coalesced
  // along the mirror's rows). Elements below the diagonal are never written from this tile, so
  // out[i][j] and out[j][i] are the same value.
  float* stage = reinterpret_cast<float*>(smem_raw) + warp * 16 * kStageLd;
  __nv_bfloat16* out = a.out + matrix * a.rows * a.rows;
  const __nv_bfloat16* c = a.c != nullptr ? a.c + matrix * a.rows * a.rows : nullptr;
#pragma unroll
  for (int i = 0; i < kFragRows; ++i) {
#pragma unroll
    for (int j = 0; j < kFragCols; ++j) {
      const int64_t gi0 = row_a + wr * kWarpRows + i * 16, gj0 = row_b + wc * kWarpCols + j * 16;
      wmma::store_matrix_sync(stage, acc[i][j], kStageLd, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int r = e / 16, cc = e % 16;
        const int64_t gi = gi0 + r, gj = gj0 + cc;
        if (gi >= a.rows || gj >= a.rows || gi > gj) continue;
        float v = a.alpha * stage[r * kStageLd + cc];
        if (c != nullptr) v += a.beta * __bfloat162float(c[gi * a.rows + gj]);
        stage[r * kStageLd + cc] = v;
        out[gi * a.rows + gj] = __float2bfloat16_rn(v);
      }
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int cc = e / 16, r = e % 16;
        const int64_t gi = gi0 + r, gj = gj0 + cc;
        if (gj >= a.rows || gi >= gj) continue;
        out[gj * a.rows + gi] = __float2bfloat16_rn(stage[r * kStageLd + cc]);
      }
      __syncwarp();
    }
  }
}

}  // namespace
}  // namespace cuda

void symmetric_gram_cuda(const GramLaunch& L) {
  using namespace cuda;
  if (L.batch == 0 || L.rows == 0) return;
  const int64_t tiles = (L.rows + kTile - 1) / kTile;
  const int64_t blocks = tiles * (tiles + 1) / 2;
  if (blocks > INT32_MAX) {
    throw std::invalid_argument("fusedopt.symmetric_gram: matrices of " + std::to_string(L.rows) +
                                " rows need more tiles than one launch holds");
  }
  const uintptr_t c = L.beta != 0.0f ? L.c : 0;  // as baddbmm: beta = 0 ignores C, inf and NaN included
  const auto stream = reinterpret_cast<cudaStream_t>(L.stream);
  // gridDim.y holds at most 65535 matrices: larger batches go in slices (one launch each, no sync).
  constexpr int64_t kMaxBatch = 65535;
  const int64_t x_step = L.rows * L.cols * int64_t(sizeof(__nv_bfloat16));
  const int64_t out_step = L.rows * L.rows * int64_t(sizeof(__nv_bfloat16));
  for (int64_t first = 0; first < L.batch; first += kMaxBatch) {
    const int64_t n = std::min(kMaxBatch, L.batch - first);
    const uintptr_t x = L.x + first * x_step;
    GramArgs args{reinterpret_cast<const __nv_bfloat16*>(x),
                  reinterpret_cast<const __nv_bfloat16*>(c != 0 ? c + first * out_step : 0),
                  reinterpret_cast<__nv_bfloat16*>(L.out + first * out_step), L.rows, L.cols, L.alpha, L.beta,
                  int(tiles), L.cols % 8 == 0 && x % 16 == 0};
    symmetric_gram_kernel<<<dim3(unsigned(blocks), unsigned(n)), kThreads, 0, stream>>>(args);
    FUSEDOPT_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace fusedopt
