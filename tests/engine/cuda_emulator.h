// A CPU emulator of as much of CUDA as the backend's own kernels use, so that tests run
// their source (backend/cuda/attention_kernels.cuh and layer_kernels.cuh) where no GPU is
// present.
//
// Every thread of a block is a fiber on one OS thread; blocks run one after another.
// Fibers take turns only where CUDA makes threads wait for each other: __syncthreads()
// and the warp-collective instructions (Turns says in what order). The emulator checks
// what a GPU would leave undefined or do silently wrong:
//   - every lane of a warp reaches the same collective (mma, ldmatrix, shuffle), and
//     every thread of a block the same __syncthreads(), else it names the lanes;
//   - ldmatrix reads and cp.async writes fall inside the launch's dynamic shared memory,
//     16-byte aligned; cp.async reads inside the buffers the test allowed; after each
//     block, the bytes past the launch's dynamic shared memory are as they were (a plain
//     store past its end, unless it stored bytes 0xff, fails the block; one before its
//     start is not seen);
//   - dynamic shared memory starts as NaN (bytes 0xff), so a read of a row no copy
//     filled shows;
//   - cp.async copies land either when issued or only when waited for (Options), and
//     warps run in step or far apart (Turns), so a pipeline that reads a buffer too
//     early, or overwrites one another warp still reads, gives a different answer in
//     one of the schedules.
// Tensor-core products use the fragment layouts of PTX's mma.m16n8k16 and ldmatrix, sum
// in double and round to float once: close to, not bit-equal with, a GPU's arithmetic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

// Declares to a host compiler the warp-level instructions the emulator defines.
#include "backend/cuda/warp_ops.cuh"

// CUDA's qualifiers mean nothing on the host (cuda_runtime.h maps them to attributes
// that g++ warns about); __forceinline__ and __align__ keep their host meanings. Static
// shared arrays are thread_local: every thread of a block is a fiber of one OS thread,
// so they all see one copy, as a block's threads see one on a GPU. Unlike dynamic shared
// memory they are not poisoned: they start as zeros and keep the last block's values, so
// a read of one before any thread of the block wrote it goes unseen.
#undef __global__
#undef __device__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __shared__ thread_local
#define __launch_bounds__(...)

// The built-in variables of the thread that runs.
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

void __syncthreads();
float __shfl_xor_sync(unsigned mask, float value, int lane_mask);
double __shfl_xor_sync(unsigned mask, double value, int lane_mask);
inline int min(int a, int b) { return a < b ? a : b; }

// The device's correctly rounded float arithmetic, each operation on its own (defined
// out of line, so that the host compiler cannot fuse them either). rsqrtf is 1 / sqrtf
// here, and __expf (declared by glibc's math.h, defined by the emulator) expf; on a GPU
// both are approximations (rsqrtf within 2 ulp, __expf within 2 ulp plus the error of
// scaling x by log2(e)).
float __fadd_rn(float a, float b);
float __fsub_rn(float a, float b);
float __fmul_rn(float a, float b);
float __fdiv_rn(float a, float b);
float __fsqrt_rn(float a);
float rsqrtf(float a);

namespace llamad::cuda::emulator {

// Which thread runs next when the running one must wait. Round robin keeps the warps of
// a block in step; the other two let the first (or last) warp run ahead until a
// __syncthreads() holds it, the widest gap between warps CUDA allows.
enum class Turns { kRoundRobin, kFirstThreadFirst, kLastThreadFirst };

struct Options {
  bool copies_land_when_issued = false;  // else only when a wait_group covers them
  Turns turns = Turns::kRoundRobin;
};

class Emulator {
 public:
  // The dynamic shared memory a launch may have: as much as a Hopper block may opt in to.
  static constexpr size_t kSharedBytes = 227 * 1024;

  explicit Emulator(Options options = {});

  // cp.async may read [p, p + bytes).
  void AllowReads(const void* p, size_t bytes);

  // Runs `thread` as every thread of every block of `grid`, with `shared_bytes` of
  // dynamic shared memory a block. Throws std::runtime_error naming the block and
  // thread when the kernel breaks one of the rules above.
  void Run(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& thread);

 private:
  // DynamicSharedMemory() of the running block: 16-byte aligned, as a GPU's, by the
  // default alignment of new.
  static_assert(__STDCPP_DEFAULT_NEW_ALIGNMENT__ >= 16);
  std::vector<unsigned char> shared_;
  const std::vector<unsigned char> poison_ = std::vector<unsigned char>(kSharedBytes, 0xff);  // what it starts as
  Options options_;
  std::vector<std::pair<const unsigned char*, size_t>> readable_;
};

}  // namespace llamad::cuda::emulator
