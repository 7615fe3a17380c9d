// Blockwise 8-bit Adam/AdamW on CUDA: math/adam8bit.h inside the multi-tensor-apply walk, on the
// caller's stream. A chunk (kChunkSize = 64 quantization blocks) belongs to one thread block, and
// each of its warps owns whole quantization blocks: lane l holds elements l, l + 32, ... of a block
// (coalesced loads whatever the param's alignment), the block's absmax is a warp shuffle
// max-reduction, and nothing is shared between warps but the two 256-entry maps.
#include "cuda/multi_tensor_apply.cuh"
#include "fusedopt/dispatch.h"
#include "fusedopt/math/adam8bit.h"
#include "ops.h"

namespace fusedopt {
namespace cuda {
namespace {

using math::kQuantBlock;
using math::kQuantMapSize;
constexpr int kWarpSize = 32;
constexpr int kWarps = kBlockSize / kWarpSize;
constexpr int kPerLane = kQuantBlock / kWarpSize;  // elements of one quantization block per lane
static_assert(kChunkSize % kQuantBlock == 0, "a chunk must hold whole quantization blocks");
static_assert(kBlockSize >= kQuantMapSize, "one thread per map entry when staging the maps");

struct Adam8bitArgs {
  math::AdamConfig config;
  double lr;
  const float* lr_ptr;
  const float* grad_scale;
  const float* found_inf;
  const float* signed_map;    // device, 256 floats
  const float* unsigned_map;  // device, 256 floats
  bool master;
};

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

template <typename P, typename G>
__global__ void __launch_bounds__(kBlockSize)
    adam8bit_kernel(const __grid_constant__ TensorListMeta<kAdam8bitSlots> meta, const Adam8bitArgs args) {
  if (args.found_inf != nullptr && *args.found_inf != 0.0f) return;
  // The binary searches read the maps ~16 times per element: keep them in shared memory.
  __shared__ float smap[kQuantMapSize];
  __shared__ float umap[kQuantMapSize];
  if (threadIdx.x < kQuantMapSize) {
    smap[threadIdx.x] = args.signed_map[threadIdx.x];
    umap[threadIdx.x] = args.unsigned_map[threadIdx.x];
  }
  __syncthreads();
  const float grad_scale = args.grad_scale != nullptr ? *args.grad_scale : 1.0f;
  const double lr = args.lr_ptr != nullptr ? double(*args.lr_ptr) : args.lr;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  math::AdamScalars s;
  for_each_chunk(meta, [&](int t, int64_t start, int64_t n, bool first_visit) {
    if (first_visit) s = math::adam_scalars(args.config, lr, double(*meta.steps[t] + 1.0f), grad_scale);
    P* p = static_cast<P*>(meta.ptrs[kParam][t]) + start;
    const G* g = static_cast<const G*>(meta.ptrs[kGrad][t]) + start;
    uint8_t* cm = static_cast<uint8_t*>(meta.ptrs[kExpAvg][t]) + start;
    uint8_t* cv = static_cast<uint8_t*>(meta.ptrs[kExpAvgSq][t]) + start;
    float* am = static_cast<float*>(meta.ptrs[kExpAvgAbsmax][t]) + start / kQuantBlock;
    float* av = static_cast<float*>(meta.ptrs[kExpAvgSqAbsmax][t]) + start / kQuantBlock;
    float* master = args.master ? static_cast<float*>(meta.ptrs[kMaster][t]) + start : nullptr;
    const int64_t blocks = (n + kQuantBlock - 1) / kQuantBlock;
    for (int64_t b = warp; b < blocks; b += kWarps) {
      const int64_t base = b * kQuantBlock;
      // Every lane reads the old absmaxes before lane 0 overwrites them: the reads feed the
      // shuffles below, which no lane passes before all lanes reach them.
      const float old_am = am[b], old_av = av[b];
      float rm[kPerLane], rv[kPerLane];
      float new_am = 0.0f, new_av = 0.0f;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int64_t i = base + j * kWarpSize + lane;
        rm[j] = 0.0f;
        rv[j] = 0.0f;
        if (i < n) {
          float pf = args.master ? master[i] : load_float(p, i);
          rm[j] = math::dequantize(smap, cm[i], old_am);
          rv[j] = math::dequantize(umap, cv[i], old_av);
          math::adam8bit_update(pf, load_float(g, i), rm[j], rv[j], s);
          if (args.master) master[i] = pf;
          store_float(p, i, pf);
        }
        new_am = math::max_of(new_am, fabsf(rm[j]));
        new_av = math::max_of(new_av, rv[j]);
      }
      new_am = warp_max(new_am);
      new_av = warp_max(new_av);
      if (lane == 0) {
        am[b] = new_am;
        av[b] = new_av;
      }
      const float inv_m = math::inv_absmax(new_am), inv_v = math::inv_absmax(new_av);
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int64_t i = base + j * kWarpSize + lane;
        if (i < n) {
          cm[i] = math::quantize(smap, rm[j], inv_m);
          cv[i] = math::quantize(umap, rv[j], inv_v);
        }
      }
    }
  });
}

}  // namespace
}  // namespace cuda

void adam8bit_step_cuda(const Adam8bitLaunch& L) {
  using namespace cuda;
  const auto stream = reinterpret_cast<cudaStream_t>(L.stream);
  Adam8bitArgs args;
  args.config = L.config;
  args.lr = L.lr;
  args.lr_ptr = reinterpret_cast<const float*>(L.device_ptrs.lr);
  args.grad_scale = reinterpret_cast<const float*>(L.device_ptrs.grad_scale);
  args.found_inf = reinterpret_cast<const float*>(L.device_ptrs.found_inf);
  args.signed_map = reinterpret_cast<const float*>(L.signed_map);
  args.unsigned_map = reinterpret_cast<const float*>(L.unsigned_map);
  args.master = L.dtypes.param != DType::kFloat32 && !L.lists.ptrs[kMaster].empty();
  dispatch_float(L.dtypes.param, "param", [&](auto p_tag) {
    dispatch_float(L.dtypes.grad, "grad", [&](auto g_tag) {
      using P = decltype(p_tag);
      using G = decltype(g_tag);
      multi_tensor_apply<kAdam8bitSlots>(L.lists, max_blocks<adam8bit_kernel<P, G>>(), args.found_inf, stream,
                                         [&](const TensorListMeta<kAdam8bitSlots>& meta, int grid) {
                                           adam8bit_kernel<P, G><<<grid, kBlockSize, 0, stream>>>(meta, args);
                                         });
    });
  });
}

}  // namespace fusedopt
