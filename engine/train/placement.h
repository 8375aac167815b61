// The gemini plugin: Colossal-AI's GeminiPlugin placement, in this engine's terms.
//
// Gemini keeps parameters, gradients and optimizer state in chunks and decides which
// chunks are sharded over the ranks and which live in host memory instead of the
// device. This engine's chunks are the flat element ranges of ZeRO: a rank's shard and
// the regions (a layer, the embedding, the LM head) gathered and reduced as the
// forward and backward reach them. PlaceGemini turns a gemini job into the ZeRO stage
// the ranks run and the tier of the optimizer state:
//
//   static  shard_param_frac 1: parameters sharded (zero3); 0: replicated (zero2);
//           between: zero3 for the regions in that first share of the parameters,
//           and every rank holds the regions after it whole, refreshed once after
//           each step instead of gathered at every use (ParallelSpec::sharded_share).
//           offload_optim_frac: the share of each shard whose f32 master weights and
//           moments live in host memory, updated by the CPU (offload.optimizer host,
//           host_fraction); with offload.optimizer nvme (all of it on the host) its
//           moments go on to the NVMe tier. offload_param_frac (zero3, at most
//           offload_optim_frac): that share's parameters leave the device too
//           (ParallelSpec::params_host_share).
//   auto    the fastest layout the memory planner (train/memory_plan.h) fits into the
//           rank's budget, tried in this order: zero2, zero3, then zero3 with the
//           smallest share of the optimizer state in host memory that fits, then all of
//           it and the smallest share of the parameters (CUDA), or zero3 partly on the
//           NVMe tier (CPU, offload.nvme_path set; offload.optimizer auto picks the
//           share). Each layout first with zero2/3's collectives overlapped, then inline.
//
// On the CPU backend the device's memory is the host's: the offload fractions move
// nothing there, and the NVMe tier (offload.optimizer nvme, nvme_fraction) is the one
// below it.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "train/jobspec.h"
#include "train/memory_plan.h"

namespace llamad {

struct GeminiPlacement {
  JobSpec spec;         // parallel.plugin zero2 or zero3, offload.optimizer resolved
  std::string summary;  // one line: what went where, and why
};

// `world` ranks; `plan` gives the per-rank memory of a resolved spec on the job's
// backend (PlanMemoryOn); `budget` is the rank's memory in bytes (the GPU's, or the
// host's share on the CPU backend; 0: unknown, everything fits). A spec whose plugin is
// not gemini comes back unchanged. `master_weights_apart`: a CPU backend that keeps
// master weights apart (CpuBackendOptions::master_weights) places the static offload
// fractions as a GPU does, for its tests; all else is placed as on the CPU.
absl::StatusOr<GeminiPlacement> PlaceGemini(const JobSpec& spec, bool cuda, int world, uint64_t budget,
                                            const std::function<MemoryPlan(const JobSpec&)>& plan,
                                            bool master_weights_apart = false);

// What a job runs as on `world` ranks within `budget` per rank (0: unknown): gemini
// placed (PlaceGemini), the CPU backend's optimizer tier placed (PlaceOptimizerState)
// and a GPU job's zero2/3 overlap (ParallelSpec::overlap_regions) dropped where only
// inline fits, which the summary then says.
// With `must_fit` a CPU job that does not fit is an error; without (a plan, which shows
// by how much), offload.optimizer auto that nothing fits stays in memory. The trainer
// and `llama-train plan` both place with this, so a plan shows what a run would do.
absl::StatusOr<GeminiPlacement> PlaceJob(const JobSpec& spec, bool cuda, int world, uint64_t budget,
                                         const std::function<MemoryPlan(const JobSpec&)>& plan, bool must_fit,
                                         bool master_weights_apart = false);

// The CPU backend's optimizer tiers: resolves offload.optimizer auto (memory when the
// job fits `budget`, else as small a share of the moments on the NVMe tier as makes the
// rest fit, in 1/1024ths) and checks that the job fits `budget` (0: unknown) as placed,
// with an error that says what it needs and what lowers it.
absl::StatusOr<JobSpec> PlaceOptimizerState(const JobSpec& spec, uint64_t budget,
                                            const std::function<MemoryPlan(const JobSpec&)>& plan);

}  // namespace llamad
