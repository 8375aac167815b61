// Token input for training: a source of fixed-length windows, and the sampler that
// decides which window each rank reads at each step.
//
// Windows are seq_len + 1 consecutive ids (inputs and their next-token targets) starting
// at multiples of seq_len. Sources: TokenDataset (ids in memory: a flat uint32 file, or
// any file read as one id per byte) and data::PreparedDataset (memory-mapped shards).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace llamad {

class TokenSource {
 public:
  virtual ~TokenSource() = default;
  virtual size_t num_tokens() const = 0;
  // Complete windows of seq_len + 1 tokens.
  virtual size_t NumWindows(int seq_len) const = 0;
  // Copies window `window` < NumWindows(seq_len) into out[seq_len + 1]. Thread-safe.
  virtual void ReadWindow(size_t window, int seq_len, int32_t* out) const = 0;
};

class TokenDataset final : public TokenSource {
 public:
  // Reads `path` ("uint32" or "bytes" format) and checks every id is below `vocab_size`.
  static absl::StatusOr<TokenDataset> Open(const std::string& path, const std::string& format,
                                           int64_t vocab_size);
  // Wraps ids already in memory (tests).
  static TokenDataset FromTokens(std::vector<int32_t> tokens);

  size_t num_tokens() const override { return tokens_.size(); }
  size_t NumWindows(int seq_len) const override;
  void ReadWindow(size_t window, int seq_len, int32_t* out) const override;
  const std::vector<int32_t>& tokens() const { return tokens_; }

 private:
  std::vector<int32_t> tokens_;
};

// A bijection of [0, n) chosen by (seed, epoch): a Feistel network over the smallest
// power of four >= n, walked until it lands inside [0, n). O(1) memory and time per
// index, so the order of billions of windows needs no table.
uint64_t PermuteIndex(uint64_t index, uint64_t n, uint64_t seed, uint64_t epoch);

// The global sample order: position p reads window PermuteIndex(p mod n) of epoch
// p / n. A run's data state is one position. Data-parallel ranks split each step's
// global batch by RankSlice, so the order, and which windows a step reads, do not depend
// on the world size: after a resize every window of the epoch is still read exactly once.
class WindowSampler {
 public:
  WindowSampler(const TokenSource* data, int seq_len, uint64_t seed);

  uint64_t WindowAt(uint64_t position) const;
  // Fills tokens[count, seq_len] and targets (the next token) with the windows at
  // positions first .. first + count - 1.
  void Fill(uint64_t first, int count, int32_t* tokens, int32_t* targets) const;
  // Single rank: the next `batch` positions.
  void Next(int batch, int32_t* tokens, int32_t* targets);
  uint64_t position() const { return position_; }
  void set_position(uint64_t position) { position_ = position; }

  // The positions [begin, end), relative to the step's first position, that rank `rank`
  // of `world` reads from a step of `global_batch` windows: contiguous slices whose
  // sizes differ by at most one.
  static std::pair<uint64_t, uint64_t> RankSlice(uint64_t global_batch, int rank, int world);

 private:
  const TokenSource* data_;
  int seq_len_;
  uint64_t seed_;
  uint64_t windows_;
  uint64_t position_ = 0;
};

}  // namespace llamad
