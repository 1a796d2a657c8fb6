// A block of columns of a row-major matrix on CUDA (ColumnsArgs in kernels/ops.h): the allgather
// dispatcher's local-expert slice of probs and map, and its scatter back for dprobs. Elements move
// as raw words of their size, so the result is bit-exact for every dtype.
#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace moe {

namespace {

using namespace cuda;

constexpr int kThreads = 256;

// Grid-stride over the rows·out_cols output elements. Each thread keeps its (row, column) position
// and advances it by the stride's quotient and remainder: one division per thread, none per element.
template <class W>
__global__ void __launch_bounds__(kThreads)
    columns_kernel(const W* __restrict__ in, W* __restrict__ out, int64_t rows, int64_t in_cols, int64_t out_cols,
                   int64_t start, bool scatter) {
  const int64_t n = rows * out_cols;
  const int64_t first = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (first >= n) return;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t dr = stride / out_cols, dc = stride - dr * out_cols;
  int64_t r = first / out_cols, c = first - r * out_cols;
  for (int64_t i = first; i < n; i += stride) {
    if (scatter) {
      const int64_t src = c - start;
      out[i] = (src >= 0 && src < in_cols) ? in[r * in_cols + src] : W(0);
    } else {
      out[i] = in[r * in_cols + start + c];
    }
    r += dr;
    c += dc;
    if (c >= out_cols) {
      c -= out_cols;
      ++r;
    }
  }
}

template <class W>
void launch(const ColumnsArgs& a, const ExecCtx& ctx) {
  const int64_t n = a.rows * a.out_cols;
  columns_kernel<W><<<grid_for(n, kThreads), kThreads, 0, stream_of(ctx)>>>(
      static_cast<const W*>(a.in), static_cast<W*>(a.out), a.rows, a.in_cols, a.out_cols, a.start, a.scatter);
  MOE_CUDA_CHECK_LAUNCH("columns_kernel");
}

}  // namespace

void cuda_columns(const ColumnsArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  if (a.rows * a.out_cols == 0) return;
  switch (a.elem_size) {
    case 1: launch<uint8_t>(a, ctx); break;
    case 2: launch<uint16_t>(a, ctx); break;
    case 4: launch<uint32_t>(a, ctx); break;
    case 8: launch<unsigned long long>(a, ctx); break;
    default:
      MOE_THROW(ErrorCode::not_supported, "columns: element size ", a.elem_size, " bytes is not supported on CUDA");
  }
}

}  // namespace moe
