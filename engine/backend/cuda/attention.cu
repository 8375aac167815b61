// The own flash attention kernels (attention_kernels.cuh) on the GPU.
#include "backend/cuda/attention_kernels.cuh"
#include "backend/cuda/gpu_device.cuh"

namespace llamad::cuda {

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
