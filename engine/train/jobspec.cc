#include "train/jobspec.h"

#include <yaml-cpp/yaml.h>

#include <cmath>
#include <filesystem>
#include <tuple>

#include "core/strings.h"
#include "core/yaml_fields.h"

namespace llamad {
namespace {

constexpr std::string_view kPlugins[] = {"ddp", "zero1", "zero2", "zero3", "gemini"};
constexpr std::string_view kPrecisions[] = {"fp32", "bf16", "fp16"};
constexpr std::string_view kCommunicators[] = {"auto", "nccl", "gloo"};
constexpr std::string_view kPlacements[] = {"static", "auto"};
constexpr std::string_view kFormats[] = {"auto", "prepared", "raw", "uint32", "bytes"};

template <size_t K>
bool OneOf(const std::string& value, const std::string_view (&options)[K]) {
  for (auto o : options) {
    if (value == o) return true;
  }
  return false;
}

template <size_t K>
std::string Choices(const std::string_view (&options)[K]) {
  return StrJoin(options, ", ");
}


absl::StatusOr<JobSpec> JobSpecFromYaml(const YAML::Node& root, const std::string& path);

}  // namespace

absl::StatusOr<JobSpec> LoadJobSpec(const std::string& path) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    return absl::NotFoundError(StrCat(path, ": cannot open job file"));
  } catch (const YAML::Exception& e) {
    return ConfigError(path, StrCat("not valid YAML: ", e.what()));
  }
  return JobSpecFromYaml(root, path);
}

absl::StatusOr<JobSpec> ParseJobSpec(const std::string& yaml_text, const std::string& origin) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    return ConfigError(origin, StrCat("not valid YAML: ", e.what()));
  }
  return JobSpecFromYaml(root, origin);
}

