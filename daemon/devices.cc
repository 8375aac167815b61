#include "daemon/devices.h"

#include <dlfcn.h>
#include <fmt/format.h>

#include <cstdlib>
#include <string_view>
#include <vector>

#include "core/strings.h"
#include "proto/rpc.h"
#include "train/jobspec.h"

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

// The entries of a CUDA_VISIBLE_DEVICES list, up to the first empty one (after which CUDA
// sees none), with the spaces around each taken off.
std::vector<std::string_view> VisibleEntries(std::string_view list) {
  std::vector<std::string_view> entries;
  while (!list.empty()) {
    const size_t comma = list.find(',');
    std::string_view item = list.substr(0, comma);
    while (!item.empty() && item.front() == ' ') item.remove_prefix(1);
    while (!item.empty() && item.back() == ' ') item.remove_suffix(1);
    if (item.empty()) break;
    entries.push_back(item);
    if (comma == std::string_view::npos) break;
    list.remove_prefix(comma + 1);
  }
  return entries;
}

}  // namespace

int UsableGpuCount(int driver_count, const std::string& daemon_visible) {
  if (driver_count < 1) return driver_count;
  const std::vector<std::string_view> entries = VisibleEntries(daemon_visible);
  for (std::string_view entry : entries) {
    if (entry.starts_with("MIG-")) return static_cast<int>(entries.size());
  }
  return driver_count;
}

absl::StatusOr<Devices> ResolveDevices(const std::string& spec) {
  const std::string visible = OwnCudaVisibleDevices();
  if (spec == "auto") {
    const int gpus = UsableGpuCount(CudaDeviceCount(), visible);
    const Devices found = gpus > 0 ? Devices{"cuda", gpus} : Devices{"cpu", 1};
    if (auto s = CheckRankGpus(found, visible); !s.ok()) return s;
    return found;
  }
  const size_t colon = spec.find(':');
  const std::string kind = spec.substr(0, colon);
  if (colon == std::string::npos || !rpc::IsDeviceKind(kind)) {
    return absl::InvalidArgumentError(fmt::format("devices: '{}' is not auto, cuda:N or cpu:N", spec));
  }
  // N as it is shown back (cuda:7, not cuda:007), as every other count llamad reads.
  const std::string_view digits = std::string_view(spec).substr(colon + 1);
  const int64_t count = digits.starts_with('0') ? 0 : ParseInt64(digits).value_or(0);
  if (count < 1 || count > kMaxDevicesPerNode) {
    return absl::InvalidArgumentError(
        fmt::format("devices: '{}': N must be a whole number from 1 to {} in base 10, no leading zeros", spec,
                    kMaxDevicesPerNode));
  }
  if (kind == "cuda") {
    const int gpus = UsableGpuCount(CudaDeviceCount(), visible);
    if (count > gpus) {
      return absl::InvalidArgumentError(
          fmt::format("devices: '{}' but the CUDA driver reports {} GPU(s) to llamad", spec, gpus));
    }
  }
  Devices found{kind, int(count)};
  if (auto s = CheckRankGpus(found, visible); !s.ok()) return s;
  return found;
}

absl::Status CheckRankGpus(const Devices& devices, const std::string& daemon_visible) {
  if (devices.kind != "cuda") return absl::OkStatus();
  for (int local_rank = 0; local_rank < devices.count; ++local_rank) {
    if (auto gpu = RankGpuFor(daemon_visible.c_str(), local_rank); !gpu.ok()) {
      return absl::InvalidArgumentError(
          fmt::format("devices: {} GPU(s), but {}", devices.count, std::string(gpu.status().message())));
    }
  }
  return absl::OkStatus();
}

std::string OwnCudaVisibleDevices() {
  const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
  return visible != nullptr ? visible : "";
}

absl::StatusOr<RankGpu> RankGpuFor(const char* daemon_visible, int local_rank) {
  if (daemon_visible == nullptr || *daemon_visible == '\0') {
    return RankGpu{std::to_string(local_rank), "PCI_BUS_ID"};
  }
  const std::vector<std::string_view> entries = VisibleEntries(daemon_visible);
  if (local_rank >= 0 && local_rank < static_cast<int>(entries.size())) {
    return RankGpu{std::string(entries[local_rank]), ""};
  }
  return absl::InvalidArgumentError(fmt::format(
      "device {}: llamad's CUDA_VISIBLE_DEVICES='{}' names no GPU at that position", local_rank, daemon_visible));
}

}  // namespace llamad::daemon
