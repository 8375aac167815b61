// Raw corpus -> prepared dataset: reads documents (corpus.h), tokenizes them on several
// threads (the output does not depend on the thread count) and packs them into shards
// (shards.h). The folder gets index.json last, so an interrupted run leaves no new
// dataset (and an overwrite the old one whole). The index names the dataset's files; the
// folder's other files are left alone.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "data/corpus.h"

namespace llamad::data {

struct PrepareOptions {
  std::string input;      // a corpus file or folder
  std::string tokenizer;  // a SentencePiece model file
  std::string out;        // the dataset folder (created)
  CorpusOptions corpus;
  int threads = 0;        // 0: all cores
  uint64_t shard_tokens = uint64_t{1} << 28;  // a new shard after this many tokens
  // Replace a dataset already in `out`. The new one is written beside it under other
  // file names, and only the rename of its index switches to it: a failed or killed run
  // leaves the old one as it was, and jobs that have the old one open keep reading it. A
  // run keeps a record (prepare.pending) while it works, by which the next prepare into
  // `out` removes what a killed run left and nothing else.
  bool overwrite = false;
};

struct PrepareResult {
  CorpusReport report;
  uint64_t tokens = 0;
  uint64_t documents = 0;
  int shards = 0;
  double seconds = 0;
};

absl::StatusOr<PrepareResult> PrepareDataset(const PrepareOptions& options);

}  // namespace llamad::data
