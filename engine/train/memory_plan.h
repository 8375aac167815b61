// Per-rank memory of a job, by kind (rank 0's, the largest by at most a few elements): what `llama-train plan` prints and what Trainer
// checks before it allocates. The same layout functions the model allocates with
// (LlamaParamLayout, LayoutActivations) do the counting, so plan and run agree.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "core/dtype.h"
#include "core/host_memory.h"
#include "offload/swap_file.h"
#include "train/jobspec.h"

namespace llamad {

struct MemoryPlan {
  int world_size = 1;
  uint64_t parameters = 0;       // the copy the layers read (dtype); zero3: 1/world_size and one region
                                 // (and the regions it holds whole, under gemini's partial sharding)
  uint64_t master_weights = 0;   // f32 copy for the optimizer, when dtype is not f32
  uint64_t gradients = 0;        // accum dtype; zero2/3: 1/world_size of them and one region
                                 // (zero2 on host memory: two, one being reduced)
  uint64_t optimizer_state = 0;  // two AdamW moments; 1/world_size of them under zero1/2/3
                                 // (offloaded: the swap pipeline's three chunk buffers)
  uint64_t optimizer_state_nvme = 0;  // the moments in the NVMe swap file (not in total())
  // offload.optimizer host: a GPU's f32 master weights and moments, and the gradient
  // chunk the CPU update works on, in host memory (not in total(), which is the GPU's).
  uint64_t optimizer_state_host = 0;
  bool host_moments_bf16 = false;  // the host's moments (optimizer_state_host) in bf16
  uint64_t activations = 0;      // every activation and backward scratch buffer
  uint64_t workspace = 0;        // the LM head's chunk of logits, unfused attention scores
  // Checkpoint saves (checkpoint.interval > 0): the snapshot of this rank's part (1/world
  // size) of the master weights and moments (f32, host memory, kept between saves).
  uint64_t checkpoint_snapshot = 0;
  bool snapshot_on_this_tier = true;  // false where the plan's memory is a GPU's
  // Training's steady state, which is also the rank's peak: a ZeRO rank builds only its
  // shard of the model, so no rank ever holds more at start-up.
  uint64_t total() const {
    return parameters + master_weights + gradients + optimizer_state + activations + workspace +
           (snapshot_on_this_tier ? checkpoint_snapshot : 0);
  }
  // A table, one row per kind, with the total and (budget > 0) whether it fits.
  std::string Describe(uint64_t budget, const std::string& budget_name) const;
};

// What a GPU rank keeps in host memory for the whole of a training run.
struct HostMemoryNeed {
  uint64_t optimizer_state = 0;  // MemoryPlan::optimizer_state_host
  uint64_t snapshot = 0;         // the checkpoint snapshot (checkpoint.interval > 0)
  uint64_t staging = 0;          // collectives of ranks without NCCL, staged in host f32
  int world = 1;  // the job's ranks (MemoryPlan::world_size)
  uint64_t total() const { return optimizer_state + snapshot + staging; }
};
// `plan` is `spec`'s (placed: gemini resolved) on GPU ranks; `nccl`: whether they reduce
// with NCCL. Without it their collectives pass through one host f32 buffer each
// (backend_collectives), as large as the largest: the whole gradient under ddp and
// zero1, a region or a shard under zero2 and zero3.
HostMemoryNeed HostMemoryNeedOf(const MemoryPlan& plan, const JobSpec& spec, bool nccl);

// Whether GPU ranks of `spec`, each needing `each`, fit in what `host` has with 2% to
// spare: `ranks_on_machine` of them draw on its MemAvailable, `ranks_in_cgroup` on its
// cgroup's limit (where it has one). An error that says what each needs and which of
// the job's settings would lower it. Without this check a host that cannot hold it
// fails when the kernel kills a rank mid-allocation.
absl::Status CheckHostMemory(const HostMemoryNeed& each, int ranks_on_machine, int ranks_in_cgroup,
                             const HostMemory& host, const JobSpec& spec);

// The NVMe tier's pipeline as the job sets it (offload.chunk_mb in whole 4 KiB pages,
// block_kb, queue_depth): what the trainer opens the swap with and the plan counts.
offload::SwapOptions NvmeSwapOptions(const OffloadSpec& offload);

// `dtype` and `accum` are the backend's element types (CPU: f32 and f32; CUDA: bf16 and
// f32). The LM head holds up to lm_head_chunk_elements logits (as many rows as fit, at
// least 16, at most the micro-batch's tokens) at `logit_bytes` each; `score_threads` is
// how many unfused score matrices (dtype) the backend holds at once (CPU: 3 per thread;
// unused with flash attention).
MemoryPlan PlanMemory(const JobSpec& spec, DType dtype, DType accum, int world_size,
                      uint64_t lm_head_chunk_elements, int logit_bytes, int score_threads);
// PlanMemory with the types and buffers of the backend the job runs on: the CUDA
// backend's (bf16, f32 master weights, a chunk of f32 logits and their bf16 gradients),
// or the CPU backend's (f32, `cpu_threads` threads per rank). A gemini job is planned
// as the layout PlaceGemini resolves it to (train/placement.h), which takes this plan.
MemoryPlan PlanMemoryOn(const JobSpec& spec, bool cuda, int world_size, int cpu_threads);

}  // namespace llamad
