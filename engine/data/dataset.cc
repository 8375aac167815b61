#include "data/dataset.h"

#include <xxhash.h>

#include <cstdlib>
#include <filesystem>

#include "core/strings.h"
#include "data/corpus.h"
#include "data/download.h"
#include "data/prepare.h"
#include "data/shards.h"
#include "data/tokenizer.h"
#include "storage/files.h"

// The sample corpus and its tokenizer, linked in from data/sample/ (sample_assets.S).
extern "C" const char llamad_sample_corpus_begin[], llamad_sample_corpus_end[];
extern "C" const char llamad_sample_tokenizer_begin[], llamad_sample_tokenizer_end[];

namespace llamad::data {
namespace fs = std::filesystem;

namespace {

std::string Hex(uint64_t v) { return fmt::format("{:016x}", v); }

// Prepares `input` with `tokenizer` into the cache, keyed by the corpus files' names,
// sizes and times and the tokenizer's bytes: a changed corpus is prepared again.
absl::StatusOr<std::string> PrepareCached(const std::string& input, const std::string& tokenizer,
                                          const std::function<void(const std::string&)>& log) {
  std::vector<std::string> files;
  if (auto s = ListCorpusFiles(input, &files); !s.ok()) return s;
  auto model = storage::ReadFile(tokenizer);
  if (!model.ok()) {
    return absl::Status(model.status().code(), StrCat(model.status().message(), " (the tokenizer model)"));
  }
  XXH64_state_t* h = XXH64_createState();
  XXH64_reset(h, uint64_t(kDatasetVersion));
  XXH64_update(h, model->data(), model->size());
  for (const std::string& f : files) {
    std::error_code ec;
    const std::string abs = fs::absolute(f).string();
    const uint64_t size = fs::file_size(f, ec);
    const auto mtime = fs::last_write_time(f, ec).time_since_epoch().count();
    XXH64_update(h, abs.data(), abs.size() + 1);
    XXH64_update(h, &size, sizeof(size));
    XXH64_update(h, &mtime, sizeof(mtime));
  }
  const std::string dir = CacheDir() + "/prepared/" + Hex(XXH64_digest(h));
  XXH64_freeState(h);
  std::error_code ec;
  if (fs::exists(dir + "/index.json", ec)) return dir;
  // One preparer per dataset: others (another job, llama-data) wait for it, then use its
  // result.
  if (auto s = storage::CreateFolders(CacheDir() + "/prepared"); !s.ok()) return s;
  auto lock = storage::FileLock::Acquire(dir + ".lock");
  if (!lock.ok()) return lock.status();
  if (fs::exists(dir + "/index.json", ec)) return dir;
  log(StrCat("preparing ", input, " (", files.size(), " files) into ", dir));
  PrepareOptions options;
  options.input = input;
  options.tokenizer = tokenizer;
  options.out = dir + ".partial";
  options.overwrite = true;
  fs::remove_all(options.out, ec);  // an interrupted run's leftovers
  auto result = PrepareDataset(options);
  if (!result.ok()) return result.status();
  log(StrCat("prepared ", result->documents, " documents, ", result->tokens, " tokens in ",
             fmt::format("{:.1f}", result->seconds), " s; ", result->report.Summary()));
  fs::remove_all(dir, ec);
  fs::rename(options.out, dir, ec);
  if (ec) return absl::InternalError(StrCat(dir, ": ", ec.message()));
  return dir;
}

}  // namespace

std::string CacheDir() {
  if (const char* c = std::getenv("LLAMAD_CACHE"); c != nullptr && *c != '\0') return c;
  if (const char* home = std::getenv("HOME"); home != nullptr && *home != '\0') {
    return std::string(home) + "/.cache/llamad";
  }
  return "/tmp/llamad-cache";
}

std::string_view SampleCorpus() {
  return {llamad_sample_corpus_begin, size_t(llamad_sample_corpus_end - llamad_sample_corpus_begin)};
}

std::string_view SampleTokenizer() {
  return {llamad_sample_tokenizer_begin,
          size_t(llamad_sample_tokenizer_end - llamad_sample_tokenizer_begin)};
}

absl::StatusOr<std::string> UnpackSample() {
  const std::string_view corpus = SampleCorpus(), tokenizer = SampleTokenizer();
  const std::string dir =
      CacheDir() + "/sample-" + Hex(XXH64(corpus.data(), corpus.size(), XXH64(tokenizer.data(), tokenizer.size(), 0)));
  if (auto s = storage::CreateFolders(dir); !s.ok()) return s;
  // Ranks of one job unpack at once: one writes, the others then find the files whole.
  auto lock = storage::FileLock::Acquire(dir + ".lock");
  if (!lock.ok()) return lock.status();
  std::error_code ec;
  const std::pair<const char*, std::string_view> files[] = {{"sample.jsonl.zst", corpus},
                                                           {"tokenizer.model", tokenizer}};
  for (const auto& [name, bytes] : files) {
    const std::string path = dir + "/" + name;
    if (fs::exists(path, ec) && fs::file_size(path, ec) == bytes.size()) continue;
    if (auto s = storage::WriteFileAtomically(path, bytes); !s.ok()) return s;
  }
  return dir;
}

absl::StatusOr<std::string> LocalDatasetPath(const std::string& dataset, const std::string& base_dir,
                                             bool allow_hub,
                                             const std::function<void(const std::string&)>& log) {
  if (dataset == "sample") {
    auto dir = UnpackSample();
    if (!dir.ok()) return dir.status();
    return *dir + "/sample.jsonl.zst";
  }
  fs::path p(dataset);
  if (p.is_relative() && !base_dir.empty()) p = fs::path(base_dir) / p;
  const std::string path = p.lexically_normal().string();
  std::error_code ec;
  if (fs::exists(path, ec)) return path;
  if (!allow_hub || !IsHubDatasetName(dataset)) {
    return absl::NotFoundError(StrCat(path, ": no such file or folder (dataset '", dataset, "')"));
  }
  log(StrCat(dataset, ": not a local path; fetching it from the Hugging Face hub into ", CacheDir()));
  DownloadOptions options;
  options.cache_dir = CacheDir();
  return FetchDataset(dataset, options);
}

absl::StatusOr<OpenedData> OpenTrainingData(const DataSpec& spec, int64_t vocab_size,
                                            const std::function<void(const std::string&)>& log) {
  if (spec.dataset.empty()) {
    return absl::InvalidArgumentError(
        "data.dataset: no dataset given (set it in the job file, or pass -d PATH or -d sample)");
  }
  std::string format = spec.format, tokenizer = spec.tokenizer;
  // A hub name stands only for a raw corpus.
  auto path = LocalDatasetPath(spec.dataset, spec.base_dir, format == "auto" || format == "raw", log);
  if (!path.ok()) return path.status();
  if (spec.dataset == "sample" && tokenizer.empty()) {
    tokenizer = fs::path(*path).parent_path().string() + "/tokenizer.model";
  }
  std::error_code ec;
  if (format == "auto") {
    if (fs::is_directory(*path, ec)) {
      format = fs::exists(*path + "/index.json", ec) ? "prepared" : "raw";
    } else {
      // A corpus file by its name; else token ids.
      format = IsCorpusFileName(*path) ? "raw" : "uint32";
    }
  }
  OpenedData out;
  if (format == "uint32" || format == "bytes") {
    auto data = TokenDataset::Open(*path, format, vocab_size);
    if (!data.ok()) {
      if (spec.format != "auto") return data.status();
      return absl::Status(data.status().code(),  // say why it was read as ids
                          StrCat(data.status().message(), " (read as uint32 token ids: the name is not a corpus "
                                 "file's (", kCorpusFileNames, "); set data.format)"));
    }
    out.description = StrCat(*path, " (", format, ", ", data->num_tokens(), " tokens)");
    out.source = std::make_unique<TokenDataset>(std::move(*data));
    return out;
  }
  if (format == "raw") {
    if (tokenizer.empty()) {
      return absl::InvalidArgumentError(StrCat(
          *path, ": a raw corpus needs a SentencePiece model: set data.tokenizer or pass --tokenizer "
                "(`llama-data tokenizer train` makes one)"));
    }
    path = PrepareCached(*path, tokenizer, log);
    if (!path.ok()) return path.status();
  }
  auto prepared = PreparedDataset::Open(*path);
  if (!prepared.ok()) return prepared.status();
  if ((*prepared)->vocab_size() > vocab_size) {
    return absl::InvalidArgumentError(StrCat(
        *path, ": the dataset's tokenizer has ", (*prepared)->vocab_size(), " ids, more than the model's vocab_size ",
        vocab_size));
  }
  out.description = StrCat(spec.dataset, " (", (*prepared)->documents(), " documents, ",
                           (*prepared)->num_tokens(), " tokens, prepared in ", *path, ")");
  out.tokenizer_model = (*prepared)->tokenizer_model();
  out.source = std::move(*prepared);
  return out;
}

}  // namespace llamad::data
