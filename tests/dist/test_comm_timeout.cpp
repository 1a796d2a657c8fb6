// A peer that never arrives (np 4, MOE_COMM_TIMEOUT_S=2 from CTest): the last rank skips a
// collective on a group and sleeps past the timeout; the others must throw a communication error
// naming the rank, group, op and phase within the timeout (plus slack), and the group is unusable
// afterwards. Each case uses a fresh split of the world, so the world stays healthy: all ranks meet
// again on it, and the process exits through MPI_Finalize normally (the abandoned request stays
// pending; its buffers are kept alive by the communicator).
#include <gtest/gtest.h>

#include <chrono>
#include <functional>
#include <thread>

#include "comm/comm_util.h"
#include "dist/dist_util.h"

using namespace moe;
using moe::dist::world;

namespace {

// Runs `op` on a fresh group on every rank but the last, which sleeps 1.5 timeouts instead. Checks
// that the others throw the expected error in [timeout, timeout + slack).
void expect_timeout(const std::string& group_name, const std::string& op_name, const std::string& phase,
                    const std::function<void(Communicator&)>& op) {
  Communicator& w = world();
  const int me = w.rank(), late = w.size() - 1;
  const double limit = comm::timeout_seconds();
  ASSERT_LE(limit, 5.0) << "this suite expects a short MOE_COMM_TIMEOUT_S";
  auto g = w.split(0, me, group_name);
  w.barrier();  // start together
  if (me == late) {
    std::this_thread::sleep_for(std::chrono::duration<double>(1.5 * limit));
  } else {
    auto t0 = std::chrono::steady_clock::now();
    try {
      op(*g);
      ADD_FAILURE() << "no timeout: " << op_name << " completed without rank " << late;
    } catch (const Error& e) {
      double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      EXPECT_EQ(e.code(), ErrorCode::communication) << e.what();
      std::string m = e.what();
      std::ostringstream expect;
      expect << "[r" << me << "] moecore communication error: " << op_name << " on group '" << group_name
             << "' (rank " << me << " of " << w.size() << ") timed out after " << limit
             << " s waiting for peers (phase: " << phase;
      EXPECT_NE(m.find(expect.str()), std::string::npos) << "got:      " << m << "\nexpected: " << expect.str();
      EXPECT_GE(elapsed, limit);
      EXPECT_LT(elapsed, limit + 0.4 * limit) << "the timeout fired late";
      // The group is now unusable: further calls fail at once instead of mismatching.
      Tensor t = Tensor::zeros({1}, DType::f32);
      try {
        g->all_reduce(t);
        ADD_FAILURE() << "a timed-out group accepted another collective";
      } catch (const Error& e2) {
        EXPECT_EQ(e2.code(), ErrorCode::communication);
        EXPECT_NE(std::string(e2.what()).find("unusable after an earlier failure"), std::string::npos) << e2.what();
      }
    }
  }
  // Everyone, the late rank included, meets again on the healthy world.
  w.barrier();
}

}  // namespace

TEST(MpiCommTimeout, AllToAllVWithAnAbsentPeer) {
  const int n = world().size();
  expect_timeout("ep", "all_to_all_v", "exchange", [n](Communicator& g) {
    std::vector<int64_t> rows(static_cast<size_t>(n), 2);
    Tensor in = Tensor::zeros({2 * n, 16}, DType::bf16), out = Tensor::zeros({2 * n, 16}, DType::bf16);
    g.all_to_all_v(in, rows, out, rows);
  });
}

TEST(MpiCommTimeout, AllReduceWithAnAbsentPeer) {
  expect_timeout("dp_cp", "all_reduce", "reduce", [](Communicator& g) {
    Tensor t = Tensor::zeros({1024}, DType::f32);
    g.all_reduce(t);
  });
}

TEST(MpiCommTimeout, SplitWithAnAbsentPeer) {
  expect_timeout("world_copy", "split", "rendezvous", [](Communicator& g) { g.split(0, 0, "never"); });
}

TEST(MpiCommTimeout, HealthyAfterwards) {
  // The world still works for everyone after the abandoned operations.
  Communicator& w = world();
  Tensor t = Tensor::from_vector(std::vector<int32_t>{1}, {1});
  w.all_reduce(t);
  EXPECT_EQ(t.to_vector<int32_t>()[0], w.size());
}
