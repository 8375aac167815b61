#include "backend/cpu/adamw_simd.h"

#include <immintrin.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace llamad::cpu {
namespace {

// The moments' storage. f32 as is; bf16 as the top 16 bits of the f32, rounded up with
// the probability of the dropped bits (add 16 random bits, then truncate): unbiased.
inline uint32_t Bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}
inline float FromBits(uint32_t b) {
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}
inline float LoadMoment(const float* a, size_t i) { return a[i]; }
inline float LoadMoment(const uint16_t* a, size_t i) { return FromBits(uint32_t(a[i]) << 16); }
inline void StoreMoment(float* a, size_t i, float x, uint32_t) { a[i] = x; }
inline void StoreMoment(uint16_t* a, size_t i, float x, uint32_t random16) {
  a[i] = uint16_t((Bits(x) + random16) >> 16);
}

// The reference order of operations; the vector paths below mirror it exactly. `first`
// is element 0's index for the rounding's random bits (bf16 moments only).
template <typename M>
void Scalar(float* p, const float* grad, M* m, M* v, size_t i, size_t n, const AdamWScalars& s, size_t first,
            uint32_t seed) {
  const float one_minus_b1 = 1.0f - s.beta1, one_minus_b2 = 1.0f - s.beta2;
  for (; i < n; ++i) {
    const float g = grad[i] * s.grad_scale;
    const float mi = s.beta1 * LoadMoment(m, i) + one_minus_b1 * g;
    const float vi = s.beta2 * LoadMoment(v, i) + one_minus_b2 * g * g;
    uint32_t random = 0;
    if constexpr (std::is_same_v<M, uint16_t>) random = RoundingBits(first + i, seed);
    StoreMoment(m, i, mi, random & 0xFFFF);
    StoreMoment(v, i, vi, random >> 16);
    p[i] = p[i] * s.decay - s.step_size * mi / (std::sqrt(vi) * s.inv_bias2_sqrt + s.eps);
  }
}

// AVX2: 8 elements at a time.
__attribute__((target("avx2"))) inline __m256 Load8(const float* a) { return _mm256_loadu_ps(a); }
__attribute__((target("avx2"))) inline __m256 Load8(const uint16_t* a) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
__attribute__((target("avx2"))) inline void Store8(float* a, __m256 x, __m256i) { _mm256_storeu_ps(a, x); }
__attribute__((target("avx2"))) inline void Store8(uint16_t* a, __m256 x, __m256i random16) {
  const __m256i top = _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(x), random16), 16);
  // Pack the eight 16-bit values (packus works per 128-bit lane: lanes 0 and 2 hold them).
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(top, top), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(a), _mm256_castsi256_si128(packed));
}
__attribute__((target("avx2"))) inline __m256i Hash8(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int(kRoundingMul1)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int(kRoundingMul2)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

template <typename M>
__attribute__((target("avx2"))) void Avx2(float* p, const float* grad, M* m, M* v, size_t n, const AdamWScalars& s,
                                            size_t first, uint32_t seed) {
  const __m256 b1 = _mm256_set1_ps(s.beta1), b2 = _mm256_set1_ps(s.beta2);
  const __m256 c1 = _mm256_set1_ps(1.0f - s.beta1), c2 = _mm256_set1_ps(1.0f - s.beta2);
  const __m256 gs = _mm256_set1_ps(s.grad_scale), eps = _mm256_set1_ps(s.eps);
  const __m256 step = _mm256_set1_ps(s.step_size), ib = _mm256_set1_ps(s.inv_bias2_sqrt);
  const __m256 decay = _mm256_set1_ps(s.decay);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), low16 = _mm256_set1_epi32(0xFFFF);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_mul_ps(_mm256_loadu_ps(grad + i), gs);
    const __m256 mi = _mm256_add_ps(_mm256_mul_ps(b1, Load8(m + i)), _mm256_mul_ps(c1, g));
    const __m256 vi = _mm256_add_ps(_mm256_mul_ps(b2, Load8(v + i)), _mm256_mul_ps(_mm256_mul_ps(c2, g), g));
    __m256i random = _mm256_setzero_si256();
    if constexpr (std::is_same_v<M, uint16_t>) {
      const __m256i index = _mm256_add_epi32(_mm256_set1_epi32(int(uint32_t(first + i))), lanes);
      random = Hash8(_mm256_xor_si256(index, _mm256_set1_epi32(int(seed))));
    }
    Store8(m + i, mi, _mm256_and_si256(random, low16));
    Store8(v + i, vi, _mm256_srli_epi32(random, 16));
    const __m256 denom = _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(vi), ib), eps);
    const __m256 update = _mm256_div_ps(_mm256_mul_ps(step, mi), denom);
    _mm256_storeu_ps(p + i, _mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(p + i), decay), update));
  }
  Scalar(p, grad, m, v, i, n, s, first, seed);
}

