// CUDA error handling: throw (pybind11 turns it into RuntimeError), never exit().
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define FUSEDOPT_CUDA_CHECK(expr)                                                                   \
  do {                                                                                              \
    const cudaError_t err_ = (expr);                                                                \
    if (err_ != cudaSuccess) {                                                                      \
      throw std::runtime_error(std::string("fusedopt CUDA error: ") + cudaGetErrorString(err_) +   \
                               " at " __FILE__ ":" + std::to_string(__LINE__) + " (" #expr ")");   \
    }                                                                                               \
  } while (0)

namespace fusedopt {
namespace cuda {
// Multiprocessor count of the current device (cached per device).
int sm_count();
}  // namespace cuda
}  // namespace fusedopt
