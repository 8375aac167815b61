#include "data/shards.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/strings.h"
#include "storage/files.h"

namespace llamad::data {
namespace {

constexpr size_t kHeaderBytes = 4096;

struct Header {
  char magic[8];
  uint32_t version;
  uint32_t id_bytes;
  uint64_t vocab_size;
  uint64_t tokens;
  uint64_t documents;
  uint64_t tokens_offset;
  uint64_t offsets_offset;
  uint64_t checksum;  // xxh64 of the token bytes followed by the offset bytes
};

std::string Errno(const std::string& what) { return StrCat(what, ": ", std::strerror(errno)); }

}  // namespace

absl::StatusOr<std::unique_ptr<ShardWriter>> ShardWriter::Create(const std::string& path,
                                                                  int64_t vocab_size, int32_t eos_id) {
  std::unique_ptr<ShardWriter> w(new ShardWriter());
  w->path_ = path;
  w->vocab_size_ = vocab_size;
  w->eos_id_ = eos_id;
  w->id_bytes_ = IdBytesFor(uint64_t(vocab_size));
  // A new file, never one truncated: a job may have a shard mapped, and a truncated
  // mapping is SIGBUS in its reader. (prepare picks names that no file has.)
  w->fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (w->fd_ < 0) return absl::InternalError(Errno(StrCat(path, ": cannot create")));
  // The header stays zero (no magic) until Finish: an unfinished shard never opens.
  const std::vector<char> zeros(kHeaderBytes, 0);
  if (auto s = w->Write(zeros.data(), zeros.size()); !s.ok()) return s;
  w->hash_ = XXH64_createState();
  XXH64_reset(static_cast<XXH64_state_t*>(w->hash_), 0);
  return w;
}

ShardWriter::~ShardWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (hash_ != nullptr) XXH64_freeState(static_cast<XXH64_state_t*>(hash_));
}

absl::Status ShardWriter::Write(const void* data, size_t bytes) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t n = ::write(fd_, p, bytes);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError(Errno(StrCat(path_, ": write failed")));
    }
    p += n;
    bytes -= size_t(n);
  }
  return absl::OkStatus();
}

absl::Status ShardWriter::Add(const std::vector<int32_t>& ids) {
  offsets_.push_back(tokens_);
  buffer_.clear();
  buffer_.reserve((ids.size() + 1) * id_bytes_);
  auto put = [&](int32_t id) {
    const uint32_t v = uint32_t(id);
    const char* b = reinterpret_cast<const char*>(&v);  // little-endian hosts only
    buffer_.insert(buffer_.end(), b, b + id_bytes_);
  };
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size_) {
      return absl::InvalidArgumentError(
          StrCat(path_, ": token id ", id, " is outside the vocabulary of ", vocab_size_));
    }
    put(id);
  }
  put(eos_id_);
  tokens_ += ids.size() + 1;
  XXH64_update(static_cast<XXH64_state_t*>(hash_), buffer_.data(), buffer_.size());
  return Write(buffer_.data(), buffer_.size());
}

absl::Status ShardWriter::Finish() {
  offsets_.push_back(tokens_);
  const size_t offsets_bytes = offsets_.size() * sizeof(uint64_t);
  XXH64_update(static_cast<XXH64_state_t*>(hash_), offsets_.data(), offsets_bytes);
  if (auto s = Write(offsets_.data(), offsets_bytes); !s.ok()) return s;
  Header h{};
  std::memcpy(h.magic, kShardMagic, sizeof(h.magic));
  h.version = kShardVersion;
  h.id_bytes = id_bytes_;
  h.vocab_size = uint64_t(vocab_size_);
  h.tokens = tokens_;
  h.documents = offsets_.size() - 1;
  h.tokens_offset = kHeaderBytes;
  h.offsets_offset = kHeaderBytes + tokens_ * id_bytes_;
  h.checksum = XXH64_digest(static_cast<XXH64_state_t*>(hash_));
  offsets_.pop_back();
  if (::fsync(fd_) != 0) return absl::InternalError(Errno(StrCat(path_, ": fsync failed")));
  if (::pwrite(fd_, &h, sizeof(h), 0) != ssize_t(sizeof(h)) || ::fsync(fd_) != 0) {
    return absl::InternalError(Errno(StrCat(path_, ": writing the header failed")));
  }
  ::close(fd_);
  fd_ = -1;
  return absl::OkStatus();
}

PreparedDataset::~PreparedDataset() {
  for (const Mapped& m : maps_) {
    if (m.base != nullptr) ::munmap(const_cast<char*>(m.base), m.bytes);
  }
}

