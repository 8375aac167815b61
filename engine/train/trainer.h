// The training loop of one rank: micro-batches, gradient accumulation, global-norm
// clipping, the LR schedule and AdamW, with per-step metrics.
#pragma once

#include <atomic>
#include <functional>
#include <future>
#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "backend/backend.h"
#include "comm/communicator.h"
#include "core/serial_worker.h"
#include "model/llama.h"
#include "train/jobspec.h"
#include "train/optimizer.h"
#include "train/token_data.h"

namespace llamad {

class DeviceCollectives;

struct StepMetrics {
  int64_t step = 0;              // 1-based optimizer step.
  double loss = 0;               // Mean token loss over the global batch.
  double lr = 0;                 // Learning rate used by this step.
  double grad_norm = 0;          // Global gradient norm before clipping.
  double step_seconds = 0;
  double tokens_per_s = 0;
  double tflops = 0;             // Achieved model TFLOP/s (6N + attention per token).
  double mfu = 0;                // tflops / peak; 0 when the peak is unknown.
  size_t peak_memory_bytes = 0;  // Backend allocation high-water mark.
  size_t optimizer_state_bytes = 0;  // AdamW moments held by this rank.
  size_t gradient_bytes = 0;         // Gradients held by this rank (zero2/3: shard + scratch,
                                     // and zero2 on host memory the region being reduced).
  size_t parameter_bytes = 0;        // Parameters held by this rank (zero3: shard + scratch).
  // Seconds spent inside collectives (the gradient buckets on the worker thread, the loss,
  // zero1's parameter gather), and the seconds the step itself waited for them (not
  // overlapped with the backward).
  double communication_seconds = 0;
  double exposed_communication_seconds = 0;
  // Some rank was asked to stop (its stop flag was set when the step's loss was summed).
  // Every rank sees the same value for the same step, so all can stop after it together.
  bool stop_requested = false;
};

class Trainer {
 public:
  // Checks that this build can run `spec` on `backend` (plugin, precision, checkpoint
  // support, sequence length) and sets up model and optimizer with seeded weights.
  // `peak_flops` is the device's peak for MFU (0 = unknown).
  // `comm` connects the data-parallel ranks (null: a single process); it must outlive
  // the trainer.
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(const JobSpec& spec, Backend* backend,
                                                         double peak_flops,
                                                         Communicator* comm = nullptr);
  ~Trainer();  // waits for a gradient reduction still in flight

  // Runs the steps from the current one up to spec.training.steps over `data`, calling
  // on_step after each; an error from on_step stops training and is returned. Returns
  // early, after on_step, at the first step whose metrics say stop_requested.
  absl::Status Train(const TokenSource& data,
                     const std::function<absl::Status(const StepMetrics&)>& on_step);

  // One optimizer step over the next global batch from `sampler`: this rank's slice of
  // it (WindowSampler::RankSlice) in micro-batches, then the gradients summed over the
  // ranks. Fails only when a collective does (a lost rank).
  absl::StatusOr<StepMetrics> Step(WindowSampler& sampler);

  // A flag this rank's stop request sets (a signal, say); null: none. Read once per step,
  // when the loss is summed over the ranks, so that all ranks agree on the step to stop
  // after (StepMetrics::stop_requested). It must outlive the trainer.
  void set_stop_flag(const std::atomic<bool>* flag) { stop_flag_ = flag; }

  // Optimizer steps taken so far (0 before the first).
  int64_t step() const { return optimizer_->step(); }
  // Windows of the global sample order consumed so far.
  uint64_t sampler_position() const { return sampler_position_; }
  // Continue from a restored state (the parameters and moments are restored separately).
  void SetProgress(int64_t step, uint64_t sampler_position);

  // A training run's check, before it moves any state to host memory: whether the GPU
  // ranks on each host fit in its available memory (within a cgroup limit) with what
  // they keep there for the run (the optimizer state moved there, the checkpoint
  // snapshot, collectives staged without NCCL). ResourceExhausted, on every rank, where
  // any does not. Collective. The CPU backend's jobs were checked at placement.
  absl::Status CheckHostMemory();
  AdamWOptimizer& optimizer() { return *optimizer_; }
  Backend& backend() { return *backend_; }

  // With several ranks, once each has its weights (seeded, imported from Hugging Face or
  // restored from a checkpoint): every rank takes rank 0's progress. Under ddp it also
  // takes rank 0's weights and restored moments (ddp restores and imports on rank 0
  // alone). Under ZeRO the trainer is built sharded and each rank seeds, imports or
  // restores its own part: zero1 keeps 1/world of the AdamW moments (and of separate
  // master weights) and steps that part, zero2 also 1/world of the gradients, zero3 also
  // 1/world of the parameters; under zero1/2 each rank then gathers the parameters'
  // other slices. A collective: every rank calls it once, before Train.
  absl::Status StartRanks();
  // Before or after StartRanks (a single process or a ZeRO rank moves the state before
  // restoring, which then writes it where it lives): offload.optimizer nvme moves the
  // moments to a swap file under offload.nvme_path (errors name the folder and what is
  // wrong with it); host moves a GPU's master weights and moments to host memory, updated
  // by `cpu_threads` CPU threads (0: all), and on a GPU nvme also the moments of a share
  // of them on to the swap.
  absl::Status OffloadOptimizerState(int cpu_threads = 0);

