#include "storage/checkpoint_store.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <sstream>
#include <fstream>
#include <map>
#include <new>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <thread>

#include "storage/direct_io.h"
#include "storage/files.h"

namespace llamad::storage {
namespace fs = std::filesystem;
namespace {

constexpr char kMagic[8] = {'L', 'L', 'A', 'M', 'A', 'D', 'C', 'K'};
constexpr uint32_t kVersion = 1;
constexpr uint64_t kAlign = 4096;
// Shard files move in 1 MiB requests, 4 in flight: on this project's VM disk fio's
// direct sequential write runs at 1.5 GB/s with one request in flight and 2.5-2.7 GB/s
// with 2-8; reads gain less (1.4 against 1.5-1.7 GB/s). Larger requests were slower
// there (fio read: 1087 MiB/s at 1 MiB against 811-859 MiB/s at 16-64 MiB).
constexpr size_t kIoBlock = size_t{1} << 20;

std::string StepKey(int64_t step) { return fmt::format("{:020d}", step); }
std::string CkptPrefix(const std::string& job) { return "ckpt/" + job + "/"; }
std::string StepPrefix(const std::string& job, int64_t step) {
  return CkptPrefix(job) + StepKey(step) + "/";
}
std::string PiecePrefix(const std::string& job, int64_t step, const std::string& name) {
  return StepPrefix(job, step) + "piece/" + name + "/";
}

// The step of a folder named step-<digits>; nothing for any other name (no sign, no
// spaces: "step--1" is not step -1 nor the latest one).
std::optional<int64_t> StepOfFolderName(const std::string& name) {
  if (!name.starts_with("step-") || name.size() == 5) return std::nullopt;
  int64_t step = 0;
  const char* first = name.data() + 5;
  const char* last = name.data() + name.size();
  if (*first < '0' || *first > '9') return std::nullopt;
  const auto [end, ec] = std::from_chars(first, last, step);
  if (ec != std::errc() || end != last) return std::nullopt;
  return step;
}

// A folder of another user's that this one may not list (a volume's lost+found, say)
// holds nothing a store of this user's wrote.
bool AnotherUsersUnreadableFolder(const fs::path& dir, const std::error_code& ec) {
  struct stat st {};
  return ec == std::errc::permission_denied && ::stat(dir.c_str(), &st) == 0 && st.st_uid != ::geteuid();
}

// Calls f(job, step, folder) for each <root>/<job>/step-<n> folder. A root that is not a
// folder holds none (creating it says why it cannot be one); one that cannot be listed
// whole is an error, as a folder the listing missed may hold committed shards. A job
// folder that cannot be listed does not hide the others: f still sees their steps, and
// the first such folder is the error returned.
template <typename F>
absl::Status ForEachStepFolder(const std::string& root, F&& f) {
  auto list_failed = [](const fs::path& dir, const std::error_code& ec) {
    return absl::InternalError(fmt::format("{}: cannot list the checkpoint folders: {}", dir.string(), ec.message()));
  };
  std::error_code ec;
  fs::directory_iterator jobs(root, ec);
  if (ec == std::errc::no_such_file_or_directory || ec == std::errc::not_a_directory) return absl::OkStatus();
  absl::Status first_unlisted;
  for (const fs::directory_iterator end; !ec && jobs != end; jobs.increment(ec)) {
    std::error_code type;
    if (!jobs->is_directory(type) || jobs->path().filename() == "index") continue;
    std::error_code listing;
    for (fs::directory_iterator steps(jobs->path(), listing); !listing && steps != end; steps.increment(listing)) {
      const auto step = StepOfFolderName(steps->path().filename().string());
      if (step && steps->is_directory(type)) f(jobs->path().filename().string(), *step, steps->path());
    }
    if (AnotherUsersUnreadableFolder(jobs->path(), listing)) listing.clear();
    if (listing && first_unlisted.ok()) first_unlisted = list_failed(jobs->path(), listing);
  }
  return ec ? list_failed(root, ec) : first_unlisted;
}

// What a step folder holds. Only one holding nothing or nothing but the files a save
// writes (rank-<r>.shard, and rank-<r>.run-<n>.records with its .tmp) is one a store
// wrote, which it may remove. One that cannot be listed whole (a stale handle on shared
// storage) may hold shards too: the store neither removes it nor ignores it.
enum class StepFolderContents { kNothing, kOnlySaveFiles, kOtherFiles, kUnreadable };

bool IsSaveFile(const std::string& name) {
  return name.starts_with("rank-") &&
         (name.ends_with(".shard") || name.ends_with(".records") || name.ends_with(".records.tmp"));
}

StepFolderContents ContentsOf(const fs::path& dir) {
  std::error_code ec;
  auto contents = StepFolderContents::kNothing;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const bool ours = it->is_regular_file(ec) && IsSaveFile(it->path().filename().string());
    if (ec) break;
    if (!ours) return StepFolderContents::kOtherFiles;
    contents = StepFolderContents::kOnlySaveFiles;
  }
  return ec ? StepFolderContents::kUnreadable : contents;
}

absl::Status IoError(const std::string& what, const std::string& path) {
  return absl::InternalError(fmt::format("{}: {}: {}", path, what, std::strerror(errno)));
}

absl::Status FromRocks(const rocksdb::Status& s, const std::string& what) {
  if (s.ok()) return absl::OkStatus();
  return absl::InternalError(fmt::format("checkpoint index: {}: {}", what, s.ToString()));
}

uint64_t RoundUp(uint64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

}  // namespace

// A 4 KiB-aligned heap buffer, as direct I/O needs.
struct AlignedBuffer {
  explicit AlignedBuffer(size_t bytes) : size(RoundUp(std::max<size_t>(bytes, 1))) {
    data = static_cast<char*>(std::aligned_alloc(kAlign, size));
    if (data == nullptr) throw std::bad_alloc();
  }
  ~AlignedBuffer() { std::free(data); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  char* data;
  size_t size;
};

namespace {

// Opens with O_DIRECT where the file system supports it (tmpfs does not), else buffered.
int OpenMaybeDirect(const std::string& path, int flags) {
  int fd = ::open(path.c_str(), flags | O_DIRECT | O_CLOEXEC, 0644);
  if (fd < 0 && errno == EINVAL) fd = ::open(path.c_str(), flags | O_CLOEXEC, 0644);
  return fd;
}

absl::Status WriteAt(int fd, const void* data, size_t size, uint64_t offset,
                     const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n =
        ::pwrite(fd, p, std::min<size_t>(size, kIoBlock), off_t(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n == 0) errno = EIO;  // no progress: retrying would spin
      return IoError("write", path);
    }
    p += n;
    size -= size_t(n);
    offset += uint64_t(n);
  }
  return absl::OkStatus();
}

// Reads move payloads (with their padding to 4 KiB) in segments of this size through
// two buffers: while one segment is hashed and handed on, the next one's requests are
// in flight (up to the queue depth at a time).
constexpr uint64_t kSegment = uint64_t{8} << 20;

nlohmann::json ToJson(const PieceRecord& r) {
  return {{"name", r.name},     {"shape", r.shape},   {"dtype", ElementTypeName(r.type)},
          {"begin", r.begin},   {"end", r.end},       {"file", r.file},
          {"offset", r.offset}, {"length", r.length}, {"xxh3", fmt::format("{:016x}", r.checksum)},
          {"rank", r.rank}};
}

absl::StatusOr<PieceRecord> FromJson(const nlohmann::json& j) {
  try {
    PieceRecord r;
    r.name = j.at("name").get<std::string>();
    r.shape = j.at("shape").get<std::vector<int64_t>>();
    const std::string dtype = j.at("dtype").get<std::string>();
    bool known = false;
    for (ElementType t :
         {ElementType::kF32, ElementType::kF64, ElementType::kI64, ElementType::kU8}) {
      if (dtype == ElementTypeName(t)) r.type = t, known = true;
    }
    if (!known) return absl::DataLossError("checkpoint index: unknown dtype " + dtype);
    r.begin = j.at("begin").get<uint64_t>();
    r.end = j.at("end").get<uint64_t>();
    r.file = j.at("file").get<std::string>();
    r.offset = j.at("offset").get<uint64_t>();
    r.length = j.at("length").get<uint64_t>();
    r.checksum = std::stoull(j.at("xxh3").get<std::string>(), nullptr, 16);
    r.rank = j.at("rank").get<int>();
    // (end - begin) elements of the type must be `length` bytes, a product that must not wrap.
    if (r.end < r.begin || r.end - r.begin > UINT64_MAX / ElementSize(r.type) ||
        r.length != (r.end - r.begin) * ElementSize(r.type) || r.offset % kAlign != 0) {
      return absl::DataLossError(
          fmt::format("checkpoint index: inconsistent record for tensor '{}'", r.name));
    }
    return r;
  } catch (const std::exception& e) {
    return absl::DataLossError(
        fmt::format("checkpoint index: unreadable piece record: {}", e.what()));
  }
}

absl::StatusOr<PieceRecord> FromJson(const std::string& text) {
  try {
    return FromJson(nlohmann::json::parse(text));
  } catch (const std::exception& e) {
    return absl::DataLossError(fmt::format("checkpoint index: unreadable piece record: {}", e.what()));
  }
}

// Scans keys with `prefix`, calling f(key, value) for each.
template <typename F>
absl::Status Scan(rocksdb::DB* db, const std::string& prefix, F&& f) {
  std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions()));
  for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) {
    if (auto s = f(it->key().ToString(), it->value().ToString()); !s.ok()) return s;
  }
  return FromRocks(it->status(), "scan " + prefix);
}

}  // namespace

