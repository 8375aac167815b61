// The CPU AdamW update at memory bandwidth: AVX-512 or AVX2 chosen at run time from the
// CPU's features, with a scalar fallback. Every path performs the same IEEE operations in
// the same order (no fused multiply-add), so all of them give bit-identical results.
#pragma once

#include <cstddef>
#include <cstdint>

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

// The same update with the moments stored as bf16, for the host-offloaded optimizer
// (offload.host_moments: bf16): 20 bytes moved per element instead of 28. The update
// itself uses the f32 moments it computed; only what is stored is rounded, and
// stochastically (round up with the probability of the dropped bits), so that an average
// of small increments (v with beta2 near 1) grows as in f32 instead of stalling at
// round-to-nearest's step. The random bits are a hash of the element's index (first + i,
// its low 32 bits) and `seed` (AdamWRoundingSeed: one per step), so a run repeats bit for
// bit at any thread count or chunking.
void AdamWBf16Moments(float* p, const float* grad, uint16_t* m, uint16_t* v, size_t n, size_t first,
                      uint32_t seed, const AdamWScalars& s, SimdLevel level);

// The mixer of the rounding's random bits: a 32-bit integer hash (Wellons' lowbias32).
inline constexpr uint32_t kRoundingMul1 = 0x7feb352du, kRoundingMul2 = 0x846ca68bu;
inline constexpr uint32_t RoundingHash(uint32_t x) {
  x ^= x >> 16;
  x *= kRoundingMul1;
  x ^= x >> 15;
  x *= kRoundingMul2;
  return x ^ (x >> 16);
}
// Element `index`'s 32 random bits at `seed`: the low 16 round m, the high 16 round v.
inline constexpr uint32_t RoundingBits(size_t index, uint32_t seed) { return RoundingHash(uint32_t(index) ^ seed); }
inline constexpr uint32_t AdamWRoundingSeed(int64_t step) { return RoundingHash(uint32_t(step) * 0x9e3779b9u + 1u); }

// bf16 moments to f32 and back (to nearest, ties to even), for checkpoints and for state
// that moves between the device and the host. On the calling thread.
void Bf16ToF32(const uint16_t* src, float* dst, size_t n);
void F32ToBf16(const float* src, uint16_t* dst, size_t n);

}  // namespace llamad::cpu
