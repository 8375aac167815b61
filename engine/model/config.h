// The shape of a LLaMA-architecture model, with the field names of Hugging Face's
// LlamaConfig so that configs move both ways with `transformers`.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace YAML {
class Node;
}

namespace llamad {

struct ModelConfig {
  std::string name = "custom";              // Preset name, or "custom".
  int64_t hidden_size = 0;                  // Model width C.
  int64_t intermediate_size = 0;            // SwiGLU inner width F.
  int64_t num_hidden_layers = 0;            // Decoder layers L.
  int64_t num_attention_heads = 0;          // Query heads H.
  int64_t num_key_value_heads = 0;          // Key/value heads (grouped-query); divides H.
  int64_t vocab_size = 0;                   // Token ids are in [0, vocab_size).
  int64_t max_position_embeddings = 2048;   // Longest sequence the model is meant for.
  double rms_norm_eps = 1e-6;               // RMSNorm epsilon.
  double rope_theta = 10000.0;              // RoPE base.

  int64_t head_dim() const { return hidden_size / num_attention_heads; }
  // Width of the fused q|k|v projection output.
  int64_t qkv_dim() const { return (num_attention_heads + 2 * num_key_value_heads) * head_dim(); }
  // All trainable parameters (embedding, layers, final norm, untied LM head).
  int64_t NumParameters() const;
  // Parameters that take part in matrix multiplies: everything but the embedding table
  // and the norm weights. This is the N of the 6N FLOPs-per-token estimate.
  int64_t NumMatmulParameters() const;
  // Training FLOPs per token: 6N plus causal attention (6 * L * C * T for sequence T).
  double TrainingFlopsPerToken(int64_t seq_len) const;
};

// OK, or an error naming the first invalid field and its value; `where` prefixes it.
absl::Status ValidateModelConfig(const ModelConfig& config, std::string_view where);

// Names of the built-in presets (the files of configs/models/, compiled in).
std::vector<std::string> ModelPresetNames();

// Resolves a model spec: a preset name ("7b"), a YAML file with the fields above, or a
// Hugging Face config.json. The result is validated.
absl::StatusOr<ModelConfig> LoadModelConfig(std::string_view spec);

// Reads a model from a YAML node of a job spec: a scalar (as LoadModelConfig), or a
// mapping with an optional `preset` key plus field overrides. `source` names the file,
// `path` the key path ("model") for messages. Relative file specs resolve against
// `base_dir`. The result is validated.
absl::StatusOr<ModelConfig> ModelConfigFromYaml(const YAML::Node& node, std::string_view source,
                                                std::string_view path, std::string_view base_dir);

// The model's fields as a Hugging Face LlamaConfig JSON object (the fields above only;
// ModelConfigFromHfJson reads it back exactly).
std::string ModelConfigToHfJson(const ModelConfig& config);

// Parses a Hugging Face LlamaConfig JSON text. `source` names it in messages.
absl::StatusOr<ModelConfig> ModelConfigFromHfJson(std::string_view json_text,
                                                  std::string_view source);

}  // namespace llamad
