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

ActivationStore::InFlight& ActivationStore::InFlight::operator=(InFlight&& o) noexcept {
  if (this != &o) {
    wait_all();
    entries_ = std::move(o.entries_);
    o.entries_.clear();
  }
  return *this;
}

ActivationStore::InFlight::~InFlight() { wait_all(); }

void ActivationStore::InFlight::reap() {
  for (size_t i = 0; i < entries_.size();) {
    if (entries_[i].done->query()) {
      entries_.erase(entries_.begin() + static_cast<std::ptrdiff_t>(i));
    } else {
      ++i;
    }
  }
}

void ActivationStore::InFlight::wait_all() {
  for (Entry& e : entries_) {
    try {
      e.done->synchronize();
    } catch (const std::exception&) {
      // A failed wait (a broken device) leaves nothing to protect; the buffer is freed below.
    }
  }
  entries_.clear();
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

void ActivationStore::save(const std::string& name, const Tensor& t, Regenerate regen) {
  MOE_CHECK(t.defined(), "ActivationStore::save: slot '", name, "' given an undefined tensor");
  in_flight_.reap();
  Slot s;
  s.policy = policy(name);
  if (s.policy == SavePolicy::recompute && !regen) s.policy = SavePolicy::keep;
  s.home = t.device();
  switch (s.policy) {
    case SavePolicy::keep:
      s.device = t;
      break;
    case SavePolicy::recompute:
      s.regen = std::move(regen);
      break;
    case SavePolicy::offload:
      s.host = t.to(t.device(), MemoryKind::pinned_host);
      break;
  }
  slots_[name] = std::move(s);
}

SavePolicy ActivationStore::saved_policy(const std::string& name) const {
  auto it = slots_.find(name);
  MOE_CHECK(it != slots_.end(), "ActivationStore::saved_policy: slot '", name, "' is not saved");
  return it->second.policy;
}

bool ActivationStore::has(const std::string& name) const { return slots_.count(name) != 0; }

Tensor ActivationStore::get(const std::string& name) {
  auto it = slots_.find(name);
  MOE_CHECK(it != slots_.end(), "ActivationStore::get: slot '", name,
            "' was not saved by this forward (is backward called twice, or before forward?)");
  Slot& s = it->second;
  if (s.device.defined()) return s.device;
  if (s.policy == SavePolicy::recompute) {
    s.device = s.regen();
    ++regenerations_;
  } else if (s.policy == SavePolicy::offload) {
    // The host→device copy is asynchronous on the home device's current stream: keep the pinned
    // source alive until an event recorded after it has completed.
    s.device = s.host.to(s.home, MemoryKind::device);
    Backend& b = get_backend(s.home);
    std::unique_ptr<Event> done = b.create_event();
    done->record(b.current_stream());
    in_flight_.add(std::move(s.host), std::move(done));
    s.host = Tensor();
    ++reloads_;
  }
  in_flight_.reap();
  MOE_CHECK_CODE(s.device.defined(), ErrorCode::internal, "ActivationStore::get: slot '", name, "' is empty");
  return s.device;
}

void ActivationStore::prefetch(const std::string& name) {
  auto it = slots_.find(name);
  if (it == slots_.end() || it->second.policy != SavePolicy::offload || it->second.device.defined()) return;
  get(name);
}

void ActivationStore::drop(const std::string& name) { slots_.erase(name); }

void ActivationStore::clear() {
  slots_.clear();
  in_flight_.reap();
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
