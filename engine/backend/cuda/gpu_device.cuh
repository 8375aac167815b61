// The Device that attention_kernels.cuh's and layer_kernels.cuh's launch code runs on when
// it runs on a GPU: a CUDA stream of the current device. Only nvcc compiles this.
#pragma once

#include "backend/cuda/cuda_common.cuh"

namespace llamad::cuda {

struct Gpu {
  cudaStream_t stream;
  int max_grid_y = kMaxGridY;
  unsigned max_strided_blocks = kMaxStridedBlocks;

  template <typename... Params, typename... Args>
  void Launch(void (*kernel)(Params...), dim3 grid, int threads, int shared_bytes, Args... args) {
    // Past 48 KiB of shared memory a kernel must opt in. The opt-in counts only the
    // dynamic bytes while the limit counts static ones too, so every launch with dynamic
    // shared memory opts in (one host call) rather than working out the kernel's total.
    if (shared_bytes > 0) {
      LLAMAD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes));
    }
    kernel<<<grid, threads, shared_bytes, stream>>>(args...);
    LLAMAD_CUDA_LAUNCHED();
  }

  int SharedMemoryLimit() const {
    int device = 0, bytes = 0;
    LLAMAD_CUDA_CHECK(cudaGetDevice(&device));
    LLAMAD_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    return bytes;
  }
};

}  // namespace llamad::cuda