  // Mean loss over every complete window of `data`, in file order. DataLoss names the
  // first window holding an id outside the model's vocabulary.
  absl::StatusOr<double> Evaluate(const TokenSource& data);

  LlamaModel& model() { return *model_; }
  // The spec it runs: gemini resolved to the ZeRO stage and optimizer tier it placed
  // (train/placement.h), offload.optimizer auto to the tier the memory planner chose.
  const JobSpec& spec() const { return spec_; }
  // gemini: one line on what was placed where and why; empty for the other plugins.
  const std::string& placement() const { return placement_; }

 private:
  Trainer(const JobSpec& spec, Backend* backend, double peak_flops, Communicator* comm);
  // The ZeRO plugins' sharding (at construction).
  void ShardOptimizerState();
  void ShardGradients();
  void ShardParameters();
  // zero2/3: runs a collective of the model's parameters or gradients unless one failed
  // before (model_collective_status_ keeps the first failure), and counts its time.
  void RunModelCollective(const std::function<absl::Status()>& collective);
  // Whether the model's collectives can run beside its compute: on a helper thread over
  // host memory, or on NCCL's stream. GPU ranks without NCCL run them inline.
  bool CollectivesCanRunBeside() const;
  // A damaged or mismatched dataset must not index past the embedding table: DataLoss
  // for the first id outside the model's vocabulary among the `count` windows of `seq` in
  // tokens_ and targets_, naming the window as `label` and its number (`first` + index).
  absl::Status CheckIdsInVocabulary(int count, int seq, std::string_view label, uint64_t first) const;

  // Create after the checks that need no memory plan: places gemini and the optimizer
  // state within the rank's memory budget, checks that the job fits, and builds.
  static absl::StatusOr<std::unique_ptr<Trainer>> CreateWithinMemory(const JobSpec& spec, Backend* backend,
                                                                     double peak_flops, Communicator* comm);

  JobSpec spec_;
  std::string placement_;
  Backend* backend_;
  std::unique_ptr<Communicator> local_comm_;  // when no communicator was given
  Communicator* comm_;
  DeviceCollectives* device_;  // the communicator's collectives on this backend's GPU buffers (NCCL), or null
  double peak_flops_;
  std::unique_ptr<LlamaModel> model_;
  std::unique_ptr<AdamWOptimizer> optimizer_;
  LrSchedule schedule_;
  std::vector<int32_t> tokens_, targets_;
  uint64_t sampler_position_ = 0;
  const std::atomic<bool>* stop_flag_ = nullptr;
  bool zero1_ = false;
  // zero2/3: the first failure of a collective inside the forward or backward, the
  // seconds spent in them this step, and the seconds the step waited for them.
  absl::Status model_collective_status_;
  double model_collective_seconds_ = 0;
  double model_wait_seconds_ = 0;
  // zero2/3 on host memory: the collectives inside the forward and backward run on one
  // helper thread, in the order posted. Each region's gradients are reduced there from a
  // copy (so the model's scratch is free for the next region) while the backward goes
  // on, one region in flight at a time; under zero3 each region's parameters are
  // gathered there while the region before it computes.
  std::unique_ptr<SerialWorker> collectives_;
  void* region_copy_ = nullptr;
  size_t region_copy_bytes_ = 0;
  // gemini's partial sharding (zero3, spec.parallel.sharded_share < 1): the model holds
  // the regions from ReplicatedBegin on whole, in its replica, which the layers read in
  // place. Each rank's optimizer updates its part there; after each step (and at start)
  // each owner sends its part to the others.
  absl::Status RefreshReplica();
  std::shared_future<void> region_reduce_;
  // zero2 on a GPU with NCCL: the region whose reductions into region_copy_ are queued
  // beside the backward, not yet added into the shard (empty when none).
  size_t device_region_begin_ = 0, device_region_end_ = 0;
  uint64_t device_region_ticket_ = 0;  // its reduce-scatter's (DeviceCollectives::last_ticket)
  // Waits for the region reduction in flight and (GPU) adds the owner's part.
  void FinishRegionReduce();
  // zero3: this rank's own parameters [lo, hi) into a gather's dst. `plain`: with memcpy,
  // not the backend (host memory, off the main thread).
  void CopyOwnParameters(void* dst, size_t lo, size_t hi, bool plain = false);
  // StartRanks' collectives: rank 0's progress, and the state each rank lacks.
  absl::Status SendStartingState();

};

}  // namespace llamad