absl::StatusOr<DatasetIndex> ReadDatasetIndex(const std::string& dir) {
  const std::string index_path = dir + "/index.json";
  std::ifstream in(index_path);
  if (!in) {
    return absl::NotFoundError(StrCat(dir, ": not a prepared dataset (no index.json; `llama-data prepare` makes one)"));
  }
  DatasetIndex d;
  std::stringstream text;
  text << in.rdbuf();
  d.json = text.str();
  const nlohmann::json index = nlohmann::json::parse(d.json, nullptr, false);
  if (!index.is_object() || !index.contains("format") || index["format"] != kDatasetFormat ||
      !index.contains("shards") || !index["shards"].is_array() || !index.contains("vocab_size")) {
    return absl::DataLossError(StrCat(index_path, ": not a llamad-tokens index"));
  }
  if (!index.contains("version") || index["version"] != kDatasetVersion) {
    const std::string version = index.contains("version") ? index["version"].dump() : "missing";
    return absl::InvalidArgumentError(StrCat(index_path, ": version ", version,
                                             ", this build reads version ", kDatasetVersion));
  }
  try {
    d.vocab_size = index["vocab_size"].get<int64_t>();
    if (index.contains("tokenizer")) d.tokenizer_file = index["tokenizer"].get<std::string>();
    for (const auto& s : index["shards"]) {
      d.shards.push_back({s.at("file").get<std::string>(), s.at("tokens").get<uint64_t>(),
                          s.at("documents").get<uint64_t>()});
    }
  } catch (const std::exception& e) {
    return absl::DataLossError(StrCat(index_path, ": ", e.what()));
  }
  if (d.vocab_size <= 0) {
    return absl::DataLossError(StrCat(index_path, ": vocab_size ", d.vocab_size, " is not positive"));
  }
  // The files the index names are in the dataset's folder.
  auto outside = [](const std::string& name) {
    return name.find("..") != std::string::npos || name.find('/') != std::string::npos;
  };
  if (outside(d.tokenizer_file)) {
    return absl::DataLossError(StrCat(index_path, ": tokenizer '", d.tokenizer_file, "' is not a file in the folder"));
  }
  for (const ShardInfo& info : d.shards) {
    if (outside(info.file)) {
      return absl::DataLossError(StrCat(index_path, ": shard name '", info.file, "' is not a file in the folder"));
    }
  }
  return d;
}

absl::StatusOr<std::unique_ptr<PreparedDataset>> PreparedDataset::Open(const std::string& dir) {
  auto index = ReadDatasetIndex(dir);
  if (!index.ok()) return index.status();
  std::unique_ptr<PreparedDataset> d(new PreparedDataset());
  d->dir_ = dir;
  d->index_json_ = std::move(index->json);
  d->vocab_size_ = index->vocab_size;
  d->tokenizer_file_ = std::move(index->tokenizer_file);
  d->shards_ = std::move(index->shards);
  // The tokenizer is read with the shards opened: preparing the folder over removes this
  // generation's files, and a job that has the shards mapped still needs their tokenizer.
  if (!d->tokenizer_file_.empty()) {
    const std::string path = dir + "/" + d->tokenizer_file_;
    auto model = storage::ReadFile(path);
    if (!model.ok()) {
      const std::string message = StrCat(model.status().message(), " (the index names this tokenizer)");
      // A folder in its place, like an empty file, is a damaged dataset.
      return absl::IsNotFound(model.status()) ? absl::NotFoundError(message) : absl::DataLossError(message);
    }
    if (model->empty()) return absl::DataLossError(StrCat(path, ": the index names this tokenizer, which is empty"));
    d->tokenizer_model_ = *std::move(model);
  }
  for (const ShardInfo& info : d->shards_) {
    const std::string path = dir + "/" + info.file;
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return absl::NotFoundError(Errno(StrCat(path, ": cannot open")));
    struct stat st{};
    ::fstat(fd, &st);
    Mapped m;
    m.bytes = size_t(st.st_size);
    if (m.bytes < kHeaderBytes) {
      ::close(fd);
      return absl::DataLossError(StrCat(path, ": ", m.bytes, " bytes, shorter than a shard header"));
    }
    void* p = ::mmap(nullptr, m.bytes, PROT_READ, MAP_SHARED, fd, 0);
    ::close(fd);
    if (p == MAP_FAILED) return absl::InternalError(Errno(StrCat(path, ": mmap failed")));
    m.base = static_cast<const char*>(p);
    d->maps_.push_back(m);  // unmapped by the destructor from here on
    Header h;
    std::memcpy(&h, m.base, sizeof(h));
    if (std::memcmp(h.magic, kShardMagic, sizeof(h.magic)) != 0) {
      return absl::DataLossError(StrCat(path, ": no shard header (an unfinished or foreign file)"));
    }
    // Sizes are bounded by the file before they are multiplied: no product can wrap. (The
    // id width is checked first: it divides.)
    const uint64_t body = m.bytes - kHeaderBytes;
    if (h.version != kShardVersion || h.id_bytes != IdBytesFor(h.vocab_size) || h.tokens > body / h.id_bytes ||
        h.documents >= body / sizeof(uint64_t) || h.tokens != info.tokens || h.documents != info.documents ||
        h.tokens_offset != kHeaderBytes || h.offsets_offset != kHeaderBytes + h.tokens * h.id_bytes ||
        h.offsets_offset + (h.documents + 1) * sizeof(uint64_t) != m.bytes ||
        h.vocab_size != uint64_t(d->vocab_size_)) {
      return absl::DataLossError(StrCat(path, ": header does not match the index or the file size (",
                                        h.tokens, " tokens, ", h.documents, " documents, ", m.bytes,
                                        " bytes; the index says ", info.tokens, " tokens, ",
                                        info.documents, " documents)"));
    }
    Mapped& mm = d->maps_.back();
    mm.id_bytes = h.id_bytes;
    mm.tokens = m.base + h.tokens_offset;
    mm.offsets = reinterpret_cast<const uint64_t*>(m.base + h.offsets_offset);
    mm.checksum = h.checksum;
    ::madvise(const_cast<char*>(m.base), m.bytes, MADV_RANDOM);
    d->tokens_ += h.tokens;
    d->documents_ += h.documents;
  }
  return d;
}

