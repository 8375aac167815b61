// What the emulator tests share: the launch code's Device on the CPU emulator, buffers
// that show a write past either end, and device values as doubles.
#pragma once

#include <algorithm>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/cuda_emulator.h"

namespace llamad::testing {

// The kernels' launch code's Device (attention_kernels.cuh, layer_kernels.cuh) on the
// emulator, with a GPU's launch limits.
struct EmulatedGpu {
  cuda::emulator::Emulator& emulator;
  int max_grid_y = 65535;
  int shared_limit = 227 * 1024;
  unsigned max_strided_blocks = 65535u * 8;

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

}  // namespace llamad::testing
