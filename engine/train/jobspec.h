// The job spec: one YAML file that describes a training run (docs/jobspec.md).
// llama-train reads the sections it owns and ignores `resources`, which belongs to the
// scheduler. Every error names the file, the key path and the value.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "model/config.h"

namespace llamad {

struct TrainingSpec {
  int64_t max_length = 2048;        // Tokens per sequence (T).
  int64_t batch_size = 1;           // Sequences per micro-batch per rank.
  int64_t global_batch_size = 0;    // Sequences per optimizer step; 0 = batch_size.
  int64_t steps = 100;              // Optimizer steps.
  double lr = 3e-4;                 // Peak learning rate.
  double min_lr_ratio = 0.1;        // Cosine floor as a fraction of lr.
  int64_t warmup_steps = 0;         // Linear warmup steps.
  double weight_decay = 0.1;        // AdamW decoupled weight decay (matrices only).
  double beta1 = 0.9;
  double beta2 = 0.95;
  double adam_eps = 1e-8;
  double grad_clip = 1.0;           // Global gradient-norm clip; 0 disables.
  bool grad_checkpoint = false;     // Activation checkpointing per layer.
  bool flash_attention = true;      // Tiled attention; false = the unfused algorithm.
  std::string mixed_precision = "fp32";  // fp32 | bf16 | fp16.
  uint64_t seed = 42;               // Initialisation and data order.
  int64_t log_interval = 1;         // Print every this many steps (and the last).
};

struct ParallelSpec {
  std::string plugin = "ddp";       // ddp | zero1 | zero2 | zero3 | gemini.
  double bucket_mb = 16;            // Gradient all-reduce buckets hold at least this much.
  // What GPU ranks reduce over: nccl (device to device), gloo (through host memory), or
  // auto (NCCL where every rank loads it and has a GPU of its own). CPU ranks use Gloo.
  std::string communicator = "auto";
  // A training step's collective that makes no progress for this long fails the rank as
  // having lost a peer (a rank that stopped answering: hung, or cut off without its
  // connections closing). Ranks that die are noticed at once, whatever this is. It must
  // be longer than any rank's longest stretch of work between two collectives (a
  // checkpoint's host copy, NVMe optimizer I/O, a slow step on a slower GPU).
  double collective_timeout_s = 600;
  // gemini (Colossal-AI's GeminiPlugin, its names): where parameters and optimizer state
  // live (train/placement.h). static: by the fractions; auto: the memory planner picks
  // the least sharding and offloading that fits the rank's memory.
  std::string placement = "static";
  double shard_param_frac = 1.0;    // 1: parameters sharded over the ranks; 0: replicated
  double offload_optim_frac = 0.0;  // share of the optimizer state in host memory
  double offload_param_frac = 0.0;  // share of the parameters in host memory
  // Not a job key: set by PlaceGemini (train/placement.h) for zero3 with a
  // shard_param_frac below 1. zero3 shards the regions in this first share of the flat
  // parameters (ReplicatedBegin); every rank holds the rest whole.
  double sharded_share = 1.0;
  // Not a job key: whether zero2/3 reduce and gather each region beside the backward
  // (host memory, or GPUs with NCCL), which costs a second region scratch of gradients and
  // of parameters. Placement turns it off for a layout that fits only without.
  bool overlap_regions = true;
  // Not a job key: set by PlaceGemini from offload_param_frac (zero3 with the optimizer
  // state in host memory). The shard's parameters of this last share leave the GPU; each
  // gather uploads them from the host's master weights (LlamaModel::TrimParamShard).
  double params_host_share = 0;
};

struct DataSpec {
  // A prepared dataset folder, a raw corpus (JSONL or text, plain/.gz/.zst, or a folder
  // of them), a token file, "sample" (the bundled corpus) or a Hugging Face dataset name
  // ("owner/name", downloaded on first use). Relative paths resolve against base_dir.
  std::string dataset;
  // auto (decided by what dataset is), prepared, raw, uint32 (little-endian token ids)
  // or bytes (one id per byte).
  std::string format = "auto";
  std::string tokenizer;            // SentencePiece model for raw corpora ("" = the sample's)
  std::string base_dir;             // The job file's folder ("" = the working directory).
};

struct CheckpointSpec {
  std::string dir;                  // Where checkpoints go.
  int64_t interval = 0;             // Save every this many steps (and the last); 0 = never.
  int64_t keep_last = 2;            // Committed checkpoints kept (older ones are removed).
};

// Where the optimizer's state lives (DeepSpeed's offload_optimizer.device). `nvme`
// keeps the AdamW moments in a scratch file under nvme_path (io_uring, O_DIRECT) and
// streams them through memory chunk by chunk each step.
struct OffloadSpec {
  // memory | host | nvme | auto. memory: with the parameters (a GPU's memory on the CUDA
  // backend); host: a GPU's f32 master weights and moments in host memory, updated by
  // the CPU (ZeRO-Offload); nvme: a swap file (CPU backend); auto: memory when the job
  // fits memory_budget_gb, else as much as fits in memory and the rest on NVMe.
  std::string optimizer = "memory";
  // nvme: the fraction of the rank's moments in the swap file (its last elements), the
  // rest in memory (Colossal-AI's nvme_offload_fraction). auto sets it.
  double nvme_fraction = 1.0;
  // host: the fraction of the rank's optimizer state (master weights and moments of its
  // last elements) in host memory, the rest on the GPU (DeepSpeed's offload ratio;
  // gemini's offload_optim_frac sets it).
  double host_fraction = 1.0;
  // Per rank; 0 = the host's available memory / ranks (CPU backend), or under gemini's
  // placement auto what the GPU has free when training starts.
  double memory_budget_gb = 0;
  std::string nvme_path;             // folder on a local disk (nvme); relative to the job file
  int64_t queue_depth = 32;          // I/O requests in flight
  double chunk_mb = 64;              // the update pipeline's unit (reads, updates, writes)
  // f32 | bf16: the type of the AdamW moments a GPU's optimizer keeps in host memory
  // (host, nvme, gemini's offload_optim_frac): bf16 (stochastically rounded) takes 4
  // bytes per element less memory and makes the CPU's update move 20 bytes per element
  // instead of 28. Checkpoints hold f32 either way.
  std::string host_moments = "f32";
  int64_t block_kb = 1024;           // one read or write request
};

// Bounds of a job's size: ValidateJobSpec checks a job's resources against them, llamad
// a node's device count, and a rank the world size its launcher gives it, so that a job
// that passes the first check is never refused by the last.
inline constexpr int64_t kMaxNodes = 100000;
inline constexpr int64_t kMaxDevicesPerNode = 1024;
inline constexpr int64_t kMaxWorldSize = int64_t{1} << 20;  // ranks of one job

// The scheduler's section: how many nodes and devices the job runs on. llama-train reads
// it only to validate it; the world size of a run comes from its launcher.
struct ResourcesSpec {
  int64_t nodes = 1;                // Nodes the job starts on, all at once (gang).
  int64_t devices_per_node = 1;     // Ranks per node: one per GPU, or CPU slots.
  int64_t min_nodes = 0;            // Fewest nodes it may shrink to; 0 = nodes.
  int64_t max_nodes = 0;            // Most nodes it may grow to; 0 = nodes.
  int64_t priority = 0;             // Higher starts first; ties start in submission order.
};

struct JobSpec {
  std::string path;                 // The file it was read from.
  std::string name = "job";         // Job name (defaults to the file's stem).
  ModelConfig model;
  TrainingSpec training;
  ParallelSpec parallel;
  DataSpec data;
  CheckpointSpec checkpoint;
  OffloadSpec offload;
  ResourcesSpec resources;
};

// Reads and validates a job file.
absl::StatusOr<JobSpec> LoadJobSpec(const std::string& path);

// Parses and validates a job spec held in memory. `origin` is the file it came from:
// errors name it, and relative paths resolve against its folder (it need not be
// readable here: the scheduler validates specs submitted from other machines).
absl::StatusOr<JobSpec> ParseJobSpec(const std::string& yaml_text, const std::string& origin);

// Checks a spec after command-line overrides; errors name the key path and value.
absl::Status ValidateJobSpec(const JobSpec& spec);

// Sequences per micro-batch times accumulation steps must equal the global batch.
int64_t GradientAccumulationSteps(const JobSpec& spec);

}  // namespace llamad
