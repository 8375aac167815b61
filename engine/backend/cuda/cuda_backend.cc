#include "backend/cuda/cuda_backend.h"

#include <cstdlib>
#include <string>
#include <string_view>

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
  CudaBackendOptions resolved = options;
  // LLAMAD_ATTENTION picks the attention kernels of a backend left on kAuto.
  if (const char* env = std::getenv("LLAMAD_ATTENTION"); env != nullptr && *env != '\0' &&
      options.attention == CudaAttention::kAuto) {
    const std::string_view value = env;
    if (value == "cudnn") {
      resolved.attention = CudaAttention::kCudnn;
    } else if (value == "llamad") {
      resolved.attention = CudaAttention::kLlamad;
    } else if (value != "auto") {
      return absl::InvalidArgumentError(StrCat(
          "LLAMAD_ATTENTION='", value, "': expected auto, cudnn or llamad"));
    }
  }
  if (resolved.attention == CudaAttention::kCudnn) {
    std::string why;
    if (!CudnnAttentionAvailable(resolved.device, &why)) {
      return absl::FailedPreconditionError(StrCat("cuDNN attention was asked for: ", why));
    }
  }
  return NewCudaBackend(resolved);
}

}  // namespace llamad
