// The one file that knows which backends exist.
#include <algorithm>
#include <cstdlib>
#include <thread>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "device/cpu/cpu_backend.h"
#include "kernels/cpu/cpu_kernels.h"
#include "moecore/backend.h"
#if MOE_HAVE_CUDA
#include "device/cuda/cuda_backend.h"
#endif

namespace moe {

namespace {
std::mutex g_mutex;

Backend& cpu() {
  static std::unique_ptr<Backend> b = [] {
    // MOE_NUM_THREADS sets the CPU kernels' thread count once, at first use. Without it (and
    // without OMP_NUM_THREADS), ranks started together on one machine share its cores: each takes
    // cores / ranks-on-this-machine threads, so mpirun -np 4 on 2 cores does not run 8 spinning
    // threads.
    if (const char* env = std::getenv("MOE_NUM_THREADS")) {
      int n = std::atoi(env);
      MOE_CHECK(n > 0, "MOE_NUM_THREADS: expected a positive integer, got '", env, "'");
      cpu_set_num_threads(n);
    } else if (!std::getenv("OMP_NUM_THREADS")) {
      int local = 0;
      for (const char* name : {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE"})
        if (const char* v = std::getenv(name)) local = std::max(local, std::atoi(v));
      if (local > 1) {
        int cores = static_cast<int>(std::thread::hardware_concurrency());
        cpu_set_num_threads(std::max(1, cores / local));
      }
    }
    return make_cpu_backend();
  }();
  return *b;
}

#if MOE_HAVE_CUDA
std::vector<std::unique_ptr<Backend>>& cuda_backends() {
  static std::vector<std::unique_ptr<Backend>> v(static_cast<size_t>(cuda_device_count()));
  return v;
}
#endif
}  // namespace

bool backend_available(DeviceType type) {
  if (type == DeviceType::cpu) return true;
#if MOE_HAVE_CUDA
  return cuda_device_count() > 0;
#else
  return false;
#endif
}

Backend& get_backend(Device device) {
  if (device.type == DeviceType::cpu) return cpu();
#if MOE_HAVE_CUDA
  int n = cuda_device_count();
  MOE_CHECK_CODE(device.index >= 0 && device.index < n, ErrorCode::not_supported, "get_backend: ",
                 device.str(), " requested but ", n, " CUDA device(s) are present");
  std::lock_guard<std::mutex> lock(g_mutex);
  auto& slot = cuda_backends()[static_cast<size_t>(device.index)];
  if (!slot) slot = make_cuda_backend(device.index);
  return *slot;
#else
  MOE_THROW(ErrorCode::not_supported, "get_backend: ", device.str(),
            " requested but this build of libmoecore has no CUDA backend (configure with -DMOE_CUDA=ON)");
#endif
}

std::vector<Device> available_devices() {
  std::vector<Device> out{Device::cpu()};
#if MOE_HAVE_CUDA
  for (int i = 0; i < cuda_device_count(); ++i) out.push_back(Device::cuda(i));
#endif
  return out;
}

Device default_device() {
  const char* env = std::getenv("MOE_DEVICE");
  if (env) {
    std::string s(env);
    if (s == "cpu") return Device::cpu();
    if (s == "cuda") {
      MOE_CHECK_CODE(backend_available(DeviceType::cuda), ErrorCode::not_supported,
                     "MOE_DEVICE=cuda but no CUDA device is available (", build_info(), ")");
      return Device::cuda(0);
    }
    MOE_THROW(ErrorCode::invalid_argument, "MOE_DEVICE: expected 'cpu' or 'cuda', got '", s, "'");
  }
  return backend_available(DeviceType::cuda) ? Device::cuda(0) : Device::cpu();
}

std::string build_info() {
  std::string s = "backends: cpu";
#if MOE_HAVE_CUDA
  s += ", cuda (" + std::to_string(cuda_device_count()) + " device(s) present)";
#else
  s += " (built without CUDA)";
#endif
  s += "; gemm: ";
  s += cpu_gemm_info();
#if MOE_HAVE_MPI
  s += "; mpi: yes";
#else
  s += "; mpi: no";
#endif
#if MOE_HAVE_NCCL
  s += "; nccl: yes";
#else
  s += "; nccl: no";
#endif
  return s;
}

void set_num_threads(int n) {
  if (n > 0) cpu_set_num_threads(n);
}
int num_threads() { return cpu_num_threads(); }

}  // namespace moe
