// Prepared datasets: token shards that training memory-maps.
//
// A dataset is a folder with index.json (written last: a folder without it is not a
// dataset) and shard files. A shard file:
//   header (4096 bytes, written last; magic "LLMDTOKS", version, id width 2 or 4 bytes
//   chosen by the vocabulary size, vocab size, token and document counts, the offsets
//   of both sections and an xxh64 checksum of them)
//   tokens: the documents' ids, each document followed by EOS
//   documents: num_docs + 1 token offsets (uint64), the start of each document
// Training windows are seq_len + 1 consecutive tokens starting at multiples of seq_len
// inside a shard (a window never spans two shards).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "train/token_data.h"

namespace llamad::data {

inline constexpr char kShardMagic[8] = {'L', 'L', 'M', 'D', 'T', 'O', 'K', 'S'};
inline constexpr uint32_t kShardVersion = 1;
inline constexpr char kDatasetFormat[] = "llamad-tokens";
// Bytes per token id in a shard: uint16 while every id fits, else uint32.
constexpr uint32_t IdBytesFor(uint64_t vocab_size) { return vocab_size <= 65536 ? 2 : 4; }
inline constexpr int kDatasetVersion = 1;

// Appends documents to one shard file; Finish writes the header and syncs.
class ShardWriter {
 public:
  static absl::StatusOr<std::unique_ptr<ShardWriter>> Create(const std::string& path,
                                                              int64_t vocab_size, int32_t eos_id);
  ~ShardWriter();
  absl::Status Add(const std::vector<int32_t>& ids);  // one document; EOS appended
  absl::Status Finish();
  uint64_t tokens() const { return tokens_; }
  uint64_t documents() const { return offsets_.size(); }

 private:
  ShardWriter() = default;
  absl::Status Write(const void* data, size_t bytes);
  std::string path_;
  int fd_ = -1;
  uint32_t id_bytes_ = 4;
  int64_t vocab_size_ = 0;
  int32_t eos_id_ = 2;
  uint64_t tokens_ = 0;
  std::vector<uint64_t> offsets_;
  void* hash_ = nullptr;  // XXH64_state_t over the tokens, then the offsets
  std::vector<char> buffer_;
};

struct ShardInfo {
  std::string file;  // relative to the dataset folder
  uint64_t tokens = 0;
  uint64_t documents = 0;
};

// What a prepared dataset's index.json says, checked in itself but not against the files
// it names (which are all in the dataset's folder).
struct DatasetIndex {
  std::string json;  // as written
  int64_t vocab_size = 0;
  // The SentencePiece model that made the tokens; "" when the index names none.
  std::string tokenizer_file;
  std::vector<ShardInfo> shards;
};
absl::StatusOr<DatasetIndex> ReadDatasetIndex(const std::string& dir);

// An open, memory-mapped prepared dataset.
class PreparedDataset final : public TokenSource {
 public:
  // Opens dir/index.json, maps every shard, checking headers against the index, and reads
  // the tokenizer it names.
  static absl::StatusOr<std::unique_ptr<PreparedDataset>> Open(const std::string& dir);
  ~PreparedDataset() override;

  size_t num_tokens() const override { return tokens_; }
  size_t NumWindows(int seq_len) const override;
  void ReadWindow(size_t window, int seq_len, int32_t* out) const override;

  const std::string& dir() const { return dir_; }
  int64_t vocab_size() const { return vocab_size_; }
  uint64_t documents() const { return documents_; }
  const std::vector<ShardInfo>& shards() const { return shards_; }
  // The index as written (tokenizer, sources, report).
  const std::string& index_json() const { return index_json_; }
  // The index's tokenizer (DatasetIndex::tokenizer_file) in the folder; "" when it has none.
  std::string tokenizer_path() const { return tokenizer_file_.empty() ? "" : dir_ + "/" + tokenizer_file_; }
  // That tokenizer's bytes as they were when the dataset was opened; "" when it has none.
  const std::string& tokenizer_model() const { return tokenizer_model_; }
  // Recomputes every shard's checksum; DataLoss naming the shard on a mismatch.
  absl::Status Verify() const;
  // Document d of shard s as ids (without its EOS). OutOfRange past the last shard or the
  // shard's last document; DataLoss when the shard's document offsets are damaged.
  absl::StatusOr<std::vector<int32_t>> Document(size_t shard, uint64_t d) const;

 private:
  struct Mapped {
    const char* base = nullptr;
    size_t bytes = 0;
    uint32_t id_bytes = 4;
    const char* tokens = nullptr;
    const uint64_t* offsets = nullptr;
    uint64_t checksum = 0;
  };
  int32_t Token(const Mapped& m, uint64_t i) const;
  // Prefix sums of windows per shard for seq_len (cached); windows_mu_ held.
  const std::vector<uint64_t>& WindowStarts(int seq_len) const;

  std::string dir_, index_json_, tokenizer_file_, tokenizer_model_;
  int64_t vocab_size_ = 0;
  uint64_t tokens_ = 0, documents_ = 0;
  std::vector<ShardInfo> shards_;
  std::vector<Mapped> maps_;
  mutable std::mutex windows_mu_;                // guards the two below
  mutable std::vector<uint64_t> window_starts_;  // prefix sums of windows per shard
  mutable int windows_seq_ = -1;
};

}  // namespace llamad::data
