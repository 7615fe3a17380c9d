// Backend entry points. ops.cpp routes by device; cpu/ and cuda/ implement.
#pragma once

#include "fusedopt/math/adam.h"
#include "fusedopt/math/lion.h"
#include "fusedopt/tensor_list.h"

namespace fusedopt {

enum class Device : int { kCPU = 0, kCUDA = 1 };

struct AdamLaunch {
  TensorLists lists;
  DTypes dtypes;
  math::AdamConfig config;
  double lr;
  bool amsgrad;
  DevicePtrs device_ptrs;
  uintptr_t stream = 0;  // cudaStream_t of the caller (torch.cuda.current_stream())
  int num_threads = 1;   // CPU threads (torch.get_num_threads())
};

void adam_step(Device device, const AdamLaunch& launch);

// Lion uses the kParam, kGrad, kExpAvg and (optionally) kMaster slots and keeps no step counter.
struct LionLaunch {
  TensorLists lists;
  DTypes dtypes;
  math::LionConfig config;
  double lr;
  DevicePtrs device_ptrs;
  uintptr_t stream = 0;
  int num_threads = 1;
};

void lion_step(Device device, const LionLaunch& launch);
void lion_step_cpu(const LionLaunch& launch);
void lion_step_cuda(const LionLaunch& launch);
void adam_step_cpu(const AdamLaunch& launch);
void adam_step_cuda(const AdamLaunch& launch);

// Elementwise dtype conversion through dtype.h (lets tests check the shared rounding code).
void convert_cpu(uintptr_t src, DType src_dtype, uintptr_t dst, DType dst_dtype, int64_t n);

bool cuda_compiled();
const char* cuda_archs();
int cuda_runtime_version();

}  // namespace fusedopt
