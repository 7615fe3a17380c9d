// Which instruction set the CPU loops run (cpu/parallel.h picks the widest the CPU has, up to a
// limit the caller may lower).
#include <stdexcept>
#include <string>

#include "cpu/parallel.h"
#include "ops.h"

namespace fusedopt {

namespace {
constexpr const char* kIsaNames[] = {"baseline", "avx2", "avx512"};
}

const char* cpu_isa() { return kIsaNames[int(cpu::best_isa())]; }

void set_cpu_isa_limit(const std::string& name) {
  for (int i = 0; i < 3; ++i) {
    if (name == kIsaNames[i]) {
      cpu::isa_limit().store(i);
      return;
    }
  }
  throw std::invalid_argument("fusedopt.set_cpu_isa_limit: '" + name + "' is not one of baseline, avx2, avx512");
}

namespace {
constexpr const char* kQuantizerChoices[] = {"auto", "byte_permutes", "gather"};
}

void set_cpu_quantizer(const std::string& name) {
  for (int i = 0; i < 3; ++i) {
    if (name == kQuantizerChoices[i]) {
      cpu::quantizer_choice().store(i);
      return;
    }
  }
  throw std::invalid_argument("fusedopt.set_cpu_quantizer: '" + name + "' is not one of auto, byte_permutes, gather");
}

}  // namespace fusedopt
