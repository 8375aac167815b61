// CUDA errors that mean the GPU itself failed, and what a rank does about them. Only
// plain C++ and the CUDA runtime's header: used by nvcc's and the host compiler's units.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#include "core/exit_codes.h"

namespace llamad::cuda {

// Errors CUDA gives for a broken or vanished device, which no kernel bug produces: an
// uncorrectable ECC or NVLink error, a device that is gone, a GPU fabric that is not
// ready. Errors a bug can also give ("unspecified launch failure", an illegal address,
// "unknown error", and cudaErrorContained, which an invalid access of a peer GPU's memory
// over NVLink gives too) are not among them: they fail the job, where draining nodes for them
// could take a whole cluster out of service one node at a time. Nor are a busy device
// (cudaErrorDevicesUnavailable: exclusive mode, another process's work) and a driver
// that cannot start (cudaErrorInitializationError: device files a container lacks, say),
// which an environment shared by many nodes can cause.
inline bool IsDeviceFault(cudaError_t err) {
  switch (err) {
    case cudaErrorECCUncorrectable:
    case cudaErrorNvlinkUncorrectable:
    case cudaErrorNoDevice:
    case cudaErrorSystemNotReady:
      return true;
    default:
      return false;
  }
}

// Where `err` is a device fault: says so on stderr and ends the process with
// kExitDeviceFault, at once (destructors could wait on the failed GPU forever). Its
// node's scheduler drains the node and restarts the job elsewhere. Otherwise returns.
inline void ExitOnDeviceFault(cudaError_t err, const char* where) {
  if (!IsDeviceFault(err)) return;
  const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
  // Which GPU, by PCI address (as nvidia-smi lists them), where CUDA can still say.
  int device = -1;
  char bus[32] = "unknown";
  if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetPCIBusId(bus, sizeof bus, device) != cudaSuccess) {
    std::snprintf(bus, sizeof bus, "unknown");
  }
  std::fprintf(stderr,
               "llamad: the GPU failed: %s (%s; PCI %s, CUDA_VISIBLE_DEVICES=%s); this rank exits with %d, and "
               "under llamad its node takes no new ranks until it is undrained\n",
               cudaGetErrorString(err), where, bus, visible != nullptr ? visible : "unset", kExitDeviceFault);
  std::fflush(nullptr);
  std::_Exit(kExitDeviceFault);
}

}  // namespace llamad::cuda