size_t ElementSize(ElementType type) {
  switch (type) {
    case ElementType::kF32:
      return 4;
    case ElementType::kF64:
      return 8;
    case ElementType::kI64:
      return 8;
    case ElementType::kU8:
      return 1;
  }
  return 0;
}

const char* ElementTypeName(ElementType type) {
  switch (type) {
    case ElementType::kF32:
      return "f32";
    case ElementType::kF64:
      return "f64";
    case ElementType::kI64:
      return "i64";
    case ElementType::kU8:
      return "u8";
  }
  return "?";
}

CheckpointStore::CheckpointStore(std::string root, StoreOptions options, rocksdb::DB* db)
    : root_(std::move(root)), options_(options), db_(db) {}

CheckpointStore::~CheckpointStore() = default;

absl::StatusOr<std::unique_ptr<CheckpointStore>> CheckpointStore::Open(
    const std::string& root, const StoreOptions& options) {
  if (options.keep_last < 1) {
    return absl::InvalidArgumentError(
        fmt::format("checkpoint keep_last must be at least 1, got {}", options.keep_last));
  }
  const std::string index = (fs::path(root) / "index").string();
  std::error_code ec;
  rocksdb::Options db_options;
  db_options.max_open_files = 64;
  db_options.keep_log_file_num = 2;
  rocksdb::DB* db = nullptr;
  const bool has_index = fs::exists(fs::path(index) / "CURRENT", ec);
  if (options.read_only) {
    if (!has_index) {
      return absl::NotFoundError(
          fmt::format("{}: no checkpoint index here (expected {})", root, index));
    }
    if (auto s = rocksdb::DB::OpenForReadOnly(db_options, index, &db); !s.ok()) {
      return absl::InternalError(
          fmt::format("{}: cannot open the checkpoint index: {}", index, s.ToString()));
    }
    return std::unique_ptr<CheckpointStore>(new CheckpointStore(root, options, db));
  }
  // Without its index, the store cannot tell committed steps from a save that died
  // half-way, and would remove them all as leftovers: refuse before creating an empty one.
  if (!has_index) {
    std::vector<std::string> found;
    auto listed = ForEachStepFolder(root, [&](const std::string&, int64_t, const fs::path& dir) {
      const StepFolderContents contents = ContentsOf(dir);
      if (contents == StepFolderContents::kOnlySaveFiles || contents == StepFolderContents::kUnreadable) {
        found.push_back(dir.string());  // shards to lose
      }
    });
    if (!listed.ok()) return listed;
    if (!found.empty()) {
      // DataLoss, not FailedPrecondition, which says another process holds the index.
      return absl::DataLossError(fmt::format(
          "{}: holds {} checkpoint folder(s) ({}{}) but no checkpoint index ({}/CURRENT is missing), so their "
          "steps cannot be told committed from unfinished; restore the index folder, or move the step folders "
          "elsewhere",
          root, found.size(), *std::min_element(found.begin(), found.end()), found.size() > 1 ? ", ..." : "", index));
    }
  }
  if (auto s = CreateFolders(root); !s.ok()) return s;
  db_options.create_if_missing = true;
  if (auto s = rocksdb::DB::Open(db_options, index, &db); !s.ok()) {
    // One process writes a store at a time; RocksDB's lock file says another has it.
    const bool locked = s.IsIOError() && s.ToString().find("lock file") != std::string::npos;
    return (locked ? absl::FailedPreconditionError : absl::InternalError)(fmt::format(
        "{}: cannot open the checkpoint index: {}{}", index, s.ToString(),
        locked ? " (another process is saving to this store: an earlier run of the job still exiting, or "
                 "another job with the same checkpoint.dir)"
               : ""));
  }
  std::unique_ptr<CheckpointStore> store(new CheckpointStore(root, options, db));
  if (auto s = store->RemoveUncommitted(); !s.ok()) return s;
  return store;
}

