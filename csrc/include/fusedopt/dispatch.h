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

// The (param, grad, state) storage types of an elementwise optimizer launch. States are float32 or
// bfloat16 only (ops.cpp rejects fp16 states), which halves the instantiations.
template <typename F>
void dispatch_param_grad_state(DType param, DType grad, DType state, F&& f) {
  dispatch_float(param, "param", [&](auto p_tag) {
    dispatch_float(grad, "grad", [&](auto g_tag) {
      if (state == DType::kBFloat16) {
        f(p_tag, g_tag, bf16_t{});
      } else {
        f(p_tag, g_tag, float{});
      }
    });
  });
}

}  // namespace fusedopt
