// llama-data: datasets for llama-train.
//
//   llama-data prepare -d DATASET --tokenizer MODEL --out DIR [--strict] [--threads N]
//   llama-data tokenizer train -d DATASET --vocab-size N --out PREFIX [--threads N]
//   llama-data tokenizer encode --tokenizer MODEL [--input FILE] [--threads N]
//   llama-data inspect DIR [--verify] [--docs N]
//
// DATASET is a corpus file or folder (RedPajama JSONL or text; plain, .gz or .zst),
// "sample" (the bundled corpus) or a Hugging Face dataset name (downloaded first).
// Exit codes: 0 success, 2 bad command line or input, 1 other failures.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>

#include "core/cli_integers.h"
#include "core/strings.h"
#include "core/threads.h"
#include "data/corpus.h"
#include "data/dataset.h"
#include "data/download.h"
#include "data/prepare.h"
#include "data/shards.h"
#include "data/tokenizer.h"
#include "storage/files.h"

namespace llamad::data {
namespace {

constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "llama-data: %s\n", std::string(status.message()).c_str());
  const auto code = status.code();
  return code == absl::StatusCode::kInvalidArgument || code == absl::StatusCode::kNotFound ||
                 code == absl::StatusCode::kAlreadyExists || code == absl::StatusCode::kDataLoss
             ? kExitUsage
             : kExitFailure;
}

// A local corpus path for DATASET: "sample", a path, or a hub name fetched into the cache.
absl::StatusOr<std::string> CorpusPath(const std::string& dataset) {
  return LocalDatasetPath(dataset, /*base_dir=*/"", /*allow_hub=*/true, [](const std::string& line) {
    std::fprintf(stderr, "llama-data: %s\n", line.c_str());
  });
}

int Prepare(const std::string& dataset, PrepareOptions o) {
  auto input = CorpusPath(dataset);
  if (!input.ok()) return Fail(input.status());
  o.input = *input;
  if (o.tokenizer.empty()) {
    if (dataset != "sample") {
      return Fail(absl::InvalidArgumentError("--tokenizer: a SentencePiece model is needed "
                                             "(`llama-data tokenizer train` makes one)"));
    }
    o.tokenizer = std::filesystem::path(*input).parent_path().string() + "/tokenizer.model";
  }
  auto result = PrepareDataset(o);
  if (!result.ok()) return Fail(result.status());
  std::printf("prepared %s: %llu documents, %llu tokens, %d shards in %.1f s (%.1f MB/s)\n%s\n",
              o.out.c_str(), (unsigned long long)result->documents, (unsigned long long)result->tokens,
              result->shards, result->seconds, result->report.bytes / 1e6 / result->seconds,
              result->report.Summary().c_str());
  return 0;
}

int TrainTokenizerCommand(const std::string& dataset, const CorpusOptions& corpus,
                          const TokenizerTrainOptions& options) {
  // A folder the model cannot be written to is found before the corpus is read and trained on.
  if (const std::string folder = std::filesystem::path(options.model_prefix).parent_path().string(); !folder.empty()) {
    if (auto s = storage::CreateFolders(folder); !s.ok()) return Fail(s);
  }
  auto input = CorpusPath(dataset);
  if (!input.ok()) return Fail(input.status());
  // Each non-empty line of each document is one training sentence.
  std::vector<std::string> lines;
  CorpusReport report;
  auto read = ReadCorpus(*input, corpus, &report, [&](std::string&& text) {
    size_t start = 0;
    while (start <= text.size()) {
      size_t end = text.find('\n', start);
      if (end == std::string::npos) end = text.size();
      if (text.find_first_not_of(" \t\r", start) < end) lines.push_back(text.substr(start, end - start));
      start = end + 1;
    }
  });
  if (!read.ok()) return Fail(read);
  std::fprintf(stderr, "llama-data: training a %d-piece BPE tokenizer on %zu lines\n%s\n", options.vocab_size,
               lines.size(), report.Summary().c_str());
  size_t next = 0;
  const std::string error = TrainTokenizer(options, [&](std::string* line) {
    if (next >= lines.size()) return false;
    *line = lines[next++];
    return true;
  });
  if (!error.empty()) return Fail(absl::InvalidArgumentError(StrCat("tokenizer training: ", error)));
  std::printf("wrote %s.model and %s.vocab\n", options.model_prefix.c_str(), options.model_prefix.c_str());
  return 0;
}

