// The MPI communicator under mpiexec (np 2, 4, 8): every collective on seeded data that each rank
// recomputes for every other rank, f32/f64/bf16/f16/i32/i64/u8, ranks with zero rows, large-ish
// buffers, overlapping input/output, split ordering, argument errors before communication, shared
// host segments (fences, growth, failure, MOE_COMM_SHM), and (when a GPU is present) CUDA tensors
// staged through pinned host memory.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <unistd.h>
#include <numeric>

#include "comm/shm_host.h"
#include "common/test_util.h"
#include "dist/dist_util.h"
#include "moecore/backend.h"

using namespace moe;
using moe::dist::concat_rows;
using moe::dist::rank_data;
using moe::dist::value_of;
using moe::dist::world;

namespace {

const DType kAllDtypes[] = {DType::f32, DType::f64, DType::bf16, DType::f16, DType::i32, DType::i64, DType::u8};

// Rows rank r contributes in the v-collectives: includes zeros (rank 0 always has none when salt is 0).
int64_t rows_of(int r, int salt) { return (r * 3 + salt) % 4; }

// Rows rank `src` sends to rank `dst` in all_to_all_v (zeros included).
int64_t a2a_rows(int src, int dst, int salt) { return (src + 2 * dst + salt) % 3; }

Shape with_rows(int64_t rows, const Shape& trailing) {
  Shape s = {rows};
  s.insert(s.end(), trailing.begin(), trailing.end());
  return s;
}

// Σ over ranks of rank_data(f64 values), per element, for reductions of float dtypes.
std::vector<double> float_sum(const Shape& shape, int n, uint64_t salt, DType dt) {
  std::vector<double> acc(static_cast<size_t>(shape_numel(shape)), 0.0);
  for (int r = 0; r < n; ++r) {
    std::vector<double> v = test::to_f64(rank_data(dt, shape, r, salt));
    for (size_t i = 0; i < acc.size(); ++i) acc[i] += v[i];
  }
  return acc;
}

}  // namespace

TEST(MpiComm, WorldIdentity) {
  Communicator& w = world();
  EXPECT_EQ(w.backend_name(), "mpi");
  EXPECT_EQ(w.name(), "world");
  EXPECT_EQ(w.size(), world_size());
  EXPECT_EQ(w.rank(), world_rank());
  EXPECT_EQ(process_rank(), w.rank());
  std::vector<int> all(static_cast<size_t>(w.size()));
  std::iota(all.begin(), all.end(), 0);
  EXPECT_EQ(w.world_ranks(), all);
  EXPECT_TRUE(mpi_available());
  EXPECT_EQ(mpi_world().get(), &w);  // one world per process
  EXPECT_GE(w.size(), 2);
}

