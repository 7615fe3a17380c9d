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

#ifndef FUSEDOPT_WITH_CUDA
void adam_step_cuda(const AdamLaunch&) {
  throw std::runtime_error(
      "fusedopt was built without its CUDA backend (no nvcc at build time, or FUSEDOPT_CUDA=off); "
      "rebuild with the CUDA toolkit installed and FUSEDOPT_CUDA=on");
}
bool cuda_compiled() { return false; }
const char* cuda_archs() { return ""; }
int cuda_runtime_version() { return 0; }
#endif

}  // namespace fusedopt
