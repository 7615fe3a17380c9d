// Lion on CUDA: math/lion.h inside the multi-tensor-apply walk, on the caller's stream.
#include "cuda/multi_tensor_apply.cuh"
#include "fusedopt/dispatch.h"
#include "fusedopt/math/lion.h"
#include "ops.h"

namespace fusedopt {
namespace cuda {
namespace {

struct LionArgs {
  math::LionConfig config;
  double lr;
  const float* lr_ptr;
  const float* grad_scale;
  const float* found_inf;
  bool master;
};

template <typename P, typename G, typename S>
__global__ void __launch_bounds__(kBlockSize)
    lion_kernel(const __grid_constant__ TensorListMeta<kAdamSlots> meta, const LionArgs args) {
  if (args.found_inf != nullptr && *args.found_inf != 0.0f) return;
  const float grad_scale = args.grad_scale != nullptr ? *args.grad_scale : 1.0f;
  const double lr = args.lr_ptr != nullptr ? double(*args.lr_ptr) : args.lr;
  const math::LionScalars s = math::lion_scalars(args.config, lr, grad_scale);
  for_each_chunk(meta, [&](int t, int64_t start, int64_t n, bool) {
    const bool vec = meta.aligned[t];
    P* p = static_cast<P*>(meta.ptrs[kParam][t]) + start;
    const G* g = static_cast<const G*>(meta.ptrs[kGrad][t]) + start;
    S* m = static_cast<S*>(meta.ptrs[kExpAvg][t]) + start;
    float* master = args.master ? static_cast<float*>(meta.ptrs[kMaster][t]) + start : nullptr;
    for (int64_t i = int64_t(threadIdx.x) * kILP; i < n; i += int64_t(blockDim.x) * kILP) {
      float rp[kILP], rg[kILP], rm[kILP];
      if (args.master) {
        load(master, i, n, vec, rp);
      } else {
        load(p, i, n, vec, rp);
      }
      load(g, i, n, vec, rg);
      load(m, i, n, vec, rm);
#pragma unroll
      for (int j = 0; j < kILP; ++j) math::lion_update(rp[j], rg[j], rm[j], s);
      if (args.master) store(master, i, n, vec, rp);
      store(p, i, n, vec, rp);
      store(m, i, n, vec, rm);
    }
  });
}

}  // namespace
}  // namespace cuda

void lion_step_cuda(const LionLaunch& L) {
  using namespace cuda;
  const auto stream = reinterpret_cast<cudaStream_t>(L.stream);
  LionArgs args;
  args.config = L.config;
  args.lr = L.lr;
  args.lr_ptr = reinterpret_cast<const float*>(L.device_ptrs.lr);
  args.grad_scale = reinterpret_cast<const float*>(L.device_ptrs.grad_scale);
  args.found_inf = reinterpret_cast<const float*>(L.device_ptrs.found_inf);
  args.master = L.dtypes.param != DType::kFloat32 && !L.lists.ptrs[kMaster].empty();
  dispatch_param_grad_state(L.dtypes.param, L.dtypes.grad, L.dtypes.state, [&](auto p_tag, auto g_tag, auto s_tag) {
    using P = decltype(p_tag);
    using G = decltype(g_tag);
    using S = decltype(s_tag);
    multi_tensor_apply<kAdamSlots>(L.lists, max_blocks<lion_kernel<P, G, S>>(), args.found_inf, stream,
                                   [&](const TensorListMeta<kAdamSlots>& meta, int grid) {
                                     lion_kernel<P, G, S><<<grid, kBlockSize, 0, stream>>>(meta, args);
                                   });
  });
}

}  // namespace fusedopt
