// llama-train: the engine's entry point.
//
//   llama-train train  --config JOB.yaml [flags that override the job file]
//                      [-o DIR -i N] [-f DIR|latest] [--init-from-hf DIR]
//   llama-train eval   --config JOB.yaml --tokens FILE [--load DIR|latest]
//   llama-train export --load CKPT_DIR --hf OUT
//
// Exit codes: 0 success, 1 runtime failure, 2 bad command line, job file or data.
#include <CLI/CLI.hpp>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <thread>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <filesystem>
#include <string>

#include "absl/strings/cord.h"
#include "core/cli_integers.h"
#include "core/durations.h"
#include "core/strings.h"
#include "core/threads.h"
#include "backend/cpu/blas_kernels.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/cuda/cuda_backend.h"
#include "comm/backend_collectives.h"
#include "comm/communicator.h"
#include "comm/nccl_communicator.h"
#include "data/dataset.h"
#include "storage/files.h"
#include "train/checkpointing.h"
#include "train/jobspec.h"
#include "train/memory_plan.h"
#include "train/placement.h"
#include "core/host_memory.h"
#include "core/exit_codes.h"
#include "core/self_executable.h"
#include "train/token_data.h"
#include "train/trainer.h"

namespace llamad {
namespace {

// Marks a status as this rank's GPU having failed (DeviceFault): Fail exits with
// kExitDeviceFault. (CUDA errors of a failed GPU end the rank where they happen instead:
// backend/cuda/device_fault.h.)
constexpr char kDeviceFaultPayload[] = "llamad.dev/device-fault";

absl::Status DeviceFault(std::string message) {
  absl::Status status = absl::UnavailableError(std::move(message));
  status.SetPayload(kDeviceFaultPayload, absl::Cord("1"));
  return status;
}

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "llama-train: %s\n", std::string(status.message()).c_str());
  // Bad input exits 2; a lost peer rank 75; a failed GPU 74; other failures while running 1.
  const auto code = status.code();
  if (status.GetPayload(kDeviceFaultPayload).has_value()) return kExitDeviceFault;
  if (code == absl::StatusCode::kAborted) return kExitPeerLost;
  return code == absl::StatusCode::kInternal || code == absl::StatusCode::kUnavailable ? kExitFailure
                                                                                      : kExitUsage;
}

// Command-line values that override the job file when given.
struct Overrides {
  std::string model, plugin, communicator, placement, precision, dataset, format, tokenizer, checkpoint_dir;
  double shard_param_frac = 1, offload_optim_frac = 0, offload_param_frac = 0;
  int64_t checkpoint_interval = 0;
  int64_t max_length = 0, batch_size = 0, global_batch_size = 0, warmup_steps = 0, steps = 0;
  double lr = 0, min_lr_ratio = 0, weight_decay = 0, grad_clip = 0;
  bool grad_checkpoint = false, flash_attention = true;
  uint64_t seed = 0;
  std::vector<std::pair<CLI::Option*, std::function<void(JobSpec&)>>> apply;

  void Register(CLI::App* app) {
    auto add = [&](CLI::Option* o, std::function<void(JobSpec&)> f) { apply.emplace_back(o, std::move(f)); };
    add(app->add_option("-c,--model", model, "Model preset (tiny, 7b, 13b, 30b, 65b, 70b) or config file"),
        [this](JobSpec&) {});
    add(app->add_option("-l,--max-length", max_length, "Sequence length"),
        [this](JobSpec& s) { s.training.max_length = max_length; });
    add(app->add_option("-b,--batch-size", batch_size, "Micro-batch size (sequences)"),
        [this](JobSpec& s) { s.training.batch_size = batch_size; });
    add(app->add_option("--global-batch-size", global_batch_size, "Sequences per optimizer step"),
        [this](JobSpec& s) { s.training.global_batch_size = global_batch_size; });
    add(app->add_flag("-g,--grad-checkpoint,!--no-grad-checkpoint", grad_checkpoint,
                      "Activation checkpointing per layer"),
        [this](JobSpec& s) { s.training.grad_checkpoint = grad_checkpoint; });
    add(app->add_flag("-a,--flash-attention,!--no-flash-attention", flash_attention,
                      "Tiled (flash) attention"),
        [this](JobSpec& s) { s.training.flash_attention = flash_attention; });
    add(app->add_option("-p,--plugin", plugin, "Parallel plugin: ddp, zero1, zero2, zero3, gemini"),
        [this](JobSpec& s) { s.parallel.plugin = plugin; });
    add(app->add_option("--communicator", communicator, "GPU ranks: auto, nccl or gloo (through host memory)"),
        [this](JobSpec& s) { s.parallel.communicator = communicator; });
    // gemini's placement, with Colossal-AI's names.
    add(app->add_option("--placement", placement, "gemini: static (by the fractions) or auto (by memory)"),
        [this](JobSpec& s) { s.parallel.placement = placement; });
    add(app->add_option("--shard-param-frac", shard_param_frac, "gemini: parameters sharded (1) or replicated (0)"),
        [this](JobSpec& s) { s.parallel.shard_param_frac = shard_param_frac; });
    add(app->add_option("--offload-optim-frac", offload_optim_frac,
                        "gemini: share of a GPU's optimizer state in host memory (0 to 1)"),
        [this](JobSpec& s) { s.parallel.offload_optim_frac = offload_optim_frac; });
    add(app->add_option("--offload-param-frac", offload_param_frac, "gemini: share of the parameters in host memory"),
        [this](JobSpec& s) { s.parallel.offload_param_frac = offload_param_frac; });
    add(app->add_option("--lr", lr, "Peak learning rate"), [this](JobSpec& s) { s.training.lr = lr; });
    add(app->add_option("--min-lr-ratio", min_lr_ratio, "Cosine floor as a fraction of --lr"),
        [this](JobSpec& s) { s.training.min_lr_ratio = min_lr_ratio; });
    add(app->add_option("-s,--warmup-steps", warmup_steps, "Linear warmup steps"),
        [this](JobSpec& s) { s.training.warmup_steps = warmup_steps; });
    add(app->add_option("--steps", steps, "Optimizer steps"),
        [this](JobSpec& s) { s.training.steps = steps; });
    add(app->add_option("--weight-decay", weight_decay, "AdamW weight decay"),
        [this](JobSpec& s) { s.training.weight_decay = weight_decay; });
    add(app->add_option("--grad-clip", grad_clip, "Global gradient-norm clip (0 = off)"),
        [this](JobSpec& s) { s.training.grad_clip = grad_clip; });
    add(app->add_option("-x,--mixed-precision", precision, "fp32, bf16 or fp16"),
        [this](JobSpec& s) { s.training.mixed_precision = precision; });
    add(app->add_option("-d,--dataset", dataset,
                        "Prepared dataset, raw corpus, token file, 'sample' or a Hugging Face dataset name"),
        [this](JobSpec& s) {
          s.data.dataset = dataset;
          s.data.base_dir.clear();  // relative to the working directory
        });
    add(app->add_option("--data-format", format, "auto, prepared, raw, uint32 or bytes"),
        [this](JobSpec& s) { s.data.format = format; });
    add(app->add_option("--tokenizer", tokenizer, "SentencePiece model for a raw corpus"),
        [this](JobSpec& s) { s.data.tokenizer = tokenizer; });
    add(app->add_option("--seed", seed, "Seed for initialisation and data order"),
        [this](JobSpec& s) { s.training.seed = seed; });
    add(app->add_option("-o,--checkpoint-dir", checkpoint_dir, "Checkpoint folder"),
        [this](JobSpec& s) { s.checkpoint.dir = checkpoint_dir; });
    add(app->add_option("-i,--checkpoint-interval", checkpoint_interval, "Save every N steps (and the last)"),
        [this](JobSpec& s) { s.checkpoint.interval = checkpoint_interval; });
  }

  // An option as the command line gave it, with its last value: "--max-length -5"; a flag
  // by the name that set it, "--no-grad-checkpoint" rather than the option's own name.
  static std::string AsGiven(const CLI::Option& option) {
    const std::string& value = option.results().back();
    if (option.get_items_expected_max() != 0) return StrCat(option.get_name(), " ", value);
    for (const std::string& name : option.get_lnames()) {
      if (option.get_flag_value(name, "") == value) return "--" + name;
    }
    return option.get_name();
  }

  absl::Status ApplyTo(JobSpec& spec) const {
    for (const auto& [option, f] : apply) {
      if (option->count() > 0) f(spec);
    }
    if (!model.empty()) {
      auto config = LoadModelConfig(model);
      if (!config.ok()) return absl::InvalidArgumentError(StrCat("--model: ", config.status().message()));
      spec.model = *config;
    }
    absl::Status valid = ValidateJobSpec(spec);
    if (valid.ok()) return valid;
    // The message names the job file's field; the value may be the command line's.
    std::vector<std::string> given;
    for (const auto& [option, f] : apply) {
      if (option->count() > 0) given.push_back(AsGiven(*option));
    }
    if (given.empty()) return valid;
    return absl::Status(valid.code(), StrCat(valid.message(), " (the job file with ", StrJoin(given, ", "), ")"));
  }
};

