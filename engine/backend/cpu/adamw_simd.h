// The CPU AdamW update at memory bandwidth: AVX-512 or AVX2 chosen at run time from the
// CPU's features, with a scalar fallback. Every path performs the same IEEE operations in
// the same order (no fused multiply-add), so all of them give bit-identical results.
#pragma once

#include <cstddef>

namespace llamad::cpu {

enum class SimdLevel { kScalar, kAvx2, kAvx512 };

// The widest level this CPU runs (LLAMAD_SIMD=scalar|avx2|avx512 caps it).
SimdLevel DetectSimd();
const char* SimdName(SimdLevel level);

struct AdamWScalars {
  float beta1, beta2, eps, grad_scale;
  float step_size;       // lr / (1 - beta1^t)
  float inv_bias2_sqrt;  // 1 / sqrt(1 - beta2^t)
  float decay;           // 1 - lr * weight_decay
};

// For i < n: g = grad * grad_scale; m = b1 m + (1 - b1) g; v = b2 v + ((1 - b2) g) g;
// p = p decay - step_size m / (sqrt(v) inv_bias2_sqrt + eps). One thread; callers split
// the range across threads.
void AdamWF32(float* p, const float* grad, float* m, float* v, size_t n, const AdamWScalars& s,
              SimdLevel level);

}  // namespace llamad::cpu
