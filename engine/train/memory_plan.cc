#include "train/memory_plan.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/cuda/cuda_backend_impl.h"
#include "core/strings.h"
#include "model/llama.h"
#include "train/optimizer.h"

namespace llamad {

offload::SwapOptions NvmeSwapOptions(const OffloadSpec& offload) {
  offload::SwapOptions options;
  options.chunk_bytes = size_t(offload.chunk_mb * double(1 << 20)) / 4096 * 4096;
  options.block_bytes = size_t(offload.block_kb) * 1024;
  options.queue_depth = int(offload.queue_depth);
  return options;
}

MemoryPlan PlanMemory(const JobSpec& spec, DType dtype, DType accum, int world_size,
                      uint64_t lm_head_chunk_elements, int logit_bytes, int score_threads) {
  MemoryPlan plan;
  plan.world_size = world_size;
  const uint64_t n = uint64_t(spec.model.NumParameters());
  const std::string& plugin = spec.parallel.plugin;
  const bool many = world_size > 1;
  const uint64_t shard = (n + uint64_t(world_size) - 1) / uint64_t(world_size);
  const uint64_t sharded = (plugin == "zero1" || plugin == "zero2" || plugin == "zero3") && many ? shard : n;
  // zero2 and zero3 shard the gradients, zero3 the parameters too, each with one
  // region's scratch besides the shard (LlamaModel::ShardGradients,
  // GatherParametersWith). In host memory, and on GPUs with NCCL
  // (Trainer::ShardGradients, ShardParameters), each region's gradients are reduced from
  // a copy while the backward goes on, and zero3 gathers the next region's parameters
  // into a second scratch. GPU ranks count on NCCL unless the job says gloo (where auto
  // falls back to Gloo at run time, they hold one region less of each than planned).
  const uint64_t region = LargestGradientRegion(spec.model);
  const bool overlapped =
      many && spec.parallel.overlap_regions && (dtype == accum || spec.parallel.communicator != "gloo");
  // gemini's partial sharding: the regions from ReplicatedBegin on whole on every rank,
  // and the shard only its part before them (rank 0's: the largest).
  const uint64_t replicated_begin = ReplicatedBegin(spec.model, spec.parallel.sharded_share);
  plan.parameters = (plugin == "zero3" && many ? std::min(shard, replicated_begin) + region * (overlapped ? 2 : 1) +
                                                     (n - replicated_begin)
                                               : n) *
                    DTypeSize(dtype);
  plan.master_weights = dtype != accum ? sharded * DTypeSize(accum) : 0;  // sharded with the moments
  plan.gradients = ((plugin == "zero2" || plugin == "zero3") && many ? shard + region : n) * DTypeSize(accum);
  if ((plugin == "zero2" || plugin == "zero3") && overlapped) plan.gradients += region * DTypeSize(accum);
  plan.optimizer_state = 2 * sharded * DTypeSize(accum);
  // The NVMe tier's chunking (AdamWOptimizer::OffloadToNvme): both moments of a range of
  // elements per chunk, whole chunks, three chunks in memory for the pipeline.
  const size_t requested_chunk = NvmeSwapOptions(spec.offload).chunk_bytes;
  const uint64_t chunk_elements = AdamWOptimizer::SwapChunkElements(requested_chunk);
  const uint64_t chunk_bytes = chunk_elements * 2 * sizeof(float);
  const bool on_gpu = dtype != accum;
  if (spec.offload.optimizer == "nvme" && !on_gpu) {
    // The last nvme_fraction of the shard's moments in the file, the others in memory.
    const uint64_t swapped = AdamWOptimizer::SwappedElements(sharded, spec.offload.nvme_fraction);
    plan.optimizer_state_nvme = AdamWOptimizer::SwapFileBytes(swapped, requested_chunk);
    plan.optimizer_state = 2 * (sharded - swapped) * DTypeSize(accum) + 3 * chunk_bytes;
  }
  if ((spec.offload.optimizer == "host" || spec.offload.optimizer == "nvme") && on_gpu) {
    // AdamWOptimizer::OffloadToHost: master weights and moments of the last
    // host_fraction of the rank's shard (nvme: all of it) in host f32, and two gradient
    // chunks of offload.chunk_mb each (one updated while the next comes down); the
    // device keeps those of the rest. nvme then moves the last nvme_fraction of those
    // moments to the file (ZeRO-Infinity), through the pipeline's chunks in host memory.
    const bool nvme = spec.offload.optimizer == "nvme";
    const uint64_t hosted = AdamWOptimizer::SwappedElements(sharded, nvme ? 1.0 : spec.offload.host_fraction);
    const uint64_t swapped = nvme ? AdamWOptimizer::SwappedElements(hosted, spec.offload.nvme_fraction) : 0;
    const auto [grad0, grad1] = AdamWOptimizer::HostGradBuffers(hosted - swapped, requested_chunk, nvme);
    plan.host_moments_bf16 = spec.offload.host_moments == "bf16";
    const uint64_t moment_bytes = plan.host_moments_bf16 ? 2 : 4;
    plan.optimizer_state_host = hosted * 4 + 2 * (hosted - swapped) * moment_bytes + (grad0 + grad1) * 4;
    if (nvme) {
      plan.optimizer_state_host += 3 * chunk_bytes;
      plan.optimizer_state_nvme = AdamWOptimizer::SwapFileBytes(swapped, requested_chunk);
    }
    plan.master_weights = (sharded - hosted) * DTypeSize(accum);
    plan.optimizer_state = 2 * (sharded - hosted) * DTypeSize(accum);
    if (plugin == "zero3" && many && spec.parallel.params_host_share > 0) {
      // Trainer::OffloadOptimizerState: the shard's last parameters leave the device.
      plan.parameters -= AdamWOptimizer::SwappedElements(sharded, spec.parallel.params_host_share) * DTypeSize(dtype);
    }
  }
  // A rank runs micro-batches of at most batch_size sequences.
  ActivationBuffers counting;
  plan.activations = LayoutActivations(spec.model, int(spec.training.batch_size), int(spec.training.max_length),
                                       spec.training.grad_checkpoint, dtype, accum, counting,
                                       [](size_t, DType) { return nullptr; });
  const double seq = double(spec.training.max_length);
  const double scores = spec.training.flash_attention ? 0.0 : double(score_threads) * seq * seq;
  const int vocab = int(spec.model.vocab_size);
  const uint64_t rows = uint64_t(LmHeadChunkRows(lm_head_chunk_elements, vocab,
                                                 int(spec.training.batch_size * spec.training.max_length)));
  plan.workspace = rows * uint64_t(vocab) * uint64_t(logit_bytes) + uint64_t(scores * double(DTypeSize(dtype)));
  // The CUDA backend's staging buffer of bf16 copies (host-memory collectives, gathers of
  // parameters from the host); a scratch of its own, outside the allocated bytes.
  if (dtype != accum) plan.workspace += kCudaStagingElements * 4;
  if (spec.checkpoint.interval > 0) {
    // AsyncCheckpointer's snapshot of rank 0's part (the largest): the f32 values of each
    // tensor part in it padded to 4 KiB, three times (master weights and both moments).
    ForEachTensorPart(LlamaParamLayout(spec.model), 0, shard,  // rank 0's EvenSlice
                      [&](const ParamInfo&, size_t lo, size_t hi) {
                        plan.checkpoint_snapshot += 3 * (((hi - lo) * 4 + 4095) / 4096 * 4096);
                      });
  }
  plan.snapshot_on_this_tier = dtype == accum;  // the CPU backend's memory is the host's
  return plan;
}

MemoryPlan PlanMemoryOn(const JobSpec& spec, bool cuda, int world_size, int cpu_threads) {
  if (cuda) {
    return PlanMemory(spec, DType::kBF16, DType::kF32, world_size, CudaBackendOptions{}.lm_head_chunk_elements,
                      /*logit_bytes=*/6, /*score_threads=*/0);
  }
  return PlanMemory(spec, DType::kF32, DType::kF32, world_size, CpuBackendOptions{}.lm_head_chunk_elements,
                    /*logit_bytes=*/4, 3 * cpu_threads);
}

HostMemoryNeed HostMemoryNeedOf(const MemoryPlan& plan, const JobSpec& spec, bool nccl) {
  HostMemoryNeed need;
  need.optimizer_state = plan.optimizer_state_host;
  need.snapshot = plan.snapshot_on_this_tier ? 0 : plan.checkpoint_snapshot;
  const int world = need.world = plan.world_size;
  if (world > 1 && !nccl) {
    const uint64_t n = uint64_t(spec.model.NumParameters());
    const std::string& plugin = spec.parallel.plugin;
    const bool sharded_grads = plugin == "zero2" || plugin == "zero3";
    const uint64_t shard = (n + uint64_t(world) - 1) / uint64_t(world);
    need.staging = 4 * (sharded_grads ? std::max<uint64_t>(LargestGradientRegion(spec.model), shard) : n);
  }
  return need;
}

absl::Status CheckHostMemory(const HostMemoryNeed& each, int ranks_on_machine, int ranks_in_cgroup,
                             const HostMemory& host, const JobSpec& spec) {
  if (each.total() == 0) return absl::OkStatus();
  // The cgroup's limit first: where both are short, it is the one the job was given.
  struct Bound {
    int ranks;
    int64_t available;
    const char* where;
    const char* what;
  };
  const Bound bounds[] = {{ranks_in_cgroup, host.cgroup_left, "in this cgroup", "its memory limit"},
                          {ranks_on_machine, host.mem_available, "on this host", "MemAvailable"}};
  for (const Bound& b : bounds) {
    if (b.available < 0) continue;
    const int ranks = std::max(b.ranks, 1);
    const uint64_t need = each.total() * uint64_t(ranks);
    const uint64_t usable = uint64_t(b.available) - uint64_t(b.available) / 50;
    if (need <= usable) continue;
    std::vector<std::string> parts, ways;
    const OffloadSpec& o = spec.offload;
    const std::string& plugin = spec.parallel.plugin;
    if (each.optimizer_state > 0) {
      parts.push_back(BytesForPeople(each.optimizer_state) + " of optimizer state");
      if (each.world > 1 && plugin == "ddp") {
        ways.push_back("shard the optimizer state over the ranks (parallel.plugin zero1, zero2 or zero3: ddp keeps "
                       "all of it on every rank)");
      }
      const bool moments_on_host = o.optimizer == "host" || (o.optimizer == "nvme" && o.nvme_fraction < 1);
      if (o.host_moments == "f32" && moments_on_host) {
        ways.push_back("store its moments in bf16 (offload.host_moments: bf16)");
      }
      if (o.optimizer == "host") {
        ways.push_back("move less of it to host memory (offload.host_fraction, or gemini's offload_optim_frac)");
        // The NVMe tier keeps all of the f32 master weights on the host (4 bytes a
        // parameter) and only those: it saves where the host holds more than that.
        const double moment_bytes = o.host_moments == "bf16" ? 2 : 4;
        if (o.host_fraction * (4 + 2 * moment_bytes) > 4) {
          ways.push_back("send its moments on to NVMe (offload.optimizer: nvme)");
        }
      } else if (o.optimizer == "nvme" && o.nvme_fraction < 1) {
        ways.push_back("send more of its moments to NVMe (offload.nvme_fraction)");
      }
    }
    if (each.snapshot > 0) {
      parts.push_back(BytesForPeople(each.snapshot) + " of checkpoint snapshot");
      ways.push_back("train without checkpoint saves (checkpoint.interval: 0), whose snapshot stays in host memory");
    }
    if (each.staging > 0) {
      parts.push_back(BytesForPeople(each.staging) + " of collectives staged without NCCL");
      ways.push_back(plugin == "zero2" || plugin == "zero3"
                         ? "give each rank a GPU of its own and NCCL (parallel.communicator: auto or nccl)"
                         : "give each rank a GPU of its own and NCCL (parallel.communicator: auto or nccl), or "
                           "shard the gradients (parallel.plugin zero2 or zero3: a region or a shard at a time)");
    }
    ways.push_back(ranks > 1 ? "run fewer ranks on each host" : "run on a host with more memory");
    std::string listed, advice;
    for (const std::string& p : parts) listed += (listed.empty() ? "" : ", ") + p;
    for (const std::string& w : ways) advice += (advice.empty() ? "" : "; ") + w;
    return absl::ResourceExhaustedError(fmt::format(
        "{}: the {} rank{} {} need{} {} of host memory ({}{}), and {} leaves {} ({} usable, with 2% spare): {}",
        spec.path.empty() ? "job" : spec.path, ranks, ranks > 1 ? "s" : "", b.where, ranks > 1 ? "" : "s",
        BytesForPeople(need), ranks > 1 ? fmt::format("{} each: ", BytesForPeople(each.total())) : "", listed, b.what,
        BytesForPeople(uint64_t(b.available)), BytesForPeople(usable), advice));
  }
  return absl::OkStatus();
}

std::string MemoryPlan::Describe(uint64_t budget, const std::string& budget_name) const {
  auto gib = [](uint64_t b) { return fmt::format("{:9.2f} GiB", double(b) / double(uint64_t{1} << 30)); };
  std::string out = fmt::format("per rank ({} rank{}):\n", world_size, world_size > 1 ? "s" : "");
  const std::pair<const char*, uint64_t> rows[] = {
      {"parameters", parameters},   {"master weights", master_weights}, {"gradients", gradients},
      {"optimizer state", optimizer_state}, {"activations", activations},   {"workspace", workspace}};
  for (const auto& [name, bytes] : rows) out += fmt::format("  {:<16} {}\n", name, gib(bytes));
  if (checkpoint_snapshot > 0) {
    out += fmt::format("  {:<16} {} (this rank's part of a checkpoint, kept between saves{})\n", "snapshot",
                       gib(checkpoint_snapshot),
                       snapshot_on_this_tier ? "" : ", host memory: not in the total");
  }
  out += fmt::format("  {:<16} {}\n", "total", gib(total()));
  if (optimizer_state_host > 0) {
    out += fmt::format("  {:<16} {} (f32 master weights and {} AdamW moments, updated by the CPU{})\n",
                       "in host memory", gib(optimizer_state_host), host_moments_bf16 ? "bf16" : "f32",
                       optimizer_state_nvme > 0 ? "; moments partly on NVMe" : "");
  }
  if (optimizer_state_nvme > 0) {
    out += fmt::format("  {:<16} {} (the AdamW moments, in the NVMe swap file)\n", "on NVMe", gib(optimizer_state_nvme));
  }
  if (budget > 0) {
    out += total() <= budget ? fmt::format("fits in {} ({} free of it)\n", budget_name, gib(budget - total()))
                            : fmt::format("does not fit in {}: {} short\n", budget_name, gib(total() - budget));
  }
  return out;
}

}  // namespace llamad
