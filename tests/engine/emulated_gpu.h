// What the emulator tests share: the launch code's Device on the CPU emulator, buffers
// that show a write past either end, device values as doubles, launches whose broken
// rules fail the test, and the CPU backend's buffers for the reference.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "engine/cuda_emulator.h"
// CUDA code comes after the emulator, which gives its qualifiers their host meanings.
#include "backend/cuda/cuda_common.cuh"
#include "backend/backend.h"
#include "engine/seeded_test.h"

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
// A device buffer's values; a kernel that wrote past its ends fails the test.
template <typename T>
std::vector<double> Values(const Guarded<T>& buffer) {
  EXPECT_TRUE(buffer.GuardsIntact()) << "a kernel wrote outside its output";
  std::vector<double> v(buffer.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      v[i] = __bfloat162float(buffer.data()[i]);
    } else {
      v[i] = buffer.data()[i];  // float or double
    }
  }
  return v;
}

// Runs launches on the emulator; a rule a kernel broke is a test failure.
template <typename Launches>
bool Emulate(Launches&& launches) {
  try {
    launches();
    return true;
  } catch (const std::exception& e) {
    ADD_FAILURE() << e.what();
    return false;
  }
}

// Buffers of a float64 CPU backend (the reference), freed with this.
class CpuBuffers {
 public:
  explicit CpuBuffers(Backend& cpu) : cpu_(cpu) {}
  CpuBuffers(const CpuBuffers&) = delete;
  CpuBuffers& operator=(const CpuBuffers&) = delete;
  ~CpuBuffers() {
    for (void* p : buffers_) cpu_.Free(p);
  }
  void* Upload(const std::vector<double>& values) {
    buffers_.push_back(cpu_.Allocate(values.size()));
    cpu_.Upload(buffers_.back(), values.data(), values.size());
    return buffers_.back();
  }
  std::vector<double> Download(const void* buffer, size_t n) {
    std::vector<double> v(n);
    cpu_.Download(v.data(), buffer, n);
    return v;
  }

 private:
  Backend& cpu_;
  std::vector<void*> buffers_;
};

}  // namespace llamad::testing
