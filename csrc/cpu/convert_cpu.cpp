// Elementwise conversion through dtype.h, loaded and stored as the optimizer loops do
// (cpu/tile_io.h, on the widest tier allowed): exposed so tests can check the shared rounding
// code, and every tier's 16-bit loads and stores, against torch's own casts, exhaustively for
// 16-bit inputs.
#include <algorithm>

#include "cpu/parallel.h"
#include "cpu/tile_io.h"
#include "fusedopt/dispatch.h"
#include "ops.h"

namespace fusedopt {

void convert_cpu(uintptr_t src, DType src_dtype, uintptr_t dst, DType dst_dtype, int64_t n) {
  dispatch_float(src_dtype, "src", [&](auto s_tag) {
    dispatch_float(dst_dtype, "dst", [&](auto d_tag) {
      using S = decltype(s_tag);
      using D = decltype(d_tag);
      const S* s = reinterpret_cast<const S*>(src);
      D* d = reinterpret_cast<D*>(dst);
      cpu::parallel_over_chunks({n}, 1, [&](const cpu::WorkItem& w, auto isa) FUSEDOPT_CPU_KERNEL {
        for (int64_t i0 = w.begin; i0 < w.end; i0 += cpu::kTile) {
          const int len = int(std::min<int64_t>(cpu::kTile, w.end - i0));
          constexpr cpu::Isa I = decltype(isa)::value;
          const cpu::InTile<S, I> in(s, i0, len);
          cpu::OutTile<D, I> out;
          for (int k = 0; k < len; ++k) out.put(d, i0 + k, k, in.get(s, i0 + k, k));
          out.flush(d, i0, len);
        }
      });
    });
  });
}

}  // namespace fusedopt