namespace {

absl::StatusOr<JobSpec> JobSpecFromYaml(const YAML::Node& root, const std::string& path) {
  if (!root.IsMap()) {
    return ConfigError(path, "expected a mapping of sections (model, training, parallel, data, checkpoint)");
  }
  JobSpec spec;
  spec.path = path;
  spec.name = std::filesystem::path(path).stem().string();
  const std::string base_dir = std::filesystem::path(path).parent_path().string();

  YamlSection top(root, path, "");
  top.Get("name", &spec.name);
  top.Allow("model");
  if (!root["model"]) {
    return ConfigError(path, StrCat("model: missing (a preset: ",
                                          StrJoin(ModelPresetNames(), ", "),
                                          "; or a mapping of sizes; or a config file)"));
  }

  const YAML::Node training = root["training"];
  YamlSection t(training, path, "training");
  top.Allow("training");
  TrainingSpec& tr = spec.training;
  t.Get("max_length", &tr.max_length);
  t.Get("batch_size", &tr.batch_size);
  t.Get("global_batch_size", &tr.global_batch_size);
  t.Get("steps", &tr.steps);
  t.Get("lr", &tr.lr);
  t.Get("min_lr_ratio", &tr.min_lr_ratio);
  t.Get("warmup_steps", &tr.warmup_steps);
  t.Get("weight_decay", &tr.weight_decay);
  t.Get("beta1", &tr.beta1);
  t.Get("beta2", &tr.beta2);
  t.Get("adam_eps", &tr.adam_eps);
  t.Get("grad_clip", &tr.grad_clip);
  t.Get("grad_checkpoint", &tr.grad_checkpoint);
  t.Get("flash_attention", &tr.flash_attention);
  t.Get("mixed_precision", &tr.mixed_precision);
  t.Get("seed", &tr.seed);
  t.Get("log_interval", &tr.log_interval);

  YamlSection p(root["parallel"], path, "parallel");
  top.Allow("parallel");
  p.Get("plugin", &spec.parallel.plugin);
  p.Get("bucket_mb", &spec.parallel.bucket_mb);
  p.Get("communicator", &spec.parallel.communicator);
  p.Get("collective_timeout_s", &spec.parallel.collective_timeout_s);
  p.Get("placement", &spec.parallel.placement);
  p.Get("shard_param_frac", &spec.parallel.shard_param_frac);
  p.Get("offload_optim_frac", &spec.parallel.offload_optim_frac);
  p.Get("offload_param_frac", &spec.parallel.offload_param_frac);

  // A path field: relative paths are taken against the job file's folder.
  auto get_path = [&](YamlSection& section, const char* key, std::string* field) {
    if (section.Get(key, field) && !field->empty() && std::filesystem::path(*field).is_relative()) {
      *field = (std::filesystem::path(base_dir) / *field).lexically_normal().string();
    }
  };

  YamlSection d(root["data"], path, "data");
  top.Allow("data");
  d.Get("dataset", &spec.data.dataset);
  d.Get("format", &spec.data.format);
  get_path(d, "tokenizer", &spec.data.tokenizer);
  spec.data.base_dir = std::string(base_dir);

  YamlSection c(root["checkpoint"], path, "checkpoint");
  top.Allow("checkpoint");
  get_path(c, "dir", &spec.checkpoint.dir);
  c.Get("interval", &spec.checkpoint.interval);
  c.Get("keep_last", &spec.checkpoint.keep_last);

  YamlSection o(root["offload"], path, "offload");
  top.Allow("offload");
  o.Get("optimizer", &spec.offload.optimizer);
  o.Get("memory_budget_gb", &spec.offload.memory_budget_gb);
  get_path(o, "nvme_path", &spec.offload.nvme_path);
  o.Get("nvme_fraction", &spec.offload.nvme_fraction);
  o.Get("host_fraction", &spec.offload.host_fraction);
  o.Get("queue_depth", &spec.offload.queue_depth);
  o.Get("chunk_mb", &spec.offload.chunk_mb);
  o.Get("host_moments", &spec.offload.host_moments);
  o.Get("block_kb", &spec.offload.block_kb);

  YamlSection r(root["resources"], path, "resources");
  top.Allow("resources");
  ResourcesSpec& res = spec.resources;
  r.Get("nodes", &res.nodes);
  r.Get("devices_per_node", &res.devices_per_node);
  r.Get("min_nodes", &res.min_nodes);
  r.Get("max_nodes", &res.max_nodes);
  r.Get("priority", &res.priority);

  for (YamlSection* s : {&t, &p, &d, &c, &o, &r, &top}) {
    if (auto status = s->Finish(); !status.ok()) return status;
  }
  auto model = ModelConfigFromYaml(root["model"], path, "model", base_dir);
  if (!model.ok()) return model.status();
  spec.model = *model;
  if (auto s = ValidateJobSpec(spec); !s.ok()) return s;
  return spec;
}

}  // namespace

