// Stream-ordered memory reuse, checked on the CPU:
//   - device/stream_pool.h, the bookkeeping behind the CUDA backend's caching allocator and its
//     deferred pinned frees, driven with fake streams and events whose completion the test controls:
//     a block freed on its own stream is reused at once on that stream only; a block another stream
//     may have used (made current while the block lived, or current at the free) waits for events on
//     those streams; a pinned pool fences its own stream too; draining waits; a destroyed stream's
//     blocks move to the fallback stream;
//   - ActivationStore's offload reload: the pinned source of the host→device copy is kept until an
//     event recorded after the copy has completed (on the CPU backend, whose streams run inline,
//     that is at once), and the pinned counter returns to where it was.
#include <gtest/gtest.h>

#include <map>
#include <set>
#include <vector>

#include "common/test_util.h"
#include "device/stream_pool.h"
#include "moecore/activation_store.h"
#include "moecore/backend.h"

using namespace moe;

namespace {

// Streams are ints; an event is an id whose completion the test sets.
struct World {
  int next = 1;
  std::map<int, int> stream_of;  // event → stream it was recorded on
  std::set<int> complete;
  std::set<int> released;
  int waits = 0;
};

struct FakeOps {
  using Stream = int;
  using Event = int;
  World* w;
  int record(int s) {
    int e = w->next++;
    w->stream_of[e] = s;
    return e;
  }
  bool done(int e) { return w->complete.count(e) != 0; }
  void wait(int e) {
    ++w->waits;
    w->complete.insert(e);
  }
  void release(int e) { w->released.insert(e); }
};

// Completes every event recorded on stream s so far.
void finish_stream(World& w, int s) {
  for (auto [e, st] : w.stream_of)
    if (st == s) w.complete.insert(e);
}

char g_mem[8][64];
void* blk(int i) { return g_mem[i]; }

}  // namespace

TEST(StreamPool, SameStreamFreeIsReusedAtOnceOnThatStreamOnly) {
  World w;
  StreamPool<FakeOps> pool(FakeOps{&w});
  pool.note_current(0);
  pool.add_live(blk(0), 512, 0);
  EXPECT_TRUE(pool.give_back(blk(0), 0));
  EXPECT_EQ(w.stream_of.size(), 0u) << "no event for a block only its own stream used";
  EXPECT_EQ(pool.cached_bytes(), 512);
  EXPECT_EQ(pool.take(512, 1), nullptr) << "another stream never gets it without an event";
  EXPECT_EQ(pool.take(1024, 0), nullptr) << "another size";
  EXPECT_EQ(pool.take(512, 0), blk(0));
  EXPECT_EQ(pool.cached_bytes(), 0);
  EXPECT_FALSE(pool.give_back(blk(3), 0)) << "not live";
}

TEST(StreamPool, BlockUsedOnAnotherStreamWaitsForItsEvent) {
  World w;
  StreamPool<FakeOps> pool(FakeOps{&w});
  pool.note_current(0);
  pool.add_live(blk(0), 512, 0);  // allocated on stream 0
  pool.note_current(7);           // stream 7 becomes current: it may use the block
  pool.note_current(0);           // and back: the free happens on stream 0
  EXPECT_TRUE(pool.give_back(blk(0), 0));
  ASSERT_EQ(w.stream_of.size(), 1u);
  EXPECT_EQ(w.stream_of.begin()->second, 7) << "the event goes on the stream that may still read it";
  EXPECT_EQ(pool.pending_count(), 1u);
  EXPECT_EQ(pool.take(512, 0), nullptr) << "reused before stream 7 passed the free";
  finish_stream(w, 7);
  EXPECT_EQ(pool.take(512, 0), blk(0));
  EXPECT_EQ(w.released.size(), 1u) << "the event goes back";
  EXPECT_EQ(pool.pending_count(), 0u);
}

TEST(StreamPool, FreeWhileAnotherStreamIsCurrentFencesThatStream) {
  World w;
  StreamPool<FakeOps> pool(FakeOps{&w});
  pool.note_current(0);
  pool.note_current(5);
  pool.note_current(0);
  pool.add_live(blk(1), 1024, 0);  // stream 5 was current only before the allocation: not a user
  pool.note_current(3);
  EXPECT_TRUE(pool.give_back(blk(1), 3));  // freed while stream 3 is current
  ASSERT_EQ(w.stream_of.size(), 1u);
  EXPECT_EQ(w.stream_of.begin()->second, 3);
  EXPECT_EQ(pool.take(1024, 0), nullptr);
  finish_stream(w, 5);
  EXPECT_EQ(pool.take(1024, 0), nullptr) << "stream 5 is not the one that mattered";
  finish_stream(w, 3);
  EXPECT_EQ(pool.take(1024, 3), nullptr) << "the block returns to its own stream's list";
  EXPECT_EQ(pool.take(1024, 0), blk(1));
}

