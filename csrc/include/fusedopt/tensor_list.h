// What crosses from Python into the backends: raw pointers and sizes, no torch types.
#pragma once

#include <cstdint>
#include <vector>

#include "fusedopt/dtype.h"
#include "fusedopt/macros.h"

namespace fusedopt {

// Slot order of the per-tensor pointers of an Adam launch (PyTorch's kParamIdx... convention).
enum AdamSlot : int { kParam = 0, kGrad, kExpAvg, kExpAvgSq, kMaxExpAvgSq, kMaster, kAdamSlots };
// 8-bit Adam adds the fp32 absmax of each 256-element block of exp_avg / exp_avg_sq (whose slots
// then hold uint8 codes).
enum Adam8bitSlot : int { kExpAvgAbsmax = kAdamSlots, kExpAvgSqAbsmax, kAdam8bitSlots };
constexpr int kMaxSlots = kAdam8bitSlots;
// Muon's elementwise launches: the momentum buffer, and the Newton-Schulz input/output (bf16).
enum MuonSlot : int { kMuonBuffer = kExpAvg, kMuonOut = kExpAvgSq };
// Moment j of a blockwise 8-bit optimizer (Adam: exp_avg, exp_avg_sq; Lion: exp_avg) keeps its
// codes in slot moment_code_slot(j) and its per-block absmax in moment_absmax_slot(j).
FUSEDOPT_HD constexpr int moment_code_slot(int j) { return j == 0 ? kExpAvg : kExpAvgSq; }
FUSEDOPT_HD constexpr int moment_absmax_slot(int j) { return j == 0 ? kExpAvgAbsmax : kExpAvgSqAbsmax; }

// One launch: n tensors, each with a pointer per slot (0 when the slot is unused), its element
// count and the address of its fp32 step counter (host memory on CPU, device memory on CUDA).
struct TensorLists {
  std::vector<uintptr_t> ptrs[kMaxSlots];
  std::vector<int64_t> numels;
  std::vector<uintptr_t> steps;
  size_t size() const { return numels.size(); }
  // 0 for an unused (empty) slot.
  uintptr_t ptr(int slot, size_t t) const { return ptrs[slot].empty() ? 0 : ptrs[slot][t]; }
};

struct DTypes {
  DType param;
  DType grad;
  DType state;
};

// Scalars that may live on the device (GradScaler, capturable lr): 0 means absent.
struct DevicePtrs {
  uintptr_t lr = 0;          // float*: overrides the host lr when set
  uintptr_t grad_scale = 0;  // float*: divide grads by it
  uintptr_t found_inf = 0;   // float*: when nonzero, skip the whole step (state and step untouched)
};

// DevicePtrs read on the CPU backend, where they point to host memory.
struct HostScalars {
  bool skip;
  float grad_scale;
  double lr;
};

inline HostScalars read_host_scalars(const DevicePtrs& d, double lr) {
  auto at = [](uintptr_t p) { return *reinterpret_cast<const float*>(p); };
  return {d.found_inf != 0 && at(d.found_inf) != 0.0f, d.grad_scale ? at(d.grad_scale) : 1.0f,
          d.lr ? double(at(d.lr)) : lr};
}

}  // namespace fusedopt