TEST(MpiComm, AllReduceEveryDtypeAndOp) {
  Communicator& w = world();
  const int n = w.size(), me = w.rank();
  const Shape shape = {7, 3};
  for (DType dt : kAllDtypes) {
    for (ReduceOp op : {ReduceOp::sum, ReduceOp::max, ReduceOp::min}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " op " + std::to_string(static_cast<int>(op)));
      const uint64_t salt = 11 + static_cast<uint64_t>(op);
      Tensor t = rank_data(dt, shape, me, salt);
      w.all_reduce(t, op);
      if (dt == DType::i32 || dt == DType::i64 || dt == DType::u8) {
        // Integers: the exact result with the dtype's wrap-around.
        std::vector<int64_t> expect(static_cast<size_t>(shape_numel(shape)));
        for (int r = 0; r < n; ++r) {
          Tensor x = rank_data(dt, shape, r, salt);
          for (size_t i = 0; i < expect.size(); ++i) {
            int64_t v = dt == DType::i32   ? static_cast<int64_t>(x.data_as<int32_t>()[i])
                        : dt == DType::i64 ? x.data_as<int64_t>()[i]
                                           : static_cast<int64_t>(x.data_as<uint8_t>()[i]);
            if (r == 0) {
              expect[i] = v;
            } else if (op == ReduceOp::sum) {
              expect[i] = static_cast<int64_t>(static_cast<uint64_t>(expect[i]) + static_cast<uint64_t>(v));
            } else {
              expect[i] = op == ReduceOp::max ? std::max(expect[i], v) : std::min(expect[i], v);
            }
          }
        }
        for (size_t i = 0; i < expect.size(); ++i) {
          if (dt == DType::i32) {
            EXPECT_EQ(t.data_as<int32_t>()[i], static_cast<int32_t>(expect[i])) << i;
          } else if (dt == DType::i64) {
            EXPECT_EQ(t.data_as<int64_t>()[i], expect[i]) << i;
          } else {
            EXPECT_EQ(t.data_as<uint8_t>()[i], static_cast<uint8_t>(expect[i])) << i;
          }
        }
        continue;
      }
      std::vector<double> expect(static_cast<size_t>(shape_numel(shape)));
      for (int r = 0; r < n; ++r) {
        std::vector<double> v = test::to_f64(rank_data(dt, shape, r, salt));
        for (size_t i = 0; i < expect.size(); ++i) {
          if (r == 0) expect[i] = v[i];
          else if (op == ReduceOp::sum) expect[i] += v[i];
          else expect[i] = op == ReduceOp::max ? std::max(expect[i], v[i]) : std::min(expect[i], v[i]);
        }
      }
      // Inputs are multiples of 1/64 (rounded once for bf16/f16): f32/f64 sums are exact; 16-bit
      // sums are accumulated in f32 and rounded once, so they are within half an ulp of the exact
      // sum (bf16: 2^-8 relative, f16: 2^-11); max/min are exact.
      double rtol = op != ReduceOp::sum ? 0 : dt == DType::bf16 ? 1.0 / 256 : dt == DType::f16 ? 1.0 / 2048 : 0;
      EXPECT_TRUE(test::all_close(test::to_f64(t), expect, 0, rtol));
    }
  }
}

TEST(MpiComm, AllReduceLargeBuffer) {
  Communicator& w = world();
  const int n = w.size(), me = w.rank();
  const int64_t numel = int64_t(1) << 21;  // 8 MiB of f32
  std::vector<float> v(static_cast<size_t>(numel));
  for (int64_t i = 0; i < numel; ++i) v[static_cast<size_t>(i)] = static_cast<float>((me + 1) * (i % 13));
  Tensor t = Tensor::from_vector(v, {numel / 64, 64});
  w.all_reduce(t);
  const float* p = t.data_as<float>();
  int64_t bad = 0;
  for (int64_t i = 0; i < numel; ++i)
    if (p[i] != static_cast<float>(n * (n + 1) / 2 * (i % 13))) ++bad;
  EXPECT_EQ(bad, 0);
}

TEST(MpiComm, AllGatherEveryDtype) {
  Communicator& w = world();
  const int n = w.size(), me = w.rank();
  const Shape trailing = {2, 3};
  for (DType dt : kAllDtypes) {
    SCOPED_TRACE(dtype_name(dt));
    Tensor in = rank_data(dt, with_rows(3, trailing), me, 21);
    Tensor out = Tensor::zeros(with_rows(3 * n, trailing), dt);
    w.all_gather(in, out);
    std::vector<Tensor> parts;
    for (int r = 0; r < n; ++r) parts.push_back(rank_data(dt, with_rows(3, trailing), r, 21));
    EXPECT_TRUE(test::bit_equal(out, concat_rows(parts, trailing, dt)));
  }
}

