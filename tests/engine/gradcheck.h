// Finite-difference gradient checks in float64 on the CPU backend (whose buffers are
// host memory, so tests read and write them directly).
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "core/rng.h"

namespace llamad::testing {

// Fills x[0..n) with N(0, std^2) samples from a fixed stream.
inline void FillRandom(double* x, size_t n, uint64_t stream, double std = 1.0) {
  for (size_t i = 0; i < n; ++i) x[i] = std * RandomNormal(1234, stream, i);
}

struct GradInput {
  std::string name;
  double* data;                // Perturbed in place (restored afterwards).
  const double* grad;          // The analytic gradient to check.
  size_t numel;
};

// Compares each analytic gradient with central differences of `loss` (which must
// recompute from the current inputs) at up to `max_checks` evenly spread elements per
// input. Fails on |analytic - numeric| > tol * max(|analytic| + |numeric|, floor).
inline void ExpectGradientsMatch(const std::function<double()>& loss,
                                 const std::vector<GradInput>& inputs, double tol = 1e-6,
                                 size_t max_checks = 400, double step = 1e-5,
                                 double floor = 1e-4) {
  for (const GradInput& in : inputs) {
    const size_t stride = std::max<size_t>(1, in.numel / max_checks);
    int failures = 0;
    double worst = 0;
    for (size_t i = 0; i < in.numel; i += stride) {
      const double saved = in.data[i];
      in.data[i] = saved + step;
      const double up = loss();
      in.data[i] = saved - step;
      const double down = loss();
      in.data[i] = saved;
      const double numeric = (up - down) / (2 * step);
      const double analytic = in.grad[i];
      const double err = std::fabs(numeric - analytic) /
                         std::max(std::fabs(numeric) + std::fabs(analytic), floor);
      worst = std::max(worst, err);
      if (err > tol && failures++ < 5) {
        ADD_FAILURE() << in.name << "[" << i << "]: analytic " << analytic << " numeric " << numeric;
      }
    }
    EXPECT_EQ(failures, 0) << in.name << ": worst relative error " << worst;
  }
}

inline double Dot(const double* a, const double* b, size_t n) {
  double s = 0;
  for (size_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace llamad::testing