std::string StepDirIn(const std::string& root, const std::string& job, int64_t step) {
  return (fs::path(root) / job / fmt::format("step-{}", step)).string();
}

std::string ShardPathIn(const std::string& root, const std::string& job, int64_t step, int rank) {
  return (fs::path(StepDirIn(root, job, step)) / fmt::format("rank-{}.shard", rank)).string();
}

std::string CheckpointStore::StepDir(const std::string& job, int64_t step) const {
  return StepDirIn(root_, job, step);
}

std::string CheckpointStore::ShardPath(const std::string& job, int64_t step, int rank) const {
  return ShardPathIn(root_, job, step, rank);
}

absl::StatusOr<std::vector<PieceRecord>> CheckpointStore::WriteShard(
    const std::string& job, int64_t step, int rank, const std::vector<PieceToWrite>& pieces) {
  return WriteShardFile(root_, job, step, rank, pieces);
}

namespace {

// Named by run too, so that a killed run's file and this run's are never the same path.
std::string RecordsPath(const std::string& root, const std::string& job, int64_t step, int rank, uint64_t run) {
  return (fs::path(StepDirIn(root, job, step)) / fmt::format("rank-{}.run-{}.records", rank, run)).string();
}

}  // namespace

absl::Status PublishShardRecords(const std::string& root, const std::string& job, int64_t step, int rank,
                                 uint64_t run, const absl::StatusOr<std::vector<PieceRecord>>& outcome) {
  nlohmann::json out = {{"rank", rank}, {"run", run}};
  if (outcome.ok()) {
    out["records"] = nlohmann::json::array();
    for (const PieceRecord& r : *outcome) out["records"].push_back(ToJson(r));
  } else {
    out["error"] = std::string(outcome.status().message());
  }
  const std::string dir = StepDirIn(root, job, step), path = RecordsPath(root, job, step, rank, run);
  if (auto s = CreateFolders(dir); !s.ok()) return s;  // a failed save may not have made it
  return WriteFileAtomically(path, out.dump());
}

