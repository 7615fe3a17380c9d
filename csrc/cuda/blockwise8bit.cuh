// Blockwise 8-bit optimizers on CUDA: a Rule of math/adam8bit.h or math/lion8bit.h inside the
// multi-tensor-apply walk, on the caller's stream. A chunk (kChunkSize = 64 quantization blocks)
// belongs to one thread block, and each of its warps owns whole quantization blocks: lane l holds
// elements l, l + 32, ... of a block (coalesced loads whatever the param's alignment), the block's
// absmax is a warp shuffle max-reduction, and nothing is shared between warps but the maps' values.
#pragma once

#include "cuda/multi_tensor_apply.cuh"
#include "fusedopt/dispatch.h"
#include "fusedopt/math/quant8.h"

namespace fusedopt {
namespace cuda {

constexpr int kWarpSize = 32;
static_assert(kChunkSize % math::kQuantBlock == 0, "a chunk must hold whole quantization blocks");

template <typename Rule>
struct Blockwise8bitArgs {
  Rule rule;
  double lr;
  const float* lr_ptr;
  const float* grad_scale;
  const float* found_inf;
  const math::QuantMap* maps[Rule::kMoments];  // device memory
  bool master;
};

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

template <typename Rule, typename P, typename G>
__global__ void __launch_bounds__(kBlockSize)
    blockwise8bit_kernel(const __grid_constant__ TensorListMeta<kAdam8bitSlots> meta, const Blockwise8bitArgs<Rule> args) {
  constexpr int K = Rule::kMoments;
  constexpr int kWarps = kBlockSize / kWarpSize;
  constexpr int kPerLane = math::kQuantBlock / kWarpSize;  // elements of one quantization block per lane
  if (args.found_inf != nullptr && *args.found_inf != 0.0f) return;
  // Dequantizing gathers from the 256 values: shared memory. Quantizing reads the search table
  // (27 KB a map, too large to stage per block) from global memory, where its hot buckets stay
  // in L1.
  __shared__ float values[K][math::kQuantMapSize];
  for (int j = 0; j < K; ++j) {
    for (int c = threadIdx.x; c < math::kQuantMapSize; c += blockDim.x) values[j][c] = args.maps[j]->values[c];
  }
  __syncthreads();
  const float grad_scale = args.grad_scale != nullptr ? *args.grad_scale : 1.0f;
  const double lr = args.lr_ptr != nullptr ? double(*args.lr_ptr) : args.lr;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  typename Rule::Scalars s;
  for_each_chunk(meta, [&](int t, int64_t start, int64_t n, bool first_visit) {
    if (first_visit) {
      const float step = meta.steps[t] != nullptr ? *meta.steps[t] + 1.0f : 0.0f;
      s = args.rule.scalars(lr, step, grad_scale);
    }
    P* p = static_cast<P*>(meta.ptrs[kParam][t]) + start;
    const G* g = static_cast<const G*>(meta.ptrs[kGrad][t]) + start;
    float* master = args.master ? static_cast<float*>(meta.ptrs[kMaster][t]) + start : nullptr;
    uint8_t* codes[K];
    float* absmax[K];
#pragma unroll
    for (int j = 0; j < K; ++j) {
      codes[j] = static_cast<uint8_t*>(meta.ptrs[moment_code_slot(j)][t]) + start;
      absmax[j] = static_cast<float*>(meta.ptrs[moment_absmax_slot(j)][t]) + start / math::kQuantBlock;
    }
    const int64_t blocks = (n + math::kQuantBlock - 1) / math::kQuantBlock;
    for (int64_t b = warp; b < blocks; b += kWarps) {
      const int64_t base = b * math::kQuantBlock;
      // Every lane reads the old absmaxes before lane 0 overwrites them: the reads feed the
      // shuffles below, which no lane passes before all lanes reach them.
      float old_max[K], new_max[K];
      float r[K][kPerLane];
#pragma unroll
      for (int j = 0; j < K; ++j) {
        old_max[j] = absmax[j][b];
        new_max[j] = 0.0f;
      }
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) {
        const int64_t i = base + e * kWarpSize + lane;
        float mf[K];
#pragma unroll
        for (int j = 0; j < K; ++j) mf[j] = 0.0f;
        if (i < n) {
          float pf = args.master ? master[i] : load_float(p, i);
#pragma unroll
          for (int j = 0; j < K; ++j) mf[j] = math::dequantize(values[j], codes[j][i], old_max[j]);
          Rule::update(pf, load_float(g, i), mf, s);
          if (args.master) master[i] = pf;
          store_float(p, i, pf);
        }
#pragma unroll
        for (int j = 0; j < K; ++j) {
          r[j][e] = mf[j];
          new_max[j] = math::max_of(new_max[j], fabsf(mf[j]));
        }
      }
      float inv[K];
#pragma unroll
      for (int j = 0; j < K; ++j) {
        new_max[j] = warp_max(new_max[j]);
        if (lane == 0) absmax[j][b] = new_max[j];
        inv[j] = math::inv_absmax(new_max[j]);
      }
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) {
        const int64_t i = base + e * kWarpSize + lane;
        if (i < n) {
#pragma unroll
          for (int j = 0; j < K; ++j) codes[j][i] = math::quantize(*args.maps[j], r[j][e], inv[j]);
        }
      }
    }
  });
}

// One step of Rule over `lists` (param/grad dtypes from `dtypes`; master when given), then the
// step counters if the optimizer keeps them.
template <typename Rule>
void blockwise8bit_step(const TensorLists& lists, const DTypes& dtypes, const Rule& rule, double lr,
                        const DevicePtrs& device_ptrs, const uintptr_t (&maps)[Rule::kMoments], uintptr_t stream_ptr) {
  const auto stream = reinterpret_cast<cudaStream_t>(stream_ptr);
  Blockwise8bitArgs<Rule> args;
  args.rule = rule;
  args.lr = lr;
  args.lr_ptr = reinterpret_cast<const float*>(device_ptrs.lr);
  args.grad_scale = reinterpret_cast<const float*>(device_ptrs.grad_scale);
  args.found_inf = reinterpret_cast<const float*>(device_ptrs.found_inf);
  for (int j = 0; j < Rule::kMoments; ++j) args.maps[j] = reinterpret_cast<const math::QuantMap*>(maps[j]);
  args.master = dtypes.param != DType::kFloat32 && !lists.ptrs[kMaster].empty();
  dispatch_float(dtypes.param, "param", [&](auto p_tag) {
    dispatch_float(dtypes.grad, "grad", [&](auto g_tag) {
      using P = decltype(p_tag);
      using G = decltype(g_tag);
      multi_tensor_apply<kAdam8bitSlots>(lists, max_blocks<blockwise8bit_kernel<Rule, P, G>>(), args.found_inf, stream,
                                         [&](const TensorListMeta<kAdam8bitSlots>& meta, int grid) {
                                           blockwise8bit_kernel<Rule, P, G><<<grid, kBlockSize, 0, stream>>>(meta, args);
                                         });
    });
  });
}

}  // namespace cuda
}  // namespace fusedopt
