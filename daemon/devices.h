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

}  // namespace llamad::daemon
