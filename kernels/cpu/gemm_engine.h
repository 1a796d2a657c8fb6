// The CPU GEMM engines behind kernels/cpu/gemm.cpp (internal: no vendor type crosses this header).
//
// Each engine computes one tile on the calling thread only: C (M, N) (ldc) = alpha · op(A) · op(B)
// + beta · C, row-major, op(X) = Xᵀ when the flag is set, full K in one call. gemm.cpp shares the
// tiles out over the OpenMP threads (see its header comment).
#pragma once
#include <cstdint>
#include <string>

#include "moecore/dtype.h"

namespace moe::gemm_engine {

// oneDNN's matmul (gemm_onednn.cpp; compiled when the build found libdnnl, MOE_HAVE_DNNL).
bool onednn_built();
// The highest ISA oneDNN dispatches to on this CPU ("avx512_core_amx", "avx512_core_bf16",
// "avx2", ...); "" when not built.
std::string onednn_isa();
// The implementation oneDNN picks for a matmul with inputs of dtype ab (f32 or bf16) and output
// c on a probe shape, e.g. "brg:avx512_core_amx_bf16"; "" when not built or not supported.
std::string onednn_kernel(DType ab, DType c);
// One tile. ab: dtype of A and B (f32 or bf16); c: dtype of C (f32, or bf16 with bf16 inputs).
// Accumulates in f32 and rounds C once. Primitives are cached per shape, per thread.
void onednn_gemm(DType ab, DType c, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const void* A,
                 int64_t lda, const void* B, int64_t ldb, float beta, void* C, int64_t ldc);
// The number of primitives this thread created so far (the cache is tested to stop re-creation).
int64_t onednn_primitives_created();

}  // namespace moe::gemm_engine
