#include "train/placement.h"

#include <fmt/format.h>

#include <vector>

#include "core/strings.h"
#include "core/yaml_fields.h"

namespace llamad {
namespace {

// What a resolved layout is, in words.
std::string Describe(const JobSpec& s, bool cuda, int world) {
  std::string out =
      world == 1 ? StrCat("one rank holds all (", s.parallel.plugin, ")")
      : s.parallel.plugin == "zero3"
          ? (s.parallel.sharded_share < 1
                 ? StrCat("the regions in the first ", fmt::format("{:g}", 100 * s.parallel.sharded_share),
                          "% of the parameters sharded over ", world,
                          " ranks (zero3), the rest held whole on every rank")
                 : StrCat("parameters sharded over ", world, " ranks (zero3)"))
          : StrCat("parameters replicated, gradients and optimizer state sharded over ", world, " ranks (zero2)");
  if (!s.parallel.overlap_regions && world > 1) out += ", each region reduced and gathered inline";
  if (s.parallel.params_host_share > 0) {
    out += world > 1 ? StrCat(", the parameters of the last ", fmt::format("{:.1f}", 100 * s.parallel.params_host_share),
                              "% of each shard in host memory (uploaded from their master weights at each gather)")
                     : ", the parameters on the device (one rank has no shards to move)";
  }
  if (s.offload.optimizer == "host" && s.offload.host_fraction < 1) {
    return StrCat(out, ", the optimizer state of the last ", fmt::format("{:.1f}", 100 * s.offload.host_fraction),
                  "% of each shard in host memory, updated by the CPU, the rest on the device");
  }
  if (s.offload.optimizer == "host") return StrCat(out, ", optimizer state in host memory, updated by the CPU");
  if (s.offload.optimizer == "nvme" && cuda) {
    return StrCat(out, ", optimizer state in host memory, updated by the CPU, with ",
                  fmt::format("{:.1f}", 100 * s.offload.nvme_fraction), "% of its moments on the NVMe tier");
  }
  if (s.offload.optimizer == "nvme") return StrCat(out, ", AdamW moments partly on the NVMe tier");
  if (s.offload.optimizer == "auto") return StrCat(out, ", AdamW moments in memory and, as needed, on the NVMe tier");
  return StrCat(out, cuda ? ", optimizer state on the device" : ", everything in host memory");
}

// The smallest fraction, in 1/1024ths, that `with(fraction)` fits the budget with (the
// plan shrinks as the fraction grows), or 0 when not even all of it does.
double SmallestFittingFraction(uint64_t budget, const std::function<MemoryPlan(const JobSpec&)>& plan,
                               const std::function<JobSpec(double)>& with) {
  if (budget == 0) return 0;
  if (plan(with(1.0)).total() > budget) return 0;
  int lo = 1, hi = 1024;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (plan(with(mid / 1024.0)).total() <= budget) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo / 1024.0;
}

// zero2/3 run each region's collectives beside the backward with a second region scratch
// (ParallelSpec::overlap_regions); a job that fits `budget` only without that scratch
// reduces and gathers inline. Returns the spec to run: unchanged when it fits as it is,
// when the budget is unknown (0), or when it does not fit either way.
JobSpec FitRegionOverlap(const JobSpec& spec, uint64_t budget, const std::function<MemoryPlan(const JobSpec&)>& plan) {
  if (budget == 0 || !spec.parallel.overlap_regions || plan(spec).total() <= budget) return spec;
  JobSpec inline_regions = spec;
  inline_regions.parallel.overlap_regions = false;
  return plan(inline_regions).total() <= budget ? inline_regions : spec;
}

}  // namespace

absl::StatusOr<GeminiPlacement> PlaceGemini(const JobSpec& spec, bool cuda, int world, uint64_t budget,
                                            const std::function<MemoryPlan(const JobSpec&)>& plan,
                                            bool master_weights_apart) {
  if (spec.parallel.plugin != "gemini") return GeminiPlacement{spec, ""};
  const std::string& f = spec.path;
  const ParallelSpec& p = spec.parallel;
  // The spec as the engine runs it: a ZeRO stage and an optimizer tier, gemini's own
  // keys back at their defaults.
  auto with = [&](const char* plugin, const std::string& optimizer, double sharded_share = 1.0) {
    JobSpec s = spec;
    const ParallelSpec defaults;
    s.parallel.placement = defaults.placement;
    s.parallel.shard_param_frac = defaults.shard_param_frac;
    s.parallel.offload_optim_frac = defaults.offload_optim_frac;
    s.parallel.offload_param_frac = defaults.offload_param_frac;
    s.parallel.plugin = plugin;
    s.parallel.sharded_share = sharded_share;
    s.parallel.params_host_share = 0;
    s.offload.optimizer = optimizer;
    return s;
  };
  // On GPUs offload_optim_frac places the optimizer state; offload.optimizer nvme only
  // sends the moments it put in host memory on to the NVMe tier (Colossal-AI's
  // nvme_offload_fraction), which needs all of it there.
  // The static fractions move state out of the backend's memory: a GPU's, or the CPU's
  // with master weights apart (its tests).
  const bool movable = cuda || master_weights_apart;
  const bool gpu_nvme = movable && spec.offload.optimizer == "nvme";
  if (movable && spec.offload.optimizer != "memory" && !gpu_nvme) {
    return ConfigError(f, StrCat("offload.optimizer: '", spec.offload.optimizer,
                                 "': under parallel.plugin gemini, parallel.offload_optim_frac places a GPU's "
                                 "optimizer state (1: host memory); leave offload.optimizer memory, or nvme to "
                                 "move its moments on to the NVMe tier"));
  }
  if (gpu_nvme && (p.placement != "static" || p.offload_optim_frac != 1)) {
    return ConfigError(f, "offload.optimizer: 'nvme': under parallel.plugin gemini on GPUs the NVMe tier takes the "
                          "moments of a state all in host memory: set parallel.placement static and "
                          "offload_optim_frac 1");
  }

  if (p.placement == "static") {
    // 0: zero2; above: zero3, the regions past the first shard_param_frac of the
    // parameters held whole on every rank.
    const char* plugin = p.shard_param_frac > 0 ? "zero3" : "zero2";
    const double share = p.shard_param_frac > 0 ? p.shard_param_frac : 1.0;
    if (!movable) {
      // The CPU backend's memory is the host's: nothing to move, whatever the fractions.
      JobSpec s = with(plugin, spec.offload.optimizer, share);
      std::string summary = StrCat("gemini static: ", Describe(s, cuda, world));
      if (p.offload_optim_frac > 0 || p.offload_param_frac > 0) {
        summary += " (the offload fractions move nothing: the CPU backend's memory is host memory)";
      }
      return GeminiPlacement{std::move(s), std::move(summary)};
    }
    if (p.offload_param_frac > 0 && p.shard_param_frac != 1) {
      return ConfigError(f, StrCat("parallel.offload_param_frac: ", p.offload_param_frac,
                                   ": parameters go to host memory from their shards; set shard_param_frac 1 "
                                   "(it is ", p.shard_param_frac, ")"));
    }
    if (p.offload_param_frac > p.offload_optim_frac) {
      return ConfigError(f, StrCat("parallel.offload_param_frac: ", p.offload_param_frac,
                                   ": the parameters in host memory are rounded from their master weights there, so "
                                   "offload_optim_frac must be at least as large (it is ", p.offload_optim_frac, ")"));
    }
    JobSpec s = with(plugin, gpu_nvme ? "nvme" : p.offload_optim_frac > 0 ? "host" : "memory", share);
    if (p.offload_optim_frac > 0 && !gpu_nvme) s.offload.host_fraction = p.offload_optim_frac;
    s.parallel.params_host_share = p.offload_param_frac;
    std::string summary = StrCat("gemini static: ", Describe(s, movable, world));
    return GeminiPlacement{std::move(s), std::move(summary)};
  }

  // auto: the first candidate that fits, fastest first. zero2 moves the least (no
  // parameter gathers); zero3 holds the least; offloading the optimizer state trades a
  // slower step for room. Each first with its collectives beside the backward, then
  // inline (one region scratch less of gradients and of parameters).
  std::vector<JobSpec> layouts = {with("zero2", "memory"), with("zero3", "memory")};
  if (cuda) {
    layouts.push_back(with("zero3", "host"));
    // Last, parameters too: all the optimizer state and a share of the parameters (of
    // shards: several ranks).
    if (world > 1) {
      layouts.push_back(with("zero3", "host"));
      layouts.back().parallel.params_host_share = 1;
    }
  } else if (!spec.offload.nvme_path.empty()) {
    // All moments on NVMe is the least this tier can hold in memory; Trainer::Create's
    // offload.optimizer auto then keeps in memory as many as fit.
    JobSpec s = with("zero3", "nvme");
    s.offload.nvme_fraction = 1;
    layouts.push_back(std::move(s));
  }
  std::vector<JobSpec> candidates;
  for (const JobSpec& s : layouts) {
    candidates.push_back(s);
    candidates.push_back(s);
    candidates.back().parallel.overlap_regions = false;
  }
  // A searched share stops 2% short of the budget: what the plan does not see (the
  // allocator's rounding, NCCL's and the libraries' buffers) needs some room.
  const uint64_t headroomed = budget - budget / 50;
  std::string tried;
  uint64_t overlapped_need = 0;
  for (JobSpec& s : candidates) {
    if (s.parallel.params_host_share > 0 && budget > 0) {
      // As few of the parameters in host memory as makes the rest fit.
      const double fraction = SmallestFittingFraction(headroomed, plan, [&](double x) {
        JobSpec t = s;
        t.parallel.params_host_share = x;
        return t;
      });
      if (fraction > 0) s.parallel.params_host_share = fraction;
    } else if (s.offload.optimizer == "host" && budget > 0) {
      // As little of the optimizer state in host memory as makes the rest fit.
      const double fraction = SmallestFittingFraction(headroomed, plan, [&](double x) {
        JobSpec t = s;
        t.offload.host_fraction = x;
        return t;
      });
      if (fraction > 0) s.offload.host_fraction = fraction;
    }
    const uint64_t need = plan(s).total();
    // Inline needs no less where nothing overlaps (one rank, or GPUs over Gloo).
    if (!s.parallel.overlap_regions && need == overlapped_need) continue;
    overlapped_need = need;
    if (budget == 0 || need <= budget) {
      if (s.offload.optimizer == "nvme") s.offload.optimizer = "auto";
      std::string summary = StrCat("gemini auto: ", Describe(s, cuda, world));
      if (budget > 0) {
        summary += StrCat(": ", BytesForPeople(need), " of the rank's ", BytesForPeople(budget));
        if (!tried.empty()) summary += StrCat(" (", tried, ")");
      }
      return GeminiPlacement{std::move(s), std::move(summary)};
    }
    if (!s.parallel.overlap_regions) {
      tried += StrCat(", ", BytesForPeople(need), " inline");
      continue;
    }
    tried += StrCat(tried.empty() ? "" : "; ", s.parallel.plugin,
                    s.offload.optimizer == "memory" ? "" : StrCat(" with the optimizer state on ",
                                                                  s.offload.optimizer == "host" ? "host" : "NVMe"),
                    s.parallel.params_host_share > 0 ? " and the parameters" : "", " needs ", BytesForPeople(need));
  }
  return absl::ResourceExhaustedError(StrCat(
      f, ": parallel.placement auto: no layout fits the rank's ", BytesForPeople(budget), " (", tried, "); ",
      cuda ? "more ranks, training.grad_checkpoint or a smaller -b/-l lower it"
           : (spec.offload.nvme_path.empty() ? "set offload.nvme_path for the NVMe tier, or use more ranks"
                                              : "more ranks, training.grad_checkpoint or a smaller -b/-l lower it")));
}

absl::StatusOr<GeminiPlacement> PlaceJob(const JobSpec& spec, bool cuda, int world, uint64_t budget,
                                         const std::function<MemoryPlan(const JobSpec&)>& plan, bool must_fit,
                                         bool master_weights_apart) {
  if (!cuda && !master_weights_apart) {
    // The CPU backend's optimizer state is f32 in host memory already: the settings that
    // move a GPU's there, or choose its type there, have nothing to act on.
    if (spec.offload.optimizer == "host") {
      return ConfigError(spec.path, "offload.optimizer: host moves a GPU's optimizer state to host memory; the CPU "
                                    "backend keeps it in host memory already (use memory, or nvme for the NVMe tier)");
    }
    if (spec.offload.host_moments != "f32") {
      return ConfigError(spec.path, StrCat("offload.host_moments: ", spec.offload.host_moments,
                                           " is the type of the moments a GPU's optimizer keeps in host memory; the "
                                           "CPU backend keeps its own as f32 (offload.host_moments: f32)"));
    }
  }
  auto placed = PlaceGemini(spec, cuda, world, budget, plan, master_weights_apart);
  if (!placed.ok()) return placed.status();
  if (cuda) {
    const bool overlapped = placed->spec.parallel.overlap_regions;
    placed->spec = FitRegionOverlap(placed->spec, budget, plan);
    if (overlapped && !placed->spec.parallel.overlap_regions) {
      placed->summary += StrCat(placed->summary.empty() ? "" : "\n",
                                "zero2/3 regions reduced and gathered inline: the job fits only without their "
                                "overlap's second scratch");
    }
  } else if (must_fit || placed->spec.offload.optimizer == "auto") {
    auto within = PlaceOptimizerState(placed->spec, budget, plan);
    if (within.ok()) {
      placed->spec = *std::move(within);
    } else if (must_fit) {
      return within.status();
    } else {
      placed->spec.offload.optimizer = "memory";
    }
  }
  return placed;
}

absl::StatusOr<JobSpec> PlaceOptimizerState(const JobSpec& spec, uint64_t budget,
                                            const std::function<MemoryPlan(const JobSpec&)>& plan) {
  const std::string& f = spec.path;
  auto plan_with = [&](const std::string& tier, double nvme_fraction) {
    JobSpec s = spec;
    s.offload.optimizer = tier;
    s.offload.nvme_fraction = nvme_fraction;
    return plan(s);
  };
  const OffloadSpec& o = spec.offload;
  JobSpec placed = spec;
  if (o.optimizer == "auto") {
    // In memory when everything fits the budget, else as little of it on the NVMe tier
    // as makes the rest fit.
    const uint64_t in_memory = plan_with("memory", 1).total();
    const bool fits = budget == 0 || in_memory <= budget;
    if (!fits && o.nvme_path.empty()) {
      return absl::InvalidArgumentError(StrCat(
          f, ": offload.optimizer auto: the job needs ", BytesForPeople(in_memory),
          " with the optimizer state in memory, more than the budget of ", BytesForPeople(budget),
          "; set offload.nvme_path for the NVMe tier"));
    }
    placed.offload.optimizer = fits ? "memory" : "nvme";
    if (!fits) {
      // The smallest share that fits; all of it when none does (the check below says so).
      const double fraction = SmallestFittingFraction(budget, plan, [&](double x) {
        JobSpec t = spec;
        t.offload.optimizer = "nvme";
        t.offload.nvme_fraction = x;
        return t;
      });
      placed.offload.nvme_fraction = fraction > 0 ? fraction : 1.0;
    }
  }
  const uint64_t needed = plan(placed).total();
  if (budget > 0 && needed > budget) {
    return absl::InvalidArgumentError(StrCat(
        f, ": model ", spec.model.name, " (", spec.model.NumParameters(), " parameters) with batch ",
        spec.training.batch_size, " x ", spec.training.max_length, " needs ", BytesForPeople(needed),
        " of host memory for weights, gradients, optimizer state and activations; ", BytesForPeople(budget), " ",
        o.memory_budget_gb > 0 ? "is offload.memory_budget_gb" : "are available",
        " (a smaller model, -b, -l or -g lowers it",
        placed.offload.optimizer == "memory" ? "; so does offload.optimizer nvme" : "", ")"));
  }
  return placed;
}

}  // namespace llamad
