#include "moecore/tensor.h"

#include <atomic>
#include <cstring>
#include <memory>
#include <sstream>

#include "moecore/backend.h"

namespace moe {

std::string Device::str() const {
  return type == DeviceType::cpu ? std::string("cpu") : "cuda:" + std::to_string(index);
}

std::string shape_str(const Shape& shape) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  if (shape.size() == 1) os << ",";
  os << ")";
  return os.str();
}

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    MOE_CHECK(d >= 0, "shape ", shape_str(shape), " has a negative dimension");
    n *= d;
  }
  return n;
}

Storage::Storage(Device device, MemoryKind kind, size_t bytes) : device_(device), kind_(kind), bytes_(bytes) {
  if (bytes_ > 0) ptr_ = get_backend(device_).allocate(bytes_, kind_);
}

Storage::Storage(Device device, void* ptr, size_t bytes, std::shared_ptr<const void> owner)
    : device_(device), kind_(MemoryKind::device), bytes_(bytes), ptr_(ptr), owner_(std::move(owner)) {
  MOE_CHECK(ptr_ || bytes_ == 0, "Storage: external memory of ", bytes_, " bytes at a null pointer");
}

Storage::~Storage() {
  if (ptr_ && !owner_) get_backend(device_).deallocate(ptr_, bytes_, kind_);
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device, MemoryKind kind) {
  Tensor t;
  t.shape_ = shape;
  t.numel_ = shape_numel(shape);
  t.dtype_ = dtype;
  t.storage_ = std::make_shared<Storage>(device, kind, t.nbytes());
  return t;
}

Tensor Tensor::from_external(void* data, const Shape& shape, DType dtype, Device device,
                             std::shared_ptr<const void> owner) {
  MOE_CHECK(owner != nullptr, "Tensor::from_external: no owner keeps the memory at ", data, " valid");
  Tensor t;
  t.shape_ = shape;
  t.numel_ = shape_numel(shape);
  t.dtype_ = dtype;
  t.storage_ = std::make_shared<Storage>(device, data, t.nbytes(), std::move(owner));
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device, MemoryKind kind) {
  Tensor t = empty(shape, dtype, device, kind);
  t.zero_();
  return t;
}

int64_t Tensor::size(int64_t dim) const {
  int64_t n = ndim();
  int64_t d = dim < 0 ? dim + n : dim;
  MOE_CHECK(d >= 0 && d < n, "Tensor::size: dim ", dim, " out of range for ", desc());
  return shape_[static_cast<size_t>(d)];
}

Device Tensor::device() const { return storage_ ? storage_->device() : Device::cpu(); }
MemoryKind Tensor::memory_kind() const { return storage_ ? storage_->kind() : MemoryKind::device; }

std::string Tensor::desc() const {
  if (!defined()) return "<undefined tensor>";
  std::string s = shape_str(shape_) + " " + dtype_name(dtype_) + " " + device().str();
  if (memory_kind() == MemoryKind::pinned_host) s += " (pinned host)";
  return s;
}

void* Tensor::data() const {
  MOE_CHECK(defined(), "Tensor::data on an undefined tensor");
  if (!storage_->data()) return nullptr;
  return static_cast<char*>(storage_->data()) + offset_;
}

Tensor Tensor::view(const Shape& shape) const {
  MOE_CHECK(defined(), "Tensor::view on an undefined tensor");
  MOE_CHECK(shape_numel(shape) == numel_, "Tensor::view: cannot view ", desc(), " as ", shape_str(shape),
            " (", numel_, " vs ", shape_numel(shape), " elements)");
  Tensor t = *this;
  t.shape_ = shape;
  return t;
}

Tensor Tensor::narrow(int64_t start, int64_t length) const {
  MOE_CHECK(defined() && ndim() >= 1, "Tensor::narrow needs a tensor with at least one dim, got ", desc());
  MOE_CHECK(start >= 0 && length >= 0 && start + length <= shape_[0], "Tensor::narrow: rows [", start, ", ",
            start + length, ") out of range for ", desc());
  int64_t row = numel_ / (shape_[0] == 0 ? 1 : shape_[0]);
  if (shape_[0] == 0) row = 0;
  Tensor t = *this;
  t.shape_[0] = length;
  t.numel_ = row * length;
  t.offset_ = offset_ + static_cast<size_t>(start * row) * dtype_size(dtype_);
  return t;
}

namespace {
std::atomic<int64_t> g_host_reads{0};
void count_host_read() { g_host_reads.fetch_add(1, std::memory_order_relaxed); }
}  // namespace

int64_t host_read_count() { return g_host_reads.load(std::memory_order_relaxed); }

