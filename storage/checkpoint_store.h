// Sharded checkpoints with a RocksDB index.
//
// On disk, under a checkpoint root:
//   <root>/index/                         RocksDB: the only source of truth
//   <root>/<job>/step-<n>/rank-<r>.shard  one file per rank and checkpoint
//
// A shard file holds pieces of tensors: contiguous element ranges [begin, end) of a
// tensor's flattened data, each with an xxh3-64 checksum. A checkpoint exists once the
// index holds its records, written by one synced WriteBatch after every shard file and
// folder is fsynced. Files without index records are leftovers of an interrupted save
// and are removed when the store opens.
//
// Index keys:
//   ckpt/<job>/<step:020>/meta                         JSON: state, world layout
//   ckpt/<job>/<step:020>/piece/<tensor>/<begin:020>   JSON: PieceRecord
//   pin/<job>/<step:020>                               pinned (kept by retention)
//
// Thread-safety: a store may be used from several threads (RocksDB is); Commit and
// Retain of the same job must not run concurrently.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace rocksdb {
class DB;
}

namespace llamad::storage {

// Element types a piece may hold.
enum class ElementType { kF32, kF64, kI64, kU8 };
size_t ElementSize(ElementType type);
const char* ElementTypeName(ElementType type);

// One tensor piece to write: elements [begin, end) of the flattened tensor `name`
// whose full shape is `shape`. `data` holds exactly (end - begin) elements and must stay
// valid until WriteShard returns.
struct PieceToWrite {
  std::string name;
  std::vector<int64_t> shape;
  ElementType type = ElementType::kF32;
  uint64_t begin = 0, end = 0;
  const void* data = nullptr;
  // When `data` is 4 KiB aligned and readable for padded_bytes >= the payload rounded up
  // to 4 KiB, the writer sends it to disk from there (direct I/O, no copy); the bytes past
  // the payload land in the file's padding. 0: the writer stages a copy.
  size_t padded_bytes = 0;
};

// Where a piece lives: what the index records.
struct PieceRecord {
  std::string name;
  std::vector<int64_t> shape;
  ElementType type = ElementType::kF32;
  uint64_t begin = 0, end = 0;
  std::string file;        // Relative to the checkpoint root.
  uint64_t offset = 0;     // Byte offset of the payload in the file.
  uint64_t length = 0;     // Payload bytes.
  uint64_t checksum = 0;   // xxh3-64 of the payload.
  int rank = 0;
};

// ---- Saves by several ranks --------------------------------------------------------
// Every rank writes its own shard; one process owns the index and commits. The others
// need no index: they write their shard under the root and publish its records, and the
// committing rank collects them before Commit.

// Folder of a checkpoint, and the shard file of a rank in it, under checkpoint `root`.
std::string StepDirIn(const std::string& root, const std::string& job, int64_t step);
std::string ShardPathIn(const std::string& root, const std::string& job, int64_t step, int rank);

// Writes one rank's shard file (payloads 4 KiB aligned, direct I/O where the file system
// allows it) and fsyncs it and its folders. Returns the records to commit; does not make
// anything visible. CheckpointStore::WriteShard is this under the store's root.
absl::StatusOr<std::vector<PieceRecord>> WriteShardFile(const std::string& root, const std::string& job,
                                                        int64_t step, int rank,
                                                        const std::vector<PieceToWrite>& pieces);

// A rank's outcome for the committing rank: its records once its shard is durable, or
// its error. Written whole (a temporary file, fsynced, then renamed) as
// <step dir>/rank-<r>.run-<run>.records. `run` names this run of the job (the same number on every
// rank), so that a file left by an earlier, killed run is never taken for this one's.
absl::Status PublishShardRecords(const std::string& root, const std::string& job, int64_t step, int rank,
                                 uint64_t run, const absl::StatusOr<std::vector<PieceRecord>>& outcome);

// Waits until ranks [1, world) have published for `step` in run `run`, for at most
// `timeout` and until `cancelled` (optional, polled) says to stop; returns their records
// in rank order, or the first rank's error (naming the rank). Then removes the step's
// published files, this run's and any a killed run left.
absl::StatusOr<std::vector<PieceRecord>> CollectShardRecords(const std::string& root, const std::string& job,
                                                             int64_t step, int world, uint64_t run,
                                                             std::chrono::milliseconds timeout,
                                                             const std::function<bool()>& cancelled = {});

struct StoreOptions {
  int keep_last = 2;  // Committed checkpoints kept per job (pinned ones come on top).
  // Open an existing index for reading only: nothing is created, cleaned up or written.
  // For export, evaluation and resuming from a store this process does not save to.
  bool read_only = false;
};

class DirectIoQueue;
struct AlignedBuffer;

class CheckpointStore {
 public:
  // Opens (creating) the store at `root` and removes leftovers of uncommitted saves;
  // with options.read_only, opens an existing index and touches nothing. A root that
  // holds step folders but no index is DataLoss: nothing tells their steps committed
  // from unfinished, so nothing is removed or created. An index another process holds
  // open for writing is FailedPrecondition.
  static absl::StatusOr<std::unique_ptr<CheckpointStore>> Open(const std::string& root,
                                                               const StoreOptions& options = {});
  ~CheckpointStore();

