// Which instruction set the CPU loops run (cpu/parallel.h picks the widest the CPU has, up to a
// limit the caller may lower).
#include <atomic>
#include <stdexcept>
#include <string>

#include "cpu/parallel.h"
#include "ops.h"

namespace fusedopt {

namespace {
constexpr const char* kIsaNames[] = {"baseline", "avx2", "avx512"};
constexpr const char* kQuantizerChoices[] = {"auto", "byte_permutes", "gather"};

// Stores the index of name among the three choices into setting, or refuses it naming them.
void set_choice(const char* who, const char* const (&choices)[3], const std::string& name, std::atomic<int>& setting) {
  for (int i = 0; i < 3; ++i) {
    if (name == choices[i]) {
      setting.store(i);
      return;
    }
  }
  throw std::invalid_argument(std::string("fusedopt.") + who + ": '" + name + "' is not one of " + choices[0] + ", " +
                              choices[1] + ", " + choices[2]);
}
}  // namespace

const char* cpu_isa() { return kIsaNames[int(cpu::best_isa())]; }

void set_cpu_isa_limit(const std::string& name) { set_choice("set_cpu_isa_limit", kIsaNames, name, cpu::isa_limit()); }

void set_cpu_quantizer(const std::string& name) {
  set_choice("set_cpu_quantizer", kQuantizerChoices, name, cpu::quantizer_choice());
}

}  // namespace fusedopt
