#include "backend/cpu/adamw_simd.h"

#include <immintrin.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

namespace llamad::cpu {
namespace {

// The reference order of operations; the vector paths below mirror it exactly.
inline void Scalar(float* p, const float* grad, float* m, float* v, size_t i, size_t n,
                   const AdamWScalars& s) {
  const float one_minus_b1 = 1.0f - s.beta1, one_minus_b2 = 1.0f - s.beta2;
  for (; i < n; ++i) {
    const float g = grad[i] * s.grad_scale;
    const float mi = s.beta1 * m[i] + one_minus_b1 * g;
    const float vi = s.beta2 * v[i] + one_minus_b2 * g * g;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * s.decay - s.step_size * mi / (std::sqrt(vi) * s.inv_bias2_sqrt + s.eps);
  }
}

__attribute__((target("avx2"))) void Avx2(float* p, const float* grad, float* m, float* v, size_t n,
                                            const AdamWScalars& s) {
  const __m256 b1 = _mm256_set1_ps(s.beta1), b2 = _mm256_set1_ps(s.beta2);
  const __m256 c1 = _mm256_set1_ps(1.0f - s.beta1), c2 = _mm256_set1_ps(1.0f - s.beta2);
  const __m256 gs = _mm256_set1_ps(s.grad_scale), eps = _mm256_set1_ps(s.eps);
  const __m256 step = _mm256_set1_ps(s.step_size), ib = _mm256_set1_ps(s.inv_bias2_sqrt);
  const __m256 decay = _mm256_set1_ps(s.decay);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_mul_ps(_mm256_loadu_ps(grad + i), gs);
    const __m256 mi = _mm256_add_ps(_mm256_mul_ps(b1, _mm256_loadu_ps(m + i)), _mm256_mul_ps(c1, g));
    const __m256 vi =
        _mm256_add_ps(_mm256_mul_ps(b2, _mm256_loadu_ps(v + i)), _mm256_mul_ps(_mm256_mul_ps(c2, g), g));
    _mm256_storeu_ps(m + i, mi);
    _mm256_storeu_ps(v + i, vi);
    const __m256 denom = _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(vi), ib), eps);
    const __m256 update = _mm256_div_ps(_mm256_mul_ps(step, mi), denom);
    _mm256_storeu_ps(p + i, _mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(p + i), decay), update));
  }
  Scalar(p, grad, m, v, i, n, s);
}

__attribute__((target("avx512f"))) void Avx512(float* p, const float* grad, float* m, float* v, size_t n,
                                                 const AdamWScalars& s) {
  const __m512 b1 = _mm512_set1_ps(s.beta1), b2 = _mm512_set1_ps(s.beta2);
  const __m512 c1 = _mm512_set1_ps(1.0f - s.beta1), c2 = _mm512_set1_ps(1.0f - s.beta2);
  const __m512 gs = _mm512_set1_ps(s.grad_scale), eps = _mm512_set1_ps(s.eps);
  const __m512 step = _mm512_set1_ps(s.step_size), ib = _mm512_set1_ps(s.inv_bias2_sqrt);
  const __m512 decay = _mm512_set1_ps(s.decay);
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 g = _mm512_mul_ps(_mm512_loadu_ps(grad + i), gs);
    const __m512 mi = _mm512_add_ps(_mm512_mul_ps(b1, _mm512_loadu_ps(m + i)), _mm512_mul_ps(c1, g));
    const __m512 vi =
        _mm512_add_ps(_mm512_mul_ps(b2, _mm512_loadu_ps(v + i)), _mm512_mul_ps(_mm512_mul_ps(c2, g), g));
    _mm512_storeu_ps(m + i, mi);
    _mm512_storeu_ps(v + i, vi);
    const __m512 denom = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(vi), ib), eps);
    const __m512 update = _mm512_div_ps(_mm512_mul_ps(step, mi), denom);
    _mm512_storeu_ps(p + i, _mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(p + i), decay), update));
  }
  Scalar(p, grad, m, v, i, n, s);
}

}  // namespace

SimdLevel DetectSimd() {
  static const SimdLevel level = [] {
    SimdLevel best = SimdLevel::kScalar;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) best = SimdLevel::kAvx2;
    if (__builtin_cpu_supports("avx512f")) best = SimdLevel::kAvx512;
    if (const char* cap = std::getenv("LLAMAD_SIMD")) {
      if (std::strcmp(cap, "scalar") == 0) best = SimdLevel::kScalar;
      if (std::strcmp(cap, "avx2") == 0 && best == SimdLevel::kAvx512) best = SimdLevel::kAvx2;
    }
    return best;
  }();
  return level;
}

const char* SimdName(SimdLevel level) {
  switch (level) {
    case SimdLevel::kAvx512: return "avx512";
    case SimdLevel::kAvx2: return "avx2";
    case SimdLevel::kScalar: return "scalar";
  }
  return "?";
}

void AdamWF32(float* p, const float* grad, float* m, float* v, size_t n, const AdamWScalars& s,
              SimdLevel level) {
  switch (level) {
    case SimdLevel::kAvx512: return Avx512(p, grad, m, v, n, s);
    case SimdLevel::kAvx2: return Avx2(p, grad, m, v, n, s);
    case SimdLevel::kScalar: return Scalar(p, grad, m, v, 0, n, s);
  }
}

}  // namespace llamad::cpu
