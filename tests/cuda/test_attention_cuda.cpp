// The attention op of the CUDA backend against the CPU backend (the reference, itself tested
// against a naive softmax in tests/unit/test_attention.cpp): the same seeded inputs go through
// ops::attention_fwd / attention_bwd with tensors on Device::cpu() and on Device::cuda(0), in f32,
// bf16, f16 and f64, for causal and context-parallel positions (queries = two chunks of a 4-chunk
// sequence, keys = the whole sequence in a permuted chunk order, some queries with no visible
// key), GQA ratios 1, 2 and 4, head sizes that are not a multiple of 8 and up to 256 (the shared
// memory opt-in path), Sq ≠ Sk, and empty sides. The backward of both devices reads the CPU
// forward's o and lse, so each comparison isolates one kernel. Runs only with a GPU: main() exits
// 77 otherwise (tests/common/gpu_test_main.cpp).
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "device/ops.h"
#include "moecore/backend.h"

using namespace moe;
using test::all_close;
using test::bit_equal;

namespace {

Device gpu() { return Device::cuda(0); }
Tensor put(const Tensor& t, Device d) { return d.is_cpu() ? t.clone() : t.to(d); }

struct Problem {
  std::string name;
  int64_t B, nq, nkv, hd;
  std::vector<int64_t> q_pos, k_pos;
  int64_t Sq() const { return static_cast<int64_t>(q_pos.size()); }
  int64_t Sk() const { return static_cast<int64_t>(k_pos.size()); }
  double scale() const { return 1.0 / std::sqrt(static_cast<double>(hd)); }
};

std::vector<int64_t> iota(int64_t from, int64_t n) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = from + i;
  return v;
}
std::vector<int64_t> chunk_positions(int64_t len, const std::vector<int64_t>& chunks) {
  std::vector<int64_t> v;
  for (int64_t c : chunks)
    for (int64_t i = 0; i < len; ++i) v.push_back(c * len + i);
  return v;
}
Problem causal(const std::string& name, int64_t S, int64_t B, int64_t nq, int64_t nkv, int64_t hd) {
  return {name, B, nq, nkv, hd, iota(0, S), iota(0, S)};
}
Problem cp(const std::string& name, int64_t len, std::vector<int64_t> qc, std::vector<int64_t> kc, int64_t B,
           int64_t nq, int64_t nkv, int64_t hd) {
  return {name, B, nq, nkv, hd, chunk_positions(len, qc), chunk_positions(len, kc)};
}

std::vector<Problem> problems() {
  return {
      causal("tiny", 1, 1, 1, 1, 1),
      causal("S=37 B=2 mha hd=12", 37, 2, 2, 2, 12),
      causal("S=100 gqa2 hd=5", 100, 1, 4, 2, 5),
      causal("S=130 B=2 gqa4 hd=64", 130, 2, 8, 2, 64),
      causal("S=70 mqa hd=128", 70, 1, 4, 1, 128),
      causal("S=40 hd=256", 40, 1, 2, 1, 256),
      {"Sq=5 Sk=100 gqa2", 1, 2, 1, 8, iota(95, 5), iota(0, 100)},
      cp("cp rank0 len=45", 45, {0, 3}, {2, 0, 3, 1}, 2, 4, 2, 12),
      cp("cp rank1 len=45", 45, {1, 2}, {2, 0, 3, 1}, 1, 4, 1, 7),
      cp("cp blind queries", 50, {0, 3}, {3, 2}, 2, 4, 2, 16),  // chunk-0 queries see no key
      {"no keys", 2, 4, 2, 6, iota(0, 5), {}},
      {"no queries", 2, 4, 2, 6, {}, iota(0, 5)},
  };
}

Tensor pos_tensor(const std::vector<int64_t>& v, Device d) {
  return Tensor::from_vector(v, {static_cast<int64_t>(v.size())}, d);
}
DType stat_of(DType dt) { return dt == DType::f64 ? DType::f64 : DType::f32; }

struct Out {
  Tensor o, lse, dq, dk, dv;
};

// Forward on `d`, and the backward on `d` from (o, lse) of `fwd_ref` (the CPU forward) when given.
Out run(const Problem& p, Device d, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout,
        const Out* fwd_ref) {
  const DType dt = q.dtype();
  Tensor qp = pos_tensor(p.q_pos, d), kp = pos_tensor(p.k_pos, d);
  Tensor qd = put(q, d), kd = put(k, d), vd = put(v, d), dod = put(dout, d);
  Out r{Tensor::empty(q.shape(), dt, d), Tensor::empty({p.B, p.nq, p.Sq()}, stat_of(dt), d),
        Tensor::empty(q.shape(), dt, d), Tensor::empty(k.shape(), dt, d), Tensor::empty(k.shape(), dt, d)};
  ops::attention_fwd(p.scale(), qp, kp, qd, kd, vd, r.o, r.lse);
  Tensor o = fwd_ref ? put(fwd_ref->o, d) : r.o, lse = fwd_ref ? put(fwd_ref->lse, d) : r.lse;
  ops::attention_bwd(p.scale(), qp, kp, qd, kd, vd, o, lse, dod, r.dq, r.dk, r.dv);
  return r;
}

