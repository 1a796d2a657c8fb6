// libmoecore — tensors.
// A Tensor is a shape, a dtype, a device and a contiguous span of shared storage. Views share the
// storage (row slices along dim 0, reshapes); nothing here launches kernels except copies.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moecore/dtype.h"
#include "moecore/error.h"

namespace moe {

enum class DeviceType : uint8_t { cpu, cuda };

struct Device {
  DeviceType type = DeviceType::cpu;
  int index = 0;
  static Device cpu() { return {DeviceType::cpu, 0}; }
  static Device cuda(int index = 0) { return {DeviceType::cuda, index}; }
  bool is_cpu() const { return type == DeviceType::cpu; }
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
  std::string str() const;  // "cpu", "cuda:0"
};

// Where an allocation lives: the device's own memory, or page-locked host memory owned by that
// device's backend (the offload target; on the CPU backend a separate counter of host memory).
enum class MemoryKind : uint8_t { device, pinned_host };

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& shape);  // "(4, 8)"
int64_t shape_numel(const Shape& shape);

// Owns one allocation; frees it through the backend that made it. An external storage (memory the
// backend did not allocate, e.g. a host segment shared between processes) frees nothing: it keeps
// `owner` alive instead, and the backend's memory counters never see it.
class Storage {
 public:
  Storage(Device device, MemoryKind kind, size_t bytes);
  Storage(Device device, void* ptr, size_t bytes, std::shared_ptr<const void> owner);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  void* data() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }
  MemoryKind kind() const { return kind_; }

 private:
  Device device_;
  MemoryKind kind_;
  size_t bytes_;
  void* ptr_ = nullptr;
  std::shared_ptr<const void> owner_;  // external storage only: what keeps ptr_ valid
};

class Tensor {
 public:
  Tensor() = default;  // undefined tensor

  static Tensor empty(const Shape& shape, DType dtype, Device device = Device::cpu(),
                      MemoryKind kind = MemoryKind::device);
  static Tensor zeros(const Shape& shape, DType dtype, Device device = Device::cpu(),
                      MemoryKind kind = MemoryKind::device);
  // A tensor over memory the caller owns (`owner` keeps it valid while any view lives): numel
  // elements of dtype at `data`, on `device`. Nothing is copied and nothing is freed.
  static Tensor from_external(void* data, const Shape& shape, DType dtype, Device device,
                              std::shared_ptr<const void> owner);
  // Copies `host` (numel elements of T) into a new tensor on `device`.
  template <class T>
  static Tensor from_vector(const std::vector<T>& host, const Shape& shape,
                            Device device = Device::cpu()) {
    Tensor t = empty(shape, dtype_of<T>::value, device);
    MOE_CHECK(static_cast<int64_t>(host.size()) == t.numel(), "Tensor::from_vector: expected ",
              t.numel(), " elements for shape ", shape_str(shape), ", got ", host.size());
    t.copy_from_host(host.data(), host.size() * sizeof(T));
    return t;
  }
  // Copies the elements to a host vector (synchronising the device).
  template <class T>
  std::vector<T> to_vector() const {
    check_dtype(dtype_of<T>::value, "Tensor::to_vector");
    std::vector<T> out(static_cast<size_t>(numel()));
    copy_to_host(out.data(), out.size() * sizeof(T));
    return out;
  }

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int64_t ndim() const { return static_cast<int64_t>(shape_.size()); }
  int64_t size(int64_t dim) const;  // negative dims count from the end
  int64_t numel() const { return numel_; }
  size_t nbytes() const { return static_cast<size_t>(numel_) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const;
  MemoryKind memory_kind() const;
  std::string desc() const;  // "(4, 8) f32 cpu"

  void* data() const;
  template <class T>
  T* data_as() const {
    check_dtype(dtype_of<T>::value, "Tensor::data_as");
    return static_cast<T*>(data());
  }

  // Views sharing storage.
  Tensor view(const Shape& shape) const;              // same numel
  Tensor narrow(int64_t start, int64_t length) const;  // rows [start, start+length) of dim 0

  // Copies.
  Tensor to(Device device, MemoryKind kind = MemoryKind::device) const;
  Tensor clone() const;
  Tensor to_dtype(DType dtype) const;  // a converted copy (float dtypes), on the same device
  void copy_from(const Tensor& src);  // same shape numel and dtype; any devices
  void copy_from_host(const void* src, size_t bytes);
  void copy_to_host(void* dst, size_t bytes) const;
  void zero_();

  void check_dtype(DType expected, const char* where) const;
  // Throws naming `what` unless the shape equals `expected`.
  void check_shape(const Shape& expected, const char* what) const;
  // Bytes of the underlying allocation (shared by views).
  size_t storage_bytes() const;
  bool shares_storage_with(const Tensor& other) const { return storage_ == other.storage_; }

 private:
  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;  // bytes from storage start
  Shape shape_;
  int64_t numel_ = 0;
  DType dtype_ = DType::f32;
};

// Host reads of tensor data: every Tensor::to_vector / copy_to_host call (on any back end, the CPU
// included), and every copy of a device tensor of another back end into a CPU tensor. Module code
// that asks for tensor data on the host does so through these, and on a GPU each one is a
// device→host synchronisation, so a CPU run shows how many syncs a GPU run makes: the host-sync-free
// layer path makes none per step (docs/gpu.md). Process-wide, thread-safe, never reset.
int64_t host_read_count();

}  // namespace moe