// Like spm_encode --output_format=id: one line of ids per input line.
int Encode(const std::string& model, const std::string& input, int threads) {
  std::string error;
  auto tok = Tokenizer::Load(model, &error);
  if (!tok) return Fail(absl::InvalidArgumentError(error));
  std::ifstream file;
  if (!input.empty()) {
    std::error_code ec;
    if (std::filesystem::is_directory(input, ec)) {
      return Fail(absl::InvalidArgumentError(StrCat("--input ", input, ": is a folder, not a text file")));
    }
    file.open(input);
    if (!file) return Fail(absl::NotFoundError(StrCat(input, ": cannot open")));
  }
  std::istream& in = input.empty() ? std::cin : file;
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(std::move(line));
  if (in.bad()) return Fail(absl::InternalError(StrCat(input.empty() ? "standard input" : input, ": read failed")));
  for (const auto& ids : EncodeAll(*tok, lines, threads)) std::printf("%s\n", StrJoin(ids, " ").c_str());
  return 0;
}

int Inspect(const std::string& dir, bool verify, int docs) {
  auto d = PreparedDataset::Open(dir);
  if (!d.ok()) return Fail(d.status());
  if (verify) {
    if (auto s = (*d)->Verify(); !s.ok()) return Fail(s);
  }
  const nlohmann::json index = nlohmann::json::parse((*d)->index_json());
  // Informational fields: shown when they have the type the index gives them.
  const auto source_field = index.find("source");
  const std::string source =
      source_field != index.end() && source_field->is_string() ? source_field->get<std::string>() : "?";
  std::printf("dataset %s\n  source %s\n  %llu documents, %llu tokens, vocabulary %lld (%s ids), %zu shards%s\n",
              dir.c_str(), source.c_str(), (unsigned long long)(*d)->documents(),
              (unsigned long long)(*d)->num_tokens(), (long long)(*d)->vocab_size(),
              IdBytesFor(uint64_t((*d)->vocab_size())) == 2 ? "uint16" : "uint32", (*d)->shards().size(),
              verify ? ", checksums verified" : "");
  for (const ShardInfo& s : (*d)->shards()) {
    std::printf("  %s: %llu documents, %llu tokens\n", s.file.c_str(), (unsigned long long)s.documents,
                (unsigned long long)s.tokens);
  }
  if (index.contains("report")) std::printf("  ingestion report: %s\n", index["report"].dump().c_str());
  for (const int seq : {512, 2048}) {
    std::printf("  windows at seq_len %d: %zu\n", seq, (*d)->NumWindows(seq));
  }
  if (docs > 0 && !(*d)->shards().empty()) {
    std::string error;
    auto tok = Tokenizer::FromSerialized((*d)->tokenizer_model(), &error);
    for (int i = 0; i < docs && uint64_t(i) < (*d)->shards()[0].documents; ++i) {
      const auto document = (*d)->Document(0, uint64_t(i));
      if (!document.ok()) return Fail(document.status());
      const std::vector<int32_t>& ids = *document;
      std::string text = tok ? tok->Decode(ids) : StrJoin(ids, " ");
      if (text.size() > 300) text = text.substr(0, 300) + "...";
      std::printf("  document %d (%zu tokens): %s\n", i, ids.size(), text.c_str());
    }
  }
  return 0;
}