struct Common {
  std::string config;
  std::string spec_origin;    // where the spec was submitted from (llamad's workers)
  std::string log_format = "human";
  int threads = 0;
  std::string resume;         // -f: a checkpoint folder, or "latest"
  bool resume_fallback = false;
  bool fresh = false;         // discard the job's existing checkpoints
  bool discard_newer = false; // -f of an older step may remove the job's newer ones
  std::string init_from_hf;   // a Hugging Face model folder
  int nproc = 1;              // data-parallel ranks on this machine
  bool cpu_master_weights = false;  // CpuBackendOptions::master_weights
  int64_t stop_grace_ms = -1; // DaemonStopGraceMs
};

// Opens the store of the job's checkpoint folder, or the one `resume` points into.
struct ResumePoint {
  std::unique_ptr<storage::CheckpointStore> store;  // where to save (may be null)
  std::unique_ptr<storage::CheckpointStore> source; // where to resume from, when elsewhere
  int64_t step = -1;                                // -1: start fresh
  // --fresh with checkpoints of the job in `store`: they are removed by
  // DiscardNewerCheckpoints once the run has checked everything else it was given.
  bool discard_all = false;
};

// An integer that llamad or the rank launcher passes in the environment: nullopt when
// unset; an error naming the variable when it is not a base-10 integer in [lo, hi].
absl::StatusOr<std::optional<int64_t>> IntegerFromEnv(const char* name, int64_t lo, int64_t hi) {
  const char* text = std::getenv(name);
  if (text == nullptr) return std::nullopt;
  const std::optional<int64_t> value = ParseInt64(text);
  if (!value || *value < lo || *value > hi) {
    return absl::InvalidArgumentError(
        StrCat("environment ", name, "='", text, "': not a whole number from ", lo, " to ", hi));
  }
  return value;
}

// Under llamad, the grace its daemon gives a stopping rank to finish its step and save
// it before SIGKILL (llamad's stop_grace_ms, passed as LLAMAD_STOP_GRACE_MS); -1 elsewhere.
// llamad bounds its durations to kMaxDurationMs.
absl::StatusOr<int64_t> DaemonStopGraceMs() {
  auto grace = IntegerFromEnv("LLAMAD_STOP_GRACE_MS", 0, kMaxDurationMs);
  if (!grace.ok()) return grace.status();
  return grace->value_or(-1);
}

// How long a run waits for another process to let go of its checkpoint store: two
// minutes, or under llamad a minute more than its stop grace, whichever is longer.
std::chrono::milliseconds StoreHeldWait(int64_t stop_grace_ms) {
  return std::chrono::milliseconds(std::max<int64_t>(120'000, stop_grace_ms + 60'000));
}

// Whether a stop fits in llamad's grace, from what this run measures: a stopped rank
// finishes the step in flight, or the next one when the signal came after that step's
// loss was summed, then saves it, and rank 0 commits it. Says once, on rank 0's stderr
// (the job's log), when that takes longer than the grace: the ranks would be killed
// mid-save, and the job would go on from its last interval checkpoint instead.
class StopGraceCheck {
 public:
  explicit StopGraceCheck(int64_t grace_ms) : grace_ms_(grace_ms) {}

  void StepTook(double seconds) { step_seconds_.store(seconds); }
  void SaveStarted(int64_t step) {
    std::lock_guard lock(mu_);
    save_started_[step] = std::chrono::steady_clock::now();
  }
  // Rank 0, when `step` is committed; the seconds since the step ended (its save waited
  // for the previous one first, as a stop's would).
  double Committed(int64_t step) {
    std::lock_guard lock(mu_);
    auto it = save_started_.find(step);
    if (it == save_started_.end()) return 0;
    const double save = std::chrono::duration<double>(std::chrono::steady_clock::now() - it->second).count();
    save_started_.erase(save_started_.begin(), std::next(it));
    const double step_s = step_seconds_.load(), needed = 2 * step_s + save;
    if (grace_ms_ >= 0 && !warned_ && needed * 1e3 > double(grace_ms_)) {
      warned_ = true;
      std::fprintf(stderr,
                   "llama-train: warning: a stop would take about %.1f s here (up to two steps of %.1f s, then "
                   "%.1f s to save and commit step %lld), longer than llamad's stop_grace_ms of %.1f s: ranks "
                   "stopped for a preemption, a cancel or a move would be killed before their save, and the job "
                   "would go on from its last interval checkpoint; raise stop_grace_ms (and the service's "
                   "TimeoutStopSec) on the nodes\n",
                   needed, step_s, save, (long long)step, double(grace_ms_) / 1e3);
    }
    return save;
  }

 private:
  const int64_t grace_ms_;
  std::atomic<double> step_seconds_{0};
  std::mutex mu_;
  std::map<int64_t, std::chrono::steady_clock::time_point> save_started_;
  bool warned_ = false;
};

