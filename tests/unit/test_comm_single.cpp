// The single-rank communicator: every collective is a copy (or nothing), with the same argument
// checks as the MPI and NCCL communicators (the checks live in src/comm/comm_util.cpp and are
// shared, so these tests pin the messages every backend gives).
#include <gtest/gtest.h>

#include <numeric>

#include "comm/comm_util.h"
#include "common/test_util.h"
#include "moecore/comm.h"

using namespace moe;
using moe::test::error_of;

namespace {

Tensor iota_f32(const Shape& shape, float start = 0) {
  std::vector<float> v(static_cast<size_t>(shape_numel(shape)));
  std::iota(v.begin(), v.end(), start);
  return Tensor::from_vector(v, shape);
}


#define EXPECT_HAS(msg, sub) EXPECT_NE((msg).find(sub), std::string::npos) << (msg)

}  // namespace

TEST(SingleComm, Identity) {
  auto c = make_single_communicator("ep");
  EXPECT_EQ(c->rank(), 0);
  EXPECT_EQ(c->size(), 1);
  EXPECT_EQ(c->name(), "ep");
  EXPECT_EQ(c->backend_name(), "single");
  EXPECT_EQ(c->world_ranks(), std::vector<int>{world_rank()});
  EXPECT_EQ(comm::group_desc(*c), "group 'ep' (rank 0 of 1)");
  auto s = c->split(3, 7, "etp");
  EXPECT_EQ(s->name(), "etp");
  EXPECT_EQ(s->size(), 1);
  EXPECT_EQ(comm::make_single_communicator("tp", 5)->world_ranks(), std::vector<int>{5});
  EXPECT_THROW(make_single_communicator(""), Error);
}

TEST(SingleComm, WorldWithoutLauncher) {
  // Not started by mpirun in this test: a world of one.
  EXPECT_EQ(world_size(), 1);
  EXPECT_EQ(world_rank(), 0);
}

TEST(SingleComm, CollectivesAreCopies) {
  auto c = make_single_communicator("g");
  Tensor x = iota_f32({3, 4});
  Tensor keep = x.clone();
  c->all_reduce(x);
  EXPECT_TRUE(test::bit_equal(x, keep));
  c->all_reduce(x, ReduceOp::max);
  EXPECT_TRUE(test::bit_equal(x, keep));
  c->broadcast(x, 0);
  EXPECT_TRUE(test::bit_equal(x, keep));
  c->barrier();

  Tensor out = Tensor::zeros({3, 4}, DType::f32);
  c->all_gather(x, out);
  EXPECT_TRUE(test::bit_equal(out, x));
  out.zero_();
  c->all_gather_v(x, out, {3});
  EXPECT_TRUE(test::bit_equal(out, x));
  out.zero_();
  c->reduce_scatter(x, out);
  EXPECT_TRUE(test::bit_equal(out, x));
  out.zero_();
  c->reduce_scatter_v(x, out, {3});
  EXPECT_TRUE(test::bit_equal(out, x));
  out.zero_();
  c->all_to_all_v(x, {3}, out, {3});
  EXPECT_TRUE(test::bit_equal(out, x));
}

TEST(SingleComm, OtherDtypesAndZeroRows) {
  auto c = make_single_communicator("g");
  Tensor b = test::randn({5, 2, 3}, DType::bf16, 7);
  Tensor ob = Tensor::zeros({5, 2, 3}, DType::bf16);
  c->all_to_all_v(b, {5}, ob, {5});
  EXPECT_TRUE(test::bit_equal(ob, b));
  Tensor i = Tensor::from_vector(std::vector<int64_t>{1, -2, 3}, {3});
  Tensor oi = Tensor::zeros({3}, DType::i64);
  c->all_gather_v(i, oi, {3});
  EXPECT_EQ(oi.to_vector<int64_t>(), (std::vector<int64_t>{1, -2, 3}));
  Tensor z = Tensor::zeros({0, 8}, DType::f32), oz = Tensor::zeros({0, 8}, DType::f32);
  c->all_to_all_v(z, {0}, oz, {0});
  c->all_gather_v(z, oz, {0});
  c->reduce_scatter_v(z, oz, {0});
  Tensor scalar = Tensor::from_vector(std::vector<double>{2.5}, {});
  c->all_reduce(scalar);
  EXPECT_EQ(scalar.to_vector<double>()[0], 2.5);
}

