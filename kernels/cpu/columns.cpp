// A block of columns of a row-major matrix, moved as bytes (ColumnsArgs in kernels/ops.h).
#include <cstring>

#include "kernels/cpu/cpu_kernels.h"

namespace moe {

void cpu_columns(const ColumnsArgs& a, const ExecCtx&) {
  const char* in = static_cast<const char*>(a.in);
  char* out = static_cast<char*>(a.out);
  const int64_t es = a.elem_size;
  if (a.scatter) {
    if (a.rows * a.out_cols > 0) std::memset(out, 0, static_cast<size_t>(a.rows * a.out_cols * es));
    for (int64_t r = 0; r < a.rows; ++r)
      std::memcpy(out + (r * a.out_cols + a.start) * es, in + r * a.in_cols * es, static_cast<size_t>(a.in_cols * es));
  } else {
    for (int64_t r = 0; r < a.rows; ++r)
      std::memcpy(out + r * a.out_cols * es, in + (r * a.in_cols + a.start) * es, static_cast<size_t>(a.out_cols * es));
  }
}

}  // namespace moe
