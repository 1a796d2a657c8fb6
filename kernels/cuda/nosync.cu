// The host-sync-free path's ops on CUDA (kernels/ops.h, "The host-sync-free layer path"; docs/gpu.md).
// None of these has run on a GPU yet. Sizes come from device memory, so the host launches for an
// upper bound and blocks past the true sizes leave at once:
//   grouped_gemm_dev: a tiled grouped GEMM (64×64 output tiles, 16-deep slices through shared
//     memory, 4×4 outputs per thread, compute in acc_t) whose group row counts are read from the
//     device offsets. fwd/dgrad: blockIdx.x walks the groups' row tiles (Σ_g ⌈m_g/64⌉ ≤ ⌈M/64⌉ + G
//     blocks launched), blockIdx.y the output columns; wgrad: one (N, K) tile grid per group
//     (blockIdx.z), reducing over the group's rows. cuBLAS's cublasGemmGroupedBatchedEx takes its
//     m/n/k arrays on the host, so it cannot read the counts where the dispatcher left them.
//     Offsets past the row bound are clamped to it. Plain CUDA cores; tensor cores (WMMA / wgmma
//     for bf16) are future work.
//   permute_dev: the permute kernel with N = N_max (it writes only rows the map names).
//   row_offsets, aux_loss_value, scale_at: one thread (G- and E-sized work); accumulate: elementwise.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace moe {

