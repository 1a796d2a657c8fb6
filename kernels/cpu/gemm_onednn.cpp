// The oneDNN engine of the CPU GEMM (kernels/cpu/gemm_engine.h): oneDNN's matmul, whose JIT
// kernels are chosen by the CPU's features (AVX2, AVX-512, AVX512-BF16, AMX-BF16) rather than by a
// table of CPU models, so a CPU newer than the library still gets its fast kernel.
//
// Each call runs on the calling thread alone: oneDNN (OpenMP build on Debian) runs sequentially
// inside an OpenMP parallel region, and outside one the caller's OpenMP thread count is set to 1
// for the call, so the primitive is created for, and executed on, one thread and never splits K.
// Primitives are cached per shape in a small per-thread map (a grouped GEMM over many experts
// re-creates none), each with a user-managed scratchpad owned by the thread.
#include "kernels/cpu/gemm_engine.h"

#include "moecore/error.h"

#if MOE_HAVE_DNNL
#include <oneapi/dnnl/dnnl.hpp>

#include <map>
#include <tuple>
#include <vector>
#if defined(_OPENMP)
#include <omp.h>
#endif
#endif

namespace moe::gemm_engine {

#if MOE_HAVE_DNNL
namespace {

dnnl::memory::data_type dnnl_type(DType dt) {
  switch (dt) {
    case DType::f32: return dnnl::memory::data_type::f32;
    case DType::bf16: return dnnl::memory::data_type::bf16;
    default: break;
  }
  MOE_THROW(ErrorCode::not_supported, "onednn gemm: dtype must be f32 or bf16, got ", dtype_name(dt));
}

const dnnl::engine& engine() {
  static const dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

// Sets the calling thread's OpenMP thread count to 1 for its lifetime (outside a parallel region
// oneDNN would otherwise use every thread, and could split K).
struct OneThread {
#if defined(_OPENMP)
  int before = omp_get_max_threads();
  OneThread() { if (before != 1) omp_set_num_threads(1); }
  ~OneThread() { if (before != 1) omp_set_num_threads(before); }
#endif
};

using Key = std::tuple<int, int, bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, float>;
struct Entry {
  dnnl::matmul prim;
  dnnl::memory::desc a, b, c, scratch;
  std::string impl;
};
constexpr size_t kMaxCached = 512;  // per thread; past it the map starts over

struct ThreadCache {
  std::map<Key, Entry> prims;
  std::vector<char> scratch;
  int64_t created = 0;
  dnnl::stream stream{engine()};
};
ThreadCache& cache() {
  thread_local ThreadCache c;
  return c;
}

Entry make_entry(DType ab, DType c, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, int64_t lda,
                 int64_t ldb, float beta, int64_t ldc) {
  using dims = dnnl::memory::dims;
  // op(A) (M, K) and op(B) (K, N) as strided views of the row-major storage.
  dnnl::memory::desc a({M, K}, dnnl_type(ab), ta ? dims{1, lda} : dims{lda, 1});
  dnnl::memory::desc b({K, N}, dnnl_type(ab), tb ? dims{1, ldb} : dims{ldb, 1});
  dnnl::memory::desc d({M, N}, dnnl_type(c), dims{ldc, 1});
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  if (alpha != 1.0f) attr.set_output_scales(0, {alpha});
  if (beta != 0.0f) {
    dnnl::post_ops po;
    po.append_sum(beta);
    attr.set_post_ops(po);
  }
  dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, b, d), attr, engine());
  return Entry{dnnl::matmul(pd), pd.src_desc(), pd.weights_desc(), pd.dst_desc(), pd.scratchpad_desc(),
               pd.impl_info_str()};
}

Entry& entry_for(DType ab, DType c, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, int64_t lda,
                 int64_t ldb, float beta, int64_t ldc) {
  ThreadCache& tc = cache();
  const Key key{static_cast<int>(ab), static_cast<int>(c), ta, tb, M, N, K, lda, ldb, ldc, alpha, beta};
  auto it = tc.prims.find(key);
  if (it != tc.prims.end()) return it->second;
  if (tc.prims.size() >= kMaxCached) tc.prims.clear();
  ++tc.created;
  return tc.prims.emplace(key, make_entry(ab, c, ta, tb, M, N, K, alpha, lda, ldb, beta, ldc)).first->second;
}

}  // namespace

bool onednn_built() { return true; }

std::string onednn_isa() {
  switch (dnnl::get_effective_cpu_isa()) {
    case dnnl::cpu_isa::sse41: return "sse41";
    case dnnl::cpu_isa::avx: return "avx";
    case dnnl::cpu_isa::avx2: return "avx2";
    case dnnl::cpu_isa::avx2_vnni: return "avx2_vnni";
    case dnnl::cpu_isa::avx512_core: return "avx512_core";
    case dnnl::cpu_isa::avx512_core_vnni: return "avx512_core_vnni";
    case dnnl::cpu_isa::avx512_core_bf16: return "avx512_core_bf16";
    case dnnl::cpu_isa::avx512_core_amx: return "avx512_core_amx";
    default: return "other";
  }
}

std::string onednn_kernel(DType ab, DType c) {
  try {
    OneThread one;
    return make_entry(ab, c, false, true, 64, 64, 64, 1.0f, 64, 64, 0.0f, 64).impl;
  } catch (const dnnl::error&) {
    return "";
  }
}

void onednn_gemm(DType ab, DType c, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const void* A,
                 int64_t lda, const void* B, int64_t ldb, float beta, void* C, int64_t ldc) {
  OneThread one;
  try {
    Entry& e = entry_for(ab, c, ta, tb, M, N, K, alpha, lda, ldb, beta, ldc);
    ThreadCache& tc = cache();
    if (tc.scratch.size() < e.scratch.get_size()) tc.scratch.resize(e.scratch.get_size());
    dnnl::memory ma(e.a, engine(), const_cast<void*>(A));
    dnnl::memory mb(e.b, engine(), const_cast<void*>(B));
    dnnl::memory mc(e.c, engine(), C);
    dnnl::memory ms(e.scratch, engine(), tc.scratch.data());
    e.prim.execute(tc.stream, {{DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mb}, {DNNL_ARG_DST, mc}, {DNNL_ARG_SCRATCHPAD, ms}});
    tc.stream.wait();
  } catch (const dnnl::error& err) {
    MOE_THROW(ErrorCode::backend, "onednn gemm (", dtype_name(ab), " -> ", dtype_name(c), ", M ", M, " N ", N,
              " K ", K, ", ta ", ta, " tb ", tb, "): oneDNN failed: ", err.what(), " (status ",
              static_cast<int>(err.status), ")");
  }
}

int64_t onednn_primitives_created() { return cache().created; }

#else  // built without oneDNN

bool onednn_built() { return false; }
std::string onednn_isa() { return ""; }
std::string onednn_kernel(DType, DType) { return ""; }
void onednn_gemm(DType ab, DType, bool, bool, int64_t, int64_t, int64_t, float, const void*, int64_t, const void*,
                 int64_t, float, void*, int64_t) {
  MOE_THROW(ErrorCode::not_supported, "onednn gemm (", dtype_name(ab),
            "): this build has no oneDNN (apt install libdnnl-dev and reconfigure)");
}
int64_t onednn_primitives_created() { return 0; }

#endif

}  // namespace moe::gemm_engine
