// The Device that attention_kernels.cuh's and layer_kernels.cuh's launch code runs on when
// it runs on a GPU: a CUDA stream of the current device. Only nvcc compiles this.
#pragma once

#include <map>
#include <utility>

#include "backend/cuda/cuda_common.cuh"

namespace llamad::cuda {

struct Gpu {
  cudaStream_t stream;
  int max_grid_y = kMaxGridY;
  unsigned max_strided_blocks = kMaxStridedBlocks;

  template <typename... Params, typename... Args>
  void Launch(void (*kernel)(Params...), dim3 grid, int threads, int shared_bytes, Args... args) {
    if (shared_bytes > 0) AllowDynamicSharedMemory(reinterpret_cast<const void*>(kernel), shared_bytes);
    kernel<<<grid, threads, shared_bytes, stream>>>(args...);
    LLAMAD_CUDA_LAUNCHED();
  }

  // Past 48 KiB of shared memory a kernel must opt in. The opt-in counts only the dynamic
  // bytes while the limit counts static ones too, so a kernel opts in to whatever dynamic
  // bytes it is launched with rather than working out its total. The opt-in is a host call
  // and lasts (per kernel and device), so it is made only when a kernel needs more than it
  // had: once per kernel and launching thread in a run whose sizes do not change. The
  // record is per thread so that a launch takes no lock.
  static void AllowDynamicSharedMemory(const void* kernel, int bytes) {
    int device = 0;
    LLAMAD_CUDA_CHECK(cudaGetDevice(&device));
    thread_local std::map<std::pair<const void*, int>, int> allowed;  // (kernel, device) -> bytes
    int& granted = allowed[{kernel, device}];
    if (bytes <= granted) return;
    LLAMAD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    granted = bytes;
  }

  int SharedMemoryLimit() const {
    int device = 0, bytes = 0;
    LLAMAD_CUDA_CHECK(cudaGetDevice(&device));
    LLAMAD_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    return bytes;
  }
};

}  // namespace llamad::cuda
