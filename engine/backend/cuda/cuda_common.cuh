// Helpers shared by the CUDA backend's translation units.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <type_traits>

#include "backend/cuda/attention_args.h"
#include "backend/cuda/device_fault.h"

namespace llamad::cuda {

// A failed CUDA call is a broken device or a bug, never bad user input: report where and
// abort, as the backend's other invariants do.
[[noreturn]] inline void Fail(const char* what, const char* file, int line) {
  std::fprintf(stderr, "llamad: CUDA error at %s:%d: %s\n", file, line, what);
  std::abort();
}

// A broken device ends the rank with kExitDeviceFault (device_fault.h); a bug aborts.
[[noreturn]] inline void FailCuda(cudaError_t err, const char* file, int line) {
  char where[256];
  std::snprintf(where, sizeof where, "at %s:%d", file, line);
  ExitOnDeviceFault(err, where);
  Fail(cudaGetErrorString(err), file, line);
}

#define LLAMAD_CUDA_CHECK(expr)                                    \
  do {                                                             \
    cudaError_t llamad_err_ = (expr);                              \
    if (llamad_err_ != cudaSuccess)                                \
      ::llamad::cuda::FailCuda(llamad_err_, __FILE__, __LINE__);   \
  } while (0)

// Checks the launch just issued (configuration errors show here, faults at the next sync).
#define LLAMAD_CUDA_LAUNCHED() LLAMAD_CUDA_CHECK(cudaGetLastError())

using bf16 = __nv_bfloat16;

// The kernel headers (attention_kernels.cuh, layer_kernels.cuh) are compiled twice: by
// nvcc for the GPU, and by g++ for the tests' CPU emulator. Their contents sit in an
// inline namespace named for the build, so that a program linking both (a test that also
// links the CUDA backend) never takes one build's kernel for the other's.
#ifdef __CUDACC__
#define LLAMAD_KERNELS_BUILD gpu
#else
#define LLAMAD_KERNELS_BUILD emulated
#endif

// The block's dynamic shared memory: the launch's shared_bytes of it, 16-byte aligned.
#ifdef __CUDACC__
__device__ __forceinline__ unsigned char* DynamicSharedMemory() {
  extern __shared__ __align__(16) unsigned char dynamic_shared_memory[];
  return dynamic_shared_memory;
}
#else
unsigned char* DynamicSharedMemory();  // the CPU emulator's (tests/engine/cuda_emulator.cc)
#endif

__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(bf16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ float FromFloat<float>(float x) { return x; }
template <>
__device__ __forceinline__ bf16 FromFloat<bf16>(float x) { return __float2bfloat16_rn(x); }

// V consecutive bf16 as floats, in one access: 16 bytes for V = 8 (p 16-byte aligned), 4
// for V = 2 (4-byte aligned).
template <int V>
__device__ __forceinline__ void LoadBf16(const bf16* p, float (&f)[V]) {
  if constexpr (V == 1) {
    f[0] = __bfloat162float(*p);
  } else {
    static_assert(V == 2 || V == 8, "bf16 vectors are 1, 2 or 8 wide");
    using Word = std::conditional_t<V == 8, uint4, uint32_t>;
    const Word word = *reinterpret_cast<const Word*>(p);
    const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&word);
#pragma unroll
    for (int k = 0; k < V / 2; ++k) {
      const float2 t = __bfloat1622float2(pairs[k]);
      f[2 * k] = t.x;
      f[2 * k + 1] = t.y;
    }
  }
}
template <int V>
__device__ __forceinline__ void StoreBf16(bf16* p, const float (&f)[V]) {
  if constexpr (V == 1) {
    *p = __float2bfloat16_rn(f[0]);
  } else {
    static_assert(V == 2 || V == 8, "bf16 vectors are 1, 2 or 8 wide");
    using Word = std::conditional_t<V == 8, uint4, uint32_t>;
    Word word;
    __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&word);
#pragma unroll
    for (int k = 0; k < V / 2; ++k) pairs[k] = __floats2bfloat162_rn(f[2 * k], f[2 * k + 1]);
    *reinterpret_cast<Word*>(p) = word;
  }
}

// Whether rows of `width` bf16 starting at each pointer can be accessed `v` at a time.
inline bool VectorsFit(int v, int width, std::initializer_list<const void*> pointers) {
  if (width % v != 0) return false;
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % (v * sizeof(bf16)) != 0) return false;
  }
  return true;
}

// A GPU's largest grid y, and the most blocks a grid-stride kernel is given (more
// elements loop): the defaults of the kernels' Devices (gpu_device.cuh, and the tests').
constexpr int kMaxGridY = 65535;
constexpr unsigned kMaxStridedBlocks = 65535u * 8;

// Blocks of `threads` that cover n elements: at least one, at most `cap`.
inline unsigned Blocks(size_t n, unsigned threads, unsigned cap) {
  size_t b = (n + threads - 1) / threads;
  return unsigned(b < 1 ? 1 : (b > cap ? cap : b));
}

// `op` (associative and commutative) over the 32 lanes of a full warp; every lane gets the
// result. Deterministic: a fixed butterfly.
template <typename T, typename Op>
__device__ __forceinline__ T WarpReduce(T v, Op op) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// `op` (associative and commutative, with `identity`) over a block of up to 1024 threads;
// every thread gets the result. `scratch` holds 32 values. Deterministic: a fixed
// reduction tree.
template <typename T, typename Op>
__device__ __forceinline__ T BlockReduce(T v, T* scratch, T identity, Op op) {
  v = WarpReduce(v, op);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) / 32;
  return WarpReduce(lane < warps ? scratch[lane] : identity, op);
}
template <typename T>
__device__ __forceinline__ T BlockSum(T v, T* scratch) {
  return BlockReduce(v, scratch, T(0), [](T a, T b) { return a + b; });
}
__device__ __forceinline__ float BlockMax(float v, float* scratch) {
  return BlockReduce(v, scratch, -INFINITY, [](float a, float b) { return fmaxf(a, b); });
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