absl::Status PreparedDataset::Verify() const {
  for (size_t s = 0; s < maps_.size(); ++s) {
    const Mapped& m = maps_[s];
    const uint64_t sum = XXH64(m.tokens, m.bytes - kHeaderBytes, 0);
    if (sum != m.checksum) {
      return absl::DataLossError(StrCat(dir_, "/", shards_[s].file, ": checksum mismatch (the shard is damaged)"));
    }
  }
  return absl::OkStatus();
}

int32_t PreparedDataset::Token(const Mapped& m, uint64_t i) const {
  if (m.id_bytes == 2) {
    uint16_t v;
    std::memcpy(&v, m.tokens + 2 * i, 2);
    return int32_t(v);
  }
  uint32_t v;
  std::memcpy(&v, m.tokens + 4 * i, 4);
  return int32_t(v);
}

const std::vector<uint64_t>& PreparedDataset::WindowStarts(int seq_len) const {
  if (windows_seq_ != seq_len) {
    window_starts_.assign(1, 0);
    for (const ShardInfo& s : shards_) {
      const uint64_t w = s.tokens > 0 ? (s.tokens - 1) / uint64_t(seq_len) : 0;
      window_starts_.push_back(window_starts_.back() + w);
    }
    windows_seq_ = seq_len;
  }
  return window_starts_;
}

size_t PreparedDataset::NumWindows(int seq_len) const {
  std::lock_guard lock(windows_mu_);
  return WindowStarts(seq_len).back();
}

void PreparedDataset::ReadWindow(size_t window, int seq_len, int32_t* out) const {
  size_t shard;
  uint64_t first;
  {
    std::lock_guard lock(windows_mu_);
    const std::vector<uint64_t>& starts = WindowStarts(seq_len);
    shard = size_t(std::upper_bound(starts.begin(), starts.end(), window) - starts.begin()) - 1;
    first = (window - starts[shard]) * uint64_t(seq_len);
  }
  const Mapped& m = maps_[shard];
  for (int i = 0; i <= seq_len; ++i) out[i] = Token(m, first + uint64_t(i));
}

absl::StatusOr<std::vector<int32_t>> PreparedDataset::Document(size_t shard, uint64_t d) const {
  if (shard >= shards_.size()) {
    return absl::OutOfRangeError(StrCat(dir_, ": no shard ", shard, " (the dataset has ", shards_.size(), ")"));
  }
  const ShardInfo& info = shards_[shard];  // its counts match the header (Open)
  const Mapped& m = maps_[shard];
  if (d >= info.documents) {
    return absl::OutOfRangeError(StrCat(dir_, "/", info.file, ": no document ", d, " (it holds ", info.documents, ")"));
  }
  const uint64_t begin = m.offsets[d], end = m.offsets[d + 1];
  if (begin >= end || end > info.tokens) {  // every document ends with its EOS
    return absl::DataLossError(StrCat(dir_, "/", info.file, ": document ", d, " spans tokens ", begin, " to ", end,
                                      " of ", info.tokens, " (the offsets are damaged)"));
  }
  std::vector<int32_t> ids;
  ids.reserve(end - begin - 1);
  for (uint64_t i = begin; i + 1 < end; ++i) ids.push_back(Token(m, i));
  return ids;
}

}  // namespace llamad::data
