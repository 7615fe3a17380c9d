// Blockwise 8-bit Adam/AdamW on CUDA: math::Adam8bitRule through cuda/blockwise8bit.cuh.
#include "cuda/blockwise8bit.cuh"
#include "fusedopt/math/adam8bit.h"
#include "ops.h"

namespace fusedopt {

void adam8bit_step_cuda(const Adam8bitLaunch& L) {
  const uintptr_t maps[2] = {L.signed_map, L.unsigned_map};
  cuda::blockwise8bit_step(L.lists, L.dtypes, math::Adam8bitRule{L.config}, L.lr, L.device_ptrs, maps, L.stream);
}

}  // namespace fusedopt
