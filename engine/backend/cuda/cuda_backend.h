// The CUDA backend: bf16 activations and parameters, f32 gradients, master weights,
// optimizer moments and row statistics; GEMMs through cuBLASLt, everything else in our
// own kernels (engine/backend/cuda/*.cu), all on one stream the backend owns.
//
// The engine includes this header whether or not the build has CUDA; without CUDA, or
// without a device, MakeCudaBackend says why.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "backend/cuda/cuda_backend_impl.h"

namespace llamad {

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const CudaBackendOptions& options = {});

}  // namespace llamad