absl::StatusOr<std::vector<PieceRecord>> CollectShardRecords(const std::string& root, const std::string& job,
                                                             int64_t step, int world, uint64_t run,
                                                             std::chrono::milliseconds timeout,
                                                             const std::function<bool()>& cancelled) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::vector<PieceRecord> records;
  for (int rank = 1; rank < world; ++rank) {
    const std::string path = RecordsPath(root, job, step, rank, run);
    nlohmann::json j;
    while (true) {
      if (fs::exists(path)) {
        std::ifstream in(path);
        std::stringstream text;
        text << in.rdbuf();
        try {
          j = nlohmann::json::parse(text.str());
        } catch (const std::exception& e) {
          return absl::DataLossError(fmt::format("{}: unreadable: {}", path, e.what()));
        }
        break;
      }
      if (cancelled && cancelled()) {
        return absl::CancelledError(fmt::format("checkpoint step {}: stopped waiting for rank {}", step, rank));
      }
      if (std::chrono::steady_clock::now() > deadline) {
        return absl::DeadlineExceededError(fmt::format(
            "checkpoint step {}: rank {} did not publish its shard within {} s ({})", step, rank,
            std::chrono::duration_cast<std::chrono::seconds>(timeout).count(), path));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (j.contains("error")) {
      return absl::InternalError(
          fmt::format("checkpoint step {}: rank {}: {}", step, rank, j["error"].get<std::string>()));
    }
    if (!j.contains("records") || !j["records"].is_array()) {
      return absl::DataLossError(fmt::format("{}: holds no records", path));
    }
    for (const auto& r : j["records"]) {
      auto record = FromJson(r);
      if (!record.ok()) return record.status();
      if (record->rank != rank) {
        return absl::DataLossError(fmt::format("{}: holds a record of rank {}", path, record->rank));
      }
      records.push_back(*std::move(record));
    }
  }
  // This run's files are read; any others are a killed run's.
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(StepDirIn(root, job, step), ec)) {
    if (entry.path().extension() == ".records") fs::remove(entry.path(), ec);
  }
  return records;
}

absl::StatusOr<std::vector<PieceRecord>> WriteShardFile(const std::string& root, const std::string& job,
                                                        int64_t step, int rank,
                                                        const std::vector<PieceToWrite>& pieces) {
  const std::string dir = StepDirIn(root, job, step);
  if (auto s = CreateFolders(dir); !s.ok()) return s;
  const std::string path = ShardPathIn(root, job, step, rank);
  const std::string relative = fs::relative(path, root).string();

  // Lay out payloads and size the header. Checksums are computed by a second thread while
  // the payloads are written, and the header (fixed-width checksums, so the same size)
  // goes to its block(s) at offset 0 last.
  std::vector<PieceRecord> records;
  nlohmann::json table = nlohmann::json::array();
  uint64_t offset = kAlign;  // The header gets the first block (or more, see below).
  for (const PieceToWrite& p : pieces) {
    if (p.end < p.begin)
      return absl::InvalidArgumentError("piece " + p.name + ": end before begin");
    PieceRecord r{p.name, p.shape,  p.type, p.begin,
                  p.end,  relative, 0,      (p.end - p.begin) * ElementSize(p.type),
                  0,      rank};
    records.push_back(r);
  }
  // The header size depends on the offsets it lists; the table is sized with the largest
  // offsets first, then the real ones (which can only be smaller or equal in length).
  auto build_header = [&](uint64_t first_offset) {
    uint64_t o = first_offset;
    table = nlohmann::json::array();
    for (PieceRecord& r : records) {
      r.offset = o;
      o += (r.length + kAlign - 1) / kAlign * kAlign;
      table.push_back(ToJson(r));
    }
    return nlohmann::json{{"format", "llamad-shard"},
                          {"version", kVersion},
                          {"job", job},
                          {"step", step},
                          {"rank", rank},
                          {"pieces", table}}
        .dump();
  };
  std::string header = build_header(uint64_t{1} << 50);
  offset = (16 + header.size() + kAlign - 1) / kAlign * kAlign;
  header = build_header(offset);

  const int fd = OpenMaybeDirect(path, O_WRONLY | O_CREAT | O_TRUNC);
  if (fd < 0) return IoError("create", path);
  // The whole file is allocated before the first write: a direct write past the end of
  // a file extends it under the inode's lock, one at a time (ext4), so the writes in
  // flight would queue behind each other; a full disk is found here, before any write.
  const uint64_t file_bytes = records.empty() ? offset : records.back().offset + RoundUp(records.back().length);
  // (Not posix_fallocate: where the file system cannot allocate, it writes zeros.)
  if (::fallocate(fd, 0, 0, off_t(file_bytes)) != 0 && errno != EOPNOTSUPP) {
    const int e = errno;
    ::close(fd);
    return absl::ResourceExhaustedError(fmt::format("{}: cannot allocate the shard's {} bytes: {}{}", path, file_bytes,
                                                    std::strerror(e), e == ENOSPC ? " (the disk is full)" : ""));
  }
  // Every write is of whole 4 KiB blocks at 4 KiB offsets: the header block(s), then
  // each payload padded with zeros. Payloads that are aligned and padded in memory
  // (PieceToWrite::padded_bytes) go straight from there; others through a staging buffer.
  absl::Status status;
  std::thread hasher([&] {
    for (size_t i = 0; i < records.size(); ++i)
      records[i].checksum = XXH3_64bits(pieces[i].data, records[i].length);
  });
  auto io = DirectIoQueue::Create(fd, path, kIoBlock, CheckpointStore::kDefaultReadDepth);
  if (!io.ok()) status = io.status();
  // Queue tags: 0 for payloads sent from the caller's memory, 1 and 2 for the two
  // staging buffers (one is filled while the other's writes are in flight).
  constexpr size_t kStaging = size_t{16} << 20;
  std::unique_ptr<AlignedBuffer> staging[2];
  size_t staged = 0;
  try {
    for (size_t i = 0; i < records.size() && status.ok(); ++i) {
      const PieceRecord& r = records[i];
      const PieceToWrite& piece = pieces[i];
      const uint64_t padded = RoundUp(r.length);
      if (reinterpret_cast<uintptr_t>(piece.data) % kAlign == 0 && piece.padded_bytes >= padded) {
        status = (*io)->Queue(true, static_cast<char*>(const_cast<void*>(piece.data)), r.offset, padded, 0);
        continue;
      }
      for (uint64_t done = 0; done < padded && status.ok(); done += kStaging) {
        const size_t slot = staged++ % 2;
        if (status = (*io)->Drain(1 + slot); !status.ok()) break;
        if (!staging[slot]) staging[slot] = std::make_unique<AlignedBuffer>(kStaging);
        const uint64_t chunk = std::min<uint64_t>(kStaging, padded - done);
        const uint64_t payload = std::min<uint64_t>(chunk, r.length > done ? r.length - done : 0);
        std::memcpy(staging[slot]->data, static_cast<const char*>(piece.data) + done, payload);
        std::memset(staging[slot]->data + payload, 0, chunk - payload);
        status = (*io)->Queue(true, staging[slot]->data, r.offset + done, chunk, 1 + slot);
      }
    }
  } catch (const std::bad_alloc&) {  // a staging buffer; the hasher must still be joined
    status = absl::ResourceExhaustedError(path + ": out of memory for the write buffer");
  }
  if (io.ok()) {
    // Nothing may stay in flight once the buffers go (on errors too).
    auto drained = (*io)->DrainAll();
    if (status.ok()) status = drained;
    io->reset();
  }
  hasher.join();
  if (status.ok()) {
    header = build_header(offset);
    AlignedBuffer head(offset);
    std::memset(head.data, 0, head.size);
    std::memcpy(head.data, kMagic, 8);
    const uint32_t version = kVersion, length = uint32_t(header.size());
    std::memcpy(head.data + 8, &version, 4);
    std::memcpy(head.data + 12, &length, 4);
    std::memcpy(head.data + 16, header.data(), header.size());
    status = WriteAt(fd, head.data, head.size, 0, path);
  }
  if (status.ok() && ::fsync(fd) != 0) status = IoError("fsync", path);
  ::close(fd);
  if (!status.ok()) return status;
  for (const std::string& d : {dir, fs::path(dir).parent_path().string(), root}) {
    if (auto s = SyncFolder(d); !s.ok()) return s;
  }
  return records;
}

