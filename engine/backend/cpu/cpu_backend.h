// The CPU backend: the numerical reference and the default without a GPU.
// f32 for training, f64 for gradient checks. GEMMs through OpenBLAS, the rest through
// OpenMP loops with static schedules, so a run is bit-identical for a given thread count.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "backend/backend.h"

namespace llamad {

struct CpuBackendOptions {
  DType dtype = DType::kF32;  // kF32 or kF64.
  int threads = 0;            // Worker threads for OpenMP and OpenBLAS; 0 = all cores.
  // Rows of logits the fused LM head holds at once is chunk_elements / vocab (>= 16).
  size_t lm_head_chunk_elements = size_t{8} << 20;
  // Master weights apart from the parameters, as a GPU's bf16 training keeps them
  // (needs_master_weights): the same type here, so the same results as without. It runs
  // the code of mixed precision on the CPU (the optimizer state in host memory, its
  // restore, the NVMe tier behind it) where no GPU is present: a test aid.
  bool master_weights = false;
};

// Creates a CPU backend. Sets the process-wide OpenMP/OpenBLAS thread count.
std::unique_ptr<Backend> MakeCpuBackend(const CpuBackendOptions& options = {});

// Threads the CPU kernels use.
int CpuThreads();

// AdamW on f32 weights in host memory with bf16 moments (the host-offloaded optimizer's
// offload.host_moments: bf16, cpu::AdamWBf16Moments) over the OpenMP threads, with the
// CPU backend's step constants. `first`: element 0's flat index, which picks the
// stochastic rounding's random bits.
void AdamWBf16MomentsOnThreads(float* p, const float* grad, uint16_t* m, uint16_t* v, size_t n, size_t first,
                               const AdamWStep& s);

}  // namespace llamad

namespace llamad {

// Measured single-precision GEMM throughput of this machine (FLOP/s) for C[m, n] =
// A[m, k] . B[n, k]^T (the layout of Linear), the best of repeated calls over at least
// `min_seconds`. The CPU's reference peak for MFU and for benchmarks.
double MeasureSgemmFlops(int m, int n, int k, double min_seconds = 0.2);

}  // namespace llamad
