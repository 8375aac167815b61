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
//           offload_optim_frac 1: the f32 master weights and moments in host memory,
//           updated by the CPU (offload.optimizer host); 0: on the device.
//           offload_param_frac: 0 (the parameters' shard stays on the device).
//   auto    the fastest layout the memory planner (train/memory_plan.h) fits into the
//           rank's budget, tried in this order: zero2, zero3, then zero3 with the
//           optimizer state in host memory (CUDA) or partly on the NVMe tier (CPU,
//           offload.nvme_path set; offload.optimizer auto picks the share).
//
// On the CPU backend the device's memory is the host's: the offload fractions move
// nothing there, and the NVMe tier (offload.optimizer nvme, nvme_fraction) is the one
// below it. Offload fractions strictly between 0 and 1 are refused with an error that
// says so: this build moves a GPU's optimizer state as a whole.
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
// not gemini comes back unchanged.
absl::StatusOr<GeminiPlacement> PlaceGemini(const JobSpec& spec, bool cuda, int world, uint64_t budget,
                                            const std::function<MemoryPlan(const JobSpec&)>& plan);

// zero2/3 run each region's collectives beside the backward with a second region scratch
// (ParallelSpec::overlap_regions); a job that fits `budget` only without that scratch
// reduces and gathers inline. Returns the spec to run: unchanged when it fits as it is,
// when the budget is unknown (0), or when it does not fit either way.
JobSpec FitRegionOverlap(const JobSpec& spec, uint64_t budget, const std::function<MemoryPlan(const JobSpec&)>& plan);

// The CPU backend's optimizer tiers: resolves offload.optimizer auto (memory when the
// job fits `budget`, else as small a share of the moments on the NVMe tier as makes the
// rest fit, in 1/1024ths) and checks that the job fits `budget` (0: unknown) as placed,
// with an error that says what it needs and what lowers it.
absl::StatusOr<JobSpec> PlaceOptimizerState(const JobSpec& spec, uint64_t budget,
                                            const std::function<MemoryPlan(const JobSpec&)>& plan);

}  // namespace llamad
