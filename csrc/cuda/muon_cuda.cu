// Muon's elementwise parts on CUDA (math/muon.h), inside the multi-tensor-apply walk on the
// caller's stream. Prepare is two kernels per launch: the momentum step with one partial sum of
// u^2 per chunk (a block reduction, in double), then the cast of u / divisor to the bf16
// Newton-Schulz input, where each block sums its matrix's partials in a fixed order (no atomics:
// the same bits every run). Apply is one kernel. Compiled here, not yet run on a GPU.
#include "cuda/multi_tensor_apply.cuh"
#include "fusedopt/dispatch.h"
#include "fusedopt/math/muon.h"
#include "ops.h"

namespace fusedopt {
namespace cuda {
namespace {

constexpr int kMuonDepth = kMuonOut + 1;  // slots kParam..kMuonOut
constexpr int kWarps = kBlockSize / 32;

struct PrepareArgs {
  double momentum;
  bool nesterov;
  double eps;
  double safety;
  const float* grad_scale;
  const float* found_inf;
  double* partials;  // one per chunk of the whole launch list, in chunk order
};

// Sum over the block; every thread gets the result. `scratch` holds kWarps doubles.
__device__ double block_sum(double x, double* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
  __syncthreads();
  double total = 0.0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();  // scratch is reused by the next call
  return total;
}

template <typename S, typename G>
__global__ void __launch_bounds__(kBlockSize)
    muon_momentum_kernel(const __grid_constant__ TensorListMeta<kMuonDepth> meta, const PrepareArgs args,
                         int64_t partial_base) {
  if (args.found_inf != nullptr && *args.found_inf != 0.0f) return;
  __shared__ double scratch[kWarps];
  const math::MuonScalars s =
      math::muon_scalars(args.momentum, args.nesterov, args.grad_scale != nullptr ? *args.grad_scale : 1.0f);
  for_each_chunk(meta, [&](int t, int64_t start, int64_t n, bool) {
    const G* g = static_cast<const G*>(meta.ptrs[kGrad][t]) + start;
    S* buf = static_cast<S*>(meta.ptrs[kMuonBuffer][t]) + start;
    double sum = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      float bf = load_float(buf, i);
      const float u = math::muon_momentum<S>(load_float(g, i), bf, s);
      store_float(buf, i, bf);
      sum += double(u) * double(u);
    }
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0) args.partials[partial_base + meta.chunk_begin[t] + start / kChunkSize] = sum;
  });
}

template <typename S, typename G>
__global__ void __launch_bounds__(kBlockSize)
    muon_cast_kernel(const __grid_constant__ TensorListMeta<kMuonDepth> meta, const PrepareArgs args,
                     int64_t partial_base) {
  if (args.found_inf != nullptr && *args.found_inf != 0.0f) return;
  __shared__ double scratch[kWarps];
  const math::MuonScalars s =
      math::muon_scalars(args.momentum, args.nesterov, args.grad_scale != nullptr ? *args.grad_scale : 1.0f);
  float divisor = 1.0f;
  for_each_chunk(meta, [&](int t, int64_t start, int64_t n, bool first_visit) {
    if (first_visit) {  // this matrix's norm, from the partials the momentum kernel left
      double sum = 0.0;
      for (int64_t c = meta.chunk_begin[t] + threadIdx.x; c < meta.chunk_begin[t + 1]; c += blockDim.x) {
        sum += args.partials[partial_base + c];
      }
      divisor = math::muon_divisor(block_sum(sum, scratch), args.safety, args.eps);
    }
    const G* g = static_cast<const G*>(meta.ptrs[kGrad][t]) + start;
    const S* buf = static_cast<const S*>(meta.ptrs[kMuonBuffer][t]) + start;
    bf16_t* out = static_cast<bf16_t*>(meta.ptrs[kMuonOut][t]) + start;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      store_float(out, i, math::muon_update_direction<S>(load_float(g, i), load_float(buf, i), s) / divisor);
    }
  });
}

struct ApplyArgs {
  double lr;
  const float* lr_ptr;
  double weight_decay;
  double lr_factor;
  const float* found_inf;
};

template <typename P>
__global__ void __launch_bounds__(kBlockSize)
    muon_apply_kernel(const __grid_constant__ TensorListMeta<kMuonDepth> meta, const ApplyArgs args) {
  if (args.found_inf != nullptr && *args.found_inf != 0.0f) return;
  const double lr = args.lr_ptr != nullptr ? double(*args.lr_ptr) : args.lr;
  const float decay = float(1.0 - lr * args.weight_decay);
  const float neg_lr_scaled = float(-lr * args.lr_factor);
  for_each_chunk(meta, [&](int t, int64_t start, int64_t n, bool) {
    P* p = static_cast<P*>(meta.ptrs[kParam][t]) + start;
    const bf16_t* o = static_cast<const bf16_t*>(meta.ptrs[kMuonOut][t]) + start;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      float pf = load_float(p, i);
      math::muon_apply<P>(pf, load_float(o, i), decay, neg_lr_scaled);
      store_float(p, i, pf);
    }
  });
}

}  // namespace
}  // namespace cuda

void muon_prepare_cuda(const MuonPrepareLaunch& L) {
  using namespace cuda;
  const auto stream = reinterpret_cast<cudaStream_t>(L.stream);
  PrepareArgs args{L.momentum, L.nesterov, L.eps, L.safety, reinterpret_cast<const float*>(L.device_ptrs.grad_scale),
                   reinterpret_cast<const float*>(L.device_ptrs.found_inf), reinterpret_cast<double*>(L.partials)};
  dispatch_float(L.dtypes.state, "momentum buffer", [&](auto s_tag) {
    dispatch_float(L.dtypes.grad, "grad", [&](auto g_tag) {
      using S = decltype(s_tag);
      using G = decltype(g_tag);
      int64_t base = 0;  // chunks of earlier launches: their partials come first
      multi_tensor_apply<kMuonDepth>(L.lists, max_blocks<muon_momentum_kernel<S, G>>(), args.found_inf, stream,
                                     [&](const TensorListMeta<kMuonDepth>& meta, int grid) {
                                       muon_momentum_kernel<S, G><<<grid, kBlockSize, 0, stream>>>(meta, args, base);
                                       muon_cast_kernel<S, G><<<grid, kBlockSize, 0, stream>>>(meta, args, base);
                                       base += meta.chunk_begin[meta.num_tensors];
                                     });
    });
  });
}

void muon_apply_cuda(const MuonApplyLaunch& L) {
  using namespace cuda;
  const auto stream = reinterpret_cast<cudaStream_t>(L.stream);
  ApplyArgs args{L.lr, reinterpret_cast<const float*>(L.device_ptrs.lr), L.weight_decay, L.lr_factor,
                 reinterpret_cast<const float*>(L.device_ptrs.found_inf)};
  dispatch_float(L.dtypes.param, "param", [&](auto p_tag) {
    using P = decltype(p_tag);
    multi_tensor_apply<kMuonDepth>(L.lists, max_blocks<muon_apply_kernel<P>>(), args.found_inf, stream,
                                   [&](const TensorListMeta<kMuonDepth>& meta, int grid) {
                                     muon_apply_kernel<P><<<grid, kBlockSize, 0, stream>>>(meta, args);
                                   });
  });
}

}  // namespace fusedopt