TEST(MpiComm, AllGatherInPlaceSlot) {
  // The input is this rank's slot of the output (overlapping buffers).
  Communicator& w = world();
  const int n = w.size(), me = w.rank();
  Tensor out = Tensor::zeros({4 * n, 5}, DType::f32);
  Tensor slot = out.narrow(4 * me, 4);
  slot.copy_from(rank_data(DType::f32, {4, 5}, me, 23));
  w.all_gather(slot, out);
  std::vector<Tensor> parts;
  for (int r = 0; r < n; ++r) parts.push_back(rank_data(DType::f32, {4, 5}, r, 23));
  EXPECT_TRUE(test::bit_equal(out, concat_rows(parts, {5}, DType::f32)));
}

TEST(MpiComm, AllGatherVWithZeroRowRanks) {
  Communicator& w = world();
  const int n = w.size(), me = w.rank();
  const Shape trailing = {5};
  for (DType dt : kAllDtypes) {
    for (int salt : {0, 1}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " salt " + std::to_string(salt));
      std::vector<int64_t> rows;
      for (int r = 0; r < n; ++r) rows.push_back(rows_of(r, salt));
      Tensor in = rank_data(dt, with_rows(rows[static_cast<size_t>(me)], trailing), me, 31 + salt);
      int64_t total = std::accumulate(rows.begin(), rows.end(), int64_t(0));
      Tensor out = Tensor::zeros(with_rows(total, trailing), dt);
      w.all_gather_v(in, out, rows);
      std::vector<Tensor> parts;
      for (int r = 0; r < n; ++r)
        parts.push_back(rank_data(dt, with_rows(rows[static_cast<size_t>(r)], trailing), r, 31 + salt));
      EXPECT_TRUE(test::bit_equal(out, concat_rows(parts, trailing, dt)));
    }
  }
  // Every rank empty.
  Tensor z = Tensor::zeros({0, 4}, DType::f32), oz = Tensor::zeros({0, 4}, DType::f32);
  w.all_gather_v(z, oz, std::vector<int64_t>(static_cast<size_t>(n), 0));
}

TEST(MpiComm, ReduceScatterFloat) {
  Communicator& w = world();
  const int n = w.size(), me = w.rank();
  for (DType dt : {DType::f32, DType::f64, DType::bf16, DType::f16}) {
    SCOPED_TRACE(dtype_name(dt));
    const Shape full = {3 * n, 4};
    Tensor in = rank_data(dt, full, me, 41);
    Tensor out = Tensor::zeros({3, 4}, dt);
    w.reduce_scatter(in, out);
    std::vector<double> sum = float_sum(full, n, 41, dt);
    std::vector<double> mine(sum.begin() + me * 12, sum.begin() + (me + 1) * 12);
    double rtol = dt == DType::bf16 ? 1.0 / 256 : dt == DType::f16 ? 1.0 / 2048 : 0;
    EXPECT_TRUE(test::all_close(test::to_f64(out), mine, 0, rtol));
  }
}

TEST(MpiComm, ReduceScatterIntegers) {
  Communicator& w = world();
  const int n = w.size(), me = w.rank();
  std::vector<int64_t> v(static_cast<size_t>(2 * n * 3));
  for (size_t i = 0; i < v.size(); ++i) v[i] = (int64_t(1) << 40) * me + static_cast<int64_t>(i);
  Tensor in = Tensor::from_vector(v, {2 * n, 3});
  Tensor out = Tensor::zeros({2, 3}, DType::i64);
  w.reduce_scatter(in, out);
  std::vector<int64_t> got = out.to_vector<int64_t>();
  for (int64_t i = 0; i < 6; ++i) {
    int64_t idx = me * 6 + i;
    EXPECT_EQ(got[static_cast<size_t>(i)], (int64_t(1) << 40) * (n * (n - 1) / 2) + n * idx);
  }
}