// `saving`: this run writes checkpoints into spec.checkpoint.dir, which is then opened
// for writing; every other store is opened read-only and left untouched. Called before
// the data is opened, so that a resume that cannot be done is told at once (the store is
// created, and held, from then on); it removes nothing (see DiscardNewerCheckpoints).
absl::StatusOr<ResumePoint> OpenCheckpoints(const JobSpec& spec, const Common& common, bool saving) {
  ResumePoint r;
  const storage::StoreOptions write_options{int(spec.checkpoint.keep_last), false};
  const storage::StoreOptions read_options{int(spec.checkpoint.keep_last), true};
  auto open_source = [&](const std::string& root) -> absl::Status {
    auto source = storage::CheckpointStore::Open(root, read_options);
    if (!source.ok()) return source.status();
    r.source = *std::move(source);
    return absl::OkStatus();
  };
  if (saving) {
    // The job's previous run may still be saving the step it was stopped after (its ranks
    // get the daemon's grace for it), while this one starts on other devices: wait for it
    // to let go of the store, as long as a save could take, rather than fail.
    const auto wait = StoreHeldWait(common.stop_grace_ms);
    const auto deadline = std::chrono::steady_clock::now() + wait;
    auto store = storage::CheckpointStore::Open(spec.checkpoint.dir, write_options);
    for (bool said = false; absl::IsFailedPrecondition(store.status()) && std::chrono::steady_clock::now() < deadline;
         said = true) {
      if (!said) {
        std::fprintf(stderr, "llama-train: %s: another process holds the checkpoint index (the job's previous run "
                     "saving its last step?); waiting up to %lld s for it\n", spec.checkpoint.dir.c_str(),
                     (long long)std::chrono::duration_cast<std::chrono::seconds>(wait).count());
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      store = storage::CheckpointStore::Open(spec.checkpoint.dir, write_options);
    }
    // Still held: a failure while running (exit 1), not bad input.
    if (absl::IsFailedPrecondition(store.status())) return absl::UnavailableError(store.status().message());
    if (!store.ok()) return store.status();
    r.store = *std::move(store);
  }
  if (common.resume.empty()) {
    if (!r.store) return r;
    auto latest = r.store->LatestStep(spec.name);
    if (latest.ok() && !common.fresh) {
      return absl::InvalidArgumentError(StrCat(
          spec.checkpoint.dir, ": job '", spec.name, "' already has checkpoints (newest: step ", *latest,
          "); pass -f latest to continue it, or --fresh to discard them and start over"));
    }
    if (latest.ok()) {
      r.discard_all = true;
    } else if (!absl::IsNotFound(latest.status())) {
      return latest.status();
    }
    return r;
  }
  if (common.resume == "latest") {
    if (spec.checkpoint.dir.empty()) {
      return absl::InvalidArgumentError("-f latest: the job has no checkpoint.dir (set it or pass -o DIR)");
    }
    if (!r.store) {
      if (auto s = open_source(spec.checkpoint.dir); !s.ok()) return s;
    }
    const storage::CheckpointStore& from = r.source ? *r.source : *r.store;
    auto latest = from.LatestStep(spec.name);
    if (latest.ok()) {
      r.step = *latest;
    } else if (absl::IsNotFound(latest.status()) && saving) {
      std::fprintf(stderr, "llama-train: no checkpoint of job '%s' in %s yet; starting from step 0\n",
                   spec.name.c_str(), spec.checkpoint.dir.c_str());
    } else {
      return latest.status();
    }
    return r;
  }
  auto path = storage::ParseCheckpointPath(common.resume);
  if (!path.ok()) return path.status();
  if (path->job != spec.name) {
    return absl::InvalidArgumentError(StrCat("-f ", common.resume, ": the checkpoint is of job '", path->job,
                                             "', this job is '", spec.name, "' (set name: in the job file)"));
  }
  std::error_code ec;
  if (!r.store || !std::filesystem::equivalent(path->root, spec.checkpoint.dir, ec)) {
    if (auto s = open_source(path->root); !s.ok()) return s;
  }
  r.step = path->step;
  if (r.step == storage::CheckpointPath::kLatest) {
    auto latest = (r.source ? *r.source : *r.store).LatestStep(spec.name);
    if (!latest.ok()) return latest.status();
    r.step = *latest;
  }
  // A run with steps left to train removes the job's checkpoints past the step it resumes
  // (see DiscardNewerCheckpoints); they are committed work, so only when asked. A run that
  // may fall back to an older step may have steps left although the chosen one has none.
  if (r.store && !common.discard_newer && (r.step < spec.training.steps || common.resume_fallback)) {
    auto newest = r.store->LatestStep(spec.name);
    if (newest.ok() && *newest > r.step) {
      return absl::InvalidArgumentError(StrCat(
          "-f ", common.resume, ": job '", spec.name, "' has newer checkpoints in ", spec.checkpoint.dir,
          " (newest: step ", *newest, "), which resuming from step ", r.step,
          " would remove; pass --discard-newer to do that, or -f latest to go on from the newest"));
    }
    if (!newest.ok() && !absl::IsNotFound(newest.status())) return newest.status();
  }
  return r;
}

// Removes the job's checkpoints newer than the step the run resumed (`resumed`; -1 when
// it starts fresh): another history, which this run's saves would collide with. With
// --fresh that is all of them. They are committed work: this runs once every rank has
// opened the data and any weights given and placed its state (offload tiers included),
// and not at all when the run has nothing to train, and so saves nothing.
absl::Status DiscardNewerCheckpoints(const ResumePoint& r, const std::string& job, int64_t resumed, int64_t steps) {
  if (!r.store || (resumed < 0 && !r.discard_all) || resumed >= steps) return absl::OkStatus();
  auto dropped = r.store->DropNewerThan(job, resumed);
  if (!dropped.ok()) return dropped.status();
  if (resumed < 0) {
    std::fprintf(stderr, "llama-train: --fresh: removed %zu checkpoint(s) of job '%s'\n", dropped->size(),
                 job.c_str());
    return absl::OkStatus();
  }
  for (int64_t step : *dropped) {
    std::fprintf(stderr, "llama-train: removed checkpoint step %lld, newer than the resumed step\n",
                 (long long)step);
  }
  return absl::OkStatus();
}

// The checkpoint root a run resumes from (-f latest: checkpoint.dir; -f PATH: its root),
// as every rank can tell from the same command line.
absl::StatusOr<std::string> ResumeRoot(const JobSpec& spec, const Common& common) {
  if (common.resume == "latest") return spec.checkpoint.dir;
  auto path = storage::ParseCheckpointPath(common.resume);
  if (!path.ok()) return path.status();
  return path->root;
}

// The newest of `steps` (ascending, as CheckpointStore::Steps lists them) older than
// `step`, or -1.
int64_t OlderStep(const std::vector<int64_t>& steps, int64_t step) {
  auto it = std::lower_bound(steps.begin(), steps.end(), step);
  return it == steps.begin() ? -1 : *std::prev(it);
}

// Restores step `step`, or with `fallback` the newest older one that restores cleanly.
absl::Status Resume(const storage::CheckpointStore& store, const std::string& job, int64_t step,
                    bool fallback, Trainer& trainer) {
  absl::Status status = RestoreCheckpoint(store, job, step, trainer);
  if (status.ok() || !fallback || !absl::IsDataLoss(status)) return status;
  auto steps = store.Steps(job);
  if (!steps.ok()) return steps.status();
  for (int64_t older = OlderStep(*steps, step); older >= 0; older = OlderStep(*steps, older)) {
    std::fprintf(stderr, "llama-train: %s\nllama-train: falling back to checkpoint step %lld\n",
                 std::string(status.message()).c_str(), (long long)older);
    status = RestoreCheckpoint(store, job, older, trainer);
    if (status.ok() || !absl::IsDataLoss(status)) return status;
  }
  return status;
}

// ZeRO ranks each restore their own part of a checkpoint, of the steps rank 0 offers,
// together: every rank restores step s, and when the only failures are damage (DataLoss)
// and `fallback` allows it, all go back to the next older committed step. Each part is
// read once, by its rank. `lead_store`: rank 0's store to resume from, and `first` the
// step it offers first (-1: none); the other ranks open the store read-only themselves.
// Returns the step every rank restored, or -1 when there was none to restore.
absl::StatusOr<int64_t> ResumeZeroRanks(Communicator& comm, const storage::CheckpointStore* lead_store,
                                        const JobSpec& spec, const Common& common, int64_t first, Trainer& trainer) {
  const bool lead = comm.rank() == 0;
  constexpr int64_t kNoneLeft = -2;     // every older step was tried
  constexpr int64_t kLeadFailed = -3;   // rank 0 cannot go on (it says why)
  std::vector<int64_t> steps;  // rank 0: the committed steps, for falling back
  absl::Status lead_status;
  int64_t step = first;
  if (lead && first >= 0 && common.resume_fallback) {
    auto all = lead_store->Steps(spec.name);
    if (all.ok()) {
      steps = *std::move(all);
    } else {
      lead_status = all.status();
      step = kLeadFailed;  // offered, so that the others stop with it
    }
  }
  std::unique_ptr<storage::CheckpointStore> own;  // the other ranks' read-only view
  while (true) {
    // Rank 0's offer, shifted to be non-negative; the others add nothing.
    double offer = lead ? double(step + 3) : 0;
    if (auto s = comm.AllReduceSum(&offer, 1); !s.ok()) return s;
    step = int64_t(offer) - 3;
    if (step == -1) return int64_t{-1};
    if (step == kLeadFailed) {
      if (lead) return lead_status;
      return absl::AbortedError(StrCat("rank ", comm.rank(), ": rank 0 could not list the job's checkpoints"));
    }
    if (step == kNoneLeft) {
      return absl::DataLossError(StrCat("no older checkpoint of job '", spec.name, "' restores on every rank"));
    }
    absl::Status restored;
    const storage::CheckpointStore* from = lead_store;
    if (!lead && !own) {
      auto root = ResumeRoot(spec, common);
      auto opened = root.ok() ? storage::CheckpointStore::Open(*root, {int(spec.checkpoint.keep_last), true})
                              : absl::StatusOr<std::unique_ptr<storage::CheckpointStore>>(root.status());
      if (opened.ok()) own = *std::move(opened);
      else restored = opened.status();
    }
    if (!lead) from = own.get();
    if (from != nullptr) restored = RestoreCheckpoint(*from, spec.name, step, trainer);
    // Every rank learns how the others did, so that they go on or stop together.
    const bool damaged = absl::IsDataLoss(restored);
    double failures[2] = {damaged ? 1.0 : 0.0, !restored.ok() && !damaged ? 1.0 : 0.0};
    if (auto s = comm.AllReduceSum(failures, 2); !s.ok()) return s;
    if (failures[0] + failures[1] == 0) return step;
    if (failures[1] > 0 || !common.resume_fallback) {
      if (!restored.ok()) return restored;
      return absl::AbortedError(StrCat("rank ", comm.rank(), ": ", int(failures[0] + failures[1]),
                                       " other rank(s) could not restore their part of checkpoint step ", step));
    }
    if (!restored.ok()) {
      std::fprintf(stderr, "llama-train: rank %d: %s\n", comm.rank(), std::string(restored.message()).c_str());
    }
    if (lead) {
      step = OlderStep(steps, step);
      if (step < 0) step = kNoneLeft;
      if (step >= 0) std::fprintf(stderr, "llama-train: falling back to checkpoint step %lld\n", (long long)step);
    }
  }
}

absl::StatusOr<JobSpec> ReadSpec(const Common& common, const Overrides& overrides) {
  absl::StatusOr<JobSpec> spec;
  if (common.spec_origin.empty()) {
    spec = LoadJobSpec(common.config);
  } else {
    // A copy of a submitted spec: its relative paths mean what they meant where it was written.
    std::ifstream in(common.config);
    if (!in) return absl::NotFoundError(StrCat(common.config, ": cannot open job file"));
    std::stringstream text;
    text << in.rdbuf();
    spec = ParseJobSpec(text.str(), common.spec_origin);
  }
  if (!spec.ok()) return spec.status();
  if (auto s = overrides.ApplyTo(*spec); !s.ok()) return s;
  return spec;
}

// The precision picks the backend: fp32 trains on the CPU, bf16 on the CUDA backend.
// Data-parallel rank r of this machine trains on GPU r modulo the GPUs it sees (under
// llamad, CUDA_VISIBLE_DEVICES leaves each rank its own one).
absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const Common& common, const JobSpec& spec,
                                                     int rank = 0) {
  const std::string& precision = spec.training.mixed_precision;
  if (precision == "bf16") {
    CudaBackendOptions options;
    const int devices = CudaDeviceCount();
    if (devices > 0) options.device = rank % devices;
    // This rank was given a GPU (llamad gives each rank of a GPU node its own) and the
    // driver finds none: the GPU fell off the bus. The node is at fault, not the job ("" and
    // -1 hide every GPU on purpose; a missing or too old driver is the machine's setup).
    const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
    if (devices == 0 && visible != nullptr && *visible != '\0' && *visible != '-' && CudaDeviceVanished()) {
      return DeviceFault(StrCat("this rank was given GPU ", visible,
                                " (CUDA_VISIBLE_DEVICES) and the CUDA driver finds no device: the GPU is gone"));
    }
    auto backend = MakeCudaBackend(options);
    if (!backend.ok()) {
      return absl::FailedPreconditionError(StrCat(
          "training.mixed_precision bf16 trains on the CUDA backend: ", backend.status().message(),
          " (-x fp32 trains on the CPU)"));
    }
    return backend;
  }
  if (precision != "fp32") {
    return absl::InvalidArgumentError(StrCat(
        spec.path, ": training.mixed_precision: '", precision,
        "' is not available in this build (fp32 on the CPU, bf16 on CUDA)"));
  }
  CpuBackendOptions options;
  options.threads = common.threads;
  options.master_weights = common.cpu_master_weights;
  return MakeCpuBackend(options);
}

