// Token input for training until the data pipeline (prepared shards and the resumable
// sampler) lands: a flat file of little-endian uint32 ids, or any file read as one id
// per byte. Windows of seq_len + 1 tokens are cut at multiples of seq_len and visited in
// a seeded random order per epoch.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace llamad {

class TokenDataset {
 public:
  // Reads `path` ("uint32" or "bytes" format) and checks every id is below `vocab_size`.
  static absl::StatusOr<TokenDataset> Open(const std::string& path, const std::string& format,
                                           int64_t vocab_size);
  // Wraps ids already in memory (tests).
  static TokenDataset FromTokens(std::vector<int32_t> tokens);

  size_t num_tokens() const { return tokens_.size(); }
  const std::vector<int32_t>& tokens() const { return tokens_; }
  // Complete windows of seq_len + 1 tokens.
  size_t NumWindows(int seq_len) const;

 private:
  std::vector<int32_t> tokens_;
};

// Deterministic sample order: window order is a seeded permutation per epoch; the state
// is one position in that global order.
class WindowSampler {
 public:
  WindowSampler(const TokenDataset* data, int seq_len, uint64_t seed);
  // Fills tokens[batch, seq_len] and targets (the next token) with the next `batch`
  // windows of the global order.
  void Next(int batch, int32_t* tokens, int32_t* targets);
  uint64_t position() const { return position_; }
  void set_position(uint64_t position) { position_ = position; }

 private:
  void Shuffle(uint64_t epoch);

  const TokenDataset* data_;
  int seq_len_;
  uint64_t seed_;
  uint64_t position_ = 0;
  uint64_t epoch_ = UINT64_MAX;
  std::vector<uint32_t> order_;
};

}  // namespace llamad
