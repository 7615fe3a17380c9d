// Runtime dtype -> template argument, as a lambda switch (flash-attention's static_switch idea).
#pragma once

#include <stdexcept>
#include <string>

#include "fusedopt/dtype.h"

namespace fusedopt {

template <typename F>
void dispatch_float(DType d, const char* what, F&& f) {
  switch (d) {
    case DType::kFloat32: f(float{}); return;
    case DType::kBFloat16: f(bf16_t{}); return;
    case DType::kFloat16: f(fp16_t{}); return;
  }
  throw std::invalid_argument(std::string("fusedopt: unsupported dtype code for ") + what);
}

template <typename F>
void dispatch_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace fusedopt
