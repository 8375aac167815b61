// Damages one byte of a file in place (corruption tests).
#pragma once

#include <cstdint>
#include <fstream>
#include <string>

namespace llamad::testing {

// XORs the byte at `offset` of `path` with `mask`; false when the file cannot be read
// or written there.
inline bool FlipByte(const std::string& path, uint64_t offset, char mask = 0x01) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  char c = 0;
  f.seekg(std::streamoff(offset));
  f.read(&c, 1);
  c = char(c ^ mask);
  f.seekp(std::streamoff(offset));
  f.write(&c, 1);
  return bool(f);
}

}  // namespace llamad::testing