int Main(int argc, char** argv) {
  CLI::App app("llama-data: prepare token datasets and tokenizers for llama-train");
  app.require_subcommand(1);
  std::string dataset, out, tokenizer, input;
  PrepareOptions prep;
  CorpusOptions corpus;
  TokenizerTrainOptions train;
  bool verify = false;
  int docs = 2, threads = 0;

  const CLI::Range kThreadRange(0, kMaxThreads);  // 0: all cores
  auto* prepare = app.add_subcommand("prepare", "Tokenize a corpus into a prepared dataset");
  prepare->add_option("-d,--dataset", dataset, "Corpus file or folder, 'sample', or a Hugging Face dataset")->required();
  prepare->add_option("--tokenizer", prep.tokenizer, "SentencePiece model (default for -d sample: its own)");
  prepare->add_option("--out", prep.out, "Dataset folder to create")->required();
  prepare->add_flag("--strict", prep.corpus.strict, "Fail on the first malformed input instead of skipping it");
  prepare->add_option("--threads", prep.threads, "Tokenizer threads (default: all cores)")->check(kThreadRange);
  prepare->add_option("--shard-tokens", prep.shard_tokens, "Tokens per shard")
      ->check(CLI::Range(uint64_t{1}, uint64_t{1} << 40));
  prepare->add_option("--max-document-bytes", prep.corpus.max_document_bytes, "Longer documents are split")
      ->check(CLI::Range(size_t{4}, size_t{1} << 40));
  prepare->add_flag("--overwrite", prep.overwrite, "Replace a dataset already in --out");

  auto* tok = app.add_subcommand("tokenizer", "Train or apply a SentencePiece tokenizer");
  tok->require_subcommand(1);
  auto* tok_train = tok->add_subcommand("train", "Train a BPE tokenizer (LLaMA layout) on a corpus");
  tok_train->add_option("-d,--dataset", dataset, "Corpus file or folder, 'sample', or a Hugging Face dataset")->required();
  tok_train->add_option("--vocab-size", train.vocab_size, "Pieces")->check(CLI::Range(260, 1 << 20));
  tok_train->add_option("--out", train.model_prefix, "Output prefix (PREFIX.model, PREFIX.vocab)")->required();
  tok_train->add_option("--threads", train.threads, "Trainer threads (default: all cores, at most 128)")
      ->check(CLI::Range(0, kMaxTokenizerTrainThreads));
  tok_train->add_option("--input-sentence-size", train.input_sentence_size, "Lines sampled for training (0: all)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 40))
      ->check(CLI::Validator(
          [](std::string& value) -> std::string {
            const auto lines = ParseInt64(value);
            if (!lines || *lines == 0 || *lines >= kMinTokenizerSentenceSample) return "";
            return StrCat("Value ", value, " is too small a sample: 0 (all lines) or at least ",
                          kMinTokenizerSentenceSample);
          },
          StrCat("0 or at least ", kMinTokenizerSentenceSample)));
  tok_train->add_option("--seed", train.seed, "Seed of the line sample");
  tok_train->add_flag("--strict", corpus.strict, "Fail on the first malformed input");
  auto* tok_encode = tok->add_subcommand("encode", "Print ids per input line (as spm_encode --output_format=id)");
  tok_encode->add_option("--tokenizer", tokenizer, "SentencePiece model")->required();
  tok_encode->add_option("--input", input, "Text file (default: standard input)");
  tok_encode->add_option("--threads", threads, "Threads (default: all cores)")->check(kThreadRange);

  auto* inspect = app.add_subcommand("inspect", "Describe a prepared dataset");
  inspect->add_option("dir", out, "Dataset folder")->required();
  inspect->add_flag("--verify", verify, "Recompute every shard's checksum");
  inspect->add_option("--docs", docs, "Documents to show decoded")->check(CLI::Range(0, 1 << 20));

  StrictIntegers(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : kExitUsage;
  }
  if (*prepare) return Prepare(dataset, prep);
  if (*tok_train) return TrainTokenizerCommand(dataset, corpus, train);
  if (*tok_encode) return Encode(tokenizer, input, threads);
  if (*inspect) return Inspect(out, verify, docs);
  return kExitUsage;
}

}  // namespace
}  // namespace llamad::data

int main(int argc, char** argv) {
  try {
    return llamad::data::Main(argc, argv);
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "llama-data: out of memory\n");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "llama-data: internal error: %s\n", e.what());
  }
  return 1;
}
