// Lion with a blockwise 8-bit momentum on CUDA: math::Lion8bitRule through cuda/blockwise8bit.cuh.
#include "cuda/blockwise8bit.cuh"
#include "fusedopt/math/lion8bit.h"
#include "ops.h"

namespace fusedopt {

void lion8bit_step_cuda(const Lion8bitLaunch& L) {
  const uintptr_t maps[1] = {L.signed_map};
  cuda::blockwise8bit_step(L.lists, L.dtypes, math::Lion8bitRule{L.config}, L.lr, L.device_ptrs, maps, L.stream);
}

}  // namespace fusedopt
