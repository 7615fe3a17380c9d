// Backend entry points. ops.cpp routes by device; cpu/ and cuda/ implement.
#pragma once

#include <string>

#include "fusedopt/math/adam.h"
#include "fusedopt/math/lion.h"
#include "fusedopt/math/quant8.h"
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

// Blockwise 8-bit Adam/AdamW (math/adam8bit.h). kExpAvg/kExpAvgSq hold uint8 codes and
// kExpAvgAbsmax/kExpAvgSqAbsmax one fp32 absmax per 256-element block; kMaster is optional.
// No amsgrad (as bnb). dtypes.state is unused.
struct Adam8bitLaunch {
  TensorLists lists;
  DTypes dtypes;
  math::AdamConfig config;
  double lr;
  uintptr_t signed_map = 0;    // const math::QuantMap* on the launch's device (exp_avg)
  uintptr_t unsigned_map = 0;  // const math::QuantMap* on the launch's device (exp_avg_sq)
  DevicePtrs device_ptrs;
  uintptr_t stream = 0;
  int num_threads = 1;
};

void adam8bit_step(Device device, const Adam8bitLaunch& launch);
void adam8bit_step_cpu(const Adam8bitLaunch& launch);
void adam8bit_step_cuda(const Adam8bitLaunch& launch);

// Lion with a blockwise 8-bit exp_avg (math/lion8bit.h): kExpAvg holds uint8 codes into the signed
// map and kExpAvgAbsmax one fp32 absmax per 256-element block; kMaster is optional; no step counter.
struct Lion8bitLaunch {
  TensorLists lists;
  DTypes dtypes;
  math::LionConfig config;
  double lr;
  uintptr_t signed_map = 0;  // const math::QuantMap* on the launch's device
  DevicePtrs device_ptrs;
  uintptr_t stream = 0;
  int num_threads = 1;
};

void lion8bit_step(Device device, const Lion8bitLaunch& launch);
void lion8bit_step_cpu(const Lion8bitLaunch& launch);
void lion8bit_step_cuda(const Lion8bitLaunch& launch);

// Muon's elementwise parts (math/muon.h), over same-shape matrices. Prepare: kGrad, kMuonBuffer
// (the momentum buffer, dtypes.state = the param's dtype) and kMuonOut (bf16, the Newton-Schulz
// input, one contiguous matrix per tensor). Apply: kParam and kMuonOut (the NS output), one
// lr_factor for all (same shape). Neither keeps a step counter.
struct MuonPrepareLaunch {
  TensorLists lists;
  DTypes dtypes;
  double momentum;
  bool nesterov;
  double eps;
  double safety;
  uintptr_t partials = 0;  // CUDA: double[ceil(numel / 16384) summed over tensors], device memory
  DevicePtrs device_ptrs;
  uintptr_t stream = 0;
  int num_threads = 1;
};

struct MuonApplyLaunch {
  TensorLists lists;
  DTypes dtypes;
  double lr;
  double weight_decay;
  double lr_factor;
  DevicePtrs device_ptrs;
  uintptr_t stream = 0;
  int num_threads = 1;
};

void muon_prepare(Device device, const MuonPrepareLaunch& launch);
void muon_prepare_cpu(const MuonPrepareLaunch& launch);
void muon_prepare_cuda(const MuonPrepareLaunch& launch);
void muon_apply(Device device, const MuonApplyLaunch& launch);
void muon_apply_cpu(const MuonApplyLaunch& launch);
void muon_apply_cuda(const MuonApplyLaunch& launch);

// out = alpha X X^T + beta C over a batch of row-major bf16 matrices X (rows x cols), out and C
// (rows x rows, C optional) symmetric; CUDA only (cuda/symmetric_gram.cu). The CPU Newton-Schulz
// keeps torch's matmuls.
struct GramLaunch {
  uintptr_t x = 0;
  uintptr_t c = 0;  // 0: no C term
  uintptr_t out = 0;
  int64_t batch = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  float alpha = 1.0f;
  float beta = 0.0f;
  uintptr_t stream = 0;
};

void symmetric_gram_cuda(const GramLaunch& launch);

// Fills the math::QuantMap at `out` (sizeof(math::QuantMap) bytes, host) from 256 sorted floats;
// throws when the map is too dense for the table-guided search to be exact.
void build_quant_map(uintptr_t values, uintptr_t out, bool coarse);
// Which quantizer the CPU loops run for a built map at the current instruction-set tier.
const char* cpu_quantizer(uintptr_t map);

// n fp32 values <-> uint8 codes + one absmax per 256-element block, on the CPU, through
// math/quant8.h (checkpoint conversion and tests use these; the optimizers never do). `map` is a
// const math::QuantMap* in host memory.
void quantize_blockwise_cpu(uintptr_t src, int64_t n, uintptr_t map, uintptr_t codes, uintptr_t absmax,
                            int num_threads);
void dequantize_blockwise_cpu(uintptr_t codes, uintptr_t absmax, int64_t n, uintptr_t map, uintptr_t dst,
                              int num_threads);

// Elementwise dtype conversion through dtype.h (lets tests check the shared rounding code).
void convert_cpu(uintptr_t src, DType src_dtype, uintptr_t dst, DType dst_dtype, int64_t n);

// The instruction set the CPU loops use now ("baseline", "avx2" or "avx512"), and a cap on it.
const char* cpu_isa();
void set_cpu_isa_limit(const std::string& name);
// The AVX-512 quantizer for maps with the coarse table on a CPU with VBMI: "auto" (byte permutes
// on AMD, the gather elsewhere: cpu/parallel.h), "byte_permutes" or "gather". The codes are the same.
void set_cpu_quantizer(const std::string& name);

bool cuda_compiled();
const char* cuda_archs();
int cuda_runtime_version();

}  // namespace fusedopt
