// Elementwise conversion through dtype.h, stored as the optimizer loops store (cpu/store_tile.h,
// on the widest tier allowed): exposed so tests can check the shared rounding code, and every
// tier's 16-bit stores, against torch's own casts, exhaustively for 16-bit inputs.
#include <algorithm>

#include "cpu/parallel.h"
#include "cpu/store_tile.h"
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
          cpu::OutTile<D> out(d);
          for (int k = 0; k < len; ++k) out.put(i0 + k, k, load_float(s, i0 + k));
          out.template flush<decltype(isa)::value>(i0, len);
        }
      });
    });
  });
}

}  // namespace fusedopt
