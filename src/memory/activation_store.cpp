// Saved slots and the offload manager (docs/memory.md).
//
//   save (offload)                               get / prefetch (offload)
//   current stream: … producer ─ record P         current stream: allocate dst ─ record R
//   d2h stream:     wait P ─ copy t → pinned      h2d stream:     wait R ─ copy pinned → dst ─ record D
//                   ─ record C                    current stream: wait D (in get) ─ consumers
//   pinned buffer: held by the slot               pinned buffer: back to the pool once D completed
// The device→host copy is asynchronous (Backend::copy_to_pinned_async): the manager holds the
// device tensor until C completed (the caller drops it at once), and the reload's host→device copy
// waits for C before it reads the pinned buffer. On the CPU back end every copy is inline.
#include "moecore/activation_store.h"

#include <cstddef>
#include <memory>
#include <utility>

#include "moecore/backend.h"
#include "moecore/error.h"

namespace moe {

const char* save_policy_name(SavePolicy p) {
  switch (p) {
    case SavePolicy::keep: return "keep";
    case SavePolicy::recompute: return "recompute";
    case SavePolicy::offload: return "offload";
  }
  return "?";
}

namespace {

// The side streams of one device, for the whole process (never destroyed: stores may outlive
// any static object that would own them).
struct SideStreams {
  Device device;
  std::unique_ptr<Stream> d2h, h2d;
};

SideStreams& side_streams(Device d) {
  static auto* table = new std::vector<std::unique_ptr<SideStreams>>();
  for (auto& s : *table)
    if (s->device == d) return *s;
  Backend& b = get_backend(d);
  table->push_back(std::make_unique<SideStreams>(SideStreams{d, b.create_stream(), b.create_stream()}));
  return *table->back();
}

std::string pool_key(Device d, DType dtype, int64_t numel) {
  return d.str() + "/" + dtype_name(dtype) + "/" + std::to_string(numel);
}

bool completed(const std::shared_ptr<Event>& e) { return !e || e->query(); }

}  // namespace

// ---- OffloadManager ----

OffloadManager::~OffloadManager() {
  for (Pending& p : pending_) {
    try {
      if (p.done) p.done->synchronize();
    } catch (const std::exception&) {
      // A failed wait (a broken device) leaves nothing to protect; the buffer is freed below.
    }
  }
  pending_.clear();
  free_.clear();
}

Tensor OffloadManager::acquire(DType dtype, int64_t numel, Device home) {
  reap();
  auto it = free_.find(pool_key(home, dtype, numel));
  if (it != free_.end() && !it->second.empty()) {
    Tensor t = std::move(it->second.back());
    it->second.pop_back();
    ++reused_;
    return t;
  }
  ++created_;
  return Tensor::empty({numel}, dtype, home, MemoryKind::pinned_host);  // (numel) pinned
}

void OffloadManager::release(Tensor host, std::shared_ptr<Event> done) {
  if (!host.defined()) return;
  MOE_CHECK_CODE(host.memory_kind() == MemoryKind::pinned_host, ErrorCode::internal,
                 "OffloadManager::release: expected a pinned host buffer, got ", host.desc());
  pending_.push_back({host.view({host.numel()}), std::move(done)});
  reap();
}

void OffloadManager::reap() {
  for (size_t i = 0; i < pending_.size();) {
    if (completed(pending_[i].done)) {
      Tensor h = std::move(pending_[i].host);
      // Pinned buffers go to the pool; a device source held for its copy is simply dropped.
      if (reuse_ && h.memory_kind() == MemoryKind::pinned_host)
        free_[pool_key(h.device(), h.dtype(), h.numel())].push_back(std::move(h));
      pending_.erase(pending_.begin() + static_cast<std::ptrdiff_t>(i));
    } else {
      ++i;
    }
  }
}

void OffloadManager::trim() {
  reap();
  free_.clear();
}

OffloadManager::Stats OffloadManager::stats() {
  reap();
  Stats s;
  s.buffers_created = created_;
  s.buffers_reused = reused_;
  for (const auto& [k, v] : free_)
    for (const Tensor& t : v) s.pooled_bytes += static_cast<int64_t>(t.nbytes());
  s.in_flight = static_cast<int64_t>(pending_.size());
  return s;
}

OffloadManager::Copy OffloadManager::to_host(const Tensor& t) {
  const Device home = t.device();
  Backend& b = get_backend(home);
  SideStreams& ss = side_streams(home);
  std::unique_ptr<Event> produced = b.create_event();  // after the producer
  produced->record(b.current_stream());
  produced->wait(*ss.d2h);
  Copy c;
  c.dst = acquire(t.dtype(), t.numel(), home).view(t.shape());  // pinned, shaped like t
  MOE_CHECK_CODE(c.dst.nbytes() == t.nbytes(), ErrorCode::internal, "OffloadManager::to_host: pinned buffer of ",
                 c.dst.nbytes(), " bytes for a tensor of ", t.nbytes());
  {
    StreamGuard g(b, *ss.d2h);
    b.copy_to_pinned_async(c.dst.data(), t.data(), t.nbytes());
  }
  c.done = b.create_event();
  c.done->record(*ss.d2h);
  // The copy may still read t: hold it until done (dropped at once where copies are inline).
  pending_.push_back({t, c.done});
  reap();
  return c;
}

OffloadManager::Copy OffloadManager::to_device(const Tensor& host, Device home, const std::shared_ptr<Event>& after) {
  Backend& b = get_backend(home);
  SideStreams& ss = side_streams(home);
  Copy c;
  c.dst = Tensor::empty(host.shape(), host.dtype(), home);  // allocated on the current stream
  std::unique_ptr<Event> ready = b.create_event();
  ready->record(b.current_stream());
  ready->wait(*ss.h2d);
  if (after) after->wait(*ss.h2d);  // the device→host copy that filled `host` has landed
  {
    StreamGuard g(b, *ss.h2d);
    c.dst.copy_from(host);
  }
  c.done = b.create_event();
  c.done->record(*ss.h2d);
  return c;
}

// ---- ActivationStore ----

ActivationStore::~ActivationStore() {
  try {
    clear();
  } catch (const std::exception&) {
    // The slots' buffers are freed by their destructors; nothing can be reported from here.
  }
}

ActivationStore& ActivationStore::operator=(ActivationStore&& o) noexcept {
  if (this != &o) {
    try {
      clear();
    } catch (const std::exception&) {
    }
    rules_ = std::move(o.rules_);
    slots_ = std::move(o.slots_);
    offload_ = std::move(o.offload_);
    min_offload_numel_ = o.min_offload_numel_;
    next_order_ = o.next_order_;
    regenerations_ = o.regenerations_;
    reloads_ = o.reloads_;
    prefetches_ = o.prefetches_;
    o.slots_.clear();
  }
  return *this;
}

void ActivationStore::set_policy(const std::string& slot_or_prefix, SavePolicy policy) {
  MOE_CHECK(!slot_or_prefix.empty(), "ActivationStore::set_policy: empty slot name");
  rules_[slot_or_prefix] = policy;
}

SavePolicy ActivationStore::policy(const std::string& slot) const {
  SavePolicy p = SavePolicy::keep;
  size_t best = 0;
  for (const auto& [rule, pol] : rules_) {
    bool match = rule == slot || (rule.back() == '.' && slot.compare(0, rule.size(), rule) == 0);
    if (match && rule.size() >= best) {
      best = rule.size();
      p = pol;
    }
  }
  return p;
}

OffloadManager& ActivationStore::manager() {
  if (!offload_) offload_ = std::make_shared<OffloadManager>(/*reuse=*/false);
  return *offload_;
}

void ActivationStore::save(const std::string& name, const Tensor& t, Regenerate regen, SaveOwner owner) {
  MOE_CHECK(t.defined(), "ActivationStore::save: slot '", name, "' given an undefined tensor");
  Slot s;
  s.policy = policy(name);
  if (s.policy == SavePolicy::recompute && !regen) s.policy = SavePolicy::keep;
  // Offloading a tensor someone else holds frees nothing; small ones are not worth a copy.
  if (s.policy == SavePolicy::offload &&
      (owner == SaveOwner::caller || t.numel() < min_offload_numel_ || t.memory_kind() == MemoryKind::pinned_host))
    s.policy = SavePolicy::keep;
  s.home = t.device();
  s.order = next_order_++;
  switch (s.policy) {
    case SavePolicy::keep:
      s.device = t;
      break;
    case SavePolicy::recompute:
      s.regen = std::move(regen);
      break;
    case SavePolicy::offload: {
      OffloadManager::Copy c = manager().to_host(t);
      s.host = std::move(c.dst);
      s.copied = std::move(c.done);
      break;
    }
  }
  auto it = slots_.find(name);
  if (it != slots_.end()) {
    retire(it->second);
    it->second = std::move(s);
  } else {
    slots_.emplace(name, std::move(s));
  }
}

SavePolicy ActivationStore::saved_policy(const std::string& name) const {
  auto it = slots_.find(name);
  MOE_CHECK(it != slots_.end(), "ActivationStore::saved_policy: slot '", name, "' is not saved");
  return it->second.policy;
}

bool ActivationStore::has(const std::string& name) const { return slots_.count(name) != 0; }

void ActivationStore::start_reload(Slot& s) {
  OffloadManager::Copy c = manager().to_device(s.host, s.home, s.copied);
  s.device = std::move(c.dst);
  s.copied = std::move(c.done);
  s.reload_started = true;
  // The pinned source goes back to the pool once the host→device copy completed.
  manager().release(std::move(s.host), s.copied);
  s.host = Tensor();
}

Tensor ActivationStore::get(const std::string& name) {
  auto it = slots_.find(name);
  MOE_CHECK(it != slots_.end(), "ActivationStore::get: slot '", name,
            "' was not saved by this forward (is backward called twice, or before forward?)");
  Slot& s = it->second;
  if (s.policy == SavePolicy::offload) {
    if (!s.device.defined()) start_reload(s);
    if (s.reload_started) {
      Backend& b = get_backend(s.home);
      s.copied->wait(b.current_stream());  // consumers on the current stream see the copied bytes
      s.reload_started = false;
      ++reloads_;
      // Prefetch the offloaded slot saved just before this one: the backward needs it next.
      Slot* next = nullptr;
      for (auto& [n, o] : slots_)
        if (o.policy == SavePolicy::offload && o.host.defined() && o.order < s.order && (!next || o.order > next->order))
          next = &o;
      if (next) {
        start_reload(*next);
        ++prefetches_;
      }
    }
  } else if (!s.device.defined() && s.policy == SavePolicy::recompute) {
    s.device = s.regen();
    ++regenerations_;
  }
  MOE_CHECK_CODE(s.device.defined(), ErrorCode::internal, "ActivationStore::get: slot '", name, "' is empty");
  return s.device;
}

void ActivationStore::prefetch(const std::string& name) {
  auto it = slots_.find(name);
  if (it == slots_.end() || it->second.policy != SavePolicy::offload || it->second.device.defined()) return;
  start_reload(it->second);
  ++prefetches_;
}

void ActivationStore::retire(Slot& s) {
  if (s.host.defined()) manager().release(std::move(s.host), s.copied);
  s.host = Tensor();
  s.device = Tensor();
}

void ActivationStore::drop(const std::string& name) {
  auto it = slots_.find(name);
  if (it == slots_.end()) return;
  retire(it->second);
  slots_.erase(it);
}

void ActivationStore::clear() {
  for (auto& [n, s] : slots_) retire(s);
  slots_.clear();
}

int64_t ActivationStore::device_bytes() const {
  int64_t b = 0;
  for (const auto& [n, s] : slots_)
    if (s.device.defined()) b += static_cast<int64_t>(s.device.nbytes());
  return b;
}

int64_t ActivationStore::host_bytes() const {
  int64_t b = 0;
  for (const auto& [n, s] : slots_)
    if (s.host.defined()) b += static_cast<int64_t>(s.host.nbytes());
  return b;
}

}  // namespace moe
