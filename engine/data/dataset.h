// Turns a job's data section into training input: opens a prepared dataset, prepares a
// raw corpus (once: the result is cached by content), unpacks the bundled sample corpus,
// or downloads a Hugging Face dataset first.
#pragma once

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

struct OpenedData {
  std::unique_ptr<TokenSource> source;
  std::string description;  // what was opened, for the run's log
};

// Opens spec's dataset for a model of `vocab_size`. `log` receives progress lines
// (preparing, downloading).
absl::StatusOr<OpenedData> OpenTrainingData(const DataSpec& spec, int64_t vocab_size,
                                            const std::function<void(const std::string&)>& log);

}  // namespace llamad::data
