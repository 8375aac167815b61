// llama-train: the engine's entry point.
//
//   llama-train train --config JOB.yaml [flags that override the job file]
//   llama-train eval  --config JOB.yaml --tokens FILE
//
// Exit codes: 0 success, 1 runtime failure, 2 bad command line, job file or data.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

#include "core/strings.h"
#include "backend/cpu/blas_kernels.h"
#include "backend/cpu/cpu_backend.h"
#include "train/jobspec.h"
#include "train/token_data.h"
#include "train/trainer.h"

namespace llamad {
namespace {

constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "llama-train: %s\n", std::string(status.message()).c_str());
  return status.code() == absl::StatusCode::kInternal ? kExitFailure : kExitUsage;
}

std::string HumanBytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024 && u < 4) bytes /= 1024, ++u;
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f %s", bytes, units[u]);
  return buf;
}

// Command-line values that override the job file when given.
struct Overrides {
  std::string model, plugin, precision, dataset, format;
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
    add(app->add_option("-d,--dataset", dataset, "Token file"),
        [this](JobSpec& s) { s.data.dataset = dataset; });
    add(app->add_option("--data-format", format, "uint32 or bytes"),
        [this](JobSpec& s) { s.data.format = format; });
    add(app->add_option("--seed", seed, "Seed for initialisation and data order"),
        [this](JobSpec& s) { s.training.seed = seed; });
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
    return ValidateJobSpec(spec);
  }
};

struct Common {
  std::string config;
  std::string log_format = "human";
  int threads = 0;
};

absl::StatusOr<JobSpec> ReadSpec(const Common& common, const Overrides& overrides) {
  auto spec = LoadJobSpec(common.config);
  if (!spec.ok()) return spec.status();
  if (auto s = overrides.ApplyTo(*spec); !s.ok()) return s;
  return spec;
}

std::unique_ptr<Backend> MakeBackend(const Common& common) {
  CpuBackendOptions options;
  options.threads = common.threads;
  return MakeCpuBackend(options);
}

int RunTrain(const Common& common, const Overrides& overrides) {
  auto spec = ReadSpec(common, overrides);
  if (!spec.ok()) return Fail(spec.status());
  auto data = TokenDataset::Open(spec->data.dataset, spec->data.format, spec->model.vocab_size);
  if (!data.ok()) return Fail(data.status());
  auto backend = MakeBackend(common);
  const double peak = MeasureSgemmFlops(1024, 1024, 1024, 0.1);
  auto trainer = Trainer::Create(*spec, backend.get(), peak);
  if (!trainer.ok()) return Fail(trainer.status());

  const bool json = common.log_format == "json";
  const TrainingSpec& t = spec->training;
  std::fprintf(stderr,
               "llama-train: job '%s': model %s (%.2fM parameters), seq %lld, batch %lld x %lld "
               "accumulation, %lld steps, %s, %d threads, dataset %s (%zu tokens); MFU is against "
               "measured sgemm %.1f GFLOP/s (OpenBLAS %s kernels)\n",
               spec->name.c_str(), spec->model.name.c_str(), spec->model.NumParameters() / 1e6,
               (long long)t.max_length, (long long)t.batch_size,
               (long long)GradientAccumulationSteps(*spec), (long long)t.steps,
               t.grad_checkpoint ? "activation checkpointing" : "no activation checkpointing",
               CpuThreads(), spec->data.dataset.c_str(), data->num_tokens(), peak / 1e9,
               BlasCoreName());
  double first_loss = 0, last_loss = 0;
  const auto status = (*trainer)->Train(*data, [&](const StepMetrics& m) {
    if (m.step == 1) first_loss = m.loss;
    last_loss = m.loss;
    if (json) {
      nlohmann::json line = {{"step", m.step},
                             {"loss", m.loss},
                             {"lr", m.lr},
                             {"grad_norm", m.grad_norm},
                             {"tokens_per_s", m.tokens_per_s},
                             {"tflops", m.tflops},
                             {"mfu", m.mfu},
                             {"step_time_s", m.step_seconds},
                             {"peak_memory_bytes", m.peak_memory_bytes}};
      std::printf("%s\n", line.dump().c_str());
      std::fflush(stdout);
    } else if (m.step % t.log_interval == 0 || m.step == t.steps || m.step == 1) {
      std::printf("step %5lld/%lld  loss %.4f  lr %.3e  grad_norm %.3f  %8.0f tok/s  %6.1f GFLOP/s  "
                  "mfu %4.1f%%  mem %s\n",
                  (long long)m.step, (long long)t.steps, m.loss, m.lr, m.grad_norm, m.tokens_per_s,
                  m.tflops * 1e3, 100 * m.mfu, HumanBytes(double(m.peak_memory_bytes)).c_str());
      std::fflush(stdout);
    }
  });
  if (!status.ok()) return Fail(status);
  std::fprintf(stderr, "llama-train: done: loss %.4f -> %.4f after %lld steps\n", first_loss,
               last_loss, (long long)t.steps);
  return 0;
}

int RunEval(const Common& common, const Overrides& overrides, const std::string& tokens_path) {
  auto spec = ReadSpec(common, overrides);
  if (!spec.ok()) return Fail(spec.status());
  auto data = TokenDataset::Open(tokens_path, spec->data.format, spec->model.vocab_size);
  if (!data.ok()) return Fail(data.status());
  const size_t windows = data->NumWindows(int(spec->training.max_length));
  if (windows == 0) {
    return Fail(absl::InvalidArgumentError(StrCat(
        tokens_path, ": ", data->num_tokens(), " tokens are fewer than one window of ",
        spec->training.max_length + 1)));
  }
  auto backend = MakeBackend(common);
  auto trainer = Trainer::Create(*spec, backend.get(), 0);
  if (!trainer.ok()) return Fail(trainer.status());
  const double loss = (*trainer)->Evaluate(*data);
  nlohmann::json out = {{"loss", loss},
                        {"perplexity", std::exp(loss)},
                        {"windows", windows},
                        {"tokens", windows * spec->training.max_length},
                        {"weights", StrCat("initialised from seed ", spec->training.seed)}};
  std::printf("%s\n", out.dump().c_str());
  return 0;
}

int Main(int argc, char** argv) {
  CLI::App app{"llama-train: LLaMA pretraining engine"};
  app.require_subcommand(1);
  Common common;
  Overrides train_overrides, eval_overrides;
  std::string tokens_path;

  auto add_common = [&](CLI::App* sub) {
    sub->add_option("--config", common.config, "Job spec YAML file")->required();
    sub->add_option("--threads", common.threads, "CPU threads (default: all cores)");
  };
  CLI::App* train = app.add_subcommand("train", "Train a model from a job spec");
  add_common(train);
  train->add_option("--log-format", common.log_format, "human or json (one object per step)")
      ->check(CLI::IsMember({"human", "json"}));
  train_overrides.Register(train);
  CLI::App* eval = app.add_subcommand("eval", "Mean loss of the model over a token file");
  add_common(eval);
  eval->add_option("--tokens", tokens_path, "Token file to evaluate")->required();
  eval_overrides.Register(eval);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);
    return code == 0 ? 0 : kExitUsage;
  }
  if (*train) return RunTrain(common, train_overrides);
  return RunEval(common, eval_overrides, tokens_path);
}

}  // namespace
}  // namespace llamad

int main(int argc, char** argv) {
  llamad::SelectBlasKernels(argv);
  return llamad::Main(argc, argv);
}