TEST(SingleComm, ArgumentErrors) {
  auto c = make_single_communicator("ep");
  Tensor x = iota_f32({3, 4});
  Tensor out = Tensor::zeros({3, 4}, DType::f32);
  std::string m;

  m = error_of([&] { c->all_gather_v(x, out, {3, 0}); });
  EXPECT_HAS(m, "all_gather_v on group 'ep' (rank 0 of 1): rows has 2 entries, expected one per rank (1)");
  m = error_of([&] { c->all_gather_v(x, out, {2}); });
  EXPECT_HAS(m, "input has 3 rows but rows[0] = 2");
  m = error_of([&] { c->all_gather_v(x, out, {-1}); });
  EXPECT_HAS(m, "rows[0] = -1 is negative");
  Tensor out5 = Tensor::zeros({5, 4}, DType::f32);
  m = error_of([&] { c->all_gather(x, out5); });
  EXPECT_HAS(m, "all_gather on group 'ep' (rank 0 of 1): output needs 1 x 3 = 3 rows");

  m = error_of([&] { c->all_to_all_v(x, {2}, out, {3}); });
  EXPECT_HAS(m, "all_to_all_v on group 'ep' (rank 0 of 1): input needs sum(send_rows) = 2 rows");
  m = error_of([&] { c->all_to_all_v(x, {3}, out5, {3}); });
  EXPECT_HAS(m, "output needs sum(recv_rows) = 3 rows");
  m = error_of([&] { c->all_to_all_v(x, {3}, out, {}); });
  EXPECT_HAS(m, "recv_rows has 0 entries, expected one per rank (1)");

  Tensor wide = Tensor::zeros({3, 5}, DType::f32);
  m = error_of([&] { c->all_to_all_v(x, {3}, wide, {3}); });
  EXPECT_HAS(m, "trailing dims differ");
  EXPECT_HAS(m, "rows of (*, 4)");
  EXPECT_HAS(m, "rows of (*, 5)");
  Tensor dbl = Tensor::zeros({3, 4}, DType::f64);
  m = error_of([&] { c->reduce_scatter(x, dbl); });
  EXPECT_HAS(m, "reduce_scatter on group 'ep' (rank 0 of 1): input and output dtypes differ");
  m = error_of([&] { c->reduce_scatter_v(x, out5, {3}); });
  EXPECT_HAS(m, "output has 5 rows but rows[0] = 3");
  m = error_of([&] { c->reduce_scatter_v(x, out, {4}); });
  EXPECT_HAS(m, "input needs sum(rows) = 4 rows");

  Tensor scalar = Tensor::zeros({}, DType::f32);
  m = error_of([&] { c->all_gather(scalar, out); });
  EXPECT_HAS(m, "need at least one dim");
  m = error_of([&] { c->broadcast(x, 1); });
  EXPECT_HAS(m, "broadcast on group 'ep' (rank 0 of 1): root 1 is not a rank of the group");
  Tensor undef;
  m = error_of([&] { c->all_reduce(undef); });
  EXPECT_HAS(m, "all_reduce on group 'ep' (rank 0 of 1): tensor is undefined");
  m = error_of([&] { c->split(-1, 0, "x"); });
  EXPECT_HAS(m, "color must be >= 0");
  m = error_of([&] { c->split(0, 0, ""); });
  EXPECT_HAS(m, "needs a name");
}

TEST(CommUtil, TimeoutMessageAndHelpers) {
  auto c = make_single_communicator("ep");
  std::string m = error_of([&] { comm::throw_timeout(*c, "all_to_all_v", "exchange", 5); }, ErrorCode::communication);
  EXPECT_HAS(m, "moecore communication error: all_to_all_v on group 'ep' (rank 0 of 1) timed out after 5 s waiting "
                "for peers (phase: exchange");
  EXPECT_EQ(comm::row_offsets({2, 0, 3}), (std::vector<int64_t>{0, 2, 2}));
  int64_t total = 0;
  comm::row_offsets({2, 0, 3}, &total);
  EXPECT_EQ(total, 5);
  Tensor x = iota_f32({4, 2});
  EXPECT_TRUE(comm::overlaps(x, x.narrow(1, 2)));
  EXPECT_FALSE(comm::overlaps(x.narrow(0, 2), x.narrow(2, 2)));
  EXPECT_FALSE(comm::overlaps(x, x.narrow(2, 0)));
  EXPECT_EQ(comm::row_info(Tensor::zeros({3, 4, 5}, DType::bf16)).row_bytes, 40u);
  EXPECT_GT(comm::timeout_seconds(), 0);
}