namespace {

using namespace cuda;

constexpr int kBM = 64, kBN = 64, kBK = 16, kTM = 4, kTN = 4;
constexpr int kGemmThreads = (kBM / kTM) * (kBN / kTN);  // 256

// One output tile of group g: C'(i, j) (+)= Σ_p A'(i, p) · B'(p, j) over rows × cols with depth p,
// A'(i, p) = a[i·asi + p·asp], B'(p, j) = b[p·bsp + j·bsj], C'(i, j) = c[i·ldc + j].
template <class T, GroupedGemmMode kMode>
__global__ void __launch_bounds__(kGemmThreads)
    grouped_gemm_dev_kernel(const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ C,
                            const int64_t* __restrict__ off, int64_t G, int64_t M, int64_t N, int64_t K,
                            bool accumulate) {
  using Acc = acc_t<T>;
  __shared__ Acc As[kBK][kBM + 1];
  __shared__ Acc Bs[kBK][kBN + 1];
  int64_t g = 0, tile_i = 0;
  if constexpr (kMode == GroupedGemmMode::wgrad) {
    g = blockIdx.z;
    tile_i = blockIdx.y;
  } else {  // find the group whose row tiles hold blockIdx.x
    int64_t base = 0;
    const int64_t t = blockIdx.x;
    for (g = 0; g < G; ++g) {
      const int64_t lo = d_min(off[g], M), hi = d_min(off[g + 1], M);
      const int64_t tiles = hi > lo ? (hi - lo + kBM - 1) / kBM : 0;
      if (t < base + tiles) break;
      base += tiles;
    }
    if (g == G) return;
    tile_i = t - base;
  }
  const int64_t o = d_min(off[g], M), m = d_max(int64_t(0), d_min(off[g + 1], M) - o);
  int64_t rows, cols, depth, asi, asp, bsp, bsj, ldc;
  const T *a, *b;
  T* c;
  if constexpr (kMode == GroupedGemmMode::fwd) {  // C_g (m, N) = A_g (m, K) · B_g^T, B_g (N, K)
    rows = m, cols = N, depth = K, a = A + o * K, asi = K, asp = 1, b = B + g * N * K, bsp = 1, bsj = K;
    c = C + o * N, ldc = N;
  } else if constexpr (kMode == GroupedGemmMode::dgrad) {  // C_g (m, K) = A_g (m, N) · B_g (N, K)
    rows = m, cols = K, depth = N, a = A + o * N, asi = N, asp = 1, b = B + g * N * K, bsp = K, bsj = 1;
    c = C + o * K, ldc = K;
  } else {  // C_g (N, K) = A_g^T (N, m) · B_g (m, K)
    rows = N, cols = K, depth = m, a = A + o * N, asi = 1, asp = N, b = B + o * K, bsp = K, bsj = 1;
    c = C + g * N * K, ldc = K;
  }
  const int64_t i0 = tile_i * kBM, j0 = int64_t(kMode == GroupedGemmMode::wgrad ? blockIdx.x : blockIdx.y) * kBN;
  if (i0 >= rows || j0 >= cols) return;
  const int tid = threadIdx.x, tr = tid / (kBN / kTN), tc = tid % (kBN / kTN);
  Acc acc[kTM][kTN];
#pragma unroll
  for (int x = 0; x < kTM; ++x)
#pragma unroll
    for (int y = 0; y < kTN; ++y) acc[x][y] = Acc(0);
  for (int64_t p0 = 0; p0 < depth; p0 += kBK) {
    // Loads walk the unit-stride index fastest (coalesced).
    for (int l = tid; l < kBK * kBM; l += kGemmThreads) {
      const int pp = asp == 1 ? l % kBK : l / kBM, ii = asp == 1 ? l / kBK : l % kBM;
      const int64_t i = i0 + ii, p = p0 + pp;
      As[pp][ii] = (i < rows && p < depth) ? to_acc(a[i * asi + p * asp]) : Acc(0);
    }
    for (int l = tid; l < kBK * kBN; l += kGemmThreads) {
      const int pp = bsp == 1 ? l % kBK : l / kBN, jj = bsp == 1 ? l / kBK : l % kBN;
      const int64_t j = j0 + jj, p = p0 + pp;
      Bs[pp][jj] = (j < cols && p < depth) ? to_acc(b[p * bsp + j * bsj]) : Acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int pp = 0; pp < kBK; ++pp) {
      Acc av[kTM], bv[kTN];
#pragma unroll
      for (int x = 0; x < kTM; ++x) av[x] = As[pp][tr * kTM + x];
#pragma unroll
      for (int y = 0; y < kTN; ++y) bv[y] = Bs[pp][tc * kTN + y];
#pragma unroll
      for (int x = 0; x < kTM; ++x)
#pragma unroll
        for (int y = 0; y < kTN; ++y) acc[x][y] += av[x] * bv[y];
    }
    __syncthreads();
  }
#pragma unroll
  for (int x = 0; x < kTM; ++x) {
    const int64_t i = i0 + tr * kTM + x;
    if (i >= rows) continue;
#pragma unroll
    for (int y = 0; y < kTN; ++y) {
      const int64_t j = j0 + tc * kTN + y;
      if (j >= cols) continue;
      T* dst = c + i * ldc + j;
      *dst = accumulate ? from_acc<T>(to_acc(*dst) + acc[x][y]) : from_acc<T>(acc[x][y]);
    }
  }
}

__global__ void row_offsets_kernel(const int64_t* __restrict__ counts, int64_t* __restrict__ offsets, int64_t G) {
  int64_t run = 0;
  for (int64_t g = 0; g < G; ++g) {
    offsets[g] = run;
    run += counts[g];
  }
  offsets[G] = run;
}

// The host formula of AuxLossValueArgs, in one thread (B·E values), in the same order.
__global__ void aux_loss_value_kernel(AuxLossValueArgs a) {
  const int64_t B = a.B, E = a.E;
  auto cnt = [&](int64_t i) {
    return a.global_acc ? a.global_acc[i % E] / a.global_steps : a.counts[i];
  };
  if (a.global_acc)
    for (int64_t e = 0; e < E; ++e) a.global_acc[e] += a.counts[e];
  const double denom = __dmul_rn(__dmul_rn(static_cast<double>(a.k), a.T_tot), a.T_tot);
  double r_sum = 0.0;
  for (int64_t i = 0; i < B * E; ++i) a.weight[i] = 0.0;
  for (int64_t b = 0; b < B && denom > 0; ++b) {
    double dot = 0.0;
    for (int64_t e = 0; e < E; ++e) dot = __dadd_rn(dot, __dmul_rn(a.prob_sum[b * E + e], cnt(b * E + e)));
    r_sum = __dadd_rn(r_sum, static_cast<double>(E) * dot / denom);
    for (int64_t e = 0; e < E; ++e)
      a.weight[b * E + e] = a.loss_scale * a.coeff * static_cast<double>(E) / denom * cnt(b * E + e) /
                            static_cast<double>(B);
  }
  a.value[0] = __dadd_rn(a.value[0], __dmul_rn(a.coeff, r_sum / static_cast<double>(B)));
}

__global__ void accumulate_kernel(AccumulateArgs a) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < a.n; i += int64_t(gridDim.x) * blockDim.x) {
    if (a.y_dtype == DType::i64) {
      static_cast<int64_t*>(a.y)[i] += static_cast<const int64_t*>(a.x)[i];
    } else {
      const double x = a.x_dtype == DType::i64 ? static_cast<double>(static_cast<const int64_t*>(a.x)[i])
                                               : static_cast<const double*>(a.x)[i];
      static_cast<double*>(a.y)[i] += x / a.divisor;
    }
  }
}

