#include "daemon/devices.h"

#include <dlfcn.h>
#include <fmt/format.h>

namespace llamad::daemon {
namespace {

int CudaDeviceCount() {
  void* driver = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (driver == nullptr) return 0;
  using InitFn = int (*)(unsigned);
  using CountFn = int (*)(int*);
  auto init = reinterpret_cast<InitFn>(::dlsym(driver, "cuInit"));
  auto count = reinterpret_cast<CountFn>(::dlsym(driver, "cuDeviceGetCount"));
  int n = 0;
  if (init == nullptr || count == nullptr || init(0) != 0 || count(&n) != 0) n = 0;
  ::dlclose(driver);
  return n;
}

}  // namespace

absl::StatusOr<Devices> ResolveDevices(const std::string& spec) {
  if (spec == "auto") {
    const int gpus = CudaDeviceCount();
    return gpus > 0 ? Devices{"cuda", gpus} : Devices{"cpu", 1};
  }
  const size_t colon = spec.find(':');
  const std::string kind = spec.substr(0, colon);
  if (colon == std::string::npos || (kind != "cpu" && kind != "cuda")) {
    return absl::InvalidArgumentError(fmt::format("devices: '{}' is not auto, cuda:N or cpu:N", spec));
  }
  int count = 0;
  try {
    size_t used = 0;
    count = std::stoi(spec.substr(colon + 1), &used);
    if (used != spec.size() - colon - 1) count = 0;
  } catch (const std::exception&) {
  }
  if (count < 1 || count > 1024) {
    return absl::InvalidArgumentError(fmt::format("devices: '{}': N must be a number within [1, 1024]", spec));
  }
  if (kind == "cuda") {
    const int gpus = CudaDeviceCount();
    if (count > gpus) {
      return absl::InvalidArgumentError(fmt::format("devices: '{}' but the CUDA driver reports {} GPU(s)", spec, gpus));
    }
  }
  return Devices{kind, count};
}

}  // namespace llamad::daemon