// AVX-512: 16 elements at a time.
__attribute__((target("avx512f"))) inline __m512 Load16(const float* a) { return _mm512_loadu_ps(a); }
__attribute__((target("avx512f"))) inline __m512 Load16(const uint16_t* a) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
__attribute__((target("avx512f"))) inline void Store16(float* a, __m512 x, __m512i) { _mm512_storeu_ps(a, x); }
__attribute__((target("avx512f"))) inline void Store16(uint16_t* a, __m512 x, __m512i random16) {
  const __m512i top = _mm512_srli_epi32(_mm512_add_epi32(_mm512_castps_si512(x), random16), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(a), _mm512_cvtepi32_epi16(top));
}
__attribute__((target("avx512f"))) inline __m512i Hash16(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(int(kRoundingMul1)));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(int(kRoundingMul2)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

template <typename M>
__attribute__((target("avx512f"))) void Avx512(float* p, const float* grad, M* m, M* v, size_t n,
                                                 const AdamWScalars& s, size_t first, uint32_t seed) {
  const __m512 b1 = _mm512_set1_ps(s.beta1), b2 = _mm512_set1_ps(s.beta2);
  const __m512 c1 = _mm512_set1_ps(1.0f - s.beta1), c2 = _mm512_set1_ps(1.0f - s.beta2);
  const __m512 gs = _mm512_set1_ps(s.grad_scale), eps = _mm512_set1_ps(s.eps);
  const __m512 step = _mm512_set1_ps(s.step_size), ib = _mm512_set1_ps(s.inv_bias2_sqrt);
  const __m512 decay = _mm512_set1_ps(s.decay);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i low16 = _mm512_set1_epi32(0xFFFF);
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 g = _mm512_mul_ps(_mm512_loadu_ps(grad + i), gs);
    const __m512 mi = _mm512_add_ps(_mm512_mul_ps(b1, Load16(m + i)), _mm512_mul_ps(c1, g));
    const __m512 vi = _mm512_add_ps(_mm512_mul_ps(b2, Load16(v + i)), _mm512_mul_ps(_mm512_mul_ps(c2, g), g));
    __m512i random = _mm512_setzero_si512();
    if constexpr (std::is_same_v<M, uint16_t>) {
      const __m512i index = _mm512_add_epi32(_mm512_set1_epi32(int(uint32_t(first + i))), lanes);
      random = Hash16(_mm512_xor_si512(index, _mm512_set1_epi32(int(seed))));
    }
    Store16(m + i, mi, _mm512_and_si512(random, low16));
    Store16(v + i, vi, _mm512_srli_epi32(random, 16));
    const __m512 denom = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(vi), ib), eps);
    const __m512 update = _mm512_div_ps(_mm512_mul_ps(step, mi), denom);
    _mm512_storeu_ps(p + i, _mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(p + i), decay), update));
  }
  Scalar(p, grad, m, v, i, n, s, first, seed);
}

template <typename M>
void Dispatch(float* p, const float* grad, M* m, M* v, size_t n, const AdamWScalars& s, size_t first, uint32_t seed,
              SimdLevel level) {
  switch (level) {
    case SimdLevel::kAvx512: return Avx512(p, grad, m, v, n, s, first, seed);
    case SimdLevel::kAvx2: return Avx2(p, grad, m, v, n, s, first, seed);
    case SimdLevel::kScalar: return Scalar(p, grad, m, v, 0, n, s, first, seed);
  }
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
  Dispatch(p, grad, m, v, n, s, 0, 0, level);
}

void AdamWBf16Moments(float* p, const float* grad, uint16_t* m, uint16_t* v, size_t n, size_t first,
                      uint32_t seed, const AdamWScalars& s, SimdLevel level) {
  Dispatch(p, grad, m, v, n, s, first, seed, level);
}

void Bf16ToF32(const uint16_t* src, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = LoadMoment(src, i);
}

void F32ToBf16(const float* src, uint16_t* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const uint32_t b = Bits(src[i]);
    // NaN stays NaN (quiet); otherwise round half to even on the dropped 16 bits.
    dst[i] = (b & 0x7fffffffu) > 0x7f800000u ? uint16_t((b >> 16) | 0x40) : uint16_t((b + 0x7fffu + ((b >> 16) & 1)) >> 16);
  }
}

}  // namespace llamad::cpu