TEST(MpiComm, ReduceScatterVWithZeroRowRanks) {
  Communicator& w = world();
  const int n = w.size(), me = w.rank();
  for (DType dt : {DType::f32, DType::bf16, DType::i32, DType::u8}) {
    for (int salt : {0, 2}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " salt " + std::to_string(salt));
      std::vector<int64_t> rows;
      for (int r = 0; r < n; ++r) rows.push_back(rows_of(r, salt));
      int64_t total = std::accumulate(rows.begin(), rows.end(), int64_t(0));
      int64_t offset = std::accumulate(rows.begin(), rows.begin() + me, int64_t(0));
      const Shape full = {total, 6};
      Tensor in = rank_data(dt, full, me, 51 + salt);
      Tensor out = Tensor::zeros({rows[static_cast<size_t>(me)], 6}, dt);
      w.reduce_scatter_v(in, out, rows);
      if (dt == DType::i32 || dt == DType::u8) {
        // Wrap-around sums (mod 2^32, mod 2^8).
        std::vector<uint32_t> expect(static_cast<size_t>(out.numel()), 0);
        for (int r = 0; r < n; ++r) {
          Tensor x = rank_data(dt, full, r, 51 + salt);
          for (size_t i = 0; i < expect.size(); ++i)
            expect[i] += dt == DType::i32 ? static_cast<uint32_t>(x.data_as<int32_t>()[offset * 6 + i])
                                          : static_cast<uint32_t>(x.data_as<uint8_t>()[offset * 6 + i]);
        }
        for (size_t i = 0; i < expect.size(); ++i) {
          if (dt == DType::i32) {
            EXPECT_EQ(out.data_as<int32_t>()[i], static_cast<int32_t>(expect[i])) << i;
          } else {
            EXPECT_EQ(out.data_as<uint8_t>()[i], static_cast<uint8_t>(expect[i] & 0xffu)) << i;
          }
        }
        continue;
      }
      std::vector<double> sum = float_sum(full, n, 51 + salt, dt);
      std::vector<double> mine(sum.begin() + offset * 6, sum.begin() + (offset + rows[static_cast<size_t>(me)]) * 6);
      EXPECT_TRUE(test::all_close(test::to_f64(out), mine, 0, dt == DType::bf16 ? 1.0 / 256 : 0));
    }
  }
}

TEST(MpiComm, AllToAllVEveryDtypeWithZeroRows) {
  Communicator& w = world();
  const int n = w.size(), me = w.rank();
  const Shape trailing = {2, 3};
  for (DType dt : kAllDtypes) {
    for (int salt : {0, 1, 2}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " salt " + std::to_string(salt));
      // Chunk me→q holds rank_data(src=me, salt'=q).
      std::vector<int64_t> send, recv;
      std::vector<Tensor> send_parts, recv_parts;
      for (int q = 0; q < n; ++q) {
        send.push_back(a2a_rows(me, q, salt));
        recv.push_back(a2a_rows(q, me, salt));
        send_parts.push_back(rank_data(dt, with_rows(send.back(), trailing), me, 1000 * salt + 61 + q));
        recv_parts.push_back(rank_data(dt, with_rows(recv.back(), trailing), q, 1000 * salt + 61 + me));
      }
      Tensor in = concat_rows(send_parts, trailing, dt);
      Tensor expect = concat_rows(recv_parts, trailing, dt);
      Tensor out = Tensor::zeros(expect.shape(), dt);
      w.all_to_all_v(in, send, out, recv);
      EXPECT_TRUE(test::bit_equal(out, expect));
    }
  }
}

TEST(MpiComm, AllToAllVLargeish) {
  // ~4 MiB per rank, uneven splits, one empty pair per rank.
  Communicator& w = world();
  const int n = w.size(), me = w.rank();
  const int64_t H = 512;
  auto rows = [&](int src, int dst) -> int64_t { return src == dst ? 0 : 1 + (src * 37 + dst * 91) % (2048 / n); };
  std::vector<int64_t> send, recv;
  std::vector<Tensor> sp, rp;
  for (int q = 0; q < n; ++q) {
    send.push_back(rows(me, q));
    recv.push_back(rows(q, me));
    sp.push_back(rank_data(DType::f32, {send.back(), H}, me, 71 + q));
    rp.push_back(rank_data(DType::f32, {recv.back(), H}, q, 71 + me));
  }
  Tensor in = concat_rows(sp, {H}, DType::f32), expect = concat_rows(rp, {H}, DType::f32);
  Tensor out = Tensor::zeros(expect.shape(), DType::f32);
  w.all_to_all_v(in, send, out, recv);
  EXPECT_TRUE(test::bit_equal(out, expect));
}

