// How the GPU tests measure a result against the float64 CPU reference.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "backend/backend.h"

namespace llamad::testing {

// v rounded to the nearest bf16 (ties to even), as a double.
inline double RoundBf16(double v) {
  float f = float(v);
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

// ||a - ref|| / ||ref||, or infinity when a holds a non-finite value.
inline double RelError(const std::vector<double>& a, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return std::numeric_limits<double>::infinity();
    num += (a[i] - ref[i]) * (a[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// For accumulated outputs: RelError of what `a` added to `before` against what `ref`
// added, so that the starting values do not dilute the error.
inline double RelIncrementError(std::vector<double> a, std::vector<double> ref, const std::vector<double>& before) {
  for (size_t i = 0; i < before.size(); ++i) {
    a[i] -= before[i];
    ref[i] -= before[i];
  }
  return RelError(a, ref);
}

// The q, k and v parts of a q|k|v buffer (or its gradient), each rows x its heads' width,
// so that each is measured on its own.
inline constexpr const char* kQkvGradientNames[3] = {"dq", "dk", "dv"};
inline std::array<std::vector<double>, 3> QkvParts(const std::vector<double>& v, const AttentionShape& s) {
  const int q_cols = s.heads * s.head_dim, kv_cols = s.kv_heads * s.head_dim;
  const int first[3] = {0, q_cols, q_cols + kv_cols}, width[3] = {q_cols, kv_cols, kv_cols};
  std::array<std::vector<double>, 3> parts;
  for (size_t row = 0; row < v.size() / size_t(s.row_stride()); ++row) {
    for (int part = 0; part < 3; ++part) {
      const double* at = v.data() + row * s.row_stride() + first[part];
      parts[part].insert(parts[part].end(), at, at + width[part]);
    }
  }
  return parts;
}

}  // namespace llamad::testing
