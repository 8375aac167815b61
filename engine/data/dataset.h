// Turns a job's data section into training input: opens a prepared dataset, prepares a
// raw corpus (once: the result is cached by content), unpacks the bundled sample corpus,
// or downloads a Hugging Face dataset first.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "train/jobspec.h"
#include "train/token_data.h"

namespace llamad::data {

// The cache folder: $LLAMAD_CACHE, else ~/.cache/llamad.
std::string CacheDir();

// The bundled sample corpus (RedPajama-format JSONL, zstd) and its tokenizer model.
std::string_view SampleCorpus();
std::string_view SampleTokenizer();
// Writes both into the cache (once) and returns the folder holding sample.jsonl.zst and
// tokenizer.model.
absl::StatusOr<std::string> UnpackSample();

// The local corpus or dataset a DATASET argument names: "sample" (unpacked into the
// cache), a path (relative ones against base_dir, or the working directory when empty),
// or, when no such path exists and `allow_hub`, a Hugging Face dataset fetched into the
// cache. NotFound names the path otherwise.
absl::StatusOr<std::string> LocalDatasetPath(const std::string& dataset, const std::string& base_dir,
                                             bool allow_hub,
                                             const std::function<void(const std::string&)>& log);

struct OpenedData {
  std::unique_ptr<TokenSource> source;
  std::string description;  // what was opened, for the run's log
  // The bytes of the SentencePiece model that made the tokens (a prepared dataset's
  // tokenizer, read when it opened); empty for bare token files, which do not say.
  std::string tokenizer_model;
};

// Opens spec's dataset for a model of `vocab_size`. `log` receives progress lines
// (preparing, downloading).
absl::StatusOr<OpenedData> OpenTrainingData(const DataSpec& spec, int64_t vocab_size,
                                            const std::function<void(const std::string&)>& log);

}  // namespace llamad::data