namespace {
bool on_host(const Tensor& t) { return t.device().is_cpu() || t.memory_kind() == MemoryKind::pinned_host; }
}  // namespace

// The copy runs on the stream of the backend that owns device memory in it: the destination's for
// host→device and device→device, the source's for device→host (so it is ordered after the work that
// wrote the source). Between two devices (device memory on both) the destination's stream first
// waits for the source device's current stream (the work that wrote the source), and the source's
// stream then waits for the copy (so the source is not overwritten or freed while it is read).
void Tensor::copy_from(const Tensor& src) {
  MOE_CHECK(defined() && src.defined(), "Tensor::copy_from: undefined tensor");
  MOE_CHECK(src.dtype_ == dtype_ && src.numel_ == numel_, "Tensor::copy_from: expected ", desc(),
            "-compatible source (same dtype and element count), got ", src.desc());
  size_t bytes = nbytes();
  if (bytes == 0) return;
  bool dh = on_host(*this), sh = on_host(src);
  if (dh && sh && device().is_cpu() && src.device().is_cpu()) {
    std::memmove(data(), src.data(), bytes);
    return;
  }
  if (device().is_cpu() && !src.device().is_cpu() && src.memory_kind() == MemoryKind::device) count_host_read();
  CopyKind kind = dh ? (sh ? CopyKind::host_to_host : CopyKind::device_to_host)
                     : (sh ? CopyKind::host_to_device : CopyKind::device_to_device);
  Device dev = device();
  if (kind == CopyKind::device_to_host || (kind == CopyKind::host_to_host && device().is_cpu())) dev = src.device();
  if (kind == CopyKind::device_to_device && src.device() != device()) {
    Backend& sb = get_backend(src.device());
    Backend& db = get_backend(device());
    std::unique_ptr<Event> written = sb.create_event();
    written->record(sb.current_stream());
    written->wait(db.current_stream());
    db.copy(data(), src.data(), bytes, kind);
    std::unique_ptr<Event> read = db.create_event();
    read->record(db.current_stream());
    read->wait(sb.current_stream());
    return;
  }
  get_backend(dev).copy(data(), src.data(), bytes, kind);
}

void Tensor::copy_from_host(const void* src, size_t bytes) {
  MOE_CHECK(bytes == nbytes(), "Tensor::copy_from_host: expected ", nbytes(), " bytes for ", desc(), ", got ", bytes);
  if (bytes == 0) return;
  if (on_host(*this) && device().is_cpu()) {
    std::memcpy(data(), src, bytes);
    return;
  }
  get_backend(device()).copy(data(), src, bytes, on_host(*this) ? CopyKind::host_to_host : CopyKind::host_to_device);
}

void Tensor::copy_to_host(void* dst, size_t bytes) const {
  MOE_CHECK(bytes == nbytes(), "Tensor::copy_to_host: expected ", nbytes(), " bytes for ", desc(), ", got ", bytes);
  count_host_read();
  if (bytes == 0) return;
  if (device().is_cpu()) {
    std::memcpy(dst, data(), bytes);
    return;
  }
  // Both copy kinds wait for the stream before returning (Backend::copy), so the host may read dst.
  get_backend(device()).copy(dst, data(), bytes, on_host(*this) ? CopyKind::host_to_host : CopyKind::device_to_host);
}

void Tensor::zero_() {
  MOE_CHECK(defined(), "Tensor::zero_ on an undefined tensor");
  if (nbytes() == 0) return;
  if (device().is_cpu() || memory_kind() == MemoryKind::pinned_host) {
    if (!device().is_cpu()) get_backend(device()).current_stream().synchronize();
    std::memset(data(), 0, nbytes());
    return;
  }
  get_backend(device()).memset_zero(data(), nbytes());
}

Tensor Tensor::to(Device device, MemoryKind kind) const {
  Tensor t = empty(shape_, dtype_, device, kind);
  t.copy_from(*this);
  return t;
}

Tensor Tensor::clone() const { return to(device(), memory_kind()); }

void Tensor::check_dtype(DType expected, const char* where) const {
  MOE_CHECK(defined(), where, ": undefined tensor");
  MOE_CHECK(dtype_ == expected, where, ": expected dtype ", dtype_name(expected), ", got ", desc());
}

void Tensor::check_shape(const Shape& expected, const char* what) const {
  MOE_CHECK(defined(), what, ": undefined tensor, expected shape ", shape_str(expected));
  MOE_CHECK(shape_ == expected, what, ": expected shape ", shape_str(expected), ", got ", desc());
}

size_t Tensor::storage_bytes() const { return storage_ ? storage_->bytes() : 0; }

}  // namespace moe
