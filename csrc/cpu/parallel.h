// CPU launch machinery: split every tensor of a launch into fixed-size chunks and run the
// (tensor, chunk) items over OpenMP threads, the CPU twin of multi-tensor-apply.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fusedopt {
namespace cpu {

// 16K elements: a chunk's working set (p, g, m, v in fp32 = 256 KiB) stays within L2.
constexpr int64_t kChunkSize = 1 << 14;
// Below this many elements in a launch, waking threads costs more than it saves.
constexpr int64_t kMinParallelElements = 1 << 16;

struct WorkItem {
  int32_t tensor;
  int64_t begin;
  int64_t end;
};

inline std::vector<WorkItem> make_work_items(const std::vector<int64_t>& numels, int64_t* total) {
  std::vector<WorkItem> items;
  *total = 0;
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t b = 0; b < numels[t]; b += kChunkSize) {
      items.push_back({int32_t(t), b, std::min(numels[t], b + kChunkSize)});
    }
    *total += numels[t];
  }
  return items;
}

template <typename F>
void parallel_over_items(const std::vector<WorkItem>& items, int64_t total, int num_threads, F&& f) {
  const int64_t n = int64_t(items.size());
  const bool parallel = num_threads > 1 && total >= kMinParallelElements;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (parallel)
  for (int64_t i = 0; i < n; ++i) f(items[i]);
}

}  // namespace cpu
}  // namespace fusedopt
