#include "common/gpu_gate.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "moecore/backend.h"
#if MOE_HAVE_CUDA
#include "device/cuda/cuda_backend.h"
#endif

namespace moe::test {

namespace {

bool exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

// The first executable `name` on PATH, or "".
std::string on_path(const std::string& name) {
  const char* path = std::getenv("PATH");
  if (!path) return "";
  std::stringstream ss(path);
  std::string dir;
  while (std::getline(ss, dir, ':')) {
    if (dir.empty()) continue;
    std::string f = dir + "/" + name;
    if (::access(f.c_str(), X_OK) == 0) return f;
  }
  return "";
}

}  // namespace

std::string machine_gpu_evidence() {
  if (const char* env = std::getenv("MOE_EXPECT_GPU")) {
    const std::string v(env);
    if (v == "0") return "";
    if (v == "1") return "MOE_EXPECT_GPU=1";
  }
  for (const char* node : {"/dev/nvidia0", "/dev/nvidiactl", "/proc/driver/nvidia/version"})
    if (exists(node)) return node;
  const std::string smi = on_path("nvidia-smi");
  if (!smi.empty()) return "nvidia-smi at " + smi;
  return "";
}

int gpu_suite_gate(const char* suite) {
  const std::string evidence = machine_gpu_evidence();
  if (backend_available(DeviceType::cuda)) {
    try {
      get_backend(Device::cuda(0));  // creates the context: a broken driver fails here
      return 0;
    } catch (const std::exception& e) {
      std::fprintf(stderr,
                   "FAIL: %s: a CUDA device is reported but libmoecore's CUDA backend could not be created: %s\n",
                   suite, e.what());
      return 1;
    }
  }
  std::string why;
#if MOE_HAVE_CUDA
  why = "the CUDA backend is built but unusable: " + cuda_status();
#else
  why = "this build of libmoecore has no CUDA backend (configure with -DMOE_CUDA=ON)";
#endif
  if (evidence.empty()) {
    std::printf("SKIP: %s: no GPU on this machine (%s; %s)\n", suite, why.c_str(), build_info().c_str());
    return 77;
  }
  std::fprintf(stderr,
               "FAIL: %s: this machine has a GPU (%s) but %s (%s). A GPU suite never skips on a GPU machine; "
               "set MOE_EXPECT_GPU=0 to skip on purpose.\n",
               suite, evidence.c_str(), why.c_str(), build_info().c_str());
  return 1;
}

}  // namespace moe::test
