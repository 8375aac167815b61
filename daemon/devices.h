// What a node offers: GPUs found through the CUDA driver, or CPU slots.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace llamad::daemon {

struct Devices {
  std::string kind;  // "cuda" or "cpu"
  int count = 0;
};

// "auto" (the GPUs the CUDA driver reports; cpu:1 when there is none), "cuda:N" or
// "cpu:N". The driver is loaded at run time, so llamad runs on machines without CUDA.
absl::StatusOr<Devices> ResolveDevices(const std::string& spec);

// How the environment of a node's rank `local_rank` names its GPU. Where llamad itself
// runs with CUDA_VISIBLE_DEVICES (`daemon_visible`, null or empty when unset), an operator
// keeps the other GPUs from it: the rank gets that list's local_rank-th entry (an index
// or a "GPU-<uuid>", as the operator wrote it) under llamad's own
// CUDA_DEVICE_ORDER, which the driver counted it by. Otherwise the index, in PCI order
// (nvidia-smi's numbers). A list with fewer entries is an error naming it.
struct RankGpu {
  std::string visible_devices;  // the rank's CUDA_VISIBLE_DEVICES
  std::string device_order;     // its CUDA_DEVICE_ORDER ("": llamad's own, inherited)
};
absl::StatusOr<RankGpu> RankGpuFor(const char* daemon_visible, int local_rank);
// This process's CUDA_VISIBLE_DEVICES, "" where unset.
std::string OwnCudaVisibleDevices();
// Whether every rank of `devices` (GPUs) gets one from `daemon_visible` (RankGpuFor):
// checked when the devices are resolved, so that a list that falls short stops llamad at
// start instead of failing jobs.
absl::Status CheckRankGpus(const Devices& devices, const std::string& daemon_visible);

}  // namespace llamad::daemon
