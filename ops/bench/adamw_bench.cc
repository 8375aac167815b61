// CPU AdamW throughput as bytes moved per second (read p, g, m, v; write p, m, v: 28
// bytes per f32 element), next to a STREAM-style triad (a = b + s c: 12 bytes per
// element by STREAM's count) and a loop with AdamW's own traffic and no arithmetic, both
// measured in the same run on the same threads, and next to the scalar path and the
// update with bf16 moments (offload.host_moments: bf16).
//
//   bench-adamw [--elements 67108864] [--threads 0]
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <cstdlib>
#include <string>
#include <vector>

#include "backend/cpu/adamw_simd.h"
#include "backend/cpu/blas_kernels.h"
#include "backend/cpu/cpu_backend.h"

namespace llamad {
namespace {

double Best(const std::function<void()>& f, int reps = 5) {
  f();  // first touch and warm-up
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const double t0 = omp_get_wtime();
    f();
    best = std::min(best, omp_get_wtime() - t0);
  }
  return best;
}

int Main(int argc, char** argv) {
  size_t n = size_t{64} << 20;
  int threads = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--elements") n = std::strtoull(argv[i + 1], nullptr, 10);
    else if (a == "--threads") threads = std::atoi(argv[i + 1]);
  }
  if (threads > 0) omp_set_num_threads(threads);
  const int used = omp_get_max_threads();
  std::vector<float> p(n), g(n), m(n), v(n);
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; ++i) {
    p[i] = 0.01f * float(i % 97);
    g[i] = 0.001f * float(i % 89) - 0.04f;
    m[i] = 0;
    v[i] = 0;
  }
  const cpu::AdamWScalars s{0.9f, 0.95f, 1e-8f, 1.0f, 3e-4f, 1.0f, 0.99997f};
  constexpr size_t kChunk = size_t{1} << 16;
  const size_t chunks = (n + kChunk - 1) / kChunk;
  auto adamw = [&](cpu::SimdLevel level) {
#pragma omp parallel for schedule(static)
    for (size_t c = 0; c < chunks; ++c) {
      const size_t b = c * kChunk, len = std::min(kChunk, n - b);
      cpu::AdamWF32(p.data() + b, g.data() + b, m.data() + b, v.data() + b, len, s, level);
    }
  };
  // Triad over three of the same arrays (STREAM counts 2 reads + 1 write).
  const double triad = Best([&] {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; ++i) m[i] = p[i] + 1.0001f * g[i];
  });
  // The same traffic as AdamW with almost no arithmetic: read p, g, m, v, write p, m, v
  // in place. What the memory system gives this access pattern.
  const double same_traffic = Best([&] {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; ++i) {
      const float gi = g[i];
      p[i] += gi;
      m[i] += gi;
      v[i] += gi;
    }
  });
  const cpu::SimdLevel best = cpu::DetectSimd();
  const double simd = Best([&] { adamw(best); });
  const double scalar = Best([&] { adamw(cpu::SimdLevel::kScalar); });
  // offload.host_moments: bf16: the same update with 2-byte moments (20 bytes per element).
  std::vector<uint16_t> m16(n), v16(n);
  cpu::F32ToBf16(m.data(), m16.data(), n);
  cpu::F32ToBf16(v.data(), v16.data(), n);
  int64_t step = 0;
  const double bf16 = Best([&] {
    const uint32_t seed = cpu::AdamWRoundingSeed(++step);
#pragma omp parallel for schedule(static)
    for (size_t c = 0; c < chunks; ++c) {
      const size_t b = c * kChunk, len = std::min(kChunk, n - b);
      cpu::AdamWBf16Moments(p.data() + b, g.data() + b, m16.data() + b, v16.data() + b, len, b, seed, s, best);
    }
  });
  const double triad_gbs = 12.0 * n / triad / 1e9;
  std::printf("bench-adamw: %zu f32 elements (%.0f MiB per array), %d threads\n", n, n * 4.0 / (1 << 20), used);
  const double same_gbs = 28.0 * n / same_traffic / 1e9;
  std::printf("  STREAM triad           : %7.2f GB/s  (STREAM's count: 12 bytes per element; the store's\n"
              "                                        write-allocate read makes it 16 in fact)\n", triad_gbs);
  std::printf("  same traffic as AdamW  : %7.2f GB/s  (p += g; m += g; v += g: 28 bytes per element)\n", same_gbs);
  std::printf("  AdamW, %-6s          : %7.2f GB/s  (%.0f%% of triad, %.0f%% of the same-traffic loop; %.2f G params/s)\n",
              cpu::SimdName(best), 28.0 * n / simd / 1e9, 100 * 28.0 * n / simd / 1e9 / triad_gbs,
              100 * 28.0 * n / simd / 1e9 / same_gbs, n / simd / 1e9);
  std::printf("  AdamW, scalar          : %7.2f GB/s  (%.0f%% of triad, %.0f%% of the same-traffic loop)\n",
              28.0 * n / scalar / 1e9, 100 * 28.0 * n / scalar / 1e9 / triad_gbs,
              100 * 28.0 * n / scalar / 1e9 / same_gbs);
  std::printf("  AdamW, bf16 moments    : %7.2f GB/s  (20 bytes per element; %.2f G params/s, %.2fx the f32 "
              "moments' rate)\n", 20.0 * n / bf16 / 1e9, n / bf16 / 1e9, simd / bf16);
  return 0;
}

}  // namespace
}  // namespace llamad

int main(int argc, char** argv) {
  llamad::SelectBlasKernels(argv);
  return llamad::Main(argc, argv);
}
