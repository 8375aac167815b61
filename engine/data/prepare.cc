#include "data/prepare.h"

#include <fcntl.h>
#include <stdio.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <string_view>
#include <vector>

#include "core/strings.h"
#include "data/shards.h"
#include "data/tokenizer.h"

namespace llamad::data {
namespace fs = std::filesystem;

namespace {

// Builds the dataset in o.out, a folder that holds no dataset (it may hold other files).
absl::StatusOr<PrepareResult> BuildDataset(const PrepareOptions& o, const Tokenizer& tok) {
  const auto start = std::chrono::steady_clock::now();
  std::error_code ec;
  fs::create_directories(o.out, ec);
  if (ec) return absl::InternalError(StrCat(o.out, ": cannot create: ", ec.message()));

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
        const std::string name = fmt::format("shard-{:05d}.tok", shards.size());
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

  // The tokenizer travels with the dataset, and the index goes in last (atomically).
  {
    std::ofstream t(o.out + "/tokenizer.model", std::ios::binary | std::ios::trunc);
    t.write(tok.serialized().data(), std::streamsize(tok.serialized().size()));
    if (!t) return absl::InternalError(StrCat(o.out, "/tokenizer.model: write failed"));
  }
  nlohmann::json index = {{"format", kDatasetFormat},
                          {"version", kDatasetVersion},
                          {"vocab_size", tok.vocab_size()},
                          {"eos_id", tok.eos_id()},
                          {"bos_id", tok.bos_id()},
                          {"tokenizer", "tokenizer.model"},
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
  const std::string tmp = o.out + "/index.json.tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    // The source path may hold bytes that are not UTF-8 (a legal file name): replaced.
    f << index.dump(1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    f.flush();
    if (!f) return absl::InternalError(StrCat(tmp, ": write failed"));
  }
  fs::rename(tmp, o.out + "/index.json", ec);
  if (ec) return absl::InternalError(StrCat(o.out, "/index.json: ", ec.message()));
  result.shards = int(shards.size());
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

// A file a prepared dataset writes into its folder.
bool IsDatasetFile(const std::string& name) {
  return name == "index.json" || name == "index.json.tmp" || name == "tokenizer.model" ||
         (name.starts_with("shard-") && name.ends_with(".tok"));
}

// Empties `from`, a folder that held a dataset in `out`'s place: the dataset's files are
// removed, and other files move back into `out` unless it has one of the same name. `from`
// itself goes when nothing is left in it.
void EmptyInto(const fs::path& from, const fs::path& out) {
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(from, ec)) {
    const fs::path name = entry.path().filename();
    std::error_code moved;
    if (IsDatasetFile(name.string())) {
      fs::remove(entry.path(), moved);
    } else if (!fs::exists(out / name, moved)) {
      fs::rename(entry.path(), out / name, moved);
    }
  }
  fs::remove(from, ec);  // left, with what could not move back, when not empty
}

// Puts the dataset built in `staging` (a sibling of `out`) in the place of the one in
// `out`. The folders are exchanged in one step where the filesystem can, so that `out`
// always holds a whole dataset, the old or the new. Then the old dataset's files are
// removed; other files that were kept in `out` move back into it.
absl::Status ReplaceDataset(const fs::path& staging, const fs::path& out) {
  const fs::path old = staging.string() + ".old";
  if (::renameat2(AT_FDCWD, staging.c_str(), AT_FDCWD, out.c_str(), RENAME_EXCHANGE) == 0) {
    std::error_code ec;
    fs::rename(staging, old, ec);
    if (ec) return absl::InternalError(StrCat(staging.string(), ": cannot rename: ", ec.message()));
  } else {
    if (errno != EINVAL && errno != ENOSYS) {
      return absl::InternalError(StrCat(out.string(), ": cannot put the new dataset in place: ", std::strerror(errno),
                                        " (the old one is unchanged)"));
    }
    // No exchange on this filesystem: two renames, undone if the second fails.
    std::error_code ec;
    fs::rename(out, old, ec);
    if (ec) return absl::InternalError(StrCat(out.string(), ": cannot move the old dataset aside: ", ec.message()));
    fs::rename(staging, out, ec);
    if (ec) {
      std::error_code undo;
      fs::rename(old, out, undo);
      return absl::InternalError(StrCat(out.string(), ": cannot put the new dataset in place: ", ec.message(),
                                        undo ? StrCat("; the old one is in ", old.string()) : std::string()));
    }
  }
  EmptyInto(old, out);
  return absl::OkStatus();
}

// The process that owns `name` when it is one of `out`'s staging folders: ".OUT.prepare-PID",
// or the same with ".old" after it.
std::optional<pid_t> StagingOwner(const std::string& name, const fs::path& out) {
  const std::string prefix = StrCat(".", out.filename().string(), ".prepare-");
  if (!name.starts_with(prefix)) return std::nullopt;
  std::string_view pid = std::string_view(name).substr(prefix.size());
  if (pid.ends_with(".old")) pid.remove_suffix(4);
  const auto value = ParseInt64(pid);
  if (!value || *value <= 0 || *value > std::numeric_limits<pid_t>::max()) return std::nullopt;
  return pid_t(*value);
}

// Puts right what a prepare that was killed while replacing `out` left beside it: staging
// folders whose process is gone. If `out` itself is missing (killed between the two renames of
// the fallback), the old dataset goes back in its place. Otherwise a staging folder holds a
// partly built dataset, or the old one with the files that were kept beside it: the dataset's
// files go, the others move back into `out`.
void RecoverStaleStaging(const fs::path& out) {
  std::error_code ec;
  std::vector<fs::path> stale;
  for (const auto& entry : fs::directory_iterator(out.parent_path(), ec)) {
    const auto owner = StagingOwner(entry.path().filename().string(), out);
    // This process prepares nothing into `out` yet, so a folder with its pid is a stale one
    // whose pid was reused.
    if (owner && (*owner == ::getpid() || (::kill(*owner, 0) != 0 && errno == ESRCH))) stale.push_back(entry.path());
  }
  // The old dataset first, so that `out` is back before the other folders are emptied into it.
  std::stable_partition(stale.begin(), stale.end(), [](const fs::path& p) { return p.string().ends_with(".old"); });
  for (const fs::path& folder : stale) {
    std::error_code moved;
    if (!fs::exists(out, moved) && folder.string().ends_with(".old") && fs::exists(folder / "index.json", moved)) {
      fs::rename(folder, out, moved);
      if (!moved) continue;
    }
    if (fs::exists(out, moved)) EmptyInto(folder, out);
  }
}

}  // namespace

absl::StatusOr<PrepareResult> PrepareDataset(const PrepareOptions& o) {
  std::string error;
  auto tok = Tokenizer::Load(o.tokenizer, &error);
  if (!tok) return absl::InvalidArgumentError(StrCat("--tokenizer: ", error));
  if (tok->eos_id() < 0) {
    return absl::InvalidArgumentError(StrCat(o.tokenizer, ": the tokenizer has no EOS id (documents are joined with EOS)"));
  }
  std::error_code ec;
  fs::path out = fs::absolute(o.out, ec).lexically_normal();
  if (out.filename().empty()) out = out.parent_path();  // "DIR/"
  RecoverStaleStaging(out);
  if (!fs::exists(o.out + "/index.json", ec)) return BuildDataset(o, *tok);
  if (!o.overwrite) {
    return absl::AlreadyExistsError(StrCat(o.out, ": already holds a prepared dataset (pass --overwrite to replace it)"));
  }
  // The old dataset stays whole, and in use, until the new one is built beside it.
  const fs::path staging = out.parent_path() / StrCat(".", out.filename().string(), ".prepare-", ::getpid());
  PrepareOptions into = o;
  into.out = staging.string();
  auto result = BuildDataset(into, *tok);
  if (!result.ok()) {
    fs::remove_all(staging, ec);
    return result;
  }
  if (auto s = ReplaceDataset(staging, out); !s.ok()) return s;
  return result;
}

}  // namespace llamad::data
