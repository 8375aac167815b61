#include "data/prepare.h"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <set>
#include <string_view>
#include <vector>

#include "core/strings.h"
#include "data/shards.h"
#include "data/tokenizer.h"
#include "storage/files.h"

namespace llamad::data {
namespace fs = std::filesystem;

namespace {

// A dataset's files are named by generation: a new dataset is built beside the one in use
// under names that it does not have, and the index written last says which are current.
// Generation 0 has the plain names.
std::string ShardName(int generation, size_t shard) {
  return generation == 0 ? fmt::format("shard-{:05d}.tok", shard)
                         : fmt::format("shard-g{}-{:05d}.tok", generation, shard);
}
std::string TokenizerName(int generation) {
  return generation == 0 ? "tokenizer.model" : fmt::format("tokenizer-g{}.model", generation);
}

bool AllDigits(std::string_view s) {
  return !s.empty() && s.size() <= 9 && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// The generation whose shard or tokenizer `name` is (also as a ".tmp" being written); -1
// for any other file.
int GenerationOf(std::string_view name) {
  if (name.ends_with(".tmp")) name.remove_suffix(4);
  // As ShardName and TokenizerName write them: no leading zero.
  auto generation = [](std::string_view digits) {
    return AllDigits(digits) && digits[0] != '0' ? int(*ParseInt64(digits)) : -1;
  };
  if (name == "tokenizer.model") return 0;
  if (name.starts_with("tokenizer-g") && name.ends_with(".model")) return generation(name.substr(11, name.size() - 17));
  if (!name.starts_with("shard-") || !name.ends_with(".tok")) return -1;
  name = name.substr(6, name.size() - 10);
  if (AllDigits(name)) return 0;
  const size_t dash = name.find('-');
  if (!name.starts_with("g") || dash == std::string_view::npos || !AllDigits(name.substr(dash + 1))) return -1;
  return generation(name.substr(1, dash - 1));
}

// The record of a prepare under way: the generation it writes and the files of the
// dataset it replaces. A killed run leaves it behind, and it is what lets the next run
// remove that run's files and no others: a file of the folder's that no index and no
// record names may be the user's (say, the tokenizer.model given to --tokenizer).
constexpr char kPendingFile[] = "prepare.pending";

// A file that preparing writes into a dataset's folder.
bool IsDatasetFile(std::string_view name) {
  return name == "index.json" || name == "index.json.tmp" || name == "prepare.pending.tmp" ||
         GenerationOf(name) >= 0;
}

// Builds a dataset into o.out under `generation`'s file names, which no file in the folder
// has, and commits it by renaming its index over index.json.
absl::StatusOr<PrepareResult> BuildDataset(const PrepareOptions& o, const Tokenizer& tok, int generation) {
  const auto start = std::chrono::steady_clock::now();
  PrepareResult result;
  std::vector<ShardInfo> shards;
  std::unique_ptr<ShardWriter> writer;
  absl::Status write_status;
  auto finish_shard = [&]() -> absl::Status {
    if (!writer) return absl::OkStatus();
    if (auto s = writer->Finish(); !s.ok()) return s;
    shards.back().tokens = writer->tokens();
    shards.back().documents = writer->documents();
    writer.reset();
    return absl::OkStatus();
  };
  std::vector<std::string> batch;
  size_t batch_bytes = 0;
  auto flush = [&]() -> absl::Status {
    for (const auto& doc : EncodeAll(tok, batch, o.threads)) {
      if (writer && writer->tokens() >= o.shard_tokens) {
        if (auto s = finish_shard(); !s.ok()) return s;
      }
      if (!writer) {
        const std::string name = ShardName(generation, shards.size());
        auto w = ShardWriter::Create(o.out + "/" + name, tok.vocab_size(), tok.eos_id());
        if (!w.ok()) return w.status();
        writer = std::move(*w);
        shards.push_back({name, 0, 0});
      }
      if (auto s = writer->Add(doc); !s.ok()) return s;
      result.tokens += doc.size() + 1;
      ++result.documents;
    }
    batch.clear();
    batch_bytes = 0;
    return absl::OkStatus();
  };
  auto read = ReadCorpus(o.input, o.corpus, &result.report, [&](std::string&& text) {
    if (!write_status.ok()) return;
    batch_bytes += text.size();
    batch.push_back(std::move(text));
    if (batch_bytes >= (size_t{16} << 20)) write_status = flush();
  });
  if (!read.ok()) return read;
  if (write_status.ok()) write_status = flush();
  if (write_status.ok()) write_status = finish_shard();
  if (!write_status.ok()) return write_status;
  if (result.documents == 0) {
    return absl::InvalidArgumentError(StrCat(o.input, ": no documents to prepare\n", result.report.Summary()));
  }

  // The tokenizer travels with the dataset, and the index goes in last: its rename commits.
  const std::string tokenizer = TokenizerName(generation);
  if (auto s = storage::WriteFileAtomically(StrCat(o.out, "/", tokenizer), tok.serialized()); !s.ok()) return s;
  nlohmann::json index = {{"format", kDatasetFormat},
                          {"version", kDatasetVersion},
                          {"vocab_size", tok.vocab_size()},
                          {"eos_id", tok.eos_id()},
                          {"bos_id", tok.bos_id()},
                          {"tokenizer", tokenizer},
                          {"source", fs::absolute(o.input).string()},
                          {"tokens", result.tokens},
                          {"documents", result.documents},
                          {"shards", nlohmann::json::array()}};
  for (const ShardInfo& s : shards) {
    index["shards"].push_back({{"file", s.file}, {"tokens", s.tokens}, {"documents", s.documents}});
  }
  const CorpusReport& r = result.report;
  index["report"] = {{"files", r.files},           {"lines", r.lines},     {"documents", r.documents},
                     {"bytes", r.bytes},           {"bad_json", r.bad_json}, {"invalid_utf8", r.invalid_utf8},
                     {"empty", r.empty},           {"split", r.split},     {"truncated_files", r.truncated_files}};
  // The source path may hold bytes that are not UTF-8 (a legal file name): replaced.
  const std::string text = index.dump(1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  if (auto s = storage::WriteFileAtomically(o.out + "/index.json", text); !s.ok()) return s;
  result.shards = int(shards.size());
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

// The dataset a folder holds: whether it has an index, and the files it names when it
// can be read (nothing else in the folder is in use). One that cannot is left alone.
struct DatasetInFolder {
  bool exists = false;
  bool readable = false;
  std::set<std::string> files;
};

DatasetInFolder ReadDatasetInFolder(const std::string& dir) {
  DatasetInFolder d;
  std::error_code ec;
  d.exists = fs::exists(dir + "/index.json", ec);
  if (!d.exists) return d;
  d.files = {"index.json"};
  // The index alone says which files are in use: a damaged shard is still replaced.
  auto index = ReadDatasetIndex(dir);
  if (!index.ok()) return d;
  d.readable = true;
  for (const ShardInfo& shard : index->shards) d.files.insert(shard.file);
  if (!index->tokenizer_file.empty()) d.files.insert(index->tokenizer_file);
  return d;
}

// Removes the dataset files in `dir` that `remove` picks, except `keep` (the tokenizer the
// run was given, when it is one of them).
void RemoveDatasetFiles(const std::string& dir, const fs::path& keep,
                        const std::function<bool(const std::string& name)>& remove) {
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    std::error_code same, removed;
    if (IsDatasetFile(name) && remove(name) && !fs::equivalent(entry.path(), keep, same)) {
      fs::remove(entry.path(), removed);
    }
  }
}

// A record the next prepare acts on: the generation being written and the files to remove
// once it is in use.
struct Pending {
  int generation = -1;
  std::set<std::string> replaces;
};

absl::Status WritePending(const std::string& dir, const Pending& p) {
  const nlohmann::json record = {{"generation", p.generation}, {"replaces", p.replaces}};
  return storage::WriteFileAtomically(StrCat(dir, "/", kPendingFile), record.dump() + "\n");
}

// Finishes what a killed prepare left: its temporary files, and by its record its
// generation's files, unless the index took them up, or else the files of the dataset
// they replaced. Returns the dataset in use. While its index cannot be read, which files
// are in use cannot be told: nothing is removed, and the record is returned in `unfinished`
// for the next record to carry on.
DatasetInFolder FinishPending(const std::string& dir, const fs::path& keep, Pending* unfinished) {
  const std::string path = StrCat(dir, "/", kPendingFile);
  Pending p;
  if (std::ifstream in(path); in) {
    const nlohmann::json record = nlohmann::json::parse(in, nullptr, false);
    try {
      p.generation = record.at("generation").get<int>();
      p.replaces = record.at("replaces").get<std::set<std::string>>();
    } catch (const nlohmann::json::exception&) {
      p = Pending{};  // not one of ours (they are written whole): its files cannot be told
    }
  }
  DatasetInFolder in_use = ReadDatasetInFolder(dir);
  if (in_use.exists && !in_use.readable) {
    *unfinished = std::move(p);
    return in_use;
  }
  RemoveDatasetFiles(dir, keep, [&](const std::string& name) {
    return !in_use.files.contains(name) && ((p.generation >= 0 && GenerationOf(name) == p.generation) ||
                                           p.replaces.contains(name) ||
                                           name == "index.json.tmp" || name == "prepare.pending.tmp");
  });
  std::error_code removed;
  fs::remove(path, removed);
  return in_use;
}

}  // namespace

absl::StatusOr<PrepareResult> PrepareDataset(const PrepareOptions& o) {
  std::string error;
  auto tok = Tokenizer::Load(o.tokenizer, &error);
  if (!tok) return absl::InvalidArgumentError(StrCat("--tokenizer: ", error));
  if (tok->eos_id() < 0) {
    return absl::InvalidArgumentError(
        StrCat(o.tokenizer, ": the tokenizer has no EOS id (documents are joined with EOS)"));
  }
  if (auto s = storage::CreateFolders(o.out); !s.ok()) return s;
  // One prepare at a time into a folder: each removes dataset files of its own and of a
  // killed run's. The lock is on the folder itself.
  auto lock = storage::FileLock::TryAcquire(o.out);
  if (absl::IsFailedPrecondition(lock.status())) {
    return absl::FailedPreconditionError(StrCat(o.out, ": another prepare is writing into this folder"));
  }
  if (!lock.ok()) return lock.status();
  // The dataset in use stays whole, and readable by jobs that have it open, until the new
  // one's index replaces its own. What a killed run left is gone first.
  const fs::path keep = o.tokenizer;
  Pending unfinished;
  const DatasetInFolder in_use = FinishPending(o.out, keep, &unfinished);
  if (in_use.exists && !o.overwrite) {
    return absl::AlreadyExistsError(
        StrCat(o.out, ": already holds a prepared dataset (pass --overwrite to replace it)"));
  }
  Pending pending{0, in_use.files};
  pending.replaces.erase("index.json");  // replaced by the rename
  // A killed run's files that could not be told from those in use go with them.
  pending.replaces.merge(unfinished.replaces);
  // One listing: the generations the folder's files have, and the killed run's files.
  std::set<int> used;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(o.out, ec)) {
    const std::string name = entry.path().filename().string();
    const int generation = GenerationOf(name);
    used.insert(generation);
    if (unfinished.generation >= 0 && generation == unfinished.generation) pending.replaces.insert(name);
  }
  while (used.contains(pending.generation)) ++pending.generation;  // the lowest no file has
  // The new dataset's files are all of its own generation, which a name the old index
  // gives without a file may share: none of them is replaced.
  std::erase_if(pending.replaces, [&](const std::string& name) { return GenerationOf(name) == pending.generation; });
  if (auto s = WritePending(o.out, pending); !s.ok()) return s;
  auto result = BuildDataset(o, *tok, pending.generation);
  // Whether it succeeded or not, the record just written says what to remove, as for a
  // killed run: the generation the index names now stays. A failure can come after the
  // index's rename (the folder's sync), and then the new generation is the one in use.
  Pending left;
  FinishPending(o.out, keep, &left);
  return result;
}

}  // namespace llamad::data