// MFU's denominator: the GPU's dense bf16 peak, or the CPU's measured sgemm rate.
double PeakFlops(const Backend& backend) {
  return backend.name() == "cuda" ? CudaPeakBf16Flops() : MeasureSgemmFlops(1024, 1024, 1024, 0.1);
}

std::string BackendDescription(const Backend& backend, double peak) {
  if (backend.name() == "cuda") {
    return StrCat("CUDA ", CudaDeviceDescription(), ", bf16; MFU is against ",
                  fmt::format("{:.0f}", peak / 1e12), " TFLOP/s dense bf16");
  }
  return StrCat(CpuThreads(), " CPU threads, fp32; MFU is against measured sgemm ",
                fmt::format("{:.1f}", peak / 1e9), " GFLOP/s (OpenBLAS ", BlasCoreName(), " kernels)");
}

// ---- data-parallel ranks --------------------------------------------------------------

char** g_argv = nullptr;  // this process's command line, which the launcher's ranks rerun

// The launcher's environment for its ranks.
constexpr char kRankEnv[] = "LLAMAD_RANK";
constexpr char kWorldEnv[] = "LLAMAD_WORLD_SIZE";
constexpr char kRendezvousEnv[] = "LLAMAD_RENDEZVOUS";

// This process's communicator: Gloo when started by LaunchRanks, else a single process.
absl::StatusOr<std::unique_ptr<Communicator>> ConnectRank() {
  const char* rank = std::getenv(kRankEnv);
  const char* world = std::getenv(kWorldEnv);
  const char* store = std::getenv(kRendezvousEnv);
  if (rank == nullptr || world == nullptr || store == nullptr) return MakeLocalCommunicator();
  // Collectives wait for the slowest rank's step; a dead rank is noticed at once (its
  // connections close), so this only bounds a rank that hangs.
  // Under llamad, ranks on several machines listen on the address the daemon gives.
  const char* host = std::getenv("LLAMAD_COMM_HOST");
  auto world_size = IntegerFromEnv(kWorldEnv, 1, kMaxWorldSize);
  if (!world_size.ok()) return world_size.status();
  auto rank_index = IntegerFromEnv(kRankEnv, 0, **world_size - 1);
  if (!rank_index.ok()) return rank_index.status();
  return MakeGlooCommunicator(int(**rank_index), int(**world_size), store, std::chrono::minutes(10),
                              host != nullptr && *host != '\0' ? host : "127.0.0.1");
}

// `llama-train train --nproc N`: starts N ranks of this same command line and watches
// them. When one fails, the others are stopped and the failure is reported by rank.
volatile sig_atomic_t g_stop_signal = 0;  // the first SIGINT/SIGTERM the launcher received
volatile sig_atomic_t g_kill_now = 0;     // a SIGINT after it: stop the ranks at once

// The launcher's rendezvous folders: the prefix, its pid (for people), a unique suffix.
// The launcher holds a lock on the file kRendezvousLock inside for as long as it runs.
constexpr char kRendezvousPrefix[] = "/tmp/llamad-rendezvous-";
constexpr char kRendezvousLock[] = "launcher.lock";

// Folders of launchers that were killed (SIGKILL leaves no chance to clean up): those
// whose lock nobody holds. A lock (unlike a pid) is seen across PID namespaces that share
// /tmp. Folders younger than a minute are left alone: their launcher may be between
// making the folder and locking it.
void RemoveStaleRendezvousFolders() {
  const std::filesystem::path prefix(kRendezvousPrefix);
  const auto now = std::filesystem::file_time_type::clock::now();
  std::error_code ec;
  std::filesystem::directory_iterator it(prefix.parent_path(), ec), end;
  for (; !ec && it != end; it.increment(ec)) {
    const std::filesystem::path folder = it->path();
    if (!folder.filename().string().starts_with(prefix.filename().string())) continue;
    std::error_code age_ec;
    const auto modified = std::filesystem::last_write_time(folder, age_ec);
    if (age_ec || now - modified < std::chrono::minutes(1)) continue;
    // Neither a missing lock file (not a launcher's folder of this kind) nor a held lock
    // (a launcher still running) lets the folder go.
    if (const auto lock = storage::FileLock::TryAcquire((folder / kRendezvousLock).string()); lock.ok()) {
      std::error_code remove_ec;
      std::filesystem::remove_all(folder, remove_ec);
    }
  }
}

int LaunchRanks(int nproc) {
  // A stop request for the job goes to every rank (they may be saving a checkpoint).
  struct sigaction on_stop {};
  on_stop.sa_handler = [](int sig) {
    if (g_stop_signal == 0) {
      g_stop_signal = sig;
    } else if (sig == SIGINT) {  // Ctrl-C again; a repeated SIGTERM changes nothing, as for a rank
      g_kill_now = 1;
    }
  };
  sigemptyset(&on_stop.sa_mask);
  on_stop.sa_flags = SA_RESTART;  // the loop below polls; it does not wait for signals
  sigaction(SIGINT, &on_stop, nullptr);
  sigaction(SIGTERM, &on_stop, nullptr);
  RemoveStaleRendezvousFolders();
  std::string dir_name = StrCat(kRendezvousPrefix, ::getpid(), "-XXXXXX");
  char* dir = dir_name.data();
  if (::mkdtemp(dir) == nullptr) {
    std::fprintf(stderr, "llama-train: cannot create a rendezvous folder: %s\n", std::strerror(errno));
    return kExitFailure;
  }
  // Held until the folder is removed (close-on-exec: the ranks do not hold it).
  const auto lock = storage::FileLock::Acquire((std::filesystem::path(dir) / kRendezvousLock).string());
  if (!lock.ok()) {
    const std::string why(lock.status().message());
    std::fprintf(stderr, "llama-train: cannot lock the rendezvous folder: %s\n", why.c_str());
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
    return kExitFailure;
  }
  std::vector<pid_t> pids(size_t(nproc), -1);
  const std::string self = SelfExecutable();
  for (int r = 0; r < nproc; ++r) {
    const pid_t pid = ::fork();
    if (pid < 0) {
      std::fprintf(stderr, "llama-train: fork failed: %s\n", std::strerror(errno));
      for (pid_t p : pids) {
        if (p > 0) ::kill(p, SIGKILL);
      }
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
      return kExitFailure;
    }
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the launcher
      ::setenv(kRankEnv, std::to_string(r).c_str(), 1);
      ::setenv(kWorldEnv, std::to_string(nproc).c_str(), 1);
      ::setenv(kRendezvousEnv, dir, 1);
      ::execv(self.c_str(), g_argv);
      std::fprintf(stderr, "llama-train: rank %d: exec failed: %s\n", r, std::strerror(errno));
      ::_exit(kExitFailure);
    }
    pids[size_t(r)] = pid;
  }
  int result = 0, running = nproc;
  bool stopping = false, killed = false;
  auto deadline = std::chrono::steady_clock::time_point::max();
  auto kill_all = [&](int sig) {
    for (pid_t p : pids) {
      if (p > 0) ::kill(p, sig);
    }
  };
  // Polls, so that a signal is seen whenever it came (a blocking wait would miss one that
  // arrived just before it).
  while (running > 0) {
    if (g_stop_signal != 0 && !stopping) {
      std::fprintf(stderr, "llama-train: %s received; stopping the %d ranks\n", strsignal(g_stop_signal), running);
      stopping = true;
      result = 128 + g_stop_signal;
      kill_all(SIGTERM);  // each finishes its step and saves it
      deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    }
    if (g_kill_now != 0 && !killed) {
      std::fprintf(stderr, "llama-train: asked again; killing the %d ranks\n", running);
      kill_all(SIGKILL);
      killed = true;
    }
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid == 0 || (pid < 0 && errno == EINTR)) {
      if (std::chrono::steady_clock::now() > deadline) {  // stopping, and the grace is over
        kill_all(SIGKILL);
        deadline = std::chrono::steady_clock::time_point::max();
      }
      ::usleep(20 * 1000);
      continue;
    }
    if (pid < 0) break;
    const int rank = int(std::find(pids.begin(), pids.end(), pid) - pids.begin());
    if (rank >= nproc) continue;
    pids[size_t(rank)] = -1;
    --running;
    const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    // A rank that stopped when asked (the others stop after the same step, by themselves),
    // or one that stopped with it.
    const bool stopped_when_asked = WIFEXITED(status) && (code == kExitPeerLost || code == 128 + SIGTERM ||
                                                         code == 128 + SIGINT);
    if (!ok && stopping && result == kExitPeerLost && code != kExitPeerLost) result = code;  // the cause says more
    if (!ok && !stopping && stopped_when_asked) {
      std::fprintf(stderr, "llama-train: rank %d of %d exited with code %d; waiting up to 30 s for the others to "
                   "stop with it\n", rank, nproc, code);
      result = code;
      stopping = true;
      deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    } else if (!ok && !stopping) {
      if (WIFSIGNALED(status)) {
        std::fprintf(stderr, "llama-train: rank %d of %d was killed by signal %d (%s); stopping the other ranks\n",
                     rank, nproc, WTERMSIG(status), strsignal(WTERMSIG(status)));
      } else {
        std::fprintf(stderr, "llama-train: rank %d of %d exited with code %d; stopping the other ranks\n", rank,
                     nproc, WEXITSTATUS(status));
      }
      result = WIFEXITED(status) ? WEXITSTATUS(status) : kExitFailure;
      stopping = true;
      kill_all(SIGTERM);
      deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    }
  }
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  return result;
}

