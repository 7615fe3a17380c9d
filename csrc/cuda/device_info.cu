#include <atomic>

#include "cuda/cuda_check.h"
#include "ops.h"

namespace fusedopt {

bool cuda_compiled() { return true; }
const char* cuda_archs() { return FUSEDOPT_CUDA_ARCHS_STR; }
int cuda_runtime_version() {
  int v = 0;
  FUSEDOPT_CUDA_CHECK(cudaRuntimeGetVersion(&v));
  return v;
}

namespace cuda {
int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];
  int dev = 0;
  FUSEDOPT_CUDA_CHECK(cudaGetDevice(&dev));
  int n = dev < kMaxDevices ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    FUSEDOPT_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    if (dev < kMaxDevices) cache[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}
}  // namespace cuda

}  // namespace fusedopt
