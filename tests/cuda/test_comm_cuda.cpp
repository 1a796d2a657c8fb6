// Communicators with CUDA tensors on one process (GPU only: main() exits 77 without one): the NCCL
// communicator at world size 1 (every collective is a device copy through NCCL, with the same
// argument checks as the other backends), and the MPI communicator staging device tensors through
// pinned host memory. Multi-rank NCCL needs one GPU per rank (tests/dist/test_nccl_dist.cpp).
#include <gtest/gtest.h>

#include <numeric>

#include "common/test_util.h"
#include "moecore/backend.h"
#include "moecore/comm.h"
#if MOE_HAVE_NCCL
#include "comm/nccl/nccl_comm.h"
#endif

using namespace moe;

namespace {

Device gpu() { return Device::cuda(0); }

Tensor iota_dev(const Shape& shape, DType dt = DType::f32, float start = 0) {
  if (dt == DType::i64) {
    std::vector<int64_t> v(static_cast<size_t>(shape_numel(shape)));
    std::iota(v.begin(), v.end(), static_cast<int64_t>(start));
    return Tensor::from_vector(v, shape, gpu());
  }
  std::vector<double> v(static_cast<size_t>(shape_numel(shape)));
  std::iota(v.begin(), v.end(), start);
  return test::from_f64(v, shape, dt, gpu());
}

}  // namespace

#if MOE_HAVE_NCCL

TEST(NcclComm, WorldOfOneMovesAndReduces) {
  auto world = mpi_world();
  if (world->size() != 1) GTEST_SKIP() << "runs as a single process";
  auto c = make_nccl_communicator(world, gpu());
  EXPECT_EQ(c->backend_name(), "nccl");
  EXPECT_EQ(c->size(), 1);
  EXPECT_EQ(c->rank(), 0);
  EXPECT_EQ(c->name(), "world");

  for (DType dt : {DType::f32, DType::bf16, DType::i64}) {
    SCOPED_TRACE(dtype_name(dt));
    Tensor x = iota_dev({6, 4}, dt);
    Tensor keep = x.clone();
    c->all_reduce(x);
    EXPECT_TRUE(test::bit_equal(x.to(Device::cpu()), keep.to(Device::cpu())));
    Tensor out = Tensor::zeros({6, 4}, dt, gpu());
    c->all_gather(x, out);
    EXPECT_TRUE(test::bit_equal(out.to(Device::cpu()), keep.to(Device::cpu())));
    out.zero_();
    c->all_gather_v(x, out, {6});
    EXPECT_TRUE(test::bit_equal(out.to(Device::cpu()), keep.to(Device::cpu())));
    out.zero_();
    c->reduce_scatter(x, out);
    EXPECT_TRUE(test::bit_equal(out.to(Device::cpu()), keep.to(Device::cpu())));
    out.zero_();
    c->reduce_scatter_v(x, out, {6});
    EXPECT_TRUE(test::bit_equal(out.to(Device::cpu()), keep.to(Device::cpu())));
    out.zero_();
    c->all_to_all_v(x, {6}, out, {6});
    EXPECT_TRUE(test::bit_equal(out.to(Device::cpu()), keep.to(Device::cpu())));
    c->broadcast(out, 0);
    EXPECT_TRUE(test::bit_equal(out.to(Device::cpu()), keep.to(Device::cpu())));
  }
  Tensor z = Tensor::zeros({0, 4}, DType::f32, gpu()), oz = Tensor::zeros({0, 4}, DType::f32, gpu());
  c->all_to_all_v(z, {0}, oz, {0});
  c->barrier();
  auto s = c->split(0, 0, "ep");
  EXPECT_EQ(s->name(), "ep");
  EXPECT_EQ(s->backend_name(), "nccl");
}

TEST(NcclComm, RejectsHostTensorsAndBadCounts) {
  auto world = mpi_world();
  if (world->size() != 1) GTEST_SKIP() << "runs as a single process";
  auto c = make_nccl_communicator(world, gpu());
  Tensor host = Tensor::zeros({2, 3}, DType::f32);
  try {
    c->all_reduce(host);
    ADD_FAILURE() << "no throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("device memory"), std::string::npos) << e.what();
  }
  Tensor x = iota_dev({2, 3}), out = Tensor::zeros({2, 3}, DType::f32, gpu());
  EXPECT_THROW(c->all_to_all_v(x, {1}, out, {2}), Error);
  EXPECT_THROW(c->all_gather_v(x, out, {2, 0}), Error);
  EXPECT_THROW(make_nccl_communicator(world, Device::cpu()), Error);
  c->barrier();  // still usable
}

#endif  // MOE_HAVE_NCCL

#if MOE_HAVE_MPI

TEST(MpiCommCuda, StagesDeviceTensorsThroughPinnedHost) {
  auto world = mpi_world();
  if (world->size() != 1) GTEST_SKIP() << "runs as a single process";
  Tensor x = iota_dev({5, 3}, DType::bf16);
  Tensor out = Tensor::zeros({5, 3}, DType::bf16, gpu());
  world->all_to_all_v(x, {5}, out, {5});
  EXPECT_TRUE(test::bit_equal(out.to(Device::cpu()), x.to(Device::cpu())));
  Tensor y = iota_dev({4}, DType::f32, 1);
  world->all_reduce(y);
  EXPECT_EQ(y.to(Device::cpu()).to_vector<float>(), (std::vector<float>{1, 2, 3, 4}));
  Tensor pinned = Tensor::empty({4}, DType::f32, gpu(), MemoryKind::pinned_host);
  pinned.copy_from(y);
  world->broadcast(pinned, 0);
  EXPECT_EQ(pinned.to(Device::cpu()).to_vector<float>(), (std::vector<float>{1, 2, 3, 4}));
}

#endif  // MOE_HAVE_MPI
