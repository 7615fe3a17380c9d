// Blockwise 8-bit Adam/AdamW on the CPU: math::Adam8bitRule through cpu/blockwise8bit.h.
#include "cpu/blockwise8bit.h"
#include "fusedopt/math/adam8bit.h"
#include "ops.h"

namespace fusedopt {

void adam8bit_step_cpu(const Adam8bitLaunch& L) {
  const HostScalars h = read_host_scalars(L.device_ptrs, L.lr);
  if (h.skip) return;
  const math::Adam8bitRule rule{L.config};
  std::vector<math::AdamScalars> scalars(L.lists.size());
  for (size_t t = 0; t < scalars.size(); ++t) {
    float* step = reinterpret_cast<float*>(L.lists.steps[t]);
    *step += 1.0f;
    scalars[t] = rule.scalars(h.lr, *step, h.grad_scale);
  }
  const math::QuantMap* maps[2] = {reinterpret_cast<const math::QuantMap*>(L.signed_map),
                                   reinterpret_cast<const math::QuantMap*>(L.unsigned_map)};
  cpu::blockwise8bit_step<math::Adam8bitRule>(L.lists, L.dtypes, maps, scalars, L.num_threads);
}

}  // namespace fusedopt
