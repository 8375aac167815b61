// Hugging Face safetensors: an 8-byte little-endian header length, a JSON header
// ({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}), then the
// tensor bytes. We write F32 and read F32, F16 and BF16 (converted to float32).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace llamad::storage {

struct SafetensorsEntry {
  std::string name;
  std::string dtype;             // "F32", "F16" or "BF16" (others are refused on read)
  std::vector<int64_t> shape;
  std::string file;              // The file holding it.
  uint64_t begin = 0, end = 0;   // Byte range in the file, after the header.
  uint64_t data_start = 0;       // Where the data section of `file` begins.
  uint64_t numel() const;
};

struct TensorToWrite {
  std::string name;
  std::vector<int64_t> shape;
  const float* data = nullptr;   // numel(shape) floats
};

// Writes one safetensors file of F32 tensors (to a temporary name, then renamed).
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

// The tensors of a Hugging Face model folder: model.safetensors, or the files that
// model.safetensors.index.json lists. Errors name the file and what is wrong.
absl::StatusOr<std::map<std::string, SafetensorsEntry>> ListSafetensors(const std::string& path_or_dir);

// Reads a tensor as float32 into out[numel()].
absl::Status ReadAsFloat32(const SafetensorsEntry& entry, float* out);
// Elements [first, last) of the tensor only.
absl::Status ReadAsFloat32(const SafetensorsEntry& entry, uint64_t first, uint64_t last, float* out);

}  // namespace llamad::storage
