// Counter-based random numbers: the value at (seed, stream, index) does not depend on
// the order of generation or on the number of threads, so initialisation and sampling are
// reproducible bit for bit on any machine.
#pragma once

#include <cmath>
#include <cstdint>

// The generator's arithmetic also runs in CUDA kernels (the CUDA backend's FillNormal).
#include "core/host_device.h"

namespace llamad {

// SplitMix64 finaliser: a bijective 64-bit mixer with good avalanche.
LLAMAD_HOST_DEVICE constexpr uint64_t Mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// The 64 random bits at `index` of the stream `stream` under `seed`.
LLAMAD_HOST_DEVICE constexpr uint64_t RandomBits(uint64_t seed, uint64_t stream, uint64_t index) {
  return Mix64(Mix64(seed ^ Mix64(stream + 0x632be59bd9b4e019ULL)) + index);
}

// Uniform in (0, 1), never exactly 0 or 1 (53-bit resolution).
LLAMAD_HOST_DEVICE inline double RandomUniform(uint64_t seed, uint64_t stream, uint64_t index) {
  return (static_cast<double>(RandomBits(seed, stream, index) >> 11) + 0.5) * 0x1.0p-53;
}

// Standard normal sample by Box-Muller over two independent uniforms of one counter.
// Unqualified sqrt, log and cos: the C library's on the host, CUDA's on a device.
LLAMAD_HOST_DEVICE inline double RandomNormal(uint64_t seed, uint64_t stream, uint64_t index) {
  const double u1 = RandomUniform(seed, stream, 2 * index);
  const double u2 = RandomUniform(seed, stream, 2 * index + 1);
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

// A small sequential generator for shuffles (deterministic for a given seed).
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t Next() { return Mix64(state_++); }
  // Uniform integer in [0, bound) without modulo bias.
  uint64_t Below(uint64_t bound) {
    const uint64_t limit = UINT64_MAX - UINT64_MAX % bound;
    uint64_t r;
    do r = Next(); while (r >= limit);
    return r % bound;
  }

 private:
  uint64_t state_;
};

}  // namespace llamad