TEST(StreamPool, PinnedPoolFencesItsOwnStreamAndDrainWaits) {
  World w;
  StreamPool<FakeOps> pool(FakeOps{&w}, /*fence_own_stream=*/true);
  pool.note_current(0);
  pool.add_live(blk(2), 100, 0);
  pool.add_live(blk(3), 200, 0);
  EXPECT_TRUE(pool.give_back(blk(2), 0));
  EXPECT_EQ(w.stream_of.size(), 1u) << "a copy on the own stream may still read a pinned buffer";
  EXPECT_EQ(pool.pending_count(), 1u);
  pool.collect();
  EXPECT_TRUE(pool.take_free().empty()) << "nothing may be freed before the event";
  finish_stream(w, 0);
  pool.collect();
  auto freed = pool.take_free();
  ASSERT_EQ(freed.size(), 1u);
  EXPECT_EQ(freed[0].first, blk(2));
  EXPECT_EQ(freed[0].second, 100u);
  // drain() waits for what is pending and hands everything over.
  EXPECT_TRUE(pool.give_back(blk(3), 0));
  auto all = pool.drain();
  ASSERT_EQ(all.size(), 1u);
  EXPECT_EQ(all[0].first, blk(3));
  EXPECT_GE(w.waits, 1);
  EXPECT_EQ(pool.cached_bytes(), 0);
}

TEST(StreamPool, ForgottenStreamHandsItsBlocksToTheFallback) {
  World w;
  StreamPool<FakeOps> pool(FakeOps{&w});
  pool.note_current(4);
  pool.add_live(blk(4), 512, 4);
  pool.add_live(blk(5), 512, 4);
  EXPECT_TRUE(pool.give_back(blk(4), 4));
  pool.note_current(0);
  pool.forget_stream(4, 0);  // stream 4 finished its work and is destroyed
  EXPECT_EQ(pool.take(512, 0), blk(4));
  EXPECT_TRUE(pool.give_back(blk(5), 0));  // allocated on the dead stream, freed on 0
  EXPECT_EQ(pool.take(512, 0), blk(5));
  EXPECT_EQ(pool.live_count(), 2u);
}

// Offload on the CPU backend: a reload keeps its pinned source until the copy's event completed;
// the CPU's streams are inline, so nothing is in flight afterwards and the pinned bytes are back.
TEST(ActivationStoreOffload, ReloadReleasesThePinnedSourceAfterItsCopy) {
  Backend& cpu = get_backend(Device::cpu());
  const int64_t pinned0 = cpu.memory_stats().pinned_current_bytes;
  ActivationStore store;
  store.set_policy("a", SavePolicy::offload);
  Tensor t = test::randn({64, 33}, DType::f32, 5);
  store.save("a", t);
  EXPECT_EQ(store.saved_policy("a"), SavePolicy::offload);
  EXPECT_EQ(cpu.memory_stats().pinned_current_bytes, pinned0 + static_cast<int64_t>(t.nbytes()));
  EXPECT_EQ(store.host_bytes(), static_cast<int64_t>(t.nbytes()));
  Tensor back = store.get("a");
  EXPECT_TRUE(test::bit_equal(back, t));
  EXPECT_EQ(store.reloads(), 1);
  EXPECT_EQ(store.reloads_in_flight(), 0) << "the CPU's copy completed inline";
  EXPECT_EQ(store.host_bytes(), 0);
  EXPECT_EQ(cpu.memory_stats().pinned_current_bytes, pinned0);
  // A moved store carries its slots.
  store.save("a", t);
  ActivationStore moved = std::move(store);
  EXPECT_TRUE(test::bit_equal(moved.get("a"), t));
  moved.clear();
  EXPECT_EQ(cpu.memory_stats().pinned_current_bytes, pinned0);
}

// The device→host copy of an offload is asynchronous where the back end allows it: the manager
// holds the source until the copy's event completed. On the CPU the copy ran inline, so nothing is
// held once save returns, the caller's tensor is the only owner, and the reload is bit-exact.
TEST(ActivationStoreOffload, SaveHoldsTheDeviceSourceOnlyWhileItsCopyRuns) {
  auto mgr = std::make_shared<OffloadManager>();
  ActivationStore store;
  store.set_offload_manager(mgr);
  store.set_policy("u", SavePolicy::offload);
  Tensor u = test::randn({64, 33}, DType::f32, 6);
  const Tensor copy = u.clone();
  store.save("u", u);
  EXPECT_EQ(store.saved_policy("u"), SavePolicy::offload);
  EXPECT_EQ(mgr->stats().in_flight, 0) << "the CPU's copy completed inline: no source held";
  u = Tensor();  // the caller drops its tensor at once, as the modules do
  EXPECT_TRUE(test::bit_equal(store.get("u"), copy));
  store.clear();
  EXPECT_EQ(mgr->stats().in_flight, 0);
}
