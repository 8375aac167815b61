// What a node offers: GPUs found through the CUDA driver, or CPU slots.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace llamad::daemon {

struct Devices {
  std::string kind;  // "cuda" or "cpu"
  int count = 0;
};

// "auto" (the GPUs the CUDA driver reports, UsableGpuCount; cpu:1 when there is none),
// "cuda:N" or "cpu:N". The driver is loaded at run time, so llamad runs on machines
// without CUDA.
absl::StatusOr<Devices> ResolveDevices(const std::string& spec);

// The GPUs a node's ranks can use, given the count the CUDA driver reports to llamad and
// llamad's CUDA_VISIBLE_DEVICES. That count, except where the list names MIG devices
// ("MIG-<uuid>"): CUDA shows a process at most one MIG device, so the driver reports 1
// however many the list names, but each rank is a process of its own and is given one
// entry (RankGpuFor). The list's entries then count, up to its first empty one (CUDA sees
// nothing past it). With no GPU (driver_count 0) the list does not matter.
int UsableGpuCount(int driver_count, const std::string& daemon_visible);

// How the environment of a node's rank `local_rank` names its GPU. Where llamad itself
// runs with CUDA_VISIBLE_DEVICES (`daemon_visible`, null or empty when unset), an operator
// keeps the other GPUs from it: the rank gets that list's local_rank-th entry (an index
// or a "GPU-<uuid>", as the operator wrote it) under llamad's own
// CUDA_DEVICE_ORDER, which the driver counted it by. Otherwise the index, in PCI order
// (nvidia-smi's numbers). A list with fewer entries (up to its first empty one) is an
// error naming it.
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