TEST(MpiComm, BroadcastFromEveryRoot) {
  Communicator& w = world();
  const int n = w.size(), me = w.rank();
  for (int root = 0; root < n; ++root) {
    for (DType dt : {DType::f64, DType::u8, DType::bf16}) {
      Tensor t = me == root ? rank_data(dt, {9, 2}, root, 81) : Tensor::zeros({9, 2}, dt);
      w.broadcast(t, root);
      EXPECT_TRUE(test::bit_equal(t, rank_data(dt, {9, 2}, root, 81))) << "root " << root << " " << dtype_name(dt);
    }
  }
  Tensor scalar = Tensor::from_vector(std::vector<float>{static_cast<float>(me) + 0.5f}, {});
  w.broadcast(scalar, n - 1);
  EXPECT_EQ(scalar.to_vector<float>()[0], static_cast<float>(n - 1) + 0.5f);
}

TEST(MpiComm, BarrierRepeated) {
  for (int i = 0; i < 20; ++i) world().barrier();
}

// Shared host segments (ranks on one node, as under mpiexec here): each rank fills its own segment
// with seeded values, and after a fence every rank reads every segment; a fence orders a second
// round written into the others' segments; growing keeps old views readable; a reserve that cannot
// be had turns the segments off on every rank alike. On a group of its own, so the failure leaves
// the world's segments alone.
TEST(MpiComm, SharedHostSegmentsAcrossRanks) {
  Communicator& w = world();
  auto g = w.split(0, w.rank(), "shm_test");
  const int n = g->size(), me = g->rank();
  SharedHostSegments* shm = g->shared_host();
  ASSERT_NE(shm, nullptr) << "every rank of this test runs on one node";
  EXPECT_EQ(g->shared_host(), shm);  // made once
  const int64_t R = 1000;  // i64 values per rank: 8000 bytes
  ASSERT_TRUE(shm->reserve(R * 8));
  EXPECT_GE(shm->bytes(), static_cast<size_t>(R * 8));
  auto value = [](int writer, int owner, int64_t i, int round) {
    return static_cast<int64_t>(round) * 1000000007 + writer * 100003 + owner * 1009 + i;
  };
  // Round 0: each rank writes its own segment.
  Tensor mine = shm->segment(me, 0, {R}, DType::i64);
  for (int64_t i = 0; i < R; ++i) mine.data_as<int64_t>()[i] = value(me, me, i, 0);
  shm->fence();
  for (int r = 0; r < n; ++r) {
    std::vector<int64_t> got = shm->segment(r, 0, {R}, DType::i64).to_vector<int64_t>();
    for (int64_t i = 0; i < R; ++i) ASSERT_EQ(got[static_cast<size_t>(i)], value(r, r, i, 0)) << "segment " << r;
  }
  Tensor old_view = shm->segment((me + 1) % n, 0, {R}, DType::i64);
  // Round 1: each rank writes its slice of the next rank's segment (after a fence: all have read).
  shm->fence();
  const int next = (me + 1) % n, prev = (me + n - 1) % n;
  Tensor slot = shm->segment(next, 0, {R}, DType::i64);
  for (int64_t i = 0; i < R; ++i) slot.data_as<int64_t>()[i] = value(me, next, i, 1);
  shm->fence();
  std::vector<int64_t> got = shm->segment(me, 0, {R}, DType::i64).to_vector<int64_t>();
  for (int64_t i = 0; i < R; ++i) ASSERT_EQ(got[static_cast<size_t>(i)], value(prev, me, i, 1));
  // Growing maps new segments; the old view still reads what it held.
  shm->fence();
  const size_t before = shm->bytes();
  ASSERT_TRUE(shm->reserve(before + 1));
  EXPECT_GE(shm->bytes(), before + 1);
  EXPECT_EQ(old_view.to_vector<int64_t>()[5], value(me, next, 5, 1));
  Tensor grown = shm->segment(me, shm->bytes() - 8, {1}, DType::i64);
  grown.data_as<int64_t>()[0] = me;
  shm->fence();
  for (int r = 0; r < n; ++r) EXPECT_EQ(shm->segment(r, shm->bytes() - 8, {1}, DType::i64).to_vector<int64_t>()[0], r);
  // Past the end: an internal error, not a read out of bounds.
  test::expect_error([&] { (void)shm->segment(me, shm->bytes() - 4, {1}, DType::i64); }, "reserve first");
  // More than any /dev/shm holds (1 PiB): false on every rank, and off from then on.
  shm->fence();
  EXPECT_FALSE(shm->reserve(size_t{1} << 50));
  EXPECT_FALSE(shm->reserve(8));
  // Nothing of this process is left in /dev/shm: names go once mapped, and on failure.
  const std::string prefix = "moecore." + std::to_string(getpid()) + ".";
  if (std::filesystem::is_directory("/dev/shm")) {
    for (const auto& f : std::filesystem::directory_iterator("/dev/shm")) {
      EXPECT_NE(f.path().filename().string().rfind(prefix, 0), size_t{0}) << "left behind: " << f.path();
    }
  }
  // A group of one has none.
  EXPECT_EQ(make_single_communicator()->shared_host(), nullptr);
}

