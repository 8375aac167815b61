// A test fixture whose random inputs come from a fresh seed, printed when the test fails
// so that the failure can be run again with the same inputs: LLAMAD_TEST_SEED=<seed> in
// the environment fixes the seed. The GPU tests' and the emulator tests'.
#pragma once

#include <gtest/gtest.h>

#include <charconv>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <system_error>
#include <vector>

#include "engine/relative_error.h"

namespace llamad::testing {

// Over ::testing::Test or TestWithParam.
template <typename Base = ::testing::Test>
class SeededTest : public Base {
 protected:
  void SetUp() override {
    seed_ = std::random_device{}();
    if (const char* fixed = std::getenv("LLAMAD_TEST_SEED"); fixed != nullptr) {
      // Digits only (from_chars takes no sign or space), below 2^32.
      const char* end = fixed + std::strlen(fixed);
      uint32_t value = 0;
      const auto [stop, error] = std::from_chars(fixed, end, value);
      ASSERT_TRUE(fixed != end && error == std::errc() && stop == end)
          << "LLAMAD_TEST_SEED='" << fixed << "' is not a seed as a failed test prints it (a number below 2^32)";
      seed_ = value;
    }
    rng_.seed(seed_);
    seeded_ = true;
  }
  void TearDown() override {
    if (seeded_ && this->HasFailure()) {
      std::fprintf(stderr, "inputs drawn with seed %u (LLAMAD_TEST_SEED=%u draws them again)\n", seed_, seed_);
    }
  }

  // n normal values, each rounded to bf16 so that a device holds them exactly.
  std::vector<double> Random(size_t n, double std = 1.0, double mean = 0.0) {
    std::normal_distribution<double> normal(mean, std);
    std::vector<double> v(n);
    for (double& x : v) x = RoundBf16(normal(rng_));
    return v;
  }

  unsigned seed_ = 0;
  bool seeded_ = false;  // SetUp got as far as seeding rng_
  std::mt19937_64 rng_;
};

}  // namespace llamad::testing
