// A small deterministic token file (uint32 ids below 60) that multi-process tests
// train on: learnable patterns, no tokenizer, the same bytes for every test.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

namespace llamad::testing {

inline void WriteSyntheticTokens(const std::filesystem::path& path, uint32_t count = 6000) {
  std::string tokens;
  for (uint32_t i = 0; i < count; ++i) {
    const uint32_t id = (i * 7 + i / 13 + (i * i) % 11) % 60;
    tokens.append(reinterpret_cast<const char*>(&id), 4);
  }
  std::ofstream(path, std::ios::binary) << tokens;
}

}  // namespace llamad::testing
