// The warp-level instructions the flash attention kernels (attention_kernels.cuh) use, as
// inline PTX: the tensor-core product, ldmatrix and the asynchronous global-to-shared
// copies. A host compiler sees only their declarations, which the tests' CPU emulator
// (tests/engine/cuda_emulator.cc) defines with the same meaning, so that a test runs the
// kernels' own source there.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace llamad::cuda {

#ifdef __CUDACC__

// c (16 x 8, f32) += a (16 x 16, bf16) . b (16 x 8, bf16), one fragment of each per lane
// (the layouts are listed in attention_kernels.cuh). Every lane of the warp calls it.
__device__ __forceinline__ void Mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8 x 8 matrices of 16-bit elements from shared memory (ldmatrix_lanes.h says which
// row each lane names and what it gets back), and the same transposed.
__device__ __forceinline__ void Ldmatrix(uint32_t r[4], const __nv_bfloat16* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SharedAddress(row))
               : "memory");
}
__device__ __forceinline__ void LdmatrixTrans(uint32_t r[4], const __nv_bfloat16* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SharedAddress(row))
               : "memory");
}

// 16 bytes from global to shared memory without passing through registers; with `in`
// false nothing is read and the 16 bytes are zeros.
__device__ __forceinline__ void CopyAsync16(void* dst, const void* src, bool in) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SharedAddress(dst)),
               "l"(src), "r"(in ? 16 : 0)
               : "memory");
}
// Closes the thread's copies issued since the last commit into one group.
__device__ __forceinline__ void CommitCopies() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most `kPending` committed groups of copies are still in flight.
template <int kPending>
__device__ __forceinline__ void WaitCopies() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

#else  // a host compiler: the emulator's

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

#endif

}  // namespace llamad::cuda