// ---- stopping when asked ---------------------------------------------------------------

// A training rank asked to stop (SIGTERM from its node's daemon, which a preemption or
// the scheduler sends, or from the launcher; SIGINT from a terminal) finishes the step in
// flight, and every rank stops after the same step: the trainer sums the requests with the
// step's loss. A job that saves checkpoints saves that step first, so a preempted or
// resized job goes on from where it stopped. A second SIGINT (Ctrl-C) stops the process at
// once; a second SIGTERM changes nothing, since supervisors send it more than once (the
// daemon's stop and its parent-death signal) and escalate with SIGKILL.
std::atomic<bool> g_stop_requested{false};
volatile sig_atomic_t g_rank_stop_signal = 0;
char g_stop_message[192];  // written by the handler, which must not format

void OnRankStopSignal(int sig) {
  if (g_rank_stop_signal != 0) {
    if (sig == SIGINT) {  // the signal's default, termination
      ::signal(sig, SIG_DFL);
      ::raise(sig);
    }
    return;
  }
  const int saved_errno = errno;  // of the call the signal interrupted
  g_rank_stop_signal = sig;
  g_stop_requested.store(true);
  // Ctrl-C also ends a pipe's reader (`llama-train ... | tee log`): the step lines written
  // from now on must not kill the rank before it has saved.
  ::signal(SIGPIPE, SIG_IGN);
  [[maybe_unused]] auto written = ::write(2, g_stop_message, std::strlen(g_stop_message));
  errno = saved_errno;
}

// From the first step on: before it, a rank has nothing to save, and the signal's default
// (termination) stops it at once.
void StopAfterTheStepWhenAsked(int rank, bool saves) {
  std::snprintf(g_stop_message, sizeof(g_stop_message),
                "llama-train: rank %d: asked to stop; the ranks stop after the step in flight%s (a second "
                "Ctrl-C stops at once)\n",
                rank, saves ? " and save it" : "");
  static_assert(std::atomic<bool>::is_always_lock_free, "set from a signal handler");
  struct sigaction on_stop {};
  on_stop.sa_handler = OnRankStopSignal;
  sigemptyset(&on_stop.sa_mask);
  on_stop.sa_flags = SA_RESTART;  // the step's calls go on as if nothing happened
  sigaction(SIGINT, &on_stop, nullptr);
  sigaction(SIGTERM, &on_stop, nullptr);
}

