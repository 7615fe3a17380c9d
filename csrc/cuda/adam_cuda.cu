// Adam/AdamW on CUDA: math/adam.h inside the multi-tensor-apply walk, on the caller's stream.
#include "cuda/multi_tensor_apply.cuh"
#include "fusedopt/dispatch.h"
#include "fusedopt/math/adam.h"
#include "ops.h"

namespace fusedopt {
namespace cuda {
namespace {

struct AdamArgs {
  math::AdamConfig config;
  double lr;
  const float* lr_ptr;      // capturable: lr lives on the device
  const float* grad_scale;  // GradScaler: grads arrive multiplied by it
  const float* found_inf;   // GradScaler: skip the step when nonzero
  bool amsgrad;
  bool master;
};

// Amsgrad and master weights are uniform branches here (one value per launch), which costs the
// GPU nothing and keeps the instantiation count at param x grad x state dtypes.
template <typename P, typename G, typename S>
__global__ void __launch_bounds__(kBlockSize)
    adam_kernel(const __grid_constant__ TensorListMeta<kAdamSlots> meta, const AdamArgs args) {
  if (args.found_inf != nullptr && *args.found_inf != 0.0f) return;
  const float grad_scale = args.grad_scale != nullptr ? *args.grad_scale : 1.0f;
  const double lr = args.lr_ptr != nullptr ? double(*args.lr_ptr) : args.lr;
  math::AdamScalars s;
  for_each_chunk(meta, [&](int t, int64_t start, int64_t n, bool first_visit) {
    if (first_visit) s = math::adam_scalars(args.config, lr, double(*meta.steps[t] + 1.0f), grad_scale);
    const bool vec = meta.aligned[t];
    P* p = static_cast<P*>(meta.ptrs[kParam][t]) + start;
    const G* g = static_cast<const G*>(meta.ptrs[kGrad][t]) + start;
    S* m = static_cast<S*>(meta.ptrs[kExpAvg][t]) + start;
    S* v = static_cast<S*>(meta.ptrs[kExpAvgSq][t]) + start;
    S* vm = args.amsgrad ? static_cast<S*>(meta.ptrs[kMaxExpAvgSq][t]) + start : nullptr;
    float* master = args.master ? static_cast<float*>(meta.ptrs[kMaster][t]) + start : nullptr;
    for (int64_t i = int64_t(threadIdx.x) * kILP; i < n; i += int64_t(blockDim.x) * kILP) {
      float rp[kILP], rg[kILP], rm[kILP], rv[kILP], rvm[kILP];
      if (args.master) {
        load(master, i, n, vec, rp);
      } else {
        load(p, i, n, vec, rp);
      }
      load(g, i, n, vec, rg);
      load(m, i, n, vec, rm);
      load(v, i, n, vec, rv);
      if (args.amsgrad) {
        load(vm, i, n, vec, rvm);
#pragma unroll
        for (int j = 0; j < kILP; ++j) math::adam_update<true>(rp[j], rg[j], rm[j], rv[j], rvm[j], s);
        store(vm, i, n, vec, rvm);
      } else {
#pragma unroll
        for (int j = 0; j < kILP; ++j) math::adam_update<false>(rp[j], rg[j], rm[j], rv[j], rvm[j], s);
      }
      if (args.master) store(master, i, n, vec, rp);
      store(p, i, n, vec, rp);
      store(m, i, n, vec, rm);
      store(v, i, n, vec, rv);
    }
  });
}

}  // namespace
}  // namespace cuda

void adam_step_cuda(const AdamLaunch& L) {
  using namespace cuda;
  const auto stream = reinterpret_cast<cudaStream_t>(L.stream);
  AdamArgs args;
  args.config = L.config;
  args.lr = L.lr;
  args.lr_ptr = reinterpret_cast<const float*>(L.device_ptrs.lr);
  args.grad_scale = reinterpret_cast<const float*>(L.device_ptrs.grad_scale);
  args.found_inf = reinterpret_cast<const float*>(L.device_ptrs.found_inf);
  args.amsgrad = L.amsgrad;
  args.master = L.dtypes.param != DType::kFloat32 && !L.lists.ptrs[kMaster].empty();
  dispatch_param_grad_state(L.dtypes.param, L.dtypes.grad, L.dtypes.state, [&](auto p_tag, auto g_tag, auto s_tag) {
    using P = decltype(p_tag);
    using G = decltype(g_tag);
    using S = decltype(s_tag);
    multi_tensor_apply<kAdamSlots>(L.lists, max_blocks<adam_kernel<P, G, S>>(), args.found_inf, stream,
                                   [&](const TensorListMeta<kAdamSlots>& meta, int grid) {
                                     adam_kernel<P, G, S><<<grid, kBlockSize, 0, stream>>>(meta, args);
                                   });
  });
}

}  // namespace fusedopt
