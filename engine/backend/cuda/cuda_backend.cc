#include "backend/cuda/cuda_backend.h"

#include "core/strings.h"

namespace llamad {

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const CudaBackendOptions& options) {
  if (!CudaBackendBuilt()) {
    return absl::FailedPreconditionError(
        "this build has no CUDA backend (nvcc was not found when it was configured)");
  }
  const int count = CudaDeviceCount();
  if (count == 0) {
    return absl::FailedPreconditionError(
        "no CUDA device is present (or no driver); the CPU backend runs without one");
  }
  if (options.device < 0 || options.device >= count) {
    return absl::InvalidArgumentError(
        StrCat("CUDA device ", options.device, " does not exist (", count, " present)"));
  }
  return NewCudaBackend(options);
}

}  // namespace llamad