int RunTrain(const Common& common, const Overrides& overrides) {
  auto spec = ReadSpec(common, overrides);
  if (!spec.ok()) return Fail(spec.status());
  if (!common.init_from_hf.empty()) {  // not with -f or --model: the command line says so
    auto hf = ReadHuggingFaceConfig(common.init_from_hf);
    if (!hf.ok()) return Fail(hf.status());
    spec->model = *hf;
    if (auto s = ValidateJobSpec(*spec); !s.ok()) return Fail(s);
  }
  // A rank of a launched job (LaunchRanks) connects to the others first.
  auto comm = ConnectRank();
  if (!comm.ok()) return Fail(comm.status());
  const int rank = (*comm)->rank();
  const bool lead = rank == 0;  // rank 0 logs, prepares data, restores and saves
  absl::StatusOr<ResumePoint> checkpoints = ResumePoint{};
  if (lead) checkpoints = OpenCheckpoints(*spec, common, /*saving=*/spec->checkpoint.interval > 0);
  if (!checkpoints.ok()) return Fail(checkpoints.status());
  auto open_data = [&] {
    return data::OpenTrainingData(spec->data, spec->model.vocab_size, [](const std::string& line) {
      std::fprintf(stderr, "llama-train: %s\n", line.c_str());
    });
  };
  // Until training starts rank 0 may work alone for long (downloading and preparing
  // data, restoring a checkpoint) while the others wait; a dead rank is still noticed at
  // once, since its connections close.
  (*comm)->set_timeout(std::chrono::hours(24));
  // Rank 0 prepares a raw corpus into the cache; the others open the result after it.
  absl::StatusOr<data::OpenedData> opened = absl::UnknownError("not opened");
  if (lead) opened = open_data();
  if (auto s = (*comm)->Barrier(); !s.ok()) return Fail(s);
  if (!lead) opened = open_data();
  if (!opened.ok()) return Fail(opened.status());
  const TokenSource* data = opened->source.get();
  Common rank_common = common;
  if (rank_common.threads == 0 && (*comm)->world_size() > 1) {
    rank_common.threads = std::max(1, int(std::thread::hardware_concurrency()) / (*comm)->world_size());
  }
  auto made = MakeBackend(rank_common, *spec, rank);
  if (!made.ok()) return Fail(made.status());
  std::unique_ptr<Backend> backend = std::move(*made);
  {
    // GPU ranks reduce device to device with NCCL where they can (parallel.communicator).
    // Set-up may still keep some ranks waiting for long, as on the host.
    std::string note;
    auto attached = AttachDeviceCollectives(std::move(*comm), *backend, spec->parallel.communicator,
                                            std::chrono::hours(24), &note);
    if (!attached.ok()) return Fail(attached.status());
    *comm = std::move(*attached);
    if (lead && !note.empty()) std::fprintf(stderr, "llama-train: %s\n", note.c_str());
  }
  // The communicator goes before the backend: NCCL's collectives are ordered with the
  // backend's stream, which the backend drains when it goes, so after a failure NCCL must
  // be aborted first (its destructor does that) or the drain waits for the timeout.
  struct CommunicatorFirst {
    absl::StatusOr<std::unique_ptr<Communicator>>& comm;
    ~CommunicatorFirst() {
      if (comm.ok()) comm->reset();
    }
  } communicator_first{comm};
  const double peak = PeakFlops(*backend) * (*comm)->world_size();
  auto trainer = Trainer::Create(*spec, backend.get(), peak, comm->get());
  if (!trainer.ok()) return Fail(trainer.status());
  if (lead && !(*trainer)->placement().empty()) {
    std::fprintf(stderr, "llama-train: %s\n", (*trainer)->placement().c_str());
  }
  // Before anything more takes host memory (weights read, state moved there).
  if (auto s = (*trainer)->CheckHostMemory(); !s.ok()) return Fail(s);
  // ZeRO ranks are built sharded: each imports and restores its own part. Under ddp rank
  // 0 does, and the others take its state (StartRanks).
  const bool zero_ranks = (*comm)->world_size() > 1 && spec->parallel.plugin != "ddp";
  if ((lead || zero_ranks) && !common.init_from_hf.empty()) {
    const AdamWOptimizer& optimizer = (*trainer)->optimizer();
    if (auto s = LoadHuggingFaceWeights(common.init_from_hf, (*trainer)->model(), *backend, optimizer.shard_begin(),
                                        optimizer.shard_end());
        !s.ok()) {
      return Fail(s);
    }
    if (lead) std::fprintf(stderr, "llama-train: weights from %s\n", common.init_from_hf.c_str());
  }
  // The optimizer state moves to its tier before a restore, so that the restore streams
  // it there instead of holding it whole in the backend's memory on the way: the CPU
  // backend's moments into the NVMe swap, a GPU's master weights and moments into host
  // memory (and its moments on to the NVMe tier). A single process and ZeRO ranks move
  // it now, and so do ddp ranks with a GPU's state in host memory, which rank 0 then
  // sends from there; other ddp ranks receive rank 0's restored state in the backend's
  // memory and move it after (an NVMe tier is each rank's own).
  const std::string& tier = (*trainer)->spec().offload.optimizer;
  bool offloaded = false;
  if (tier == "host" || (tier == "nvme" && ((*comm)->world_size() == 1 || zero_ranks))) {
    if (auto s = (*trainer)->OffloadOptimizerState(rank_common.threads); !s.ok()) return Fail(s);
    offloaded = true;
  }
  // Rank 0 picks the step. A single process or a ddp rank 0 restores the whole state
  // (the other ddp ranks take it from there); ZeRO ranks each restore their own part.
  const storage::CheckpointStore* from =
      lead ? (checkpoints->source ? checkpoints->source.get() : checkpoints->store.get()) : nullptr;
  int64_t resumed = -1;
  if (zero_ranks) {
    auto step = ResumeZeroRanks(**comm, from, *spec, common, lead ? checkpoints->step : -1, **trainer);
    if (!step.ok()) return Fail(step.status());
    resumed = *step;
  } else if (checkpoints->step >= 0) {
    if (auto s = Resume(*from, spec->name, checkpoints->step, common.resume_fallback, **trainer); !s.ok()) {
      return Fail(s);
    }
    resumed = (*trainer)->step();
  }
  if (lead && resumed >= 0) {
    std::fprintf(stderr, "llama-train: resumed job '%s' at step %lld from %s\n", spec->name.c_str(),
                 (long long)(*trainer)->step(), from->root().c_str());
  }
  // Every rank takes rank 0's progress; ddp ranks its state too, ZeRO ranks the
  // parameters' slices of the others.
  if (auto s = (*trainer)->StartRanks(); !s.ok()) return Fail(s);
  absl::Status placed = absl::OkStatus();
  if (!offloaded) placed = (*trainer)->OffloadOptimizerState(rank_common.threads);
  // Every rank says whether its state is in place before rank 0 may remove checkpoints.
  if ((*comm)->world_size() > 1) {
    double failed = placed.ok() ? 0 : 1;
    if (auto s = (*comm)->AllReduceSum(&failed, 1); !s.ok()) return Fail(s);
    if (placed.ok() && failed > 0) {
      placed = absl::AbortedError("another rank could not place its optimizer state (its log says why)");
    }
  }
  if (!placed.ok()) return Fail(placed);
  if (lead && (*trainer)->optimizer().host_offloaded()) {
    const AdamWOptimizer& o = (*trainer)->optimizer();
    const size_t shard = std::max<size_t>(1, o.shard_end() - o.shard_begin()), hosted = o.shard_end() - o.memory_end();
    const size_t moments = o.swap_begin() - o.memory_end();  // the rest of theirs on NVMe
    const double moment_bytes = o.host_moments_bf16() ? 2 : 4;
    std::fprintf(stderr,
                 "llama-train: master weights and AdamW moments%s (%s per rank%s) in host memory, updated by the CPU\n",
                 o.host_moments_bf16() ? " (bf16)" : "",
                 BytesForPeople(4.0 * double(hosted) + 2 * moment_bytes * double(moments)).c_str(),
                 hosted == shard ? "" : fmt::format(", {:.1f}% of them", 100.0 * double(hosted) / double(shard)).c_str());
  }
  if (lead && (*trainer)->optimizer().offloaded()) {
    const AdamWOptimizer& o = (*trainer)->optimizer();
    const double share = double(o.shard_end() - o.swap_begin()) / double(std::max<size_t>(1, o.shard_end() - o.shard_begin()));
    std::fprintf(stderr, "llama-train: optimizer state (%s, %.1f%% of the moments) in an NVMe swap file under %s%s\n",
                 BytesForPeople(double(o.swap()->size())).c_str(), 100 * share, spec->offload.nvme_path.c_str(),
                 o.swap()->synchronous() ? " (io_uring is not available here: one request at a time)" : "");
  }
  // Every rank has its state in place (as the collective check above says): nothing of the
  // run's input can fail any more, and checkpoints past the step it starts from may go.
  if (lead) {
    if (auto s = DiscardNewerCheckpoints(*checkpoints, spec->name, resumed, spec->training.steps); !s.ok()) {
      return Fail(s);
    }
  }
  // Rank 0 draws a number for this run, which tells its ranks' saves from a killed run's.
  // Agreeing on it is also where the other ranks wait for rank 0 to finish removing
  // checkpoints, which may take long: it runs under the start-up timeout still.
  double run = 0;
  if (lead) run = double(std::random_device{}() & 0xfffffff) + 1;
  if (auto s = (*comm)->AllReduceSum(&run, 1); !s.ok()) return Fail(s);
  // A training step's collectives (parallel.collective_timeout_s).
  (*comm)->set_timeout(std::chrono::milliseconds(int64_t(spec->parallel.collective_timeout_s * 1000)));
  StopGraceCheck stop_grace(common.stop_grace_ms);  // before the checkpointer, whose commits report to it
  std::unique_ptr<AsyncCheckpointer> checkpointer;
  if (spec->checkpoint.interval > 0) {
    // Every rank writes its part of each checkpoint; rank 0 commits them together.
    checkpointer = std::make_unique<AsyncCheckpointer>(
        checkpoints->store.get(), spec->checkpoint.dir, spec->name, rank, (*comm)->world_size(), uint64_t(run),
        [&](int64_t step, const absl::Status& s) {
          if (s.ok() && lead) {
            const double seconds = stop_grace.Committed(step);
            std::fprintf(stderr, "llama-train: checkpoint step %lld committed in %.2f s (%s)\n", (long long)step,
                         seconds, checkpoints->store->StepDir(spec->name, step).c_str());
          } else if (!s.ok()) {
            std::fprintf(stderr, "llama-train: rank %d: checkpoint step %lld failed: %s\n", rank, (long long)step,
                         std::string(s.message()).c_str());
          }
        });
    // Checkpoints carry the tokenizer that made the data, for exports.
    if (!opened->tokenizer_model.empty()) checkpointer->set_tokenizer_model(std::move(opened->tokenizer_model));
  }

  const bool json = common.log_format == "json";
  const TrainingSpec& t = spec->training;
  const int world = (*comm)->world_size();
  const int64_t global = GradientAccumulationSteps(*spec) * t.batch_size;
  const int64_t per_rank = (global + world - 1) / world;
  if (lead) {
    std::fprintf(stderr,
                 "llama-train: job '%s': model %s (%.2fM parameters), seq %lld, global batch %lld = "
                 "%d rank%s x %lld accumulation x batch %lld (at most), %lld steps, %s, dataset %s; %s\n",
                 spec->name.c_str(), spec->model.name.c_str(), spec->model.NumParameters() / 1e6,
                 (long long)t.max_length, (long long)global, world, world > 1 ? "s" : "",
                 (long long)((per_rank + t.batch_size - 1) / t.batch_size), (long long)t.batch_size,
                 (long long)t.steps,
                 t.grad_checkpoint ? "activation checkpointing" : "no activation checkpointing",
                 opened->description.c_str(), BackendDescription(*backend, peak).c_str());
  }
  double first_loss = 0, last_loss = 0;
  const int64_t first_step = (*trainer)->step() + 1;
  (*trainer)->set_stop_flag(&g_stop_requested);
  StopAfterTheStepWhenAsked(rank, checkpointer != nullptr);
  const auto status = (*trainer)->Train(*data, [&](const StepMetrics& m) -> absl::Status {
    if (m.step == first_step) first_loss = m.loss;
    last_loss = m.loss;
    double stall = 0;
    if (m.stop_requested && m.step < t.steps && lead) {
      std::fprintf(stderr, "llama-train: a rank was asked to stop: stopping after step %lld of %lld%s\n",
                   (long long)m.step, (long long)t.steps, checkpointer ? ", saving it first" : "");
    }
    const bool save = checkpointer != nullptr &&
                      (m.step % spec->checkpoint.interval == 0 || m.step == t.steps || m.stop_requested);
    stop_grace.StepTook(m.step_seconds);
    if (save) {
      if (lead) stop_grace.SaveStarted(m.step);
      auto seconds = checkpointer->Save(**trainer);
      if (!seconds.ok()) return seconds.status();
      stall = *seconds;
    }
    if (!lead) return absl::OkStatus();  // rank 0 reports for the job
    if (json) {
      nlohmann::json line = {{"step", m.step},
                             {"loss", m.loss},
                             {"lr", m.lr},
                             {"grad_norm", m.grad_norm},
                             {"tokens_per_s", m.tokens_per_s},
                             {"tflops", m.tflops},
                             {"mfu", m.mfu},
                             {"step_time_s", m.step_seconds},
                             {"peak_memory_bytes", m.peak_memory_bytes},
                             {"optimizer_state_bytes", m.optimizer_state_bytes},
                             {"gradient_bytes", m.gradient_bytes},
                             {"parameter_bytes", m.parameter_bytes},
                             {"communication_s", m.communication_seconds},
                             {"exposed_communication_s", m.exposed_communication_seconds}};
      if (stall > 0) line["checkpoint_stall_s"] = stall;
      std::printf("%s\n", line.dump().c_str());
      std::fflush(stdout);
    } else if (m.step % t.log_interval == 0 || m.step == t.steps || m.step == first_step) {
      std::printf("step %5lld/%lld  loss %.4f  lr %.3e  grad_norm %.3f  %8.0f tok/s  %6.1f GFLOP/s  "
                  "mfu %4.1f%%  mem %s\n",
                  (long long)m.step, (long long)t.steps, m.loss, m.lr, m.grad_norm, m.tokens_per_s,
                  m.tflops * 1e3, 100 * m.mfu, BytesForPeople(double(m.peak_memory_bytes)).c_str());
      std::fflush(stdout);
    }
    return absl::OkStatus();
  });
  if (!status.ok()) return Fail(status);
  if (checkpointer) {
    if (auto s = checkpointer->Wait(); !s.ok()) return Fail(s);
  }
  if (const int64_t stopped = (*trainer)->step(); stopped < t.steps) {
    // Stopped when asked. Whether this rank was: read now, since once a peer has left, its
    // launcher may signal this rank too.
    const int asked = g_rank_stop_signal;
    // No rank leaves before rank 0 has committed the step's checkpoint: the job's next
    // generation may start on this rank's device as soon as it exits, and must find that
    // checkpoint. A peer that is gone already only ends the wait.
    if ((*comm)->world_size() > 1) (*comm)->Barrier().IgnoreError();
    if (lead) {
      std::fprintf(stderr, "llama-train: stopped after step %lld of %lld (loss %.4f)%s\n", (long long)stopped,
                   (long long)t.steps, last_loss,
                   checkpointer ? "; -f latest goes on from there" : "; no checkpoints are saved, so nothing is kept");
    }
    // The rank that was asked ends as the signal would have ended it; the others say that
    // a peer stopped, which leaves the job's fate to what happened to that peer.
    if (asked != 0) return 128 + asked;
    std::fprintf(stderr, "llama-train: rank %d stopped with the rank that was asked to\n", rank);
    return kExitPeerLost;
  }
  if (lead && first_step > t.steps) {
    std::fprintf(stderr, "llama-train: job '%s' is at step %lld already, not before its last (%lld): "
                 "nothing to train\n", spec->name.c_str(), (long long)(first_step - 1), (long long)t.steps);
  } else if (lead) {
    std::fprintf(stderr, "llama-train: done: loss %.4f -> %.4f after %lld steps\n", first_loss,
                 last_loss, (long long)t.steps);
  }
  return 0;
}

