// Dense and grouped GEMM on CUDA through cuBLAS.
//
// Row-major C (M,N) = op(A) op(B) is the column-major product Cᵀ (N,M) = op(B)ᵀ op(A)ᵀ: a row-major
// (r, c) matrix with leading dimension c is the column-major (c, r) matrix with the same leading
// dimension, so cuBLAS gets B first, A second, m = N, n = M and ldc = N.
//
// Precision: f32 runs with CUBLAS_COMPUTE_32F_PEDANTIC (plain f32 FMA, never TF32 or BF16x9
// emulation, whatever the math mode or NVIDIA_TF32_OVERRIDE say) so results match the CPU BLAS to
// f32 rounding; f64 with CUBLAS_COMPUTE_64F_PEDANTIC (no fixed-point emulation); bf16 and f16
// storage multiply on tensor cores with f32 accumulation (CUBLAS_COMPUTE_32F), as the CPU widens to
// f32 and rounds once at the end. The 64-bit API (cublasGemmEx_64) takes every size as int64.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace moe {

namespace {

using namespace cuda;

// C (n) = beta · C, in the compute type (beta = 0 writes zeros, ignoring what C held).
template <class T>
__global__ void scale_kernel(T* c, int64_t n, double beta) {
  using A = acc_t<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    c[i] = beta == 0.0 ? from_acc<T>(A(0)) : from_acc<T>(static_cast<A>(beta) * to_acc(c[i]));
}

void scale_inplace(const ExecCtx& ctx, DType dt, void* C, int64_t n, double beta, const char* op) {
  if (n == 0 || beta == 1.0) return;
  dispatch_float(dt, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kThreads = 256;
    scale_kernel<T><<<grid_for(n, kThreads), kThreads, 0, stream_of(ctx)>>>(static_cast<T*>(C), n, beta);
    MOE_CUDA_CHECK_LAUNCH("scale_kernel");
  });
}

struct CublasTypes {
  cudaDataType data;
  cublasComputeType_t compute;
  bool f64_scalars;  // alpha/beta are double (64F compute), else float
};

CublasTypes cublas_types(DType dt, const char* op) {
  switch (dt) {
    case DType::f32: return {CUDA_R_32F, CUBLAS_COMPUTE_32F_PEDANTIC, false};
    case DType::f64: return {CUDA_R_64F, CUBLAS_COMPUTE_64F_PEDANTIC, true};
    case DType::bf16: return {CUDA_R_16BF, CUBLAS_COMPUTE_32F, false};
    case DType::f16: return {CUDA_R_16F, CUBLAS_COMPUTE_32F, false};
    default: break;
  }
  MOE_THROW(ErrorCode::not_supported, op, ": the CUDA backend has no GEMM for dtype ", dtype_name(dt));
}

// Row-major C (M,N) = alpha · op(A) · op(B) + beta · C on ctx's stream.
void gemm_rowmajor(const ExecCtx& ctx, DType dt, bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha,
                   const void* A, const void* B, double beta, void* C, const char* op) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // cuBLAS rejects a zero leading dimension: apply beta ourselves
    scale_inplace(ctx, dt, C, M * N, beta, op);
    return;
  }
  const CublasTypes ty = cublas_types(dt, op);
  const cublasOperation_t op_b = tb ? CUBLAS_OP_T : CUBLAS_OP_N;  // B row-major (N,K) or (K,N)
  const cublasOperation_t op_a = ta ? CUBLAS_OP_T : CUBLAS_OP_N;  // A row-major (K,M) or (M,K)
  const int64_t ldb = tb ? K : N;
  const int64_t lda = ta ? M : K;
  const float af = static_cast<float>(alpha), bf = static_cast<float>(beta);
  const void* pa = ty.f64_scalars ? static_cast<const void*>(&alpha) : static_cast<const void*>(&af);
  const void* pb = ty.f64_scalars ? static_cast<const void*>(&beta) : static_cast<const void*>(&bf);
  cublasHandle_t h = cublas_handle(ctx);
  MOE_CUBLAS_CHECK(cublasGemmEx_64(h, op_b, op_a, N, M, K, pa, B, ty.data, ldb, A, ty.data, lda, pb, C, ty.data, N,
                                   ty.compute, CUBLAS_GEMM_DEFAULT));
}

}  // namespace

void cuda_gemm(const GemmArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  gemm_rowmajor(ctx, a.dtype, a.trans_a, a.trans_b, a.M, a.N, a.K, a.alpha, a.A, a.B, a.beta, a.C, "gemm");
}

// A loop of one cuBLAS GEMM per non-empty group on the current stream (simple and exact; the
// per-group launches are the cost). Row counts come from rows_host, which the dispatcher has anyway
// (it sized the buffers from them). Keeping the counts on the device only (rows_device, no host
// sync) would need a device-side grouped GEMM that reads the problem sizes from device memory: a
// CUTLASS grouped GEMM with device problem-size arrays, or a persistent kernel that walks
// rows_device; cublasGemmGroupedBatchedEx does not help there, its m/n/k arrays live on the host.
void cuda_grouped_gemm(const GroupedGemmArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  const char* op = "grouped_gemm";
  (void)cublas_types(a.dtype, op);  // unsupported dtypes fail even when every group is empty
  const size_t es = dtype_size(a.dtype);
  const char* A = static_cast<const char*>(a.A);
  const char* B = static_cast<const char*>(a.B);
  char* C = static_cast<char*>(a.C);
  const double beta = a.accumulate ? 1.0 : 0.0;
  const int64_t NK = a.N * a.K;
  int64_t row = 0;  // first row of group g in A (and in C for fwd/dgrad, in B for wgrad)
  for (int64_t gi = 0; gi < a.G; ++gi) {
    const int64_t m = a.rows_host[gi];
    switch (a.mode) {
      case GroupedGemmMode::fwd:  // C_g (m,N) = A_g (m,K) · B_g (N,K)ᵀ
        if (m > 0)
          gemm_rowmajor(ctx, a.dtype, false, true, m, a.N, a.K, 1.0, A + static_cast<size_t>(row * a.K) * es,
                        B + static_cast<size_t>(gi * NK) * es, beta, C + static_cast<size_t>(row * a.N) * es, op);
        break;
      case GroupedGemmMode::dgrad:  // C_g (m,K) = A_g (m,N) · B_g (N,K)
        if (m > 0)
          gemm_rowmajor(ctx, a.dtype, false, false, m, a.K, a.N, 1.0, A + static_cast<size_t>(row * a.N) * es,
                        B + static_cast<size_t>(gi * NK) * es, beta, C + static_cast<size_t>(row * a.K) * es, op);
        break;
      case GroupedGemmMode::wgrad: {  // C_g (N,K) = A_g (m,N)ᵀ · B_g (m,K)
        char* Cg = C + static_cast<size_t>(gi * NK) * es;
        if (m > 0) {
          gemm_rowmajor(ctx, a.dtype, true, false, a.N, a.K, m, 1.0, A + static_cast<size_t>(row * a.N) * es,
                        B + static_cast<size_t>(row * a.K) * es, beta, Cg, op);
        } else if (!a.accumulate && NK > 0) {  // an empty group's weight gradient is zero
          MOE_CUDA_CHECK(cudaMemsetAsync(Cg, 0, static_cast<size_t>(NK) * es, stream_of(ctx)));
        }
        break;
      }
    }
    row += m;
  }
}

}  // namespace moe
