// CPU launch machinery: split every tensor of a launch into fixed-size chunks, run the
// (tensor, chunk) items over OpenMP threads (the CPU twin of multi-tensor-apply), and pick the
// instruction set once per launch.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace fusedopt {
namespace cpu {

// 16K elements: a chunk's working set (p, g, m, v in fp32 = 256 KiB) stays within L2.
constexpr int64_t kChunkSize = 1 << 14;
// Below this many elements in a launch, waking threads costs more than it saves.
constexpr int64_t kMinParallelElements = 1 << 16;

// Put on a loop lambda so its body is inlined into (and compiled for) each ISA's caller.
#define FUSEDOPT_CPU_KERNEL __attribute__((always_inline))

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

// The update loops are divide/sqrt-bound at SSE2 width on a 2-core machine (measured: 34 ms vs
// 23 ms per 16M-param AdamW step on one core), so x86-64 also runs them compiled for AVX2+FMA and
// for AVX-512 when the CPU has them (torch's own fused CPU kernels use AVX-512 where present).
// -ffp-contract=off and exact vector div/sqrt keep every copy bitwise identical.
enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// A loop lambda may take the tier it is compiled for as a second argument, to pick hand-written
// intrinsics where the compiler's own vectorization falls short (cpu/quantize_avx2.h).
template <Isa I>
struct IsaTag {
  static constexpr Isa value = I;
};

template <Isa I, typename F>
FUSEDOPT_CPU_KERNEL inline void call_item(const F& f, const WorkItem& w) {
  if constexpr (std::is_invocable_v<const F&, const WorkItem&, IsaTag<I>>) {
    f(w, IsaTag<I>{});
  } else {
    f(w);
  }
}

template <typename F>
void run_item_baseline(const F& f, const WorkItem& w) {
  call_item<Isa::kBaseline>(f, w);
}

#if defined(__x86_64__)
// The instruction sets of the two x86 tiers, as target attributes: the tier's loops
// (run_item_*) and its hand-written (de)quantizers (cpu/quantize_avx2.h, cpu/quantize_avx512.h).
#define FUSEDOPT_TARGET_AVX2 "avx2,fma"
#define FUSEDOPT_TARGET_AVX512 "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"

template <typename F>
__attribute__((target(FUSEDOPT_TARGET_AVX2))) void run_item_avx2(const F& f, const WorkItem& w) {
  call_item<Isa::kAvx2>(f, w);
}

// This thread's MXCSR.DAZ (torch.set_flush_denormal sets it), read once per work item for
// cpu/tile_io.h's bf16 stores: stmxcsr once per tile made a bf16-state Lion step ~3% slower
// (one thread, 256K params, Zen 4: 0.535-0.538 against 0.512-0.521 ns per param).
inline thread_local bool t_mxcsr_daz = false;

template <typename F>
__attribute__((target(FUSEDOPT_TARGET_AVX512 ",prefer-vector-width=512")))
void run_item_avx512(const F& f, const WorkItem& w) {
  t_mxcsr_daz = (__builtin_ia32_stmxcsr() & (1u << 6)) != 0;
  call_item<Isa::kAvx512>(f, w);
}

inline bool has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

inline bool has_avx512() {
  static const bool yes = has_avx2_fma() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return yes;
}

// Within the AVX-512 tier, where the 8-bit dequantizer and quantizer may use byte permutes.
inline bool has_avx512_vbmi() {
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512vbmi");
  return yes;
}
#endif

// Which AVX-512 quantizer a map with the coarse table runs where the CPU has VBMI. The byte
// permutes win where a gather is microcoded (AMD: 0.28-0.44 against 0.44-0.58 ns per element on
// Zen 5 and Zen 4) and lose where it is not (a Sapphire Rapids Xeon: the gather 1.3-1.6x faster in
// each of five runs, 0.30-0.83 ns), so kAuto asks the vendor; set_cpu_quantizer (ops.h) overrides
// it for tests and benchmarks.
enum class QuantizerChoice : int { kAuto = 0, kBytePermutes = 1, kGather = 2 };

inline std::atomic<int>& quantizer_choice() {
  static std::atomic<int> choice{int(QuantizerChoice::kAuto)};
  return choice;
}

#if defined(__x86_64__)
inline bool use_byte_permute_quantizer() {
  static const bool amd = __builtin_cpu_is("amd");
  switch (QuantizerChoice(quantizer_choice().load(std::memory_order_relaxed))) {
    case QuantizerChoice::kBytePermutes: return has_avx512_vbmi();
    case QuantizerChoice::kGather: return false;
    default: return has_avx512_vbmi() && amd;
  }
}
#endif

// The widest instruction set this CPU has, capped by isa_limit() (set_cpu_isa_limit in ops.h:
// benchmarks compare the tiers, tests check that they agree bitwise).

inline std::atomic<int>& isa_limit() {
  static std::atomic<int> limit{int(Isa::kAvx512)};
  return limit;
}

inline Isa best_isa() {
  Isa isa = Isa::kBaseline;
#if defined(__x86_64__)
  if (has_avx512()) {
    isa = Isa::kAvx512;
  } else if (has_avx2_fma()) {
    isa = Isa::kAvx2;
  }
#endif
  return Isa(std::min(int(isa), isa_limit().load()));
}

// Runs f (a FUSEDOPT_CPU_KERNEL lambda) over every chunk of every tensor.
template <typename F>
void parallel_over_chunks(const std::vector<int64_t>& numels, int num_threads, const F& f) {
  int64_t total = 0;
  const std::vector<WorkItem> items = make_work_items(numels, &total);
  const int64_t n = int64_t(items.size());
  const bool parallel = num_threads > 1 && total >= kMinParallelElements;
  void (*run)(const F&, const WorkItem&) = &run_item_baseline<F>;
#if defined(__x86_64__)
  const Isa isa = best_isa();
  if (isa == Isa::kAvx512) run = &run_item_avx512<F>;
  if (isa == Isa::kAvx2) run = &run_item_avx2<F>;
#endif
#pragma omp parallel for schedule(static) num_threads(num_threads) if (parallel)
  for (int64_t i = 0; i < n; ++i) run(f, items[i]);
}

}  // namespace cpu
}  // namespace fusedopt
