#include "train/token_data.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <algorithm>
#include <numeric>

#include "comm/communicator.h"
#include "core/strings.h"
#include "core/rng.h"

namespace llamad {

absl::StatusOr<TokenDataset> TokenDataset::Open(const std::string& path, const std::string& format,
                                                int64_t vocab_size) {
  if (path.empty()) {
    return absl::InvalidArgumentError("data.dataset: no dataset given (set it in the job file or pass -d FILE)");
  }
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    return absl::NotFoundError(StrCat(path, ": not a readable dataset file"));
  }
  const uintmax_t size = std::filesystem::file_size(path, ec);
  std::ifstream in(path, std::ios::binary);
  if (!in || ec) return absl::NotFoundError(StrCat(path, ": cannot open dataset file"));
  std::vector<char> bytes(static_cast<size_t>(size));
  if (size > 0 && !in.read(bytes.data(), std::streamsize(size))) {
    return absl::DataLossError(StrCat(path, ": read failed"));
  }
  TokenDataset data;
  if (format == "bytes") {
    if (vocab_size < 256) {
      return absl::InvalidArgumentError(StrCat(
          path, ": the bytes format needs vocab_size >= 256, the model has ", vocab_size));
    }
    data.tokens_.resize(bytes.size());
    for (size_t i = 0; i < bytes.size(); ++i) data.tokens_[i] = static_cast<uint8_t>(bytes[i]);
  } else if (format == "uint32") {
    if (bytes.size() % 4 != 0) {
      return absl::InvalidArgumentError(StrCat(
          path, ": size ", bytes.size(), " bytes is not a multiple of 4 (expected little-endian uint32 ids)"));
    }
    data.tokens_.resize(bytes.size() / 4);
    for (size_t i = 0; i < data.tokens_.size(); ++i) {
      const auto* b = reinterpret_cast<const uint8_t*>(bytes.data() + 4 * i);
      const uint32_t id = uint32_t(b[0]) | uint32_t(b[1]) << 8 | uint32_t(b[2]) << 16 | uint32_t(b[3]) << 24;
      if (id >= uint64_t(vocab_size)) {
        return absl::InvalidArgumentError(StrCat(path, ": token ", i, " (byte offset ", 4 * i,
                                                       ") is ", id, ", outside the vocabulary of ",
                                                       vocab_size));
      }
      data.tokens_[i] = int32_t(id);
    }
  } else {
    return absl::InvalidArgumentError(StrCat("data.format: '", format, "' is not one of uint32, bytes"));
  }
  return data;
}

TokenDataset TokenDataset::FromTokens(std::vector<int32_t> tokens) {
  TokenDataset data;
  data.tokens_ = std::move(tokens);
  return data;
}

size_t TokenDataset::NumWindows(int seq_len) const {
  return tokens_.size() > 0 ? (tokens_.size() - 1) / size_t(seq_len) : 0;
}

void TokenDataset::ReadWindow(size_t window, int seq_len, int32_t* out) const {
  std::memcpy(out, tokens_.data() + window * size_t(seq_len), sizeof(int32_t) * (size_t(seq_len) + 1));
}

uint64_t PermuteIndex(uint64_t index, uint64_t n, uint64_t seed, uint64_t epoch) {
  if (n <= 1) return 0;
  int half = 1;  // bits per Feistel half: the domain 4^half is the first >= n
  while ((uint64_t{1} << (2 * half)) < n) ++half;
  const uint64_t mask = (uint64_t{1} << half) - 1;
  const uint64_t key = Mix64(Mix64(seed) ^ Mix64(epoch + 0x5851f42d4c957f2dULL));
  uint64_t x = index;
  do {  // cycle walking: at most a few rounds on average (the domain is < 4n)
    uint64_t left = x >> half, right = x & mask;
    for (uint64_t round = 0; round < 4; ++round) {
      const uint64_t f = Mix64(key + round * 0x9e3779b97f4a7c15ULL + right) & mask;
      const uint64_t next = left ^ f;
      left = right;
      right = next;
    }
    x = (left << half) | right;
  } while (x >= n);
  return x;
}

WindowSampler::WindowSampler(const TokenSource* data, int seq_len, uint64_t seed)
    : data_(data), seq_len_(seq_len), seed_(seed), windows_(data->NumWindows(seq_len)) {}

uint64_t WindowSampler::WindowAt(uint64_t position) const {
  return PermuteIndex(position % windows_, windows_, seed_, position / windows_);
}

void WindowSampler::Fill(uint64_t first, int count, int32_t* tokens, int32_t* targets) const {
  std::vector<int32_t> window(size_t(seq_len_) + 1);
  for (int b = 0; b < count; ++b) {
    data_->ReadWindow(WindowAt(first + uint64_t(b)), seq_len_, window.data());
    std::memcpy(tokens + size_t(b) * seq_len_, window.data(), sizeof(int32_t) * seq_len_);
    std::memcpy(targets + size_t(b) * seq_len_, window.data() + 1, sizeof(int32_t) * seq_len_);
  }
}

void WindowSampler::Next(int batch, int32_t* tokens, int32_t* targets) {
  Fill(position_, batch, tokens, targets);
  position_ += uint64_t(batch);
}

std::pair<uint64_t, uint64_t> WindowSampler::RankSlice(uint64_t global_batch, int rank, int world) {
  return EvenSlice(global_batch, rank, world);
}

}  // namespace llamad