struct Tol {
  double atol, rtol;
};
// Outputs of the storage dtype. f64: summation order only. f32: expf vs the CPU's polynomial
// (2 ulp) and sums in another order over up to a few hundred keys. bf16 / f16: one ulp of the
// storage type (the f32 results may round to neighbouring values).
Tol out_tol(DType dt) {
  switch (dt) {
    case DType::f64: return {1e-12, 1e-10};
    case DType::f32: return {2e-5, 2e-5};
    case DType::bf16: return {1e-2, 1.6e-2};
    case DType::f16: return {2e-3, 2e-3};
    default: return {0, 0};
  }
}
// Gradients sum more terms of either sign (dk, dv over r·Sq queries): a larger absolute floor.
Tol grad_tol(DType dt) {
  switch (dt) {
    case DType::f64: return {1e-11, 1e-10};
    case DType::f32: return {1e-4, 1e-4};
    case DType::bf16: return {2e-2, 1.6e-2};
    case DType::f16: return {4e-3, 4e-3};
    default: return {0, 0};
  }
}
// lse is f32 (f64 for f64) on both sides.
Tol lse_tol(DType dt) { return dt == DType::f64 ? Tol{1e-12, 1e-12} : Tol{1e-5, 1e-5}; }

::testing::AssertionResult close(const Tensor& got, const Tensor& ref, Tol t) {
  return all_close(got, ref, t.atol, t.rtol);
}

}  // namespace

TEST(CudaAttention, ForwardAndBackwardMatchCpu) {
  uint64_t seed = 1;
  for (const Problem& p : problems())
    for (DType dt : {DType::f32, DType::bf16, DType::f16, DType::f64}) {
      SCOPED_TRACE(p.name + " " + dtype_name(dt));
      Tensor q = test::randn({p.Sq(), p.B, p.nq, p.hd}, dt, ++seed);
      Tensor k = test::randn({p.Sk(), p.B, p.nkv, p.hd}, dt, ++seed);
      Tensor v = test::randn({p.Sk(), p.B, p.nkv, p.hd}, dt, ++seed);
      Tensor dout = test::randn({p.Sq(), p.B, p.nq, p.hd}, dt, ++seed);
      Out c = run(p, Device::cpu(), q, k, v, dout, nullptr);
      Out g = run(p, gpu(), q, k, v, dout, &c);
      EXPECT_TRUE(close(g.o, c.o, out_tol(dt))) << "o";
      EXPECT_TRUE(close(g.lse, c.lse, lse_tol(dt))) << "lse";
      EXPECT_TRUE(close(g.dq, c.dq, grad_tol(dt))) << "dq";
      EXPECT_TRUE(close(g.dk, c.dk, grad_tol(dt))) << "dk";
      EXPECT_TRUE(close(g.dv, c.dv, grad_tol(dt))) << "dv";
    }
}

TEST(CudaAttention, RepeatsBitForBit) {
  Problem p = cp("cp len=100", 100, {1, 2}, {2, 0, 3, 1}, 2, 8, 2, 64);
  Tensor q = test::randn({p.Sq(), p.B, p.nq, p.hd}, DType::bf16, 11);
  Tensor k = test::randn({p.Sk(), p.B, p.nkv, p.hd}, DType::bf16, 12);
  Tensor v = test::randn({p.Sk(), p.B, p.nkv, p.hd}, DType::bf16, 13);
  Tensor dout = test::randn({p.Sq(), p.B, p.nq, p.hd}, DType::bf16, 14);
  Out a = run(p, gpu(), q, k, v, dout, nullptr);
  Out b = run(p, gpu(), q, k, v, dout, nullptr);
  EXPECT_TRUE(bit_equal(a.o, b.o));
  EXPECT_TRUE(bit_equal(a.lse, b.lse));
  EXPECT_TRUE(bit_equal(a.dq, b.dq));
  EXPECT_TRUE(bit_equal(a.dk, b.dk));
  EXPECT_TRUE(bit_equal(a.dv, b.dv));
}

TEST(CudaAttention, LongSequence) {
  // S = 2048, B = 1, nq = 8, nkv = 2, hd = 64, f32 and bf16 against the CPU; prints the GPU time
  // of one forward + backward (after a warm-up call).
  Problem p = causal("S=2048 gqa4 hd=64", 2048, 1, 8, 2, 64);
  for (DType dt : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(dtype_name(dt));
    Tensor q = test::randn({p.Sq(), p.B, p.nq, p.hd}, dt, 21);
    Tensor k = test::randn({p.Sk(), p.B, p.nkv, p.hd}, dt, 22);
    Tensor v = test::randn({p.Sk(), p.B, p.nkv, p.hd}, dt, 23);
    Tensor dout = test::randn({p.Sq(), p.B, p.nq, p.hd}, dt, 24);
    Out c = run(p, Device::cpu(), q, k, v, dout, nullptr);
    Out g = run(p, gpu(), q, k, v, dout, &c);
    get_backend(gpu()).synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    Out g2 = run(p, gpu(), q, k, v, dout, nullptr);
    get_backend(gpu()).synchronize();
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    std::printf("[ info ] %s S=2048 nq=8 nkv=2 hd=64: GPU forward + backward %.2f ms (incl. copies)\n",
                dtype_name(dt), ms);
    EXPECT_TRUE(close(g.o, c.o, out_tol(dt))) << "o";
    EXPECT_TRUE(close(g.lse, c.lse, lse_tol(dt))) << "lse";
    // 2048-term sums: a larger absolute floor in f32.
    const Tol gt = dt == DType::f32 ? Tol{3e-4, 1e-4} : grad_tol(dt);
    EXPECT_TRUE(close(g.dq, c.dq, gt)) << "dq";
    EXPECT_TRUE(close(g.dk, c.dk, gt)) << "dk";
    EXPECT_TRUE(close(g.dv, c.dv, gt)) << "dv";
  }
}
