// The Device that attention_kernels.cuh's and layer_kernels.cuh's launch code runs on when
// it runs on a GPU: a CUDA stream of the current device. Only nvcc compiles this.
#pragma once

#include <map>
#include <mutex>
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
  // and lasts (per kernel and device, for the whole process), so it is made only when a
  // kernel needs more than it had, and only ever raised: a thread launching the kernel
  // smaller must not lower it under another. Each thread keeps what it knows is granted,
  // so a launch takes the process-wide lock only when it needs more than that.
  static void AllowDynamicSharedMemory(const void* kernel, int bytes) {
    int device = 0;
    LLAMAD_CUDA_CHECK(cudaGetDevice(&device));
    using Key = std::pair<const void*, int>;  // (kernel, device)
    thread_local std::map<Key, int> known;      // at most what `granted` holds
    int& seen = known[{kernel, device}];
    if (bytes <= seen) return;
    static std::mutex mu;
    static std::map<Key, int> granted;
    std::lock_guard lock(mu);
    int& now = granted[{kernel, device}];
    if (bytes > now) {
      LLAMAD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
      now = bytes;
    }
    seen = now;
  }

  int SharedMemoryLimit() const {
    int device = 0, bytes = 0;
    LLAMAD_CUDA_CHECK(cudaGetDevice(&device));
    LLAMAD_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    return bytes;
  }
};

}  // namespace llamad::cuda
