// Elementwise conversion through dtype.h: exposed so tests can check the shared rounding code
// against torch's own casts, exhaustively for 16-bit inputs.
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
      for (int64_t i = 0; i < n; ++i) d[i] = from_float<D>(to_float(s[i]));
    });
  });
}

}  // namespace fusedopt
