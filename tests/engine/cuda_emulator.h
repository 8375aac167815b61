// A CPU emulator of as much of CUDA as the own flash attention kernels use, so that a
// test runs their source (backend/cuda/attention_kernels.cuh) where no GPU is present.
//
// Every thread of a block is a fiber on one OS thread; blocks run one after another.
// Fibers take turns only where CUDA makes threads wait for each other: __syncthreads()
// and the warp-collective instructions (Turns says in what order). The emulator checks what a GPU would leave
// undefined or do silently wrong:
//   - every lane of a warp reaches the same collective (mma, ldmatrix, shuffle), and
//     every thread of a block the same __syncthreads(), else it names the lanes;
//   - ldmatrix reads and cp.async writes fall inside the launch's dynamic shared memory,
//     16-byte aligned; cp.async reads inside the buffers the test allowed;
//   - shared memory starts as NaN (bytes 0xff), so a read of a row no copy filled shows;
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
#include <span>
#include <string>
#include <utility>
#include <vector>

// CUDA's qualifiers mean nothing on the host (cuda_runtime.h maps them to attributes
// that g++ warns about); __forceinline__ and __align__ keep their host meanings.
#undef __global__
#undef __device__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __shared__
#define __launch_bounds__(...)

// The built-in variables of the thread that runs.
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

void __syncthreads();
float __shfl_xor_sync(unsigned mask, float value, int lane_mask);
inline int min(int a, int b) { return a < b ? a : b; }

// The instructions of backend/cuda/warp_ops.cuh, with the same signatures and meaning.
namespace llamad::cuda {
void Mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
void Ldmatrix(uint32_t r[4], const __nv_bfloat16* row);
void LdmatrixTrans(uint32_t r[4], const __nv_bfloat16* row);
void CopyAsync16(void* dst, const void* src, bool in);
void CommitCopies();
void WaitCopiesFor(int pending);
template <int kPending>
void WaitCopies() {
  WaitCopiesFor(kPending);
}
}  // namespace llamad::cuda

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
  // `shared` is the kernels' `extern __shared__` array: the emulator poisons and checks it.
  Emulator(std::span<unsigned char> shared, Options options);

  // cp.async may read [p, p + bytes).
  void AllowReads(const void* p, size_t bytes);

  // Runs `thread` as every thread of every block of `grid`, with `shared_bytes` of
  // dynamic shared memory a block. Throws std::runtime_error naming the block and
  // thread when the kernel breaks one of the rules above.
  void Run(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& thread);

 private:
  std::span<unsigned char> shared_;
  Options options_;
  std::vector<std::pair<const unsigned char*, size_t>> readable_;
};

}  // namespace llamad::cuda::emulator