__global__ void scale_at_kernel(double* y, int64_t index, double mul, double div) {
  y[index] = __dmul_rn(y[index], mul) / div;
}

}  // namespace

void cuda_grouped_gemm_dev(const GroupedGemmDevArgs& d, const ExecCtx& ctx) {
  DeviceGuard guard(ctx);
  const GroupedGemmArgs& a = d.base;
  const char* op = "grouped_gemm_dev";
  if (a.G == 0 || a.N == 0 || a.K == 0) return;
  const bool wgrad = a.mode == GroupedGemmMode::wgrad;
  if (!wgrad && a.M == 0) return;
  dispatch_float(a.dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto launch = [&](auto kernel, dim3 grid) {
      kernel<<<grid, kGemmThreads, 0, stream_of(ctx)>>>(static_cast<const T*>(a.A), static_cast<const T*>(a.B),
                                                         static_cast<T*>(a.C), d.row_offsets, a.G, a.M, a.N, a.K,
                                                         a.accumulate);
      MOE_CUDA_CHECK_LAUNCH("grouped_gemm_dev_kernel");
    };
    switch (a.mode) {
      case GroupedGemmMode::fwd:
        launch(grouped_gemm_dev_kernel<T, GroupedGemmMode::fwd>,
               dim3(grid_rows(ceil_div(a.M, kBM) + a.G, op), static_cast<unsigned>(ceil_div(a.N, kBN))));
        break;
      case GroupedGemmMode::dgrad:
        launch(grouped_gemm_dev_kernel<T, GroupedGemmMode::dgrad>,
               dim3(grid_rows(ceil_div(a.M, kBM) + a.G, op), static_cast<unsigned>(ceil_div(a.K, kBN))));
        break;
      case GroupedGemmMode::wgrad:
        MOE_CHECK_CODE(a.G <= 65535 && ceil_div(a.N, kBM) <= 65535, ErrorCode::not_supported, op, ": wgrad over ",
                       a.G, " groups of ", a.N, " rows exceeds the CUDA grid");
        launch(grouped_gemm_dev_kernel<T, GroupedGemmMode::wgrad>,
               dim3(grid_rows(ceil_div(a.K, kBN), op), static_cast<unsigned>(ceil_div(a.N, kBM)),
                    static_cast<unsigned>(a.G)));
        break;
    }
  });
}

void cuda_permute_dev(const PermuteDevArgs& d, const ExecCtx& ctx) {
  // The kernel writes the rows the map names (all below the true count) and checks them against
  // the bound N_max; the rows past the count stay untouched.
  cuda_permute(d.base, ctx);
}

void cuda_row_offsets(const RowOffsetsArgs& a, const ExecCtx& ctx) {
  DeviceGuard guard(ctx);
  row_offsets_kernel<<<1, 1, 0, stream_of(ctx)>>>(a.counts, a.offsets, a.G);
  MOE_CUDA_CHECK_LAUNCH("row_offsets_kernel");
}

void cuda_aux_loss_value(const AuxLossValueArgs& a, const ExecCtx& ctx) {
  DeviceGuard guard(ctx);
  aux_loss_value_kernel<<<1, 1, 0, stream_of(ctx)>>>(a);
  MOE_CUDA_CHECK_LAUNCH("aux_loss_value_kernel");
}

void cuda_accumulate(const AccumulateArgs& a, const ExecCtx& ctx) {
  DeviceGuard guard(ctx);
  if (a.n == 0) return;
  MOE_CHECK(a.y_dtype == DType::f64 || (a.x_dtype == DType::i64 && a.divisor == 1.0),
            "accumulate: an i64 sum needs i64 x and divisor 1");
  accumulate_kernel<<<grid_for(a.n, 256), 256, 0, stream_of(ctx)>>>(a);
  MOE_CUDA_CHECK_LAUNCH("accumulate_kernel");
}

void cuda_scale_at(const AccumulateArgs& a, const ExecCtx& ctx) {
  DeviceGuard guard(ctx);
  scale_at_kernel<<<1, 1, 0, stream_of(ctx)>>>(static_cast<double*>(a.y), a.index, a.mul, a.divisor);
  MOE_CUDA_CHECK_LAUNCH("scale_at_kernel");
}

}  // namespace moe
