// Multi-tensor apply: one launch covers up to kMaxTensors tensors of any sizes.
//
// Unlike apex/PyTorch (a block-to-(tensor, chunk) table capped at 320 blocks per launch), each
// launch carries a prefix sum of chunk counts and a persistent grid walks every chunk with a grid
// stride. A launch therefore never splits a tensor, the number of launches depends only on the
// tensor count, and a block's tensor index only moves forward (a linear scan, no table).
// The metadata rides in the kernel parameters (up to 32 KB since CUDA 12.1), so a launch needs no
// device allocation or host-to-device copy and can be captured in a CUDA graph.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/cuda_check.h"
#include "fusedopt/dtype.h"
#include "fusedopt/tensor_list.h"

namespace fusedopt {
namespace cuda {

constexpr int kBlockSize = 512;
constexpr int kILP = 4;  // elements per thread per iteration: one 16-byte fp32 vector
constexpr int64_t kChunkSize = 1 << 14;
constexpr int kMaxTensors = 320;

template <int kDepth>
struct TensorListMeta {
  void* ptrs[kDepth][kMaxTensors];
  int64_t numel[kMaxTensors];
  float* steps[kMaxTensors];
  int64_t chunk_begin[kMaxTensors + 1];  // prefix sum of chunk counts
  bool aligned[kMaxTensors];             // every used pointer of the tensor is 16-byte aligned
  int num_tensors;
};
// Kernel parameters are limited to 32764 bytes; leave 1 KiB for the optimizer's own arguments.
static_assert(sizeof(TensorListMeta<kMaxSlots>) + 1024 <= 32764, "kernel parameter budget is 32764 bytes");

// Calls f(t, start, n, first_visit) for each chunk this block owns; first_visit is true when
// the block reaches a tensor it has not seen yet (per-tensor scalars are recomputed then).
template <int kDepth, typename F>
__device__ __forceinline__ void for_each_chunk(const TensorListMeta<kDepth>& meta, F&& f) {
  const int64_t total = meta.chunk_begin[meta.num_tensors];
  int t = 0;
  int last_t = -1;
  for (int64_t c = blockIdx.x; c < total; c += gridDim.x) {
    while (meta.chunk_begin[t + 1] <= c) ++t;
    const int64_t start = (c - meta.chunk_begin[t]) * kChunkSize;
    const int64_t n = meta.numel[t] - start < kChunkSize ? meta.numel[t] - start : kChunkSize;
    f(t, start, n, t != last_t);
    last_t = t;
  }
}

template <typename T>
struct alignas(sizeof(T) * kILP) Vec {
  T v[kILP];
};

// Loads kILP elements at base[i..i+kILP) as float, with a vector load when the group is whole
// and aligned, else element by element (tail of a tensor, or a misaligned view).
template <typename T>
__device__ __forceinline__ void load(const T* base, int64_t i, int64_t n, bool vec, float (&out)[kILP]) {
  if (vec && i + kILP <= n) {
    const Vec<T> x = *reinterpret_cast<const Vec<T>*>(base + i);
#pragma unroll
    for (int j = 0; j < kILP; ++j) out[j] = to_float(x.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kILP; ++j) out[j] = i + j < n ? to_float(base[i + j]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store(T* base, int64_t i, int64_t n, bool vec, const float (&in)[kILP]) {
  if (vec && i + kILP <= n) {
    Vec<T> x;
#pragma unroll
    for (int j = 0; j < kILP; ++j) x.v[j] = from_float<T>(in[j]);
    *reinterpret_cast<Vec<T>*>(base + i) = x;
  } else {
#pragma unroll
    for (int j = 0; j < kILP; ++j)
      if (i + j < n) base[i + j] = from_float<T>(in[j]);
  }
}

struct StepList {
  float* steps[kMaxTensors];
  int num_tensors;
};

// Runs after the update kernels of a batch: the update read step + 1; now store it, unless
// GradScaler found an inf (then the step is skipped and the counter must not move).
// (A template so every .cu that includes this header can launch it without relocatable code.)
template <int kUnused = 0>
__global__ void increment_steps_kernel(const __grid_constant__ StepList list, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  for (int i = threadIdx.x; i < list.num_tensors; i += blockDim.x) *list.steps[i] += 1.0f;
}

inline bool is_aligned16(uintptr_t p) { return p % 16 == 0; }

// Grid size for a persistent multi-tensor kernel: its occupancy on the current device times the
// SM count (cached per kernel and thread, recomputed when the current device changes).
template <auto Kernel>
int max_blocks() {
  static thread_local int cached_device = -1;
  static thread_local int cached_blocks = 0;
  int dev = 0;
  FUSEDOPT_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev != cached_device) {
    int per_sm = 0;
    FUSEDOPT_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, kBlockSize, 0));
    cached_blocks = std::max(1, per_sm) * sm_count();
    cached_device = dev;
  }
  return cached_blocks;
}

// Packs the non-empty tensors of `lists` into launches of at most kMaxTensors and calls
// launch(meta, grid_blocks) for each; then bumps every tensor's step counter (if the optimizer
// keeps one) on `stream`.
template <int kDepth, typename Launch>
void multi_tensor_apply(const TensorLists& lists, int max_blocks, const float* found_inf, cudaStream_t stream,
                        Launch&& launch) {
  TensorListMeta<kDepth> meta;
  meta.num_tensors = 0;
  meta.chunk_begin[0] = 0;
  auto flush = [&]() {
    if (meta.num_tensors == 0) return;
    const int64_t chunks = meta.chunk_begin[meta.num_tensors];
    launch(meta, int(std::min<int64_t>(chunks, max_blocks)));
    FUSEDOPT_CUDA_CHECK(cudaGetLastError());
    meta.num_tensors = 0;
  };
  for (size_t t = 0; t < lists.size(); ++t) {
    const int64_t numel = lists.numels[t];
    if (numel == 0) continue;
    const int k = meta.num_tensors;
    bool aligned = true;
    for (int d = 0; d < kDepth; ++d) {
      const uintptr_t p = d < kMaxSlots ? lists.ptr(d, t) : 0;
      meta.ptrs[d][k] = reinterpret_cast<void*>(p);
      aligned = aligned && is_aligned16(p);
    }
    meta.numel[k] = numel;
    meta.steps[k] = lists.steps.empty() ? nullptr : reinterpret_cast<float*>(lists.steps[t]);
    meta.aligned[k] = aligned;
    meta.chunk_begin[k + 1] = meta.chunk_begin[k] + (numel + kChunkSize - 1) / kChunkSize;
    meta.num_tensors = k + 1;
    if (meta.num_tensors == kMaxTensors) flush();
  }
  flush();

  if (lists.steps.empty()) return;  // optimizers without a step counter (Lion)
  StepList steps;
  steps.num_tensors = 0;
  for (size_t t = 0; t < lists.size(); ++t) {
    steps.steps[steps.num_tensors++] = reinterpret_cast<float*>(lists.steps[t]);
    if (steps.num_tensors == kMaxTensors || t + 1 == lists.size()) {
      increment_steps_kernel<><<<1, 128, 0, stream>>>(steps, found_inf);
      FUSEDOPT_CUDA_CHECK(cudaGetLastError());
      steps.num_tensors = 0;
    }
  }
}

}  // namespace cuda
}  // namespace fusedopt
