// The NCCL communicator across ranks (np 2; one GPU per rank, so it exits 77 — skipped — on
// machines with fewer GPUs than ranks): every collective on device tensors against data each rank
// recomputes, zero-row ranks included, a subgroup from split(), and the MPI communicator's
// pinned-host staging on the same tensors as a cross-check.
#include <gtest/gtest.h>

#include <cstdio>
#include <numeric>

#include "comm/nccl/nccl_comm.h"
#include "common/test_util.h"
#include "device/cuda/cuda_backend.h"
#include "dist/dist_util.h"
#include "moecore/backend.h"

using namespace moe;
using moe::dist::concat_rows;
using moe::dist::rank_data;
using moe::dist::world;

namespace {

Device my_gpu() { return Device::cuda(world().rank() % cuda_device_count()); }

std::shared_ptr<Communicator> nccl_world() {
  static std::shared_ptr<Communicator> c = make_nccl_communicator(mpi_world(), my_gpu());
  return c;
}

Tensor host(const Tensor& t) { return t.to(Device::cpu()); }

}  // namespace

TEST(NcclDist, Identity) {
  Communicator& c = *nccl_world();
  EXPECT_EQ(c.backend_name(), "nccl");
  EXPECT_EQ(c.size(), world().size());
  EXPECT_EQ(c.rank(), world().rank());
  EXPECT_EQ(c.world_ranks(), world().world_ranks());
}

TEST(NcclDist, AllReduceAndBroadcast) {
  Communicator& c = *nccl_world();
  const int n = c.size(), me = c.rank();
  for (DType dt : {DType::f32, DType::f64, DType::i64}) {
    Tensor t = rank_data(dt, {33, 5}, me, 7).to(my_gpu());
    c.all_reduce(t);
    Tensor expect = rank_data(dt, {33, 5}, 0, 7);
    for (int r = 1; r < n; ++r) {
      Tensor x = rank_data(dt, {33, 5}, r, 7);
      // f32/f64 values are multiples of 1/64 in [-16, 16): the sums are exact in any order.
      if (dt == DType::i64) {
        for (int64_t i = 0; i < x.numel(); ++i) expect.data_as<int64_t>()[i] += x.data_as<int64_t>()[i];
      } else if (dt == DType::f32) {
        for (int64_t i = 0; i < x.numel(); ++i) expect.data_as<float>()[i] += x.data_as<float>()[i];
      } else {
        for (int64_t i = 0; i < x.numel(); ++i) expect.data_as<double>()[i] += x.data_as<double>()[i];
      }
    }
    EXPECT_TRUE(test::bit_equal(host(t), expect)) << dtype_name(dt);
  }
  for (int root = 0; root < n; ++root) {
    Tensor t = (me == root ? rank_data(DType::bf16, {4, 3}, root, 9) : Tensor::zeros({4, 3}, DType::bf16)).to(my_gpu());
    c.broadcast(t, root);
    EXPECT_TRUE(test::bit_equal(host(t), rank_data(DType::bf16, {4, 3}, root, 9)));
  }
  c.barrier();
}

TEST(NcclDist, VariableCollectivesWithZeroRows) {
  Communicator& c = *nccl_world();
  const int n = c.size(), me = c.rank();
  std::vector<int64_t> rows;
  for (int r = 0; r < n; ++r) rows.push_back((r * 3) % 4);  // rank 0 has none
  const int64_t total = std::accumulate(rows.begin(), rows.end(), int64_t(0));
  // all_gather_v
  Tensor in = rank_data(DType::bf16, {rows[static_cast<size_t>(me)], 6}, me, 11).to(my_gpu());
  Tensor out = Tensor::zeros({total, 6}, DType::bf16, my_gpu());
  c.all_gather_v(in, out, rows);
  std::vector<Tensor> parts;
  for (int r = 0; r < n; ++r) parts.push_back(rank_data(DType::bf16, {rows[static_cast<size_t>(r)], 6}, r, 11));
  EXPECT_TRUE(test::bit_equal(host(out), concat_rows(parts, {6}, DType::bf16)));
  // reduce_scatter_v (f64: exact)
  Tensor full = rank_data(DType::f64, {total, 6}, me, 13).to(my_gpu());
  Tensor mine = Tensor::zeros({rows[static_cast<size_t>(me)], 6}, DType::f64, my_gpu());
  c.reduce_scatter_v(full, mine, rows);
  int64_t off = std::accumulate(rows.begin(), rows.begin() + me, int64_t(0));
  std::vector<double> expect(static_cast<size_t>(mine.numel()), 0.0);
  for (int r = 0; r < n; ++r) {
    Tensor x = rank_data(DType::f64, {total, 6}, r, 13);
    for (size_t i = 0; i < expect.size(); ++i) expect[i] += x.data_as<double>()[off * 6 + i];
  }
  EXPECT_EQ(host(mine).to_vector<double>(), expect);
  // all_to_all_v
  std::vector<int64_t> send, recv;
  std::vector<Tensor> sp, rp;
  for (int q = 0; q < n; ++q) {
    send.push_back((me + 2 * q) % 3);
    recv.push_back((q + 2 * me) % 3);
    sp.push_back(rank_data(DType::f32, {send.back(), 8}, me, 100 + q));
    rp.push_back(rank_data(DType::f32, {recv.back(), 8}, q, 100 + me));
  }
  Tensor a2a_in = concat_rows(sp, {8}, DType::f32).to(my_gpu());
  Tensor expect_out = concat_rows(rp, {8}, DType::f32);
  Tensor a2a_out = Tensor::zeros(expect_out.shape(), DType::f32, my_gpu());
  c.all_to_all_v(a2a_in, send, a2a_out, recv);
  EXPECT_TRUE(test::bit_equal(host(a2a_out), expect_out));
  // The MPI communicator (staging through pinned host memory) gives the same bytes.
  Tensor staged = Tensor::zeros(expect_out.shape(), DType::f32, my_gpu());
  world().all_to_all_v(a2a_in, send, staged, recv);
  EXPECT_TRUE(test::bit_equal(host(staged), expect_out));
}

TEST(NcclDist, SplitGivesNcclSubgroups) {
  Communicator& c = *nccl_world();
  const int me = c.rank();
  auto g = c.split(me % 2, me, "parity");
  EXPECT_EQ(g->backend_name(), "nccl");
  Tensor t = Tensor::from_vector(std::vector<int64_t>{int64_t(1) << me}, {1}, my_gpu());
  g->all_reduce(t);
  int64_t expect = 0;
  for (int r : g->world_ranks()) expect |= int64_t(1) << r;
  EXPECT_EQ(host(t).to_vector<int64_t>()[0], expect);
}

int main(int argc, char** argv) {
  auto w = mpi_world();
  int gpus = backend_available(DeviceType::cuda) ? cuda_device_count() : 0;
  if (gpus < w->size()) {
    if (w->rank() == 0)
      std::printf("SKIP: NCCL across %d ranks needs one GPU per rank, %d present\n", w->size(), gpus);
    return 77;
  }
  return moe::dist::run_dist_tests(argc, argv);
}