// "80GiB", "512MiB", "1e9" -> bytes, from 1 byte to under 2^64; an error on anything else.
absl::StatusOr<uint64_t> ParseBytes(const std::string& text) {
  size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  std::string unit = text.substr(used);
  const std::pair<const char*, double> units[] = {{"", 1},      {"B", 1},      {"KiB", 1024.0},
                                                  {"MiB", 1 << 20}, {"GiB", double(1 << 30)},
                                                  {"TiB", 1099511627776.0}, {"KB", 1e3}, {"MB", 1e6},
                                                  {"GB", 1e9},  {"TB", 1e12}};
  for (const auto& [name, scale] : units) {
    if (used == 0 || unit != name) continue;
    const double bytes = value * scale;  // NaN fails both comparisons
    if (!(bytes >= 1 && bytes < 0x1p64)) {
      return absl::InvalidArgumentError(StrCat("'", text, "' is not a size from 1 byte to 16 EiB"));
    }
    return uint64_t(bytes);
  }
  return absl::InvalidArgumentError(StrCat("'", text, "' is not a size (for example 80GiB or 512MiB)"));
}

// `llama-train plan`: the per-rank memory of the job on the backend its precision picks,
// with gemini and offload.optimizer auto placed as a run would place them.
int RunPlan(const Common& common, const Overrides& overrides, const std::string& device_memory, int nodes,
            int devices_per_node, bool nproc_given, bool json) {
  auto spec = ReadSpec(common, overrides);
  if (!spec.ok()) return Fail(spec.status());
  const bool cuda = spec->training.mixed_precision == "bf16";
  // --nproc, or --nodes times --devices-per-node, gives the world; the job's resources
  // section fills in what is not given.
  const int per_node =
      nproc_given ? common.nproc : (devices_per_node > 0 ? devices_per_node : int(spec->resources.devices_per_node));
  const int64_t node_count = nproc_given ? 1 : (nodes > 0 ? nodes : spec->resources.nodes);
  if (node_count * per_node > kMaxWorldSize) {
    // Each factor is within its bound (the flags' checks, the spec's); their product may not be.
    return Fail(absl::InvalidArgumentError(StrCat(
        nodes > 0 ? "--nodes " : "resources.nodes ", node_count, " times ",
        devices_per_node > 0 ? "--devices-per-node " : "resources.devices_per_node ", per_node, " is ",
        node_count * per_node, " ranks; a job runs as at most ", kMaxWorldSize)));
  }
  const int world = int(node_count * per_node);
  const int threads = common.threads > 0 ? common.threads : std::max(1, int(std::thread::hardware_concurrency()) / world);
  uint64_t budget = 0;
  std::string budget_name;
  if (!device_memory.empty()) {
    auto bytes = ParseBytes(device_memory);
    if (!bytes.ok()) return Fail(absl::InvalidArgumentError(StrCat("--device-memory: ", bytes.status().message())));
    budget = *bytes;
    budget_name = StrCat("--device-memory ", device_memory);
  } else if (spec->offload.memory_budget_gb > 0) {
    budget = uint64_t(spec->offload.memory_budget_gb * double(1 << 30));
    budget_name = "offload.memory_budget_gb";
  } else if (!cuda && AvailableHostMemoryBytes() > 0) {
    budget = uint64_t(AvailableHostMemoryBytes()) / uint64_t(world);
    budget_name = StrCat("this host's available memory", world > 1 ? " per rank" : "");
  }
  if (cuda && budget == 0 && spec->parallel.plugin == "gemini" && spec->parallel.placement == "auto") {
    return Fail(absl::InvalidArgumentError(
        "--device-memory: gemini's placement auto places by the GPU's memory; give it (for example 80GiB)"));
  }
  auto plan_of = [&](const JobSpec& s) { return PlanMemoryOn(s, cuda, world, threads); };
  // As a run would place it; where nothing fits, the plan shows by how much.
  auto gemini = PlaceJob(*spec, cuda, world, budget, plan_of, /*must_fit=*/false);
  if (!gemini.ok()) return Fail(gemini.status());
  const JobSpec& placed = gemini->spec;
  const MemoryPlan plan = plan_of(placed);
  // What a GPU rank keeps in host memory for the run (the plan assumes NCCL unless the
  // job says gloo, as the device plan does).
  const HostMemoryNeed host =
      cuda ? HostMemoryNeedOf(plan, placed, placed.parallel.communicator != "gloo") : HostMemoryNeed{};
  const bool fits = budget == 0 || plan.total() <= budget;
  // zero2/3's collectives run beside the backward unless only inline fits.
  const bool inline_regions = !placed.parallel.overlap_regions && world > 1 &&
                              (placed.parallel.plugin == "zero2" || placed.parallel.plugin == "zero3");
  if (json) {
    nlohmann::json out = {{"parameters", plan.parameters},   {"master_weights", plan.master_weights},
                          {"gradients", plan.gradients},     {"optimizer_state", plan.optimizer_state},
                          {"activations", plan.activations}, {"workspace", plan.workspace},
                          {"checkpoint_snapshot", plan.checkpoint_snapshot},
                          {"optimizer_state_host", plan.optimizer_state_host},
                          {"optimizer_state_nvme", plan.optimizer_state_nvme},
                          {"total", plan.total()},           {"world_size", plan.world_size},
                          {"plugin", placed.parallel.plugin}, {"optimizer", placed.offload.optimizer},
                          {"inline_regions", inline_regions},
                          {"budget", budget},                {"fits", fits}};
    if (!gemini->summary.empty()) out["placement"] = gemini->summary;
    if (placed.offload.optimizer == "host") out["host_fraction"] = placed.offload.host_fraction;
    if (placed.parallel.params_host_share > 0) out["params_host_share"] = placed.parallel.params_host_share;
    if (host.total() > 0) out["host_bytes_per_node"] = host.total() * uint64_t(per_node);
    std::printf("%s\n", out.dump().c_str());
    return fits ? 0 : kExitFailure;
  }
  std::printf("job '%s': model %s (%.2fM parameters), %s, plugin %s, micro-batch %lld x %lld, %s\n%s%s",
              spec->name.c_str(), spec->model.name.c_str(), spec->model.NumParameters() / 1e6,
              !cuda ? "CPU fp32"
              : plan.host_moments_bf16
                  ? "CUDA bf16 (f32 master, gradients, moments; the moments in host memory bf16)"
                  : "CUDA bf16 (f32 master, gradients, moments)",
              spec->parallel.plugin.c_str(),
              (long long)spec->training.batch_size, (long long)spec->training.max_length,
              spec->training.grad_checkpoint ? "activation checkpointing" : "no activation checkpointing",
              gemini->summary.empty() ? "" : (gemini->summary + "\n").c_str(), plan.Describe(budget, budget_name).c_str());
  if (host.total() > 0) {
    // The ranks of a node share its memory; a run checks it against what the node has.
    std::printf("host memory per node: %d rank%s x %.2f GiB = %.2f GiB%s\n", per_node, per_node > 1 ? "s" : "",
                double(host.total()) / double(uint64_t{1} << 30),
                double(host.total() * uint64_t(per_node)) / double(uint64_t{1} << 30),
                host.staging > 0 ? " (with collectives staged without NCCL)" : "");
  }
  return fits ? 0 : kExitFailure;
}

