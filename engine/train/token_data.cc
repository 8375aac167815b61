#include "train/token_data.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>

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

WindowSampler::WindowSampler(const TokenDataset* data, int seq_len, uint64_t seed)
    : data_(data), seq_len_(seq_len), seed_(seed) {}

void WindowSampler::Shuffle(uint64_t epoch) {
  order_.resize(data_->NumWindows(seq_len_));
  std::iota(order_.begin(), order_.end(), 0u);
  SplitMix64 rng(Mix64(seed_) ^ Mix64(epoch + 1));
  for (size_t i = order_.size(); i > 1; --i) std::swap(order_[i - 1], order_[rng.Below(i)]);
  epoch_ = epoch;
}

void WindowSampler::Next(int batch, int32_t* tokens, int32_t* targets) {
  const size_t windows = data_->NumWindows(seq_len_);
  for (int b = 0; b < batch; ++b, ++position_) {
    const uint64_t epoch = position_ / windows;
    if (epoch != epoch_) Shuffle(epoch);
    const size_t start = size_t(order_[position_ % windows]) * seq_len_;
    const int32_t* src = data_->tokens().data() + start;
    std::memcpy(tokens + size_t(b) * seq_len_, src, sizeof(int32_t) * seq_len_);
    std::memcpy(targets + size_t(b) * seq_len_, src + 1, sizeof(int32_t) * seq_len_);
  }
}

}  // namespace llamad
