// Blockwise quantize / dequantize of a flat fp32 buffer on the CPU, through math/quant8.h: the
// same rounding the 8-bit optimizers apply in place, exposed for checkpoint conversion and tests.
#include <algorithm>
#include <stdexcept>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/quantize_block.h"
#include "fusedopt/math/quant8.h"
#include "ops.h"

namespace fusedopt {

using math::kQuantBlock;
static_assert(cpu::kChunkSize % kQuantBlock == 0, "a CPU work item must hold whole quantization blocks");

void build_quant_map(uintptr_t values, uintptr_t out, bool coarse) {
  if (!math::build_quant_map(reinterpret_cast<const float*>(values), reinterpret_cast<math::QuantMap*>(out), coarse)) {
    throw std::invalid_argument(
        "fusedopt.build_quant_map: the map holds no exact 0, is not strictly increasing, or changes code more than "
        "once in one search bucket (raise kSearchMantissaBits in math/quant8.h)");
  }
}

const char* cpu_quantizer(uintptr_t map) {
  const math::QuantMap& q = *reinterpret_cast<const math::QuantMap*>(map);
  switch (cpu::best_isa()) {
    case cpu::Isa::kBaseline: return "scalar";
    case cpu::Isa::kAvx2: return "avx2";
    default: break;
  }
#if defined(__x86_64__)
  if (q.coarse.ok && cpu::use_byte_permute_quantizer()) return "avx512 byte permutes";
#endif
  return "avx512 gather";
}

void quantize_blockwise_cpu(uintptr_t src, int64_t n, uintptr_t map, uintptr_t codes, uintptr_t absmax,
                            int num_threads) {
  const float* x = reinterpret_cast<const float*>(src);
  const math::QuantMap& q = *reinterpret_cast<const math::QuantMap*>(map);
  uint8_t* c = reinterpret_cast<uint8_t*>(codes);
  float* a = reinterpret_cast<float*>(absmax);
  // The Python wrapper refuses non-finite input, which block_absmax needs.
  cpu::parallel_over_chunks(std::vector<int64_t>{n}, num_threads, [&](const cpu::WorkItem& w, auto isa) FUSEDOPT_CPU_KERNEL {
    for (int64_t b0 = w.begin; b0 < w.end; b0 += kQuantBlock) {
      const int len = int(std::min<int64_t>(w.end, b0 + kQuantBlock) - b0);
      const float amax = cpu::block_absmax(x + b0, len);
      a[b0 / kQuantBlock] = amax;
      cpu::quantize_block<decltype(isa)::value>(q, x + b0, len, math::inv_absmax(amax), c + b0);
    }
  });
}

void dequantize_blockwise_cpu(uintptr_t codes, uintptr_t absmax, int64_t n, uintptr_t map, uintptr_t dst,
                              int num_threads) {
  const uint8_t* c = reinterpret_cast<const uint8_t*>(codes);
  const float* a = reinterpret_cast<const float*>(absmax);
  const math::QuantMap& q = *reinterpret_cast<const math::QuantMap*>(map);
  float* y = reinterpret_cast<float*>(dst);
  cpu::parallel_over_chunks(std::vector<int64_t>{n}, num_threads, [&](const cpu::WorkItem& w, auto isa) FUSEDOPT_CPU_KERNEL {
    for (int64_t b0 = w.begin; b0 < w.end; b0 += kQuantBlock) {
      const int len = int(std::min<int64_t>(w.end, b0 + kQuantBlock) - b0);
      cpu::dequantize_block<decltype(isa)::value>(q, c + b0, len, a[b0 / kQuantBlock], y + b0);
    }
  });
}

}  // namespace fusedopt
