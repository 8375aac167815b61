// Element types the engine stores tensors in.
#pragma once

#include <cstddef>
#include <string_view>

namespace llamad {

enum class DType {
  kF32,   // IEEE float32: the CPU backend's training type.
  kF64,   // IEEE float64: gradient checks and references only.
  kBF16,  // bfloat16: CUDA activations and weights.
};

// Bytes per element.
constexpr size_t DTypeSize(DType t) {
  switch (t) {
    case DType::kF32: return 4;
    case DType::kF64: return 8;
    case DType::kBF16: return 2;
  }
  return 0;
}

constexpr std::string_view DTypeName(DType t) {
  switch (t) {
    case DType::kF32: return "f32";
    case DType::kF64: return "f64";
    case DType::kBF16: return "bf16";
  }
  return "?";
}

}  // namespace llamad
