// Helpers shared by the CUDA backend's translation units.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "backend/cuda/attention_args.h"

namespace llamad::cuda {

// A failed CUDA call is a broken device or a bug, never bad user input: report where and
// abort, as the backend's other invariants do.
[[noreturn]] inline void Fail(const char* what, const char* file, int line) {
  std::fprintf(stderr, "llamad: CUDA error at %s:%d: %s\n", file, line, what);
  std::abort();
}

#define LLAMAD_CUDA_CHECK(expr)                                                 \
  do {                                                                          \
    cudaError_t llamad_err_ = (expr);                                           \
    if (llamad_err_ != cudaSuccess)                                             \
      ::llamad::cuda::Fail(cudaGetErrorString(llamad_err_), __FILE__, __LINE__); \
  } while (0)

// Checks the launch just issued (configuration errors show here, faults at the next sync).
#define LLAMAD_CUDA_LAUNCHED() LLAMAD_CUDA_CHECK(cudaGetLastError())

using bf16 = __nv_bfloat16;

__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(bf16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ float FromFloat<float>(float x) { return x; }
template <>
__device__ __forceinline__ bf16 FromFloat<bf16>(float x) { return __float2bfloat16_rn(x); }

inline unsigned Blocks(size_t n, unsigned threads, unsigned cap = 65535u * 8) {
  size_t b = (n + threads - 1) / threads;
  return unsigned(b < 1 ? 1 : (b > cap ? cap : b));
}

// Sum over a block of up to 1024 threads; every thread gets the result. `scratch` holds
// 32 values. Deterministic: a fixed reduction tree.
template <typename T>
__device__ __forceinline__ T BlockSum(T v, T* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) / 32;
  T total = lane < warps ? scratch[lane] : T(0);
  for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
  return total;
}

// Flash attention (attention.cu). Pointers are device memory; qkv/out/dout/dqkv bf16,
// lse f32 [B, H, T] in natural-log units; delta is f32 scratch of B*H*T.
bool AttentionSupportsHeadDim(int head_dim);
void AttentionForward(bf16* out, float* lse, const bf16* qkv, const AttentionArgs& a,
                      cudaStream_t stream);
void AttentionBackward(bf16* dqkv, float* delta, const bf16* dout, const bf16* out,
                       const float* lse, const bf16* qkv, const AttentionArgs& a,
                       cudaStream_t stream);

}  // namespace llamad::cuda