// MOE_COMM_SHM: 0 on one rank turns the segments off for the whole group (the ranks agree), and a
// value other than 0 or 1 is refused by name.
TEST(MpiComm, SharedHostSegmentsOffByEnv) {
  Communicator& w = world();
  ASSERT_EQ(unsetenv("MOE_COMM_SHM"), 0);
  EXPECT_TRUE(comm::shm_enabled_by_env());
  if (w.rank() == 0) {
    ASSERT_EQ(setenv("MOE_COMM_SHM", "0", 1), 0);
  }
  auto g = w.split(0, w.rank(), "shm_off");
  EXPECT_EQ(g->shared_host(), nullptr);
  ASSERT_EQ(setenv("MOE_COMM_SHM", "yes", 1), 0);
  test::expect_error([] { (void)comm::shm_enabled_by_env(); }, "MOE_COMM_SHM: expected 0 (off) or 1");
  auto h = w.split(0, w.rank(), "shm_bad");
  test::expect_error([&] { (void)h->shared_host(); }, "MOE_COMM_SHM");
  ASSERT_EQ(unsetenv("MOE_COMM_SHM"), 0);
  EXPECT_NE(h->shared_host(), nullptr);  // the refused call decided nothing
}

TEST(MpiComm, SplitOrdersByKeyThenRank) {
  Communicator& w = world();
  const int n = w.size(), me = w.rank();
  // Colour by parity; key = -rank reverses the order inside each group.
  auto g = w.split(me % 2, -me, "parity");
  EXPECT_EQ(g->name(), "parity");
  EXPECT_EQ(g->backend_name(), "mpi");
  std::vector<int> expect;
  for (int r = n - 1; r >= 0; --r)
    if (r % 2 == me % 2) expect.push_back(r);
  EXPECT_EQ(g->world_ranks(), expect);
  EXPECT_EQ(g->size(), static_cast<int>(expect.size()));
  EXPECT_EQ(expect[static_cast<size_t>(g->rank())], me);
  // Equal keys: ordered by rank in the parent.
  auto h = w.split(0, 0, "same_key");
  EXPECT_EQ(h->rank(), me);
  // A collective inside the subgroup sums only its members.
  Tensor t = Tensor::from_vector(std::vector<int64_t>{me}, {1});
  g->all_reduce(t);
  int64_t s = 0;
  for (int r : expect) s += r;
  EXPECT_EQ(t.to_vector<int64_t>()[0], s);
  // Split of a split.
  auto gg = g->split(0, g->rank(), "parity_again");
  EXPECT_EQ(gg->world_ranks(), g->world_ranks());
}

