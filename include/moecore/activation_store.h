// libmoecore — saved slots (docs/architecture.md).
// What a forward keeps for its backward lives in named slots, each with a policy:
//   keep       the tensor stays where it is;
//   recompute  the tensor is dropped at save time and rebuilt by its regenerate function (which
//              reads only kept slots or module state) the first time the backward asks for it;
//   offload    the tensor is copied to pinned host memory at save time and its device copy dropped;
//              get() (or an earlier prefetch()) copies it back, asynchronously on the device's
//              current stream; the pinned copy stays alive until an event recorded after that copy
//              has completed.
// Switching a policy never changes a bit of any output or gradient: regeneration reruns the same
// deterministic kernels on the same inputs, and offload copies bytes.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "moecore/backend.h"
#include "moecore/tensor.h"

namespace moe {

enum class SavePolicy : uint8_t { keep, recompute, offload };
const char* save_policy_name(SavePolicy p);

class ActivationStore {
 public:
  using Regenerate = std::function<Tensor()>;

  // Policies by slot name ("experts.act_output") or by prefix ending in '.' ("shared_experts.").
  // The longest matching rule wins; the default is keep.
  void set_policy(const std::string& slot_or_prefix, SavePolicy policy);
  SavePolicy policy(const std::string& slot) const;

  // Saves under the slot's policy. A slot saved without a regenerate function cannot be
  // recomputed: under a recompute rule it is kept (saved_policy() says so).
  void save(const std::string& slot, const Tensor& t, Regenerate regen = {});
  // The policy a saved slot actually has.
  SavePolicy saved_policy(const std::string& slot) const;
  bool has(const std::string& slot) const;
  // The tensor, restored to the device if it was offloaded or dropped.
  Tensor get(const std::string& slot);
  void prefetch(const std::string& slot);  // bring an offloaded slot back early (no-op otherwise)
  void drop(const std::string& slot);      // after its last use
  void clear();

  // Bytes currently held on the device / in pinned host memory by the slots.
  int64_t device_bytes() const;
  int64_t host_bytes() const;
  // How many tensors were regenerated / copied back since construction (for tests and logs).
  int64_t regenerations() const { return regenerations_; }
  int64_t reloads() const { return reloads_; }
  // Pinned host copies of reloaded slots kept alive until their host→device copy completed.
  int64_t reloads_in_flight() const { return static_cast<int64_t>(in_flight_.size()); }

 private:
  // A reload's pinned source and the event recorded after its host→device copy: the buffer is
  // released once the event has completed (checked at every save/get/clear), and the destructor
  // waits for what is left. Moving the store moves the buffers; nothing is released early.
  class InFlight {
   public:
    struct Entry {
      Tensor host;
      std::unique_ptr<Event> done;
    };
    InFlight() = default;
    InFlight(InFlight&&) noexcept = default;
    InFlight& operator=(InFlight&& o) noexcept;
    InFlight(const InFlight&) = delete;
    InFlight& operator=(const InFlight&) = delete;
    ~InFlight();
    void add(Tensor host, std::unique_ptr<Event> done) { entries_.push_back({std::move(host), std::move(done)}); }
    void reap();      // drops the entries whose copy completed
    void wait_all();  // waits for every copy, then drops them all (never throws)
    size_t size() const { return entries_.size(); }

   private:
    std::vector<Entry> entries_;
  };

  struct Slot {
    SavePolicy policy = SavePolicy::keep;
    Tensor device;   // kept or restored copy
    Tensor host;     // offloaded copy
    Regenerate regen;
    Device home = Device::cpu();
  };
  std::map<std::string, SavePolicy> rules_;
  std::map<std::string, Slot> slots_;
  InFlight in_flight_;
  int64_t regenerations_ = 0, reloads_ = 0;
};

}  // namespace moe
