// The own flash attention kernels (attention_kernels.cuh) on the GPU.
#include "backend/cuda/warp_ops.cuh"
// The warp-level instructions come first: the kernels call them.
#include "backend/cuda/attention_kernels.cuh"

namespace llamad::cuda {
namespace {

// The Device of attention_kernels.cuh's launch code: a CUDA stream of the current GPU.
struct Gpu {
  cudaStream_t stream;
  int max_grid_y = 65535;

  template <typename... Params, typename... Args>
  void Launch(void (*kernel)(Params...), dim3 grid, int threads, int shared_bytes, Args... args) {
    // Above 48 KiB of dynamic shared memory a kernel must opt in (a cheap host call).
    LLAMAD_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes));
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

}  // namespace

bool AttentionSupportsHeadDim(int head_dim) { return flash::SupportsHeadDim(head_dim); }

void AttentionForward(bf16* out, float* lse, const bf16* qkv, const AttentionArgs& a,
                      cudaStream_t stream) {
  Gpu gpu{stream};
  flash::Forward(gpu, out, lse, qkv, a);
}

void AttentionBackward(bf16* dqkv, float* delta, const bf16* dout, const bf16* out,
                       const float* lse, const bf16* qkv, const AttentionArgs& a,
                       cudaStream_t stream) {
  Gpu gpu{stream};
  flash::Backward(gpu, dqkv, delta, dout, out, lse, qkv, a);
}

}  // namespace llamad::cuda
