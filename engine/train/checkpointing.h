// Training checkpoints on top of storage::CheckpointStore: what a rank saves (fp32
// master weights, AdamW moments and step, sampler position, seed, LR schedule, world
// layout), asynchronous saving, exact restore, and Hugging Face import/export.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "storage/checkpoint_store.h"
#include "train/trainer.h"

namespace llamad {

// Names of the checkpointed tensors of parameter `name`.
std::string ExpAvgName(const std::string& name);
std::string ExpAvgSqName(const std::string& name);

// Saves in the background. Save() copies this rank's part of the trainer's state to a
// host buffer (the only time training waits, besides waiting for the previous save) and
// returns; a worker thread writes the rank's shard and fsyncs it. With several ranks each
// saves the EvenSlice of the flat parameter layout its rank number gives (whatever part
// it holds in memory), the others publish their shards' records, and rank 0 commits them
// all with its own. At most one save is in flight per rank, so host memory is bounded by
// one copy of the rank's part of the state.
class AsyncCheckpointer {
 public:
  // One process saving alone. `store` must outlive this object. `on_commit` (optional) is
  // called from the worker after each commit with the step and its status.
  AsyncCheckpointer(storage::CheckpointStore* store, std::string job,
                    std::function<void(int64_t, const absl::Status&)> on_commit = {});
  // Rank `rank` of `world` saving under checkpoint `root`, which must be the same folder
  // for every rank (shared storage when ranks run on several machines). Rank 0 passes the
  // store it commits to; the others pass null, and on_commit is called when their shard
  // is published. `run`: a number every rank of this run shares and earlier runs of the
  // job did not use (storage::PublishShardRecords).
  AsyncCheckpointer(storage::CheckpointStore* store, std::string root, std::string job, int rank, int world,
                    uint64_t run, std::function<void(int64_t, const absl::Status&)> on_commit = {});
  // Waits for the save in flight; rank 0 of several no longer waits for the others'
  // shards (they may be gone), so call Wait() first to finish a save.
  ~AsyncCheckpointer();

  // Waits for the previous save (returning its error, if any), snapshots `trainer`'s
  // state at its current step and starts writing it. Returns the seconds spent
  // snapshotting (the training stall).
  absl::StatusOr<double> Save(Trainer& trainer);
  // Waits for the save in flight; returns its status (Internal when it failed, as Save()
  // returns the previous save's failure).
  absl::Status Wait();
  // The tokenizer model's bytes, saved with every checkpoint (tensor "tokenizer.model",
  // u8) so that an export carries the tokenizer the model was trained with.
  void set_tokenizer_model(std::string bytes) { tokenizer_model_ = std::move(bytes); }

 private:
  void Worker();

  // How long rank 0 waits for the other ranks' shards after writing its own.
  static constexpr std::chrono::minutes kPeerSaveTimeout{30};

  storage::CheckpointStore* store_;  // null on ranks other than 0
  std::string root_;
  std::string job_;
  int rank_ = 0, world_ = 1;
  uint64_t run_ = 0;
  std::atomic<bool> abandon_{false};  // set by the destructor: stop waiting for peers
  std::function<void(int64_t, const absl::Status&)> on_commit_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool busy_ = false, stop_ = false;
  absl::Status last_status_;
  // The snapshot being written.
  int64_t step_ = 0;
  std::string meta_;
  // Host copy of the state, each tensor 4 KiB aligned and padded so that the writer sends
  // it to disk with direct I/O and no further copy.
  std::unique_ptr<float, void (*)(void*)> buffer_{nullptr, &std::free};
  size_t buffer_bytes_ = 0;
  std::vector<storage::PieceToWrite> pieces_;
  std::string tokenizer_model_;
  std::thread worker_;
};

// Restores `trainer` from checkpoint `step` of `job`, whatever world size and plugin
// wrote it, reading only the element ranges it holds: the master weights (all, or a
// ZeRO rank's shard, rounded into the parameters), the moments of the optimizer's shard,
// the optimizer step and the sampler position. A ZeRO rank's other parameters come from
// the other ranks (Trainer::StartRanks). State already moved to its tier goes there
// directly: moments on the NVMe tier are streamed into the swap, and a GPU's master
// weights and moments in host memory into the optimizer's host arrays (then rounded into
// the device's parameters). Refuses a checkpoint of another model, sequence length or
// seed, naming the difference; damage to the checkpoint is DataLoss.
absl::Status RestoreCheckpoint(const storage::CheckpointStore& store, const std::string& job,
                               int64_t step, Trainer& trainer);

// The checkpointed tensor holding the tokenizer model's bytes.
inline constexpr char kTokenizerTensor[] = "tokenizer.model";

// Writes the model of a checkpoint as Hugging Face safetensors + config.json into `out`,
// and its tokenizer (tokenizer.model, tokenizer_config.json, special_tokens_map.json)
// when the checkpoint holds one. *with_tokenizer (optional) says whether it did.
absl::Status ExportHuggingFace(const storage::CheckpointStore& store, const std::string& job,
                               int64_t step, const std::string& out, bool* with_tokenizer = nullptr);

// The model config of a Hugging Face folder (config.json).
absl::StatusOr<ModelConfig> ReadHuggingFaceConfig(const std::string& dir);
// Loads Hugging Face weights (safetensors) into the model's master weights it holds (all,
// or a ZeRO rank's shard), of flat elements [begin, end) only, and rounds them into its
// parameters; every tensor must be there with the model's shape. A ZeRO rank passes the
// elements it steps; its other parameters come from the other ranks (Trainer::StartRanks).
absl::Status LoadHuggingFaceWeights(const std::string& dir, LlamaModel& model, Backend& backend, size_t begin = 0,
                                    size_t end = SIZE_MAX);

}  // namespace llamad