absl::Status ValidateJobSpec(const JobSpec& spec) {
  const std::string& f = spec.path.empty() ? std::string("job") : spec.path;
  auto fail = [&](std::string_view key, auto value, std::string_view why) {
    return ConfigError(f, StrCat(key, ": ", value, " ", why));
  };
  const TrainingSpec& t = spec.training;
  if (t.max_length <= 0) return fail("training.max_length", t.max_length, "must be a positive integer");
  if (t.max_length > (int64_t{1} << 20)) return fail("training.max_length", t.max_length, "is too large");
  if (t.batch_size <= 0) return fail("training.batch_size", t.batch_size, "must be a positive integer");
  if (t.batch_size > ((int64_t{1} << 31) - 1) / t.max_length) {
    return fail("training.batch_size", t.batch_size,
                StrCat("times training.max_length ", t.max_length, " exceeds 2^31 tokens per micro-batch"));
  }
  if (t.global_batch_size < 0) {
    return fail("training.global_batch_size", t.global_batch_size, "must not be negative");
  }
  // 2^40 tokens a step is far past any real run and keeps every product of it exact.
  if (t.global_batch_size > (int64_t{1} << 40) / t.max_length) {
    return fail("training.global_batch_size", t.global_batch_size,
                StrCat("times training.max_length ", t.max_length, " exceeds 2^40 tokens per optimizer step"));
  }
  if (t.global_batch_size > 0 && t.global_batch_size % t.batch_size != 0) {
    return fail("training.global_batch_size", t.global_batch_size,
                StrCat("is not a multiple of training.batch_size ", t.batch_size));
  }
  if (t.steps <= 0) return fail("training.steps", t.steps, "must be a positive integer");
  for (const auto& [key, value] : {std::pair<const char*, double>{"training.lr", t.lr},
                                   {"training.min_lr_ratio", t.min_lr_ratio},
                                   {"training.weight_decay", t.weight_decay},
                                   {"training.adam_eps", t.adam_eps},
                                   {"training.grad_clip", t.grad_clip}}) {
    if (!std::isfinite(value)) return fail(key, value, "must be a finite number");
  }
  if (!(t.lr > 0)) return fail("training.lr", t.lr, "must be positive");
  if (!(t.min_lr_ratio >= 0 && t.min_lr_ratio <= 1)) {
    return fail("training.min_lr_ratio", t.min_lr_ratio, "must be within [0, 1]");
  }
  if (t.warmup_steps < 0) return fail("training.warmup_steps", t.warmup_steps, "must not be negative");
  if (!(t.weight_decay >= 0)) return fail("training.weight_decay", t.weight_decay, "must not be negative");
  if (!(t.beta1 >= 0 && t.beta1 < 1)) return fail("training.beta1", t.beta1, "must be within [0, 1)");
  if (!(t.beta2 >= 0 && t.beta2 < 1)) return fail("training.beta2", t.beta2, "must be within [0, 1)");
  if (!(t.adam_eps > 0)) return fail("training.adam_eps", t.adam_eps, "must be positive");
  if (!(t.grad_clip >= 0)) return fail("training.grad_clip", t.grad_clip, "must not be negative (0 disables)");
  if (t.log_interval <= 0) return fail("training.log_interval", t.log_interval, "must be a positive integer");
  if (!OneOf(t.mixed_precision, kPrecisions)) {
    return fail("training.mixed_precision", StrCat("'", t.mixed_precision, "'"),
                StrCat("is not one of ", Choices(kPrecisions)));
  }
  if (!(spec.parallel.bucket_mb > 0) || spec.parallel.bucket_mb > 1e6) {
    return fail("parallel.bucket_mb", spec.parallel.bucket_mb, "must be within (0, 1e6]");
  }
  if (!(spec.parallel.collective_timeout_s >= 10) || spec.parallel.collective_timeout_s > 86400) {
    return fail("parallel.collective_timeout_s", spec.parallel.collective_timeout_s,
                "must be within [10, 86400] seconds (longer than any rank's longest stretch between two "
                "collectives, a checkpoint's copy included)");
  }
  if (!OneOf(spec.parallel.plugin, kPlugins)) {
    return fail("parallel.plugin", StrCat("'", spec.parallel.plugin, "'"),
                StrCat("is not one of ", Choices(kPlugins)));
  }
  const ParallelSpec& par = spec.parallel;
  if (!OneOf(par.communicator, kCommunicators)) {
    return fail("parallel.communicator", StrCat("'", par.communicator, "'"),
                StrCat("is not one of ", Choices(kCommunicators)));
  }
  if (par.communicator == "nccl" && t.mixed_precision != "bf16") {
    return fail("parallel.communicator", "'nccl'",
                StrCat("moves GPU buffers; training.mixed_precision ", t.mixed_precision,
                       " trains on the CPU (bf16 trains on GPUs)"));
  }
  if (!OneOf(par.placement, kPlacements)) {
    return fail("parallel.placement", StrCat("'", par.placement, "'"), StrCat("is not one of ", Choices(kPlacements)));
  }
  const ParallelSpec defaults;
  for (const auto& [key, value, fallback] :
       {std::tuple<const char*, double, double>{"parallel.shard_param_frac", par.shard_param_frac, defaults.shard_param_frac},
        {"parallel.offload_optim_frac", par.offload_optim_frac, defaults.offload_optim_frac},
        {"parallel.offload_param_frac", par.offload_param_frac, defaults.offload_param_frac}}) {
    if (!(value >= 0 && value <= 1)) return fail(key, value, "must be within [0, 1]");
    if (value != fallback && par.plugin != "gemini") {
      return fail(key, value, StrCat("places gemini's chunks; parallel.plugin is '", par.plugin, "'"));
    }
    if (value != fallback && par.placement == "auto") {
      return fail(key, value, "is a static placement's; parallel.placement auto places by the memory budget");
    }
  }
  if (par.placement != defaults.placement && par.plugin != "gemini") {
    return fail("parallel.placement", StrCat("'", par.placement, "'"),
                StrCat("places gemini's chunks; parallel.plugin is '", par.plugin, "'"));
  }
  if (!OneOf(spec.data.format, kFormats)) {
    return fail("data.format", StrCat("'", spec.data.format, "'"),
                StrCat("is not one of ", Choices(kFormats)));
  }
  if (spec.checkpoint.interval < 0) {
    return fail("checkpoint.interval", spec.checkpoint.interval, "must not be negative");
  }
  if (spec.checkpoint.keep_last < 1) {
    return fail("checkpoint.keep_last", spec.checkpoint.keep_last, "must be at least 1");
  }
  if (spec.checkpoint.interval > 0 && spec.checkpoint.dir.empty()) {
    return fail("checkpoint.interval", spec.checkpoint.interval, "needs checkpoint.dir (or -o DIR)");
  }
  const OffloadSpec& o = spec.offload;
  if (o.optimizer != "memory" && o.optimizer != "host" && o.optimizer != "nvme" && o.optimizer != "auto") {
    return fail("offload.optimizer", StrCat("'", o.optimizer, "'"), "is not one of memory, host, nvme, auto");
  }
  if (!(o.memory_budget_gb >= 0 && o.memory_budget_gb <= 1e6)) {
    return fail("offload.memory_budget_gb", o.memory_budget_gb, "must be within [0, 1e6]");
  }
  if (o.optimizer == "nvme" && o.nvme_path.empty()) {
    return fail("offload.nvme_path", "''", "must name a folder on a local disk for offload.optimizer nvme");
  }
  if (!(o.nvme_fraction > 0 && o.nvme_fraction <= 1)) {
    return fail("offload.nvme_fraction", o.nvme_fraction, "must be within (0, 1]");
  }
  if (!(o.host_fraction > 0 && o.host_fraction <= 1)) {
    return fail("offload.host_fraction", o.host_fraction, "must be within (0, 1]");
  }
  if (o.host_fraction != 1 && o.optimizer != "host") {
    return fail("offload.host_fraction", o.host_fraction,
                StrCat("is the share of offload.optimizer host; offload.optimizer is '", o.optimizer, "'"));
  }
  if (o.host_moments != "f32" && o.host_moments != "bf16") {
    return fail("offload.host_moments", StrCat("'", o.host_moments, "'"), "is not one of f32, bf16");
  }
  // gemini's offload_optim_frac places the state itself, whatever offload.optimizer says.
  if (o.host_moments != "f32" && o.optimizer != "host" && o.optimizer != "nvme" && spec.parallel.plugin != "gemini") {
    return fail("offload.host_moments", o.host_moments,
                StrCat("is the type of the moments offload.optimizer host or nvme (or gemini's "
                       "parallel.offload_optim_frac) keeps in host memory; offload.optimizer is '", o.optimizer, "'"));
  }
  if (o.host_moments != "f32" && spec.parallel.plugin == "gemini" && spec.parallel.placement == "static" &&
      spec.parallel.offload_optim_frac == 0) {
    return fail("offload.host_moments", o.host_moments,
                "is the type of the moments in host memory, and gemini's parallel.offload_optim_frac 0 keeps none there");
  }
  if (o.queue_depth < 1 || o.queue_depth > 4096) {
    return fail("offload.queue_depth", o.queue_depth, "must be within [1, 4096]");
  }
  if (o.block_kb < 4 || o.block_kb % 4 != 0 || o.block_kb > 65536) {
    return fail("offload.block_kb", o.block_kb, "must be a multiple of 4 within [4, 65536]");
  }
  if (!(o.chunk_mb * 1024 >= double(o.block_kb)) || o.chunk_mb > 4096) {
    return fail("offload.chunk_mb", o.chunk_mb, StrCat("must be within [block_kb ", o.block_kb, " KiB, 4096]"));
  }
  const ResourcesSpec& r = spec.resources;
  if (r.nodes < 1 || r.nodes > kMaxNodes) {
    return fail("resources.nodes", r.nodes, StrCat("must be within [1, ", kMaxNodes, "]"));
  }
  if (r.devices_per_node < 1 || r.devices_per_node > kMaxDevicesPerNode) {
    return fail("resources.devices_per_node", r.devices_per_node,
                StrCat("must be within [1, ", kMaxDevicesPerNode, "]"));
  }
  if (r.min_nodes < 0 || r.min_nodes > r.nodes) {
    return fail("resources.min_nodes", r.min_nodes, StrCat("must be within [0, resources.nodes ", r.nodes, "]"));
  }
  if (r.max_nodes != 0 && (r.max_nodes < r.nodes || r.max_nodes > kMaxNodes)) {
    return fail("resources.max_nodes", r.max_nodes,
                StrCat("must be 0 or within [resources.nodes ", r.nodes, ", ", kMaxNodes, "]"));
  }
  // The most ranks the job runs as, grown to max_nodes (both factors are bounded above,
  // so the product cannot overflow).
  const bool grows = r.max_nodes > r.nodes;
  if (const int64_t ranks = (grows ? r.max_nodes : r.nodes) * r.devices_per_node; ranks > kMaxWorldSize) {
    return fail(grows ? "resources.max_nodes" : "resources.nodes", grows ? r.max_nodes : r.nodes,
                StrCat("times resources.devices_per_node ", r.devices_per_node, " is ", ranks,
                       " ranks; a job runs as at most ", kMaxWorldSize));
  }
  if (r.priority < -1000000 || r.priority > 1000000) {
    return fail("resources.priority", r.priority, "must be within [-1000000, 1000000]");
  }
  if (spec.name.empty() || spec.name.find('/') != std::string::npos || spec.name == "index" ||
      spec.name == "." || spec.name == "..") {
    return fail("name", StrCat("'", spec.name, "'"), "must be a plain name (no '/'; not 'index')");
  }
  if (auto s = ValidateModelConfig(spec.model, StrCat(f, ": model")); !s.ok()) return s;
  // An upper bound of one micro-batch's activation elements (every layer's, and the
  // backward's scratch): within 2^56, so that their bytes and the memory plan's sums
  // stay far inside uint64.
  const ModelConfig& m = spec.model;
  const double activations = double(t.batch_size * t.max_length) * double(m.num_hidden_layers + 2) *
                             double(16 * m.hidden_size + 8 * m.intermediate_size);
  if (activations > 0x1p56) {
    return fail("training.batch_size", t.batch_size,
                StrCat("times training.max_length ", t.max_length, " needs more than 2^56 activation values for a "
                       "model of ", m.num_hidden_layers, " layers of hidden_size ", m.hidden_size));
  }
  return absl::OkStatus();
}

int64_t GradientAccumulationSteps(const JobSpec& spec) {
  const int64_t global = spec.training.global_batch_size > 0 ? spec.training.global_batch_size
                                                              : spec.training.batch_size;
  return global / spec.training.batch_size;
}

}  // namespace llamad
