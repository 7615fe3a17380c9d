// Routes a launch to its backend. A build without CUDA fails here, at call time, by name.
#include <stdexcept>
#include <string>

#include "ops.h"

namespace fusedopt {

namespace {
void check_lists(const AdamLaunch& L) {
  const size_t n = L.lists.size();
  auto need = [&](int slot, const char* name, bool required) {
    const size_t got = L.lists.ptrs[slot].size();
    if (got != n && !(got == 0 && !required)) {
      throw std::invalid_argument(std::string("fusedopt.adam_step: list '") + name + "' has " +
                                  std::to_string(got) + " entries, expected " + std::to_string(n));
    }
  };
  need(kParam, "params", true);
  need(kGrad, "grads", true);
  need(kExpAvg, "exp_avgs", true);
  need(kExpAvgSq, "exp_avg_sqs", true);
  need(kMaxExpAvgSq, "max_exp_avg_sqs", L.amsgrad);
  need(kMaster, "master_params", false);
  if (L.lists.steps.size() != n) throw std::invalid_argument("fusedopt.adam_step: one step counter per tensor");
  if (L.dtypes.state == DType::kFloat16) {
    throw std::invalid_argument("fusedopt.adam_step: optimizer states must be float32 or bfloat16");
  }
}
}  // namespace

void adam_step(Device device, const AdamLaunch& launch) {
  check_lists(launch);
  if (launch.lists.size() == 0) return;
  if (device == Device::kCPU) {
    adam_step_cpu(launch);
  } else {
    adam_step_cuda(launch);
  }
}

void lion_step(Device device, const LionLaunch& launch) {
  const size_t n = launch.lists.size();
  for (int slot : {int(kParam), int(kGrad), int(kExpAvg)}) {
    if (launch.lists.ptrs[slot].size() != n) throw std::invalid_argument("fusedopt.lion_step: list lengths differ");
  }
  if (!launch.lists.ptrs[kMaster].empty() && launch.lists.ptrs[kMaster].size() != n) {
    throw std::invalid_argument("fusedopt.lion_step: one master pointer per tensor, or none");
  }
  if (launch.dtypes.state == DType::kFloat16) {
    throw std::invalid_argument("fusedopt.lion_step: optimizer states must be float32 or bfloat16");
  }
  if (n == 0) return;
  if (device == Device::kCPU) {
    lion_step_cpu(launch);
  } else {
    lion_step_cuda(launch);
  }
}

void adam8bit_step(Device device, const Adam8bitLaunch& launch) {
  const size_t n = launch.lists.size();
  for (int slot : {int(kParam), int(kGrad), int(kExpAvg), int(kExpAvgSq), int(kExpAvgAbsmax), int(kExpAvgSqAbsmax)}) {
    if (launch.lists.ptrs[slot].size() != n) throw std::invalid_argument("fusedopt.adam8bit_step: list lengths differ");
  }
  if (!launch.lists.ptrs[kMaster].empty() && launch.lists.ptrs[kMaster].size() != n) {
    throw std::invalid_argument("fusedopt.adam8bit_step: one master pointer per tensor, or none");
  }
  if (launch.lists.steps.size() != n) throw std::invalid_argument("fusedopt.adam8bit_step: one step counter per tensor");
  if (launch.signed_map == 0 || launch.unsigned_map == 0) {
    throw std::invalid_argument("fusedopt.adam8bit_step: both quantization maps are required");
  }
  if (n == 0) return;
  if (device == Device::kCPU) {
    adam8bit_step_cpu(launch);
  } else {
    adam8bit_step_cuda(launch);
  }
}

void lion8bit_step(Device device, const Lion8bitLaunch& launch) {
  const size_t n = launch.lists.size();
  for (int slot : {int(kParam), int(kGrad), int(kExpAvg), int(kExpAvgAbsmax)}) {
    if (launch.lists.ptrs[slot].size() != n) throw std::invalid_argument("fusedopt.lion8bit_step: list lengths differ");
  }
  if (!launch.lists.ptrs[kMaster].empty() && launch.lists.ptrs[kMaster].size() != n) {
    throw std::invalid_argument("fusedopt.lion8bit_step: one master pointer per tensor, or none");
  }
  if (launch.signed_map == 0) throw std::invalid_argument("fusedopt.lion8bit_step: the signed quantization map is required");
  if (n == 0) return;
  if (device == Device::kCPU) {
    lion8bit_step_cpu(launch);
  } else {
    lion8bit_step_cuda(launch);
  }
}

void muon_prepare(Device device, const MuonPrepareLaunch& launch) {
  const size_t n = launch.lists.size();
  for (int slot : {int(kGrad), int(kMuonBuffer), int(kMuonOut)}) {
    if (launch.lists.ptrs[slot].size() != n) throw std::invalid_argument("fusedopt.muon_prepare: list lengths differ");
  }
  if (n == 0) return;
  if (device == Device::kCPU) {
    muon_prepare_cpu(launch);
  } else {
    if (launch.partials == 0) throw std::invalid_argument("fusedopt.muon_prepare: CUDA needs a partials workspace");
    muon_prepare_cuda(launch);
  }
}

void muon_apply(Device device, const MuonApplyLaunch& launch) {
  const size_t n = launch.lists.size();
  for (int slot : {int(kParam), int(kMuonOut)}) {
    if (launch.lists.ptrs[slot].size() != n) throw std::invalid_argument("fusedopt.muon_apply: list lengths differ");
  }
  if (n == 0) return;
  if (device == Device::kCPU) {
    muon_apply_cpu(launch);
  } else {
    muon_apply_cuda(launch);
  }
}

#ifndef FUSEDOPT_WITH_CUDA
[[noreturn]] static void no_cuda() {
  throw std::runtime_error(
      "fusedopt was built without its CUDA backend (no nvcc at build time, or FUSEDOPT_CUDA=off); "
      "rebuild with the CUDA toolkit installed and FUSEDOPT_CUDA=on");
}
void adam_step_cuda(const AdamLaunch&) { no_cuda(); }
void lion_step_cuda(const LionLaunch&) { no_cuda(); }
void adam8bit_step_cuda(const Adam8bitLaunch&) { no_cuda(); }
void lion8bit_step_cuda(const Lion8bitLaunch&) { no_cuda(); }
void muon_prepare_cuda(const MuonPrepareLaunch&) { no_cuda(); }
void muon_apply_cuda(const MuonApplyLaunch&) { no_cuda(); }
void symmetric_gram_cuda(const GramLaunch&) { no_cuda(); }
bool cuda_compiled() { return false; }
const char* cuda_archs() { return ""; }
int cuda_runtime_version() { return 0; }
#endif

}  // namespace fusedopt