  const std::string& root() const { return root_; }
  // Folder of a checkpoint, and the shard file of a rank in it.
  std::string StepDir(const std::string& job, int64_t step) const;
  std::string ShardPath(const std::string& job, int64_t step, int rank) const;

  // Writes one rank's shard file (payloads 4 KiB aligned, direct I/O where the file
  // system allows it) and fsyncs it and its folders.
  // Returns the records to commit. Does not make anything visible.
  absl::StatusOr<std::vector<PieceRecord>> WriteShard(const std::string& job, int64_t step,
                                                      int rank,
                                                      const std::vector<PieceToWrite>& pieces);

  // Makes the checkpoint exist: writes `meta_json` and every record in one synced
  // WriteBatch, then applies retention. The records of all ranks must be passed. Once the
  // batch is durable the result is OK; a retention failure is retried at the next commit.
  absl::Status Commit(const std::string& job, int64_t step, const std::string& meta_json,
                      const std::vector<PieceRecord>& records);

  // Committed steps of `job`, ascending.
  absl::StatusOr<std::vector<int64_t>> Steps(const std::string& job) const;
  // The newest committed step, or NotFound.
  absl::StatusOr<int64_t> LatestStep(const std::string& job) const;
  absl::StatusOr<std::string> Meta(const std::string& job, int64_t step) const;
  // Every piece record of a committed checkpoint (all tensors), ordered by tensor, begin.
  absl::StatusOr<std::vector<PieceRecord>> Pieces(const std::string& job, int64_t step) const;

  // Reads of one committed checkpoint, for one thread. It keeps the shard files it opened
  // and an I/O queue on each from one read to the next (a restore makes hundreds), and
  // its buffers until it goes.
  class Reader {
   public:
    ~Reader();
    Reader(const Reader&) = delete;
    Reader& operator=(const Reader&) = delete;