int RunExport(const std::string& load, const std::string& hf_out) {
  auto path = storage::ParseCheckpointPath(load);
  if (!path.ok()) return Fail(path.status());
  auto store = storage::CheckpointStore::Open(path->root, {2, /*read_only=*/true});
  if (!store.ok()) return Fail(store.status());
  if (path->step == storage::CheckpointPath::kLatest) {
    auto latest = (*store)->LatestStep(path->job);
    if (!latest.ok()) return Fail(latest.status());
    path->step = *latest;
  }
  bool with_tokenizer = false;
  if (auto s = ExportHuggingFace(**store, path->job, path->step, hf_out, &with_tokenizer); !s.ok()) return Fail(s);
  std::fprintf(stderr, "llama-train: exported job '%s' step %lld to %s (model.safetensors, config.json%s)\n",
               path->job.c_str(), (long long)path->step, hf_out.c_str(),
               with_tokenizer ? ", tokenizer.model, tokenizer_config.json"
                              : "; no tokenizer: the job trained on bare token ids");
  return 0;
}

int RunEval(const Common& common, const Overrides& overrides, const std::string& tokens_path) {
  auto spec = ReadSpec(common, overrides);
  if (!spec.ok()) return Fail(spec.status());
  DataSpec eval_data = spec->data;
  eval_data.dataset = tokens_path;
  eval_data.base_dir.clear();  // relative to the working directory
  auto opened = data::OpenTrainingData(eval_data, spec->model.vocab_size, [](const std::string& line) { std::fprintf(stderr, "llama-train: %s\n", line.c_str()); });
  if (!opened.ok()) return Fail(opened.status());
  const TokenSource* data = opened->source.get();
  const size_t windows = data->NumWindows(int(spec->training.max_length));
  if (windows == 0) {
    return Fail(absl::InvalidArgumentError(StrCat(
        tokens_path, ": ", data->num_tokens(), " tokens are fewer than one window of ",
        spec->training.max_length + 1)));
  }
  auto made = MakeBackend(common, *spec);
  if (!made.ok()) return Fail(made.status());
  std::unique_ptr<Backend> backend = std::move(*made);
  auto trainer = Trainer::Create(*spec, backend.get(), 0);
  if (!trainer.ok()) return Fail(trainer.status());
  std::string weights = StrCat("initialised from seed ", spec->training.seed);
  if (!common.resume.empty()) {
    auto checkpoints = OpenCheckpoints(*spec, common, /*saving=*/false);
    if (!checkpoints.ok()) return Fail(checkpoints.status());
    const storage::CheckpointStore& from = checkpoints->source ? *checkpoints->source : *checkpoints->store;
    if (auto s = RestoreCheckpoint(from, spec->name, checkpoints->step, **trainer); !s.ok()) return Fail(s);
    weights = from.StepDir(spec->name, checkpoints->step);
  }
  const auto evaluated = (*trainer)->Evaluate(*data);
  if (!evaluated.ok()) return Fail(evaluated.status());
  const double loss = *evaluated;
  nlohmann::json out = {{"loss", loss},
                        {"perplexity", std::exp(loss)},
                        {"windows", windows},
                        {"tokens", windows * spec->training.max_length},
                        {"weights", weights}};
  std::printf("%s\n", out.dump().c_str());
  return 0;
}

int Main(int argc, char** argv) {
  g_argv = argv;
  CLI::App app{"llama-train: LLaMA pretraining engine"};
  app.require_subcommand(1);
  Common common;
  Overrides train_overrides, eval_overrides;
  std::string tokens_path;

  const CLI::Range kThreadRange(0, kMaxThreads);  // 0: all cores
  auto add_common = [&](CLI::App* sub) {
    sub->add_option("--config", common.config, "Job spec YAML file")->required();
    sub->add_option("--threads", common.threads, "CPU threads (default: all cores)")->check(kThreadRange);
    sub->add_option("--spec-origin", common.spec_origin,
                    "Path the spec was submitted from: relative paths resolve against its folder");
  };
  CLI::App* train = app.add_subcommand("train", "Train a model from a job spec");
  add_common(train);
  train->add_option("--log-format", common.log_format, "human or json (one object per step)")
      ->check(CLI::IsMember({"human", "json"}));
  CLI::Option* resume = train->add_option("-f,--resume", common.resume, "Resume from a checkpoint folder or 'latest'");
  train->add_flag("--resume-fallback", common.resume_fallback,
                  "If the checkpoint is damaged, resume from the newest older one that is intact");
  train->add_flag("--fresh", common.fresh, "Discard the job's existing checkpoints and start from step 0")
      ->excludes(resume);
  train->add_flag("--discard-newer", common.discard_newer,
                  "With -f of an older step: remove the job's checkpoints past it (they are of another history)")
      ->needs(resume);
  train->add_flag("--cpu-master-weights", common.cpu_master_weights,
                  "fp32 on the CPU: keep master weights apart from the parameters, as bf16 training on GPUs "
                  "does (the same results), so that offload.optimizer host runs there: for testing");
  CLI::Option* init_from_hf =
      train->add_option("--init-from-hf", common.init_from_hf, "Start from Hugging Face weights and config (folder)")
          ->excludes(resume);
  train->add_option("--nproc", common.nproc, "Data-parallel ranks on this machine (processes)")
      ->check(CLI::Range(1, 256));
  train_overrides.Register(train);
  init_from_hf->excludes(train->get_option("--model"));  // its config.json is the model
  CLI::App* eval = app.add_subcommand("eval", "Mean loss of the model over a token file");
  add_common(eval);
  eval->add_option("--tokens", tokens_path, "Dataset to evaluate (any form -d takes)")->required();
  eval->add_option("-f,--load", common.resume,
                   "Checkpoint to evaluate: a folder <root>/<job>/step-<n>, or 'latest' of the job");
  eval_overrides.Register(eval);
  Overrides plan_overrides;
  std::string device_memory;
  CLI::App* plan = app.add_subcommand("plan", "Per-rank memory of a job: weights, gradients, optimizer, activations");
  plan->add_option("--config", common.config, "Job spec YAML file")->required();
  CLI::Option* plan_nproc = plan->add_option("--nproc", common.nproc, "Data-parallel ranks (default: the job's resources)")
                                ->check(CLI::Range(int64_t{1}, kMaxWorldSize));
  int plan_nodes = 0, plan_devices = 0;
  plan->add_option("--nodes", plan_nodes, "Nodes (ranks: nodes x devices per node; default: the job's resources)")
      ->check(CLI::Range(int64_t{1}, kMaxNodes))
      ->excludes(plan_nproc);
  plan->add_option("--devices-per-node", plan_devices, "Ranks per node (default: the job's resources)")
      ->check(CLI::Range(int64_t{1}, kMaxDevicesPerNode))
      ->excludes(plan_nproc);
  plan->add_option("--threads", common.threads, "CPU threads per rank (default: the cores / ranks)")
      ->check(kThreadRange);
  plan->add_option("--device-memory", device_memory, "Memory per rank to place and check against: what each GPU has free (e.g. 79GiB)");
  bool plan_json = false;
  plan->add_flag("--json", plan_json, "Print the plan as one JSON object (bytes)");
  plan_overrides.Register(plan);
  std::string load, hf_out;
  CLI::App* exp = app.add_subcommand("export", "Write a checkpoint as Hugging Face safetensors + config.json");
  exp->add_option("--load", load, "Checkpoint folder (<root>/<job>/step-<n>, or <root>/<job>/latest)")->required();
  exp->add_option("--hf", hf_out, "Output folder")->required();

  StrictIntegers(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);
    return code == 0 ? 0 : kExitUsage;
  }
  if (*train) {  // the only command that meets llamad's stop
    auto grace = DaemonStopGraceMs();
    if (!grace.ok()) return Fail(grace.status());
    common.stop_grace_ms = *grace;
  }
  if (*train && common.nproc > 1 && std::getenv(kRankEnv) == nullptr) return LaunchRanks(common.nproc);
  if (*train) return RunTrain(common, train_overrides);
  if (*exp) return RunExport(load, hf_out);
  if (*plan) {
    return RunPlan(common, plan_overrides, device_memory, plan_nodes, plan_devices, plan_nproc->count() > 0,
                   plan_json);
  }
  return RunEval(common, eval_overrides, tokens_path);
}

}  // namespace
}  // namespace llamad

int main(int argc, char** argv) {
  llamad::SelectBlasKernels(argv);
  try {
    return llamad::Main(argc, argv);
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "llama-train: out of memory\n");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "llama-train: internal error: %s\n", e.what());
  }
  return 1;
}
