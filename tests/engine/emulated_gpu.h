// What the emulator tests share: the launch code's Device on the CPU emulator, buffers
// that show a write past either end, device values as doubles, and a fixture that draws
// bf16 inputs from a seed it prints when a test fails.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/cuda_emulator.h"
// CUDA code comes after the emulator, which gives its qualifiers their host meanings.
#include "backend/cuda/cuda_common.cuh"
#include "engine/relative_error.h"

namespace llamad::testing {

// The kernels' launch code's Device (attention_kernels.cuh, layer_kernels.cuh) on the
// emulator, with a GPU's launch limits.
struct EmulatedGpu {
  cuda::emulator::Emulator& emulator;
  int max_grid_y = cuda::kMaxGridY;
  int shared_limit = int(cuda::emulator::Emulator::kSharedBytes);
  unsigned max_strided_blocks = cuda::kMaxStridedBlocks;

  template <typename... Params, typename... Args>
  void Launch(void (*kernel)(Params...), dim3 grid, int threads, int shared_bytes, Args... args) {
    if (shared_bytes > shared_limit) {
      throw std::runtime_error("a launch asks for " + std::to_string(shared_bytes) + " bytes of shared memory, " +
                               "more than the " + std::to_string(shared_limit) + " a block may have");
    }
    if (int(grid.y) > max_grid_y) throw std::runtime_error("grid y " + std::to_string(grid.y) + " past the limit");
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw std::runtime_error("a launch of an empty grid");
    emulator.Run(grid, dim3(threads), shared_bytes, [&] { kernel(args...); });
  }
  int SharedMemoryLimit() const { return shared_limit; }
};

// A buffer with guard elements on both sides, so that a write past either end shows.
template <typename T>
class Guarded {
 public:
  explicit Guarded(size_t n, T fill) : v_(n + 2 * kGuard, Sentinel()) {
    std::fill(data(), data() + n, fill);
  }
  T* data() { return v_.data() + kGuard; }
  const T* data() const { return v_.data() + kGuard; }
  size_t size() const { return v_.size() - 2 * kGuard; }
  bool GuardsIntact() const {
    for (size_t i = 0; i < kGuard; ++i) {
      if (!Same(v_[i]) || !Same(v_[v_.size() - 1 - i])) return false;
    }
    return true;
  }

 private:
  static constexpr size_t kGuard = 64;
  static T Sentinel() { return T(12345.0f); }
  static bool Same(T x) { return float(x) == float(Sentinel()); }
  std::vector<T> v_;
};

inline std::vector<double> Floats(const __nv_bfloat16* p, size_t n) {
  std::vector<double> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = __bfloat162float(p[i]);
  return v;
}
inline std::vector<double> Floats(const float* p, size_t n) { return std::vector<double>(p, p + n); }
inline std::vector<double> Floats(const double* p, size_t n) { return std::vector<double>(p, p + n); }


// `values` in the emulated device's memory, as T.
template <typename T>
Guarded<T> OnDevice(const std::vector<double>& values) {
  Guarded<T> buffer(values.size(), T(0.f));
  for (size_t i = 0; i < values.size(); ++i) buffer.data()[i] = T(float(values[i]));
  return buffer;
}
// n NaNs in the emulated device's memory: an output no kernel wrote stays NaN.
template <typename T>
Guarded<T> Poisoned(size_t n) {
  return Guarded<T>(n, T(std::numeric_limits<float>::quiet_NaN()));
}
// A device buffer's values, once a test has checked that no kernel wrote past its ends.
template <typename T>
std::vector<double> Values(const Guarded<T>& buffer) {
  EXPECT_TRUE(buffer.GuardsIntact()) << "a kernel wrote outside its output";
  return Floats(buffer.data(), buffer.size());
}

// A fixture (over ::testing::Test or TestWithParam) whose inputs come from a fresh seed,
// printed when the test fails so that the failure can be run again.
template <typename Base = ::testing::Test>
class SeededTest : public Base {
 protected:
  void SetUp() override {
    seed_ = std::random_device{}();
    rng_.seed(seed_);
  }
  void TearDown() override {
    if (this->HasFailure()) std::fprintf(stderr, "inputs drawn with seed %u\n", seed_);
  }

  // n normal values, each rounded to bf16 so that the device holds them exactly.
  std::vector<double> Random(size_t n, double std = 1.0, double mean = 0.0) {
    std::normal_distribution<double> normal(mean, std);
    std::vector<double> v(n);
    for (double& x : v) x = RoundBf16(normal(rng_));
    return v;
  }

  unsigned seed_ = 0;
  std::mt19937_64 rng_;
};

}  // namespace llamad::testing
