// The bookkeeping of a caching allocator whose blocks may be used on several streams (the CUDA
// backend's device allocator and its deferred pinned-host frees), as plain C++ so that the CPU test
// suite checks it with fake streams and events (tests/unit/test_stream_pool.cpp).
//
// A block belongs to the stream that was current when it was allocated. When it is freed it becomes
// reusable for allocations on that stream at once (stream order protects it) unless it may have been
// used on another stream: any stream that was made current while the block was alive, or the stream
// current at the free. Then an event is recorded on each of those streams and the block waits in a
// pending list until every event has completed (PyTorch's allocator does the same for the streams
// named by record_stream; here the streams are found without the caller's help). Nothing here locks:
// the owner holds its mutex around every call.
//
// Ops is a policy with the types Stream and Event and the calls
//   Event record(Stream)  an event recorded on the stream now (never throws)
//   bool done(Event)      whether it completed (never throws; an error counts as complete)
//   void wait(Event)      block the host until it completed (never throws)
//   void release(Event)   give it back (it may be reused by record)
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <unordered_map>
#include <utility>
#include <vector>

namespace moe {

template <class Ops>
class StreamPool {
 public:
  using Stream = typename Ops::Stream;
  using Event = typename Ops::Event;

  // fence_own_stream: record an event on the block's own stream too (memory handed back to the
  // system or to host code right after the free, e.g. pinned host buffers, where stream order
  // protects nothing); a device cache reuses blocks on their own stream without one.
  explicit StreamPool(Ops ops = Ops{}, bool fence_own_stream = false)
      : ops_(std::move(ops)), fence_own_(fence_own_stream) {}
  StreamPool(const StreamPool&) = delete;
  StreamPool& operator=(const StreamPool&) = delete;

  // `s` became the current stream (every switch, including back to a stream used before).
  void note_current(Stream s) { last_current_[s] = ++gen_; }

  // `s` was destroyed after its work completed: free blocks kept for it move to `fallback`'s list,
  // live blocks allocated on it will return to `fallback`'s list.
  void forget_stream(Stream s, Stream fallback) {
    last_current_.erase(s);
    for (auto it = free_.begin(); it != free_.end();) {
      if (it->first.stream == s) {
        auto& dst = free_[Key{fallback, it->first.size}];
        dst.insert(dst.end(), it->second.begin(), it->second.end());
        it = free_.erase(it);
      } else {
        ++it;
      }
    }
    for (auto& [p, b] : live_)
      if (b.stream == s) b.stream = fallback;
    for (auto& pb : pending_)
      if (pb.key.stream == s) pb.key.stream = fallback;
  }

  // A free block of exactly `size` bytes (a bucket size) for work on `s`, or nullptr. Completed
  // pending blocks are collected first.
  void* take(size_t size, Stream s) {
    collect();
    auto it = free_.find(Key{s, size});
    if (it == free_.end() || it->second.empty()) return nullptr;
    void* p = it->second.back();
    it->second.pop_back();
    cached_ -= static_cast<int64_t>(size);
    live_[p] = Block{size, s, gen_};
    return p;
  }

  // A new block (from the system) is live on `s`.
  void add_live(void* p, size_t size, Stream s) { live_[p] = Block{size, s, gen_}; }
  bool is_live(void* p) const { return live_.count(p) != 0; }
  size_t live_size(void* p) const { return live_.at(p).size; }

  // Frees a live block while `current` is the current stream. Returns false when p is not live (a
  // bug of the caller; nothing changes). The block is free at once, or pending on events.
  bool give_back(void* p, Stream current) {
    auto it = live_.find(p);
    if (it == live_.end()) return false;
    const Block b = it->second;
    live_.erase(it);
    std::vector<Event> events;
    for (const auto& [s, g] : last_current_)
      if (s == b.stream ? fence_own_ : (g > b.gen || s == current)) events.push_back(ops_.record(s));
    if (last_current_.count(current) == 0 && (fence_own_ || !(current == b.stream)))
      events.push_back(ops_.record(current));
    if (fence_own_ && last_current_.count(b.stream) == 0 && !(current == b.stream))
      events.push_back(ops_.record(b.stream));
    cached_ += static_cast<int64_t>(b.size);
    if (events.empty()) {
      free_[Key{b.stream, b.size}].push_back(p);
    } else {
      pending_.push_back(Pending{p, Key{b.stream, b.size}, std::move(events)});
    }
    return true;
  }

  // Pending blocks whose events all completed become free.
  void collect() {
    for (size_t i = 0; i < pending_.size();) {
      Pending& pb = pending_[i];
      bool all = true;
      for (Event e : pb.events) all = all && ops_.done(e);
      if (!all) {
        ++i;
        continue;
      }
      for (Event e : pb.events) ops_.release(e);
      free_[pb.key].push_back(pb.ptr);
      pending_.erase(pending_.begin() + static_cast<std::ptrdiff_t>(i));
    }
  }

  // Waits for every pending block, then hands over every free block (ptr, size) and forgets them:
  // the owner returns them to the system (before giving up an allocation, or at shutdown).
  std::vector<std::pair<void*, size_t>> drain() {
    for (Pending& pb : pending_)
      for (Event e : pb.events) ops_.wait(e);
    collect();
    return take_free();
  }

  // Hands over the free blocks only (pending ones stay): for a pool that caches nothing (pinned
  // host memory is freed as soon as no stream can still use it).
  std::vector<std::pair<void*, size_t>> take_free() {
    std::vector<std::pair<void*, size_t>> out;
    for (auto& [key, ptrs] : free_)
      for (void* p : ptrs) out.emplace_back(p, key.size);
    free_.clear();
    cached_ = 0;
    for (const Pending& pb : pending_) cached_ += static_cast<int64_t>(pb.key.size);
    return out;
  }

  int64_t cached_bytes() const { return cached_; }  // free + pending
  size_t pending_count() const { return pending_.size(); }
  size_t live_count() const { return live_.size(); }

 private:
  struct Block {
    size_t size;
    Stream stream;  // current at allocation
    uint64_t gen;   // generation at allocation
  };
  struct Key {
    Stream stream;
    size_t size;
    bool operator<(const Key& o) const {
      const std::less<Stream> lt;
      if (lt(stream, o.stream)) return true;
      if (lt(o.stream, stream)) return false;
      return size < o.size;
    }
  };
  struct Pending {
    void* ptr;
    Key key;
    std::vector<Event> events;
  };

  Ops ops_;
  bool fence_own_;
  uint64_t gen_ = 0;
  std::map<Stream, uint64_t> last_current_;  // stream → generation at which it last became current
  std::unordered_map<void*, Block> live_;
  std::map<Key, std::vector<void*>> free_;
  std::vector<Pending> pending_;
  int64_t cached_ = 0;
};

}  // namespace moe