absl::Status CheckpointStore::Commit(const std::string& job, int64_t step,
                                     const std::string& meta_json,
                                     const std::vector<PieceRecord>& records) {
  rocksdb::WriteBatch batch;
  batch.Put(StepPrefix(job, step) + "meta", meta_json);
  for (const PieceRecord& r : records) {
    batch.Put(PiecePrefix(job, step, r.name) + fmt::format("{:020d}", r.begin), ToJson(r).dump());
  }
  rocksdb::WriteOptions sync;
  sync.sync = true;
  if (auto s = FromRocks(db_->Write(sync, &batch), "commit"); !s.ok()) return s;
  // The checkpoint is durable now; a failed cleanup of older ones must not make the
  // save look failed (it is retried at the next commit).
  (void)Retain(job);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int64_t>> CheckpointStore::Steps(const std::string& job) const {
  std::vector<int64_t> steps;
  auto s = Scan(db_.get(), CkptPrefix(job), [&](const std::string& key, const std::string&) {
    if (key.ends_with("/meta")) {
      int64_t step = 0;
      const std::string digits = key.substr(CkptPrefix(job).size(), 20);
      if (std::from_chars(digits.data(), digits.data() + digits.size(), step).ec != std::errc()) {
        return absl::DataLossError(fmt::format("{}/index: malformed key '{}'", root_, key));
      }
      steps.push_back(step);
    }
    return absl::OkStatus();
  });
  if (!s.ok()) return s;
  return steps;
}

absl::StatusOr<int64_t> CheckpointStore::LatestStep(const std::string& job) const {
  auto steps = Steps(job);
  if (!steps.ok()) return steps.status();
  if (steps->empty()) {
    return absl::NotFoundError(fmt::format("{}: no committed checkpoint of job '{}'", root_, job));
  }
  return steps->back();
}

absl::StatusOr<std::string> CheckpointStore::Meta(const std::string& job, int64_t step) const {
  std::string value;
  const auto s = db_->Get(rocksdb::ReadOptions(), StepPrefix(job, step) + "meta", &value);
  if (s.IsNotFound()) {
    return absl::NotFoundError(
        fmt::format("{}: job '{}' has no committed checkpoint at step {}", root_, job, step));
  }
  if (auto st = FromRocks(s, "read meta"); !st.ok()) return st;
  return value;
}

absl::StatusOr<std::vector<PieceRecord>> CheckpointStore::Pieces(const std::string& job,
                                                                 int64_t step) const {
  if (auto meta = Meta(job, step); !meta.ok()) return meta.status();
  std::vector<PieceRecord> out;
  auto s = Scan(db_.get(), StepPrefix(job, step) + "piece/",
                [&](const std::string&, const std::string& v) {
                  auto r = FromJson(v);
                  if (!r.ok()) return r.status();
                  out.push_back(*std::move(r));
                  return absl::OkStatus();
                });
  if (!s.ok()) return s;
  return out;
}

struct CheckpointStore::Reader::OpenShard {
  std::string path;
  int fd = -1;
  std::unique_ptr<DirectIoQueue> io;
  uint64_t size = 0;  // bytes, when opened
};

CheckpointStore::Reader::Reader(const CheckpointStore& store, std::string job, int64_t step, int queue_depth)
    : store_(store), job_(std::move(job)), step_(step), queue_depth_(std::clamp(queue_depth, 1, 4096)) {}

CheckpointStore::Reader::~Reader() {
  for (auto& shard : shards_) {
    shard->io.reset();  // waits for anything in flight (after an error)
    if (shard->fd >= 0) ::close(shard->fd);
  }
}

absl::StatusOr<std::unique_ptr<CheckpointStore::Reader>> CheckpointStore::OpenReader(const std::string& job,
                                                                                      int64_t step,
                                                                                      int queue_depth) const {
  if (auto meta = Meta(job, step); !meta.ok()) return meta.status();
  return std::unique_ptr<Reader>(new Reader(*this, job, step, queue_depth));
}

absl::StatusOr<std::vector<PieceRecord>> CheckpointStore::Reader::FindPieces(const std::string& name,
                                                                             ElementType type, uint64_t begin,
                                                                             uint64_t end) {
  std::vector<PieceRecord> pieces;
  auto s =
      Scan(store_.db_.get(), PiecePrefix(job_, step_, name), [&](const std::string&, const std::string& v) {
        auto r = FromJson(v);
        if (!r.ok()) return r.status();
        if (r->end > begin && r->begin < end) pieces.push_back(*std::move(r));
        return absl::OkStatus();
      });
  if (!s.ok()) return s;
  if (pieces.empty()) {
    return absl::NotFoundError(
        fmt::format("checkpoint {} of job '{}' has no tensor '{}'", step_, job_, name));
  }
  // The pieces must cover [begin, end) with no gap.
  uint64_t covered = begin;
  for (const PieceRecord& p : pieces) {
    if (p.begin > covered) break;
    covered = std::max(covered, p.end);
  }
  if (covered < end) {
    return absl::DataLossError(
        fmt::format("checkpoint {} of job '{}': tensor '{}' has no data for elements [{}, {})",
                    step_, job_, name, covered, end));
  }
  for (const PieceRecord& p : pieces) {
    if (p.type != type) {
      return absl::DataLossError(
          fmt::format("checkpoint {} of job '{}': tensor '{}' is {} in the index, expected {}",
                      step_, job_, name, ElementTypeName(p.type), ElementTypeName(type)));
    }
    if (p.offset % kAlign != 0) {
      return absl::DataLossError(fmt::format("{}: tensor '{}' has an unaligned payload offset {}",
                                             (fs::path(store_.root_) / p.file).string(), p.name, p.offset));
    }
  }
  return pieces;
}

absl::StatusOr<CheckpointStore::Reader::OpenShard*> CheckpointStore::Reader::Shard(const std::string& file) {
  const std::string path = (fs::path(store_.root_) / file).string();
  for (auto& shard : shards_) {
    if (shard->path == path) return shard.get();
  }
  auto shard = std::make_unique<OpenShard>();
  shard->path = path;
  shard->fd = OpenMaybeDirect(path, O_RDONLY);
  if (shard->fd < 0) {
    return absl::DataLossError(fmt::format("{}: cannot open shard: {}", path, std::strerror(errno)));
  }
  struct stat st {};
  if (::fstat(shard->fd, &st) != 0) {
    const absl::Status error = IoError("fstat", path);
    ::close(shard->fd);
    return error;
  }
  shard->size = uint64_t(st.st_size);
  auto io = DirectIoQueue::Create(shard->fd, path, kIoBlock, queue_depth_);
  if (!io.ok()) {
    ::close(shard->fd);
    return io.status();
  }
  shard->io = *std::move(io);
  shards_.push_back(std::move(shard));
  return shards_.back().get();
}

absl::Status CheckpointStore::ReadRange(const std::string& job, int64_t step, const std::string& name,
                                        ElementType type, uint64_t begin, uint64_t end, void* out) const {
  auto reader = OpenReader(job, step);
  if (!reader.ok()) return reader.status();
  return (*reader)->ReadRange(name, type, begin, end, out);
}

absl::Status CheckpointStore::Reader::ReadRange(const std::string& name, ElementType type, uint64_t begin,
                                                uint64_t end, void* out) {
  const size_t elem = ElementSize(type);
  return ReadRangeStreamed(name, type, begin, end, [&](uint64_t first, const void* data, uint64_t count) {
    std::memcpy(static_cast<char*>(out) + (first - begin) * elem, data, count * elem);
  });
}

absl::Status CheckpointStore::Reader::ReadRangeStreamed(const std::string& name, ElementType type, uint64_t begin,
                                                        uint64_t end, const ElementSink& sink) {
  return ReadRangesStreamed({RangeRead{name, type, begin, end, sink}});
}

absl::Status CheckpointStore::Reader::ReadRangesStreamed(const std::vector<RangeRead>& ranges) {
  // Every piece to read, in order, with its shard and the range it serves.
  struct PieceRead {
    PieceRecord piece;
    OpenShard* shard;
    const RangeRead* range;
  };
  std::vector<PieceRead> reads;
  for (const RangeRead& range : ranges) {
    auto pieces = FindPieces(range.name, range.type, range.begin, range.end);
    if (!pieces.ok()) return pieces.status();
    for (PieceRecord& p : *pieces) {
      auto shard = Shard(p.file);
      if (!shard.ok()) return shard.status();
      // The index's record must place the payload inside the file (a damaged record
      // would otherwise be read, or planned in segments, far past its end).
      if (p.length > (*shard)->size || p.offset > (*shard)->size - p.length) {
        return absl::DataLossError(
            fmt::format("{}: shorter than expected: tensor '{}' is recorded at bytes [{}, +{}) of a {}-byte file",
                        (*shard)->path, p.name, p.offset, p.length, (*shard)->size));
      }
      reads.push_back({std::move(p), *shard, &range});
    }
  }
  // The segments of all pieces, one stream: segment i goes into buffer i % 2. A piece
  // of no bytes still gets one (empty) segment, where its checksum is checked.
  struct Segment {
    size_t read;       // index in reads
    uint64_t at;       // offset in the piece's payload
    uint64_t bytes;    // bytes to read (whole 4 KiB blocks)
    bool last;         // the piece's last
  };
  std::vector<Segment> segments;
  for (size_t r = 0; r < reads.size(); ++r) {
    const uint64_t padded = RoundUp(reads[r].piece.length);
    uint64_t at = 0;
    do {
      const uint64_t bytes = std::min(kSegment, padded - at);
      segments.push_back({r, at, bytes, at + bytes >= padded});
      at += bytes;
    } while (at < padded);
  }
  // Payloads are 4 KiB aligned and padded in the file, so whole blocks are read with
  // direct I/O (no page cache pollution) into the segment buffers, kept from one read to
  // the next: fresh allocations cost a page fault per 4 KiB each time.
  if (!segments_) segments_ = std::make_unique<AlignedBuffer>(2 * kSegment);
  auto buffer = [&](size_t i) { return segments_->data + (i % 2) * kSegment; };
  auto queue = [&](size_t i) {
    const Segment& g = segments[i];
    if (g.bytes == 0) return absl::OkStatus();
    const PieceRead& r = reads[g.read];
    return r.shard->io->Queue(false, buffer(i), r.piece.offset + g.at, g.bytes, i % 2);
  };
  std::unique_ptr<XXH3_state_t, XXH_errorcode (*)(XXH3_state_t*)> state(XXH3_createState(), &XXH3_freeState);
  if (!state) throw std::bad_alloc();
  absl::Status status = segments.empty() ? absl::OkStatus() : queue(0);
  for (size_t i = 0; i < segments.size() && status.ok(); ++i) {
    const Segment& g = segments[i];
    const PieceRead& r = reads[g.read];
    const PieceRecord& p = r.piece;
    // Segment i+1, of this piece or the next, goes into the buffer segment i-1 was
    // consumed from. Queueing returns once all but a queue depth of its requests are
    // submitted; those still in flight keep the disk busy while segment i is consumed.
    size_t failed = i + 1;
    if (i + 1 < segments.size()) status = queue(i + 1);
    if (status.ok() && g.bytes > 0) failed = i, status = r.shard->io->Drain(i % 2);
    if (!status.ok()) {
      // A shard that cannot be read back is a damaged checkpoint (DataLoss: fallback
      // applies); a failure of this machine's I/O queue is not, and keeps its code.
      status = absl::Status(status.code(), fmt::format("{} (tensor '{}')", std::string(status.message()),
                                                       reads[segments[failed].read].piece.name));
      break;
    }
    if (g.at == 0) XXH3_64bits_reset(state.get());
    if (g.at < p.length) {
      const uint64_t bytes = std::min(g.bytes, p.length - g.at);
      XXH3_64bits_update(state.get(), buffer(i), bytes);
      // The bytes of the range's elements in this piece's payload; segments end on
      // element boundaries (kSegment is a multiple of every element size).
      const uint64_t elem = ElementSize(p.type);
      const uint64_t want_lo = (std::max(r.range->begin, p.begin) - p.begin) * elem;
      const uint64_t want_hi = (std::min(r.range->end, p.end) - p.begin) * elem;
      const uint64_t lo = std::max(g.at, want_lo), hi = std::min(g.at + bytes, want_hi);
      if (lo < hi) r.range->sink(p.begin + lo / elem, buffer(i) + (lo - g.at), (hi - lo) / elem);
    }
    if (g.last && XXH3_64bits_digest(state.get()) != p.checksum) {
      status = absl::DataLossError(
          fmt::format("{}: tensor '{}' elements [{}, {}) fail their checksum: the shard is corrupt",
                      r.shard->path, p.name, p.begin, p.end));
    }
  }
  if (!status.ok()) {
    // The buffers are free again only once nothing is in flight.
    for (auto& shard : shards_) (void)shard->io->DrainAll();
  }
  return status;
}

absl::Status CheckpointStore::Verify(const std::string& job, int64_t step) const {
  auto pieces = Pieces(job, step);
  if (!pieces.ok()) return pieces.status();
  auto reader = OpenReader(job, step);
  if (!reader.ok()) return reader.status();
  // In file order: each shard front to back.
  std::sort(pieces->begin(), pieces->end(), [](const PieceRecord& a, const PieceRecord& b) {
    return std::tie(a.file, a.offset) < std::tie(b.file, b.offset);
  });
  std::vector<Reader::RangeRead> ranges;
  for (const PieceRecord& p : *pieces) {
    ranges.push_back({p.name, p.type, p.begin, p.end, [](uint64_t, const void*, uint64_t) {}});
  }
  return (*reader)->ReadRangesStreamed(ranges);
}

absl::StatusOr<std::vector<int64_t>> CheckpointStore::DropNewerThan(const std::string& job,
                                                                    int64_t step) {
  if (options_.read_only) return absl::FailedPreconditionError(root_ + ": opened read-only");
  auto steps = Steps(job);
  if (!steps.ok()) return steps.status();
  std::vector<int64_t> newer;
  for (int64_t s : *steps) {
    if (s > step) newer.push_back(s);
  }
  if (auto st = RemoveSteps(job, newer, "drop newer checkpoints"); !st.ok()) return st;
  return newer;
}

absl::Status CheckpointStore::RemoveSteps(const std::string& job, const std::vector<int64_t>& steps,
                                          const char* what) {
  if (steps.empty()) return absl::OkStatus();
  rocksdb::WriteBatch batch;
  for (int64_t step : steps) {
    const std::string prefix = StepPrefix(job, step);
    batch.DeleteRange(prefix, prefix + "\xff");
    batch.Delete("pin/" + job + "/" + StepKey(step));
  }
  rocksdb::WriteOptions sync;
  sync.sync = true;
  if (auto st = FromRocks(db_->Write(sync, &batch), what); !st.ok()) return st;
  for (int64_t step : steps) {
    std::error_code ec;
    fs::remove_all(StepDir(job, step), ec);  // A leftover is removed at the next Open.
  }
  return absl::OkStatus();
}

absl::Status CheckpointStore::Pin(const std::string& job, int64_t step, bool pinned) {
  rocksdb::WriteOptions sync;
  sync.sync = true;
  const std::string key = "pin/" + job + "/" + StepKey(step);
  return FromRocks(pinned ? db_->Put(sync, key, "") : db_->Delete(sync, key), "pin");
}

absl::Status CheckpointStore::Retain(const std::string& job) {
  auto steps = Steps(job);
  if (!steps.ok()) return steps.status();
  if (int(steps->size()) <= options_.keep_last) return absl::OkStatus();
  std::set<int64_t> pinned;
  auto s = Scan(db_.get(), "pin/" + job + "/", [&](const std::string& key, const std::string&) {
    int64_t step = 0;
    const std::string digits = key.substr(key.size() - std::min<size_t>(20, key.size()));
    if (std::from_chars(digits.data(), digits.data() + digits.size(), step).ec == std::errc())
      pinned.insert(step);
    return absl::OkStatus();
  });
  if (!s.ok()) return s;
  std::vector<int64_t> doomed(steps->begin(), steps->end() - options_.keep_last);
  std::erase_if(doomed, [&](int64_t step) { return pinned.count(step) > 0; });
  return RemoveSteps(job, doomed, "retention");
}

absl::Status CheckpointStore::RemoveUncommitted() {
  std::map<std::string, std::vector<int64_t>> committed;
  absl::Status status;
  std::error_code ec;
  // Cleanup, unlike Open's check without an index: what it cannot list it leaves as it is,
  // as it leaves a folder it fails to remove, and it still cleans the job folders it can list.
  (void)ForEachStepFolder(root_, [&](const std::string& job, int64_t step, const fs::path& dir) {
    if (!status.ok()) return;
    auto it = committed.find(job);
    if (it == committed.end()) {
      auto steps = Steps(job);
      if (!steps.ok()) {
        status = steps.status();
        return;
      }
      it = committed.emplace(job, *std::move(steps)).first;
    }
    if (std::binary_search(it->second.begin(), it->second.end(), step)) return;
    const StepFolderContents contents = ContentsOf(dir);
    if (contents == StepFolderContents::kNothing || contents == StepFolderContents::kOnlySaveFiles) {
      fs::remove_all(dir, ec);
    }
  });
  return status;
}

absl::StatusOr<CheckpointPath> ParseCheckpointPath(const std::string& step_dir) {
  fs::path p = fs::path(step_dir).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();
  const std::string name = p.filename().string();
  CheckpointPath out;
  if (name == "latest") {
    out.step = CheckpointPath::kLatest;
  } else if (const auto step = StepOfFolderName(name)) {
    out.step = *step;
  } else {
    return absl::InvalidArgumentError(
        fmt::format("{}: not a checkpoint folder (expected <root>/<job>/step-<n> or <root>/<job>/latest)", step_dir));
  }
  out.job = p.parent_path().filename().string();
  out.root = p.parent_path().parent_path().string();
  if (out.job.empty() || out.root.empty()) out.root = out.root.empty() ? "." : out.root;
  return out;
}

}  // namespace llamad::storage
