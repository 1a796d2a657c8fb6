// libmoecore — saved slots and the offload manager (docs/memory.md).
// What a forward keeps for its backward lives in named slots, each with a policy:
//   keep       the tensor stays where it is;
//   recompute  the tensor is dropped at save time and rebuilt by its regenerate function (which
//              reads only kept slots or module state) the first time the backward asks for it;
//   offload    the tensor is copied to pinned host memory at save time (on the offload manager's
//              device→host side stream, after the work queued so far on the current stream) and its
//              device copy dropped once that copy completed; get() (or an earlier prefetch()) copies
//              it back on the host→device side stream, makes the current stream wait for that copy,
//              and starts the prefetch of the offloaded slot saved just before it (the one the
//              backward needs next). A pinned buffer goes back to the pool (or is freed) only after
//              an event recorded after its last copy has completed.
// A slot saved as held by the caller (SaveOwner::caller) is never offloaded: its device memory
// would not be freed. Tensors under the store's minimum offload size stay kept (Megatron's
// min_offloaded_tensor_size, in elements).
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

// Who else holds a saved tensor: the store alone (offloading it frees its device memory) or the
// caller too (offloading it would free nothing, so it is kept).
enum class SaveOwner : uint8_t { store, caller };

// Pinned host buffers and the side streams of activation offloading. One manager is shared by
// the stores of a layer or model (every micro-batch, every step), so its pinned buffers are reused
// across steps: a buffer of a given dtype and size is handed out again once the copy that last
// used it completed. reuse = false frees every buffer once its copy completed (a bare store). The
// side streams are the backend's, one pair per device for the process; on the CPU they are inline.
class OffloadManager {
 public:
  explicit OffloadManager(bool reuse = true) : reuse_(reuse) {}
  ~OffloadManager();  // waits for every copy in flight, then frees every buffer
  OffloadManager(const OffloadManager&) = delete;
  OffloadManager& operator=(const OffloadManager&) = delete;

  struct Copy {
    Tensor dst;
    std::shared_ptr<Event> done;  // recorded after the copy on its side stream
  };
  // t (device) → a pinned buffer, on the device→host stream after the current stream's work,
  // asynchronously (Backend::copy_to_pinned_async): the manager holds t until `done` completed, so
  // the caller may drop it at once; read dst only after `done`.
  Copy to_host(const Tensor& t);
  // host (pinned) → a new device tensor on `home` (allocated on the current stream), on the
  // host→device stream after the current stream's work and after `after` (the copy that filled
  // host; null: none). The caller makes its stream wait for done.
  Copy to_device(const Tensor& host, Device home, const std::shared_ptr<Event>& after = nullptr);
  // A pinned buffer back to the pool (or freed) once `done` has completed (null: now).
  void release(Tensor host, std::shared_ptr<Event> done);
  void trim();  // frees the pooled buffers (none in flight)

  struct Stats {
    int64_t buffers_created = 0;  // pinned buffers allocated
    int64_t buffers_reused = 0;   // hand-outs served from the pool
    int64_t pooled_bytes = 0;     // free pinned bytes in the pool
    int64_t in_flight = 0;        // buffers (pinned, or a device source) whose copy has not completed
  };
  Stats stats();  // reaps first

 private:
  Tensor acquire(DType dtype, int64_t numel, Device home);
  void reap();
  struct Pending {
    Tensor host;
    std::shared_ptr<Event> done;
  };
  bool reuse_;
  std::map<std::string, std::vector<Tensor>> free_;  // by (device, dtype, numel)
  std::vector<Pending> pending_;
  int64_t created_ = 0, reused_ = 0;
};

class ActivationStore {
 public:
  using Regenerate = std::function<Tensor()>;
  ActivationStore() = default;
  ~ActivationStore();
  ActivationStore(ActivationStore&&) noexcept = default;
  ActivationStore& operator=(ActivationStore&&) noexcept;
  ActivationStore(const ActivationStore&) = delete;
  ActivationStore& operator=(const ActivationStore&) = delete;

  // Policies by slot name ("experts.act_output") or by prefix ending in '.' ("shared_experts.").
  // The longest matching rule wins; the default is keep.
  void set_policy(const std::string& slot_or_prefix, SavePolicy policy);
  SavePolicy policy(const std::string& slot) const;
  // The manager offloaded slots use (shared by the stores of a layer or model); without one the
  // store makes its own that frees each pinned buffer after its copy.
  void set_offload_manager(std::shared_ptr<OffloadManager> manager) { offload_ = std::move(manager); }
  // Tensors with fewer elements than this stay kept under an offload rule (default 0: every one).
  void set_min_offload_numel(int64_t n) { min_offload_numel_ = n; }

  // Saves under the slot's policy. A slot saved without a regenerate function cannot be
  // recomputed and one held by the caller is not offloaded: both are kept (saved_policy() says so).
  void save(const std::string& slot, const Tensor& t, Regenerate regen = {}, SaveOwner owner = SaveOwner::store);
  // The policy a saved slot actually has.
  SavePolicy saved_policy(const std::string& slot) const;
  bool has(const std::string& slot) const;
  // The tensor, restored to the device if it was offloaded or dropped.
  Tensor get(const std::string& slot);
  void prefetch(const std::string& slot);  // start bringing an offloaded slot back (no-op otherwise)
  void drop(const std::string& slot);      // after its last use
  void clear();

  // Bytes currently held on the device / in pinned host memory by the slots.
  int64_t device_bytes() const;
  int64_t host_bytes() const;
  // How many tensors were regenerated / copied back / prefetched since construction.
  int64_t regenerations() const { return regenerations_; }
  int64_t reloads() const { return reloads_; }
  int64_t prefetches() const { return prefetches_; }
  // Pinned buffers released by this store's manager whose copy has not completed yet.
  int64_t reloads_in_flight() const { return offload_ ? offload_->stats().in_flight : 0; }  // reaps first

 private:
  struct Slot {
    SavePolicy policy = SavePolicy::keep;
    Tensor device;   // kept or restored copy
    Tensor host;     // offloaded copy (pinned)
    std::shared_ptr<Event> copied;  // after the last copy of host (to host, or back to the device)
    bool reload_started = false;    // device holds a copy in progress (wait for `copied` before use)
    Regenerate regen;
    Device home = Device::cpu();
    int64_t order = 0;  // save order (offloaded slots are prefetched in reverse)
  };
  OffloadManager& manager();
  void start_reload(Slot& s);
  void retire(Slot& s);  // hands its pinned buffer back to the manager
  std::map<std::string, SavePolicy> rules_;
  std::map<std::string, Slot> slots_;
  std::shared_ptr<OffloadManager> offload_;
  int64_t min_offload_numel_ = 0;
  int64_t next_order_ = 0;
  int64_t regenerations_ = 0, reloads_ = 0, prefetches_ = 0;
};

}  // namespace moe