TEST(MpiComm, ArgumentErrorsBeforeCommunicating) {
  // Every rank makes the same bad call: each throws invalid_argument without communicating, and
  // the group stays usable.
  Communicator& w = world();
  const int n = w.size();
  Tensor in = Tensor::zeros({2, 3}, DType::f32), out = Tensor::zeros({2 * n, 3}, DType::f32);
  std::vector<int64_t> short_rows(static_cast<size_t>(n - 1), 2);
  try {
    w.all_gather_v(in, out, short_rows);
    ADD_FAILURE() << "no throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    std::string m = e.what();
    EXPECT_NE(m.find("[r" + std::to_string(w.rank()) + "]"), std::string::npos) << m;
    EXPECT_NE(m.find("all_gather_v on group 'world' (rank " + std::to_string(w.rank()) + " of " + std::to_string(n) +
                     "): rows has " + std::to_string(n - 1) + " entries, expected one per rank (" +
                     std::to_string(n) + ")"),
              std::string::npos)
        << m;
  }
  Tensor bad = Tensor::zeros({2 * n, 3}, DType::f64);
  EXPECT_THROW(w.all_gather(in, bad), Error);
  EXPECT_THROW(w.all_to_all_v(in, std::vector<int64_t>(static_cast<size_t>(n), 1), out,
                              std::vector<int64_t>(static_cast<size_t>(n), 1)),
               Error);  // in has 2 rows, sum(send) = n
  EXPECT_THROW(w.broadcast(in, n), Error);
  EXPECT_THROW(w.split(-3, 0, "neg"), Error);
  w.barrier();
}

TEST(MpiComm, CudaTensorsStageThroughPinnedHost) {
  if (!backend_available(DeviceType::cuda)) GTEST_SKIP() << "no CUDA device";
  Communicator& w = world();
  const int n = w.size(), me = w.rank();
  Device dev = Device::cuda(0);
  std::vector<int64_t> send, recv;
  std::vector<Tensor> sp, rp;
  for (int q = 0; q < n; ++q) {
    send.push_back(a2a_rows(me, q, 1));
    recv.push_back(a2a_rows(q, me, 1));
    sp.push_back(rank_data(DType::bf16, {send.back(), 8}, me, 91 + q));
    rp.push_back(rank_data(DType::bf16, {recv.back(), 8}, q, 91 + me));
  }
  Tensor in = concat_rows(sp, {8}, DType::bf16).to(dev);
  Tensor expect = concat_rows(rp, {8}, DType::bf16);
  Tensor out = Tensor::zeros(expect.shape(), DType::bf16, dev);
  w.all_to_all_v(in, send, out, recv);
  EXPECT_TRUE(test::bit_equal(out.to(Device::cpu()), expect));
  Tensor t = rank_data(DType::f32, {5, 4}, me, 95).to(dev);
  w.all_reduce(t);
  EXPECT_TRUE(test::all_close(test::to_f64(t), float_sum({5, 4}, n, 95, DType::f32), 0, 0));
  Tensor pinned = Tensor::empty({3, 4}, DType::f32, dev, MemoryKind::pinned_host);
  pinned.copy_from(rank_data(DType::f32, {3, 4}, me, 97));
  Tensor gathered = Tensor::zeros({3 * n, 4}, DType::f32, dev);
  w.all_gather(pinned, gathered);
  std::vector<Tensor> parts;
  for (int r = 0; r < n; ++r) parts.push_back(rank_data(DType::f32, {3, 4}, r, 97));
  EXPECT_TRUE(test::bit_equal(gathered.to(Device::cpu()), concat_rows(parts, {4}, DType::f32)));
}