    // Streams elements [begin, end) of tensor `name` to `sink` in order, as they are
    // read, whatever pieces the checkpoint was written in: sink(first, data, count) gets
    // elements [first, first + count), at most 8 MiB at a time, through two 8 MiB
    // buffers. Reads only the pieces that overlap and checks each piece's checksum once
    // its last segment is read, so what `sink` got is verified only when the call returns
    // OK; a mismatch is a DataLoss error naming the file and the tensor. Every piece must
    // hold `type`; an unreadable or missing shard is DataLoss.
    using ElementSink = std::function<void(uint64_t first, const void* data, uint64_t count)>;
    absl::Status ReadRangeStreamed(const std::string& name, ElementType type, uint64_t begin, uint64_t end,
                                   const ElementSink& sink);
    // One range of ReadRangesStreamed.
    struct RangeRead {
      std::string name;
      ElementType type;
      uint64_t begin, end;
      ElementSink sink;
    };
    // Streams several ranges in the order given, as ReadRangeStreamed does each, but as
    // one pipeline: the next piece's first segment is already being read (up to the
    // queue depth of requests in flight) while the last segment of the piece before is
    // checked and handed on. Ranges given in the order a
    // save wrote them then read each shard file front to back with no pause between
    // tensors, as a sequential reader of the file would. Stops at the first error.
    absl::Status ReadRangesStreamed(const std::vector<RangeRead>& ranges);
    // The same into `out` (room for end - begin elements of the tensor's type).
    absl::Status ReadRange(const std::string& name, ElementType type, uint64_t begin, uint64_t end, void* out);

   private:
    friend class CheckpointStore;
    Reader(const CheckpointStore& store, std::string job, int64_t step, int queue_depth);
    // The pieces of `name` that overlap [begin, end), checked to cover it and hold `type`.
    absl::StatusOr<std::vector<PieceRecord>> FindPieces(const std::string& name, ElementType type, uint64_t begin,
                                                        uint64_t end);
    struct OpenShard;
    // The shard file `file` (relative to the store's root), opened with its I/O queue at
    // first use.
    absl::StatusOr<OpenShard*> Shard(const std::string& file);
    const CheckpointStore& store_;
    std::string job_;
    int64_t step_;
    int queue_depth_;
    std::vector<std::unique_ptr<OpenShard>> shards_;  // in the order opened
    std::unique_ptr<AlignedBuffer> segments_;
  };
  // A reader of checkpoint `step` of `job`, which must be committed, with `queue_depth`
  // 1 MiB requests in flight per shard file. The default keeps as many in flight as a
  // save does (this is the depth a save writes with); readers that run side by side can
  // share that depth among them.
  static constexpr int kDefaultReadDepth = 4;
  absl::StatusOr<std::unique_ptr<Reader>> OpenReader(const std::string& job, int64_t step,
                                                     int queue_depth = kDefaultReadDepth) const;
  // One read through a reader of its own (see Reader).
  absl::Status ReadRange(const std::string& job, int64_t step, const std::string& name, ElementType type,
                         uint64_t begin, uint64_t end, void* out) const;
  // Reads and checks every piece of a checkpoint.
  absl::Status Verify(const std::string& job, int64_t step) const;

  // Removes the committed checkpoints of `job` newer than `step` (index first, then
  // files): a run that resumes from `step` continues a different history, and its saves
  // must not collide with those steps. Returns the steps removed.
  absl::StatusOr<std::vector<int64_t>> DropNewerThan(const std::string& job, int64_t step);

  // Pinned checkpoints are never removed by retention.
  absl::Status Pin(const std::string& job, int64_t step, bool pinned);
  // Removes committed checkpoints beyond the newest keep_last (except pinned ones):
  // index records first (one synced batch), then the files.
  absl::Status Retain(const std::string& job);

 private:
  CheckpointStore(std::string root, StoreOptions options, rocksdb::DB* db);
  absl::Status RemoveUncommitted();
  // Deletes the index records of `steps` (one synced batch), then their folders.
  absl::Status RemoveSteps(const std::string& job, const std::vector<int64_t>& steps, const char* what);

  std::string root_;
  StoreOptions options_;
  std::unique_ptr<rocksdb::DB> db_;
};

// Parses "<root>/<job>/step-<n>" into its parts; "<root>/<job>/latest" gives step
// kLatest, which the caller resolves with LatestStep.
struct CheckpointPath {
  static constexpr int64_t kLatest = -1;
  std::string root, job;
  int64_t step = 0;
};
absl::StatusOr<CheckpointPath> ParseCheckpointPath(const std::string& step_dir);

}  // namespace llamad::storage
