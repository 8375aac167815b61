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
    // A kernel opts in to dynamic shared memory that passes 48 KiB with its static
    // shared memory (a cheap host call); opting in for any size counts both.
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
