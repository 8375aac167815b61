// SentencePiece tokenizer (LLaMA layout: unk 0, bos 1, eos 2, byte fallback).
//
// This header and tokenizer.cc include no absl header: sentencepiece_processor.h
// defines its own absl::string_view, which clashes with the real absl. Errors come back
// as strings; callers wrap them in their own status.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace llamad::data {

class Tokenizer {
 public:
  // Loads a SentencePiece model file (for example LLaMA's tokenizer.model). Returns
  // null and sets *error when it cannot.
  static std::unique_ptr<Tokenizer> Load(const std::string& path, std::string* error);
  // From the bytes of a model file.
  static std::unique_ptr<Tokenizer> FromSerialized(std::string_view model, std::string* error);
  ~Tokenizer();

  // Ids of `text` without bos/eos. Identical to `spm_encode --output_format=id` on the
  // same model and text. Thread-safe.
  std::vector<int32_t> Encode(std::string_view text) const;
  std::string Decode(const std::vector<int32_t>& ids) const;

  int vocab_size() const;
  int unk_id() const;
  int bos_id() const;
  int eos_id() const;
  std::string IdToPiece(int id) const;
  bool IsByte(int id) const;
  // The model file's bytes (for embedding in datasets and checkpoints).
  const std::string& serialized() const { return serialized_; }

 private:
  Tokenizer();
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::string serialized_;
};

// The ids of each of `texts` (Tokenizer::Encode), on up to `threads` threads (0: all
// cores). The same result for any thread count: every text is encoded on its own.
std::vector<std::vector<int32_t>> EncodeAll(const Tokenizer& tokenizer, const std::vector<std::string>& texts,
                                            int threads);

// SentencePiece's limits on its trainer: threads, and a line sample of 0 (all) or above 100.
inline constexpr int kMaxTokenizerTrainThreads = 128;
inline constexpr int64_t kMinTokenizerSentenceSample = 101;

struct TokenizerTrainOptions {
  std::string model_prefix;  // writes <prefix>.model and <prefix>.vocab
  int vocab_size = 32000;
  int threads = 0;           // 0: all cores, at most kMaxTokenizerTrainThreads
  // Sentences (lines) sampled for training (0: all), and the longest line used (bytes).
  int64_t input_sentence_size = 2000000;
  int max_sentence_length = 16384;
  uint64_t seed = 42;
};

// Trains a BPE model with LLaMA's settings (byte fallback, split digits, identity
// normalisation, unk 0 / bos 1 / eos 2, no pad) on the lines `next_line` yields until it
// returns false. Returns an empty string on success, else the error.
std::string TrainTokenizer(const TokenizerTrainOptions& options,
                           const std::function<bool(std::string* line)>& next_line);

}  // namespace llamad::data
