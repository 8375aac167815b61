#include "model/config.h"

#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/strings.h"
#include "core/yaml_fields.h"

namespace llamad {

// Defined in the file generated from configs/models/*.yaml.
const std::vector<std::pair<std::string_view, std::string_view>>& EmbeddedModelPresets();

namespace {

constexpr const char* kFieldNames[] = {
    "hidden_size",       "intermediate_size", "num_hidden_layers",       "num_attention_heads",
    "num_key_value_heads", "vocab_size",      "max_position_embeddings", "rms_norm_eps",
    "rope_theta"};

// Reads the model fields present in `section` into `config`.
void ReadFields(YamlSection& section, ModelConfig& config) {
  section.Get("hidden_size", &config.hidden_size);
  section.Get("intermediate_size", &config.intermediate_size);
  section.Get("num_hidden_layers", &config.num_hidden_layers);
  // Without an explicit num_key_value_heads, a model that had plain multi-head attention
  // (or no value yet) keeps it when the head count changes, as Hugging Face defaults.
  const bool multi_head = config.num_key_value_heads == 0 ||
                          config.num_key_value_heads == config.num_attention_heads;
  section.Get("num_attention_heads", &config.num_attention_heads);
  const bool has_kv = section.Get("num_key_value_heads", &config.num_key_value_heads);
  if (!has_kv && multi_head) config.num_key_value_heads = config.num_attention_heads;
  section.Get("vocab_size", &config.vocab_size);
  section.Get("max_position_embeddings", &config.max_position_embeddings);
  section.Get("rms_norm_eps", &config.rms_norm_eps);
  section.Get("rope_theta", &config.rope_theta);
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(StrCat(path, ": cannot open model config file"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::StatusOr<ModelConfig> PresetConfig(std::string_view name) {
  for (const auto& [preset, text] : EmbeddedModelPresets()) {
    if (preset != name) continue;
    YAML::Node node = YAML::Load(std::string(text));
    ModelConfig config;
    config.name = std::string(name);
    YamlSection section(node, StrCat("configs/models/", name, ".yaml"), "");
    ReadFields(section, config);
    if (auto s = section.Finish(); !s.ok()) return s;
    return config;
  }
  return absl::InvalidArgumentError(StrCat("unknown model preset '", name,
                                                 "' (presets: ", StrJoin(ModelPresetNames(), ", "),
                                                 "; or a path to a .yaml or config.json file)"));
}

bool LooksLikePath(std::string_view spec) {
  return spec.find('/') != std::string_view::npos || spec.ends_with(".yaml") ||
         spec.ends_with(".yml") || spec.ends_with(".json");
}

absl::StatusOr<ModelConfig> LoadModelFile(const std::string& path) {
  auto text = ReadFile(path);
  if (!text.ok()) return text.status();
  if (path.ends_with(".json")) return ModelConfigFromHfJson(*text, path);
  YAML::Node node;
  try {
    node = YAML::Load(*text);
  } catch (const YAML::Exception& e) {
    return ConfigError(path, StrCat("not valid YAML: ", e.what()));
  }
  ModelConfig config;
  config.name = std::filesystem::path(path).stem().string();
  YamlSection section(node, path, "");
  ReadFields(section, config);
  if (auto s = section.Finish(); !s.ok()) return s;
  if (auto s = ValidateModelConfig(config, path); !s.ok()) return s;
  return config;
}

}  // namespace

int64_t ModelConfig::NumParameters() const {
  return vocab_size * hidden_size + NumMatmulParameters() + (2 * num_hidden_layers + 1) * hidden_size;
}

int64_t ModelConfig::NumMatmulParameters() const {
  const int64_t c = hidden_size, f = intermediate_size;
  const int64_t attention = qkv_dim() * c + c * c;
  const int64_t mlp = 3 * c * f;
  return num_hidden_layers * (attention + mlp) + vocab_size * c;
}

double ModelConfig::TrainingFlopsPerToken(int64_t seq_len) const {
  return 6.0 * static_cast<double>(NumMatmulParameters()) +
         6.0 * static_cast<double>(num_hidden_layers) * hidden_size * seq_len;
}

absl::Status ValidateModelConfig(const ModelConfig& c, std::string_view where) {
  auto fail = [&](std::string_view key, auto value, std::string_view why) {
    return ConfigError(where, StrCat(key, ": ", value, " ", why));
  };
  const std::pair<const char*, int64_t> positive[] = {
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"vocab_size", c.vocab_size},
      {"max_position_embeddings", c.max_position_embeddings}};
  for (const auto& [key, value] : positive) {
    if (value <= 0) return fail(key, value, "must be a positive integer");
  }
  // Bounds that keep every size product within int64 and every dimension within int.
  const std::pair<const char*, std::pair<int64_t, int64_t>> bounded[] = {
      {"hidden_size", {c.hidden_size, int64_t{1} << 20}},
      {"intermediate_size", {c.intermediate_size, int64_t{1} << 22}},
      {"num_hidden_layers", {c.num_hidden_layers, int64_t{1} << 16}},
      {"num_attention_heads", {c.num_attention_heads, c.hidden_size}},
      {"max_position_embeddings", {c.max_position_embeddings, int64_t{1} << 24}}};
  for (const auto& [key, value_limit] : bounded) {
    if (value_limit.first > value_limit.second) {
      return fail(key, value_limit.first, StrCat("is too large (at most ", value_limit.second, ")"));
    }
  }
  if (c.hidden_size % c.num_attention_heads != 0) {
    return fail("num_attention_heads", c.num_attention_heads,
                StrCat("does not divide hidden_size ", c.hidden_size));
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return fail("num_key_value_heads", c.num_key_value_heads,
                StrCat("does not divide num_attention_heads ", c.num_attention_heads));
  }
  if (c.head_dim() % 2 != 0) {
    return fail("num_attention_heads", c.num_attention_heads,
                StrCat("gives an odd head dimension ", c.head_dim(),
                             " (rotary embeddings need an even one)"));
  }
  if (c.vocab_size > (int64_t{1} << 31) - 1) return fail("vocab_size", c.vocab_size, "is too large");
  // Each bound above holds, yet together they allow ~2^60 parameters, whose bytes in a
  // memory plan would wrap around uint64. 2^48 is thousands of times any model trained.
  // The error names whichever of the layers or the vocabulary holds more of them.
  if (const int64_t n = c.NumParameters(); n > (int64_t{1} << 48)) {
    const int64_t vocabulary = 2 * c.vocab_size * c.hidden_size;
    if (vocabulary >= n - vocabulary) {
      return fail("vocab_size", c.vocab_size,
                  StrCat("with hidden_size ", c.hidden_size, " gives ", n, " parameters (at most 2^48)"));
    }
    return fail("num_hidden_layers", c.num_hidden_layers,
                StrCat("with hidden_size ", c.hidden_size, " and intermediate_size ", c.intermediate_size, " gives ", n,
                       " parameters (at most 2^48)"));
  }
  if (!(c.rms_norm_eps > 0)) return fail("rms_norm_eps", c.rms_norm_eps, "must be positive");
  if (!(c.rope_theta > 0)) return fail("rope_theta", c.rope_theta, "must be positive");
  return absl::OkStatus();
}

std::vector<std::string> ModelPresetNames() {
  std::vector<std::string> names;
  for (const auto& [name, text] : EmbeddedModelPresets()) names.emplace_back(name);
  return names;
}

absl::StatusOr<ModelConfig> LoadModelConfig(std::string_view spec) {
  if (LooksLikePath(spec)) return LoadModelFile(std::string(spec));
  auto config = PresetConfig(spec);
  if (!config.ok()) return config.status();
  if (auto s = ValidateModelConfig(*config, StrCat("preset ", spec)); !s.ok()) return s;
  return config;
}

absl::StatusOr<ModelConfig> ModelConfigFromYaml(const YAML::Node& node, std::string_view source,
                                                std::string_view path, std::string_view base_dir) {
  auto resolve = [&](const std::string& spec) {
    if (!LooksLikePath(spec) || std::filesystem::path(spec).is_absolute()) return spec;
    return (std::filesystem::path(base_dir) / spec).string();
  };
  const std::string where = StrCat(source, ": ", path);
  if (node.IsScalar()) {
    auto config = LoadModelConfig(resolve(node.Scalar()));
    if (!config.ok()) return ConfigError(source, StrCat(path, ": ", config.status().message()));
    return config;
  }
  YamlSection section(node, std::string(source), std::string(path));
  ModelConfig config;
  std::string preset;
  if (section.Get("preset", &preset)) {
    auto base = LoadModelConfig(resolve(preset));
    if (!base.ok()) {
      return ConfigError(source, StrCat(section.PathOf("preset"), ": ", base.status().message()));
    }
    config = *base;
  }
  ReadFields(section, config);
  if (auto s = section.Finish(); !s.ok()) return s;
  if (auto s = ValidateModelConfig(config, where); !s.ok()) return s;
  return config;
}

std::string ModelConfigToHfJson(const ModelConfig& c) {
  return nlohmann::json{{"hidden_size", c.hidden_size},
                        {"intermediate_size", c.intermediate_size},
                        {"num_hidden_layers", c.num_hidden_layers},
                        {"num_attention_heads", c.num_attention_heads},
                        {"num_key_value_heads", c.num_key_value_heads},
                        {"vocab_size", c.vocab_size},
                        {"max_position_embeddings", c.max_position_embeddings},
                        {"rms_norm_eps", c.rms_norm_eps},
                        {"rope_theta", c.rope_theta}}
      .dump();
}

absl::StatusOr<ModelConfig> ModelConfigFromHfJson(std::string_view json_text,
                                                  std::string_view source) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(json_text);
  } catch (const nlohmann::json::exception& e) {
    return ConfigError(source, StrCat("not valid JSON: ", e.what()));
  }
  if (!j.is_object()) return ConfigError(source, "expected a JSON object");
  if (j.contains("model_type") && j["model_type"] != "llama") {
    return ConfigError(source, StrCat("model_type: ", j["model_type"].dump(),
                                            " is not supported (only \"llama\")"));
  }
  if (j.contains("tie_word_embeddings") && j["tie_word_embeddings"] == true) {
    return ConfigError(source, "tie_word_embeddings: true is not supported (LLaMA's LM head is untied)");
  }
  if (j.contains("hidden_act") && j["hidden_act"] != "silu") {
    return ConfigError(source, StrCat("hidden_act: ", j["hidden_act"].dump(),
                                            " is not supported (only \"silu\")"));
  }
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
    return ConfigError(source, "rope_scaling: RoPE scaling is not supported");
  }
  // Projections with biases hold weights this model has no place for: refused, not dropped.
  for (const char* key : {"attention_bias", "mlp_bias"}) {
    if (j.contains(key) && j[key] != false && !j[key].is_null()) {
      return ConfigError(source,
                         StrCat(key, ": ", j[key].dump(), " is not supported (LLaMA's projections have no bias)"));
    }
  }
  ModelConfig config;
  config.name = "hf";
  auto read_int = [&](const char* key, int64_t* out, bool required) -> absl::Status {
    if (!j.contains(key) || j[key].is_null()) {
      return required ? ConfigError(source, StrCat(key, ": missing")) : absl::OkStatus();
    }
    if (!j[key].is_number_integer()) {
      return ConfigError(source, StrCat(key, ": expected an integer, got ", j[key].dump()));
    }
    *out = j[key].get<int64_t>();
    return absl::OkStatus();
  };
  auto read_double = [&](const char* key, double* out) -> absl::Status {
    if (!j.contains(key) || j[key].is_null()) return absl::OkStatus();
    if (!j[key].is_number()) {
      return ConfigError(source, StrCat(key, ": expected a number, got ", j[key].dump()));
    }
    *out = j[key].get<double>();
    return absl::OkStatus();
  };
  for (auto s : {read_int("hidden_size", &config.hidden_size, true),
                 read_int("intermediate_size", &config.intermediate_size, true),
                 read_int("num_hidden_layers", &config.num_hidden_layers, true),
                 read_int("num_attention_heads", &config.num_attention_heads, true),
                 read_int("vocab_size", &config.vocab_size, true),
                 read_int("max_position_embeddings", &config.max_position_embeddings, false),
                 read_double("rms_norm_eps", &config.rms_norm_eps),
                 read_double("rope_theta", &config.rope_theta)}) {
    if (!s.ok()) return s;
  }
  config.num_key_value_heads = config.num_attention_heads;
  if (auto s = read_int("num_key_value_heads", &config.num_key_value_heads, false); !s.ok()) return s;
  if (auto s = ValidateModelConfig(config, source); !s.ok()) return s;
  // The head dimension follows from the other sizes (compared by division: a product
  // could wrap; a value past INT64_MAX reads as negative).
  if (j.contains("head_dim") && !j["head_dim"].is_null() &&
      (!j["head_dim"].is_number_integer() ||
       j["head_dim"].get<int64_t>() != config.hidden_size / config.num_attention_heads)) {
    return ConfigError(source, StrCat("head_dim: ", j["head_dim"].dump(),
                                            " must equal hidden_size / num_attention_heads"));
  }
  return config;
}

}  // namespace llamad
