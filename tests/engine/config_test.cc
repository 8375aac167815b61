// Model presets, Hugging Face config.json, job specs and their error messages.
#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <fstream>
#include <utility>
#include <vector>

#include "common/scratch_dir.h"
#include "model/config.h"
#include "train/jobspec.h"

namespace llamad {
namespace {

TEST(ModelConfigTest, PresetParameterCounts) {
  const std::pair<const char*, int64_t> expected[] = {{"7b", 6'738'415'616},
                                                      {"13b", 13'015'864'320},
                                                      {"30b", 32'528'943'616},
                                                      {"65b", 65'285'660'672},
                                                      {"70b", 68'976'648'192}};
  for (const auto& [name, count] : expected) {
    auto config = LoadModelConfig(name);
    ASSERT_TRUE(config.ok()) << config.status();
    EXPECT_EQ(config->NumParameters(), count) << name;
  }
  auto tiny = LoadModelConfig("tiny");
  ASSERT_TRUE(tiny.ok());
  EXPECT_GT(tiny->NumParameters(), 1'000'000);
  EXPECT_LT(tiny->NumParameters(), 10'000'000);
  EXPECT_EQ(LoadModelConfig("70b")->num_key_value_heads, 8);
}

TEST(ModelConfigTest, FlopsPerTokenIsSixNPlusCausalAttention) {
  auto c = *LoadModelConfig("7b");
  const double n = double(c.NumParameters() - c.vocab_size * c.hidden_size -
                          (2 * c.num_hidden_layers + 1) * c.hidden_size);
  EXPECT_DOUBLE_EQ(c.TrainingFlopsPerToken(2048), 6 * n + 6.0 * 32 * 4096 * 2048);
}

TEST(ModelConfigTest, ReadsHuggingFaceConfigJson) {
  const char* json = R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "tie_word_embeddings": false, "hidden_act": "silu", "torch_dtype": "float16"})";
  auto config = ModelConfigFromHfJson(json, "config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->NumParameters(), 68'976'648'192);
  EXPECT_DOUBLE_EQ(config->rms_norm_eps, 1e-5);

  auto tied = ModelConfigFromHfJson(R"({"hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100,
    "tie_word_embeddings": true})", "tied.json");
  ASSERT_FALSE(tied.ok());
  EXPECT_NE(tied.status().message().find("tie_word_embeddings"), std::string::npos);
  // Keys that would change the model are refused, naming the key; head_dim is compared by
  // division (the second wraps to 4096 when multiplied by 32 heads).
  const std::string small = R"("hidden_size": 4096, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 32, "vocab_size": 100)";
  for (const auto& [extra, key] : std::vector<std::pair<std::string, std::string>>{
           {R"("attention_bias": true)", "attention_bias"},
           {R"("mlp_bias": true)", "mlp_bias"},
           {R"("head_dim": 9223372036854775807)", "head_dim"},
           {R"("head_dim": 9223372036854775936)", "head_dim"},
           {R"("head_dim": 128.0)", "head_dim"},
           {R"("head_dim": 64)", "head_dim"}}) {
    auto refused = ModelConfigFromHfJson("{" + small + ", " + extra + "}", "extra.json");
    ASSERT_FALSE(refused.ok()) << extra;
    EXPECT_NE(refused.status().message().find(key), std::string::npos) << refused.status();
  }
  for (const char* extra : {R"("head_dim": 128)", R"("attention_bias": false, "mlp_bias": null)"}) {
    EXPECT_TRUE(ModelConfigFromHfJson("{" + small + ", " + extra + "}", "fine.json").ok()) << extra;
  }
  auto broken = ModelConfigFromHfJson("{\"hidden_size\": ", "broken.json");
  ASSERT_FALSE(broken.ok());
  EXPECT_NE(broken.status().message().find("broken.json"), std::string::npos);
  auto missing = ModelConfigFromHfJson(R"({"hidden_size": 64})", "m.json");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("intermediate_size: missing"), std::string::npos);
}

// Writes `text` to a job file in a fresh folder and loads it.
absl::StatusOr<JobSpec> LoadJobText(const std::string& text) {
  const auto dir = testing::ScratchDir("llamad-config-test");
  std::filesystem::create_directories(dir);
  const auto path = dir / "job.yaml";
  std::ofstream(path) << text;
  return LoadJobSpec(path.string());
}

// The error for `text` mentions every string in `needles`.
void ExpectError(const std::string& text, std::initializer_list<const char*> needles);

TEST(JobSpecTest, ResourcesAreValidated) {
  const std::string base = "model: tiny\ndata: {dataset: x}\n";
  ExpectError(base + "resources: {nodes: 2, anything: 1}\n", {"resources.anything"});
  ExpectError(base + "resources: {nodes: 0}\n", {"resources.nodes"});
  ExpectError(base + "resources: {nodes: 2, min_nodes: 3}\n", {"resources.min_nodes"});
  ExpectError(base + "resources: {nodes: 2, max_nodes: 1}\n", {"resources.max_nodes"});
  // Both are int32 in the scheduler's records: larger values must not wrap there.
  ExpectError(base + "resources: {nodes: 1, max_nodes: 2147483648}\n", {"resources.max_nodes", "2147483648"});
  ExpectError(base + "resources: {priority: 3000000000}\n", {"resources.priority", "3000000000"});
  ExpectError(base + "resources: {priority: -3000000000}\n", {"resources.priority", "-3000000000"});
  ExpectError(base + "resources: {devices_per_node: 0}\n", {"resources.devices_per_node"});
  // Each within its own bound, but more ranks than a rank accepts as its world size.
  ExpectError(base + "resources: {nodes: 1025, devices_per_node: 1024}\n",
              {"resources.nodes: 1025 times resources.devices_per_node 1024 is 1049600 ranks", "at most 1048576"});
  ExpectError(base + "resources: {nodes: 2, max_nodes: 1025, devices_per_node: 1024}\n",
              {"resources.max_nodes: 1025", "1049600 ranks"});
  EXPECT_TRUE(LoadJobText(base + "resources: {nodes: 1024, devices_per_node: 1024}\n").ok());
}

// The error for `text` mentions every string in `needles`.
void ExpectError(const std::string& text, std::initializer_list<const char*> needles) {
  auto spec = LoadJobText(text);
  ASSERT_FALSE(spec.ok()) << "accepted:\n" << text;
  const std::string message(spec.status().message());
  for (const char* n : needles) EXPECT_NE(message.find(n), std::string::npos) << message;
}

TEST(JobSpecTest, ReadsAFullSpecWithResources) {
  auto spec = LoadJobText(R"(
name: demo
model: {preset: tiny, num_hidden_layers: 2}
training: {max_length: 128, batch_size: 4, global_batch_size: 16, steps: 10, lr: 1e-3,
           grad_checkpoint: true, seed: 7}
parallel: {plugin: ddp}
data: {dataset: tokens.bin, format: uint32}
checkpoint: {dir: ckpt, interval: 0}
resources: {nodes: 4, devices_per_node: 8, min_nodes: 2, priority: 3}
)");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->name, "demo");
  EXPECT_EQ(spec->resources.nodes, 4);
  EXPECT_EQ(spec->resources.devices_per_node, 8);
  EXPECT_EQ(spec->resources.min_nodes, 2);
  EXPECT_EQ(spec->resources.priority, 3);
  EXPECT_EQ(spec->model.num_hidden_layers, 2);
  EXPECT_EQ(spec->model.hidden_size, 256);  // from the preset
  EXPECT_EQ(GradientAccumulationSteps(*spec), 4);
  EXPECT_TRUE(spec->training.grad_checkpoint);
  EXPECT_EQ(spec->training.seed, 7u);
  // Kept as written; opening resolves it against the job file's folder.
  EXPECT_EQ(spec->data.dataset, "tokens.bin");
  EXPECT_FALSE(spec->data.base_dir.empty());
}

TEST(JobSpecTest, TheShippedSpecsLoad) {
  auto spec = LoadJobSpec(std::string(LLAMAD_SOURCE_DIR) + "/configs/tiny.yaml");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->model.name, "tiny");
  // The cluster speed tests' specs too.
  for (const char* bench : {"7b", "65b"}) {
    auto b = LoadJobSpec(std::string(LLAMAD_SOURCE_DIR) + "/ops/bench/" + bench + "/job.yaml");
    ASSERT_TRUE(b.ok()) << bench << ": " << b.status();
    EXPECT_EQ(b->model.name, bench);
    EXPECT_EQ(b->training.max_length, 2048);
  }
}

TEST(JobSpecTest, BadSpecsNameTheKeyAndValue) {
  ExpectError("model: 5b\n", {"model", "unknown model preset '5b'", "7b"});
  ExpectError("model: {preset: tiny, num_attention_heads: 7}\n",
              {"num_attention_heads", "7", "does not divide hidden_size 256"});
  ExpectError("model: {preset: tiny, num_key_value_heads: 3}\n", {"num_key_value_heads", "3"});
  ExpectError("model: {preset: tiny, hidden_size: -256}\n", {"hidden_size", "-256", "positive"});
  ExpectError("model: tiny\ntraining: {batch_size: -1}\n", {"training.batch_size", "-1"});
  ExpectError("model: tiny\ntraining: {batch_sise: 4}\n",
              {"unknown key 'training.batch_sise'", "did you mean 'training.batch_size'"});
  ExpectError("model: tiny\ntrainng: {batch_size: 4}\n", {"unknown key 'trainng'", "'training'"});
  ExpectError("model: {preset: tiny, hiden_size: 64}\n", {"model.hiden_size", "model.hidden_size"});
  ExpectError("model: tiny\ntraining: {lr: fast}\n", {"training.lr", "'fast'", "number"});
  ExpectError("model: tiny\ntraining: {batch_size: 1, global_batch_size: 9223372036854775807}\n",
              {"training.global_batch_size", "9223372036854775807", "2^40"});
  ExpectError("model: tiny\noffload: {memory_budget_gb: 1e10}\n", {"offload.memory_budget_gb", "[0, 1e6]"});
  // Every dimension within its bound, but 2^60 parameters, or 2^64 activation values:
  // sizes that would wrap around in the memory plan.
  ExpectError("model: {hidden_size: 1048576, num_attention_heads: 1024, num_key_value_heads: 1024, "
              "intermediate_size: 4194303, num_hidden_layers: 65536, vocab_size: 32768}\n",
              {"num_hidden_layers", "65536", "parameters (at most 2^48)"});
  ExpectError("model: {hidden_size: 1048576, num_attention_heads: 1024, num_key_value_heads: 1024, "
              "intermediate_size: 4, num_hidden_layers: 1, vocab_size: 2147483647}\n",
              {"model: vocab_size: 2147483647 with hidden_size 1048576", "parameters (at most 2^48)"});
  ExpectError("model: {hidden_size: 4096, num_attention_heads: 32, intermediate_size: 16384, num_hidden_layers: 65536, "
              "vocab_size: 32000, max_position_embeddings: 1048576}\n"
              "training: {batch_size: 2047, max_length: 1048576}\n",
              {"training.batch_size", "2047", "2^56 activation values"});
  ExpectError("model: tiny\ntraining: {batch_size: 3, global_batch_size: 10}\n",
              {"training.global_batch_size", "10", "multiple"});
  ExpectError("model: tiny\nparallel: {plugin: fsdp}\n", {"parallel.plugin", "'fsdp'", "zero3"});
  ExpectError("model: tiny\ntraining: {mixed_precision: fp8}\n", {"training.mixed_precision", "fp8"});
  ExpectError("model: tiny\nparallel: {plugin: gemini, placement: dynamic}\n", {"parallel.placement", "'dynamic'"});
  ExpectError("model: tiny\nparallel: {communicator: mpi}\n", {"parallel.communicator", "'mpi'", "nccl"});
  ExpectError("model: tiny\nparallel: {communicator: nccl}\n", {"parallel.communicator", "fp32", "bf16"});
  ExpectError("model: tiny\nparallel: {collective_timeout_s: 5}\n", {"parallel.collective_timeout_s", "5", "[10, 86400]"});
  ExpectError("model: tiny\nparallel: {plugin: gemini, offload_param_frac: 1.5}\n",
              {"parallel.offload_param_frac", "1.5", "[0, 1]"});
  ExpectError("model: tiny\nparallel: {plugin: zero3, shard_param_frac: 0}\n",
              {"parallel.shard_param_frac", "gemini", "'zero3'"});
  ExpectError("model: tiny\nparallel: {plugin: gemini, placement: auto, offload_optim_frac: 1}\n",
              {"parallel.offload_optim_frac", "placement auto"});
  ExpectError("model: tiny\noffload: {optimizer: host, host_fraction: 0}\n", {"offload.host_fraction", "(0, 1]"});
  ExpectError("model: tiny\noffload: {host_fraction: 0.5}\n", {"offload.host_fraction", "0.5", "'memory'"});
  ExpectError("model: tiny\noffload: {optimizer: host, host_moments: f16}\n",
              {"offload.host_moments", "'f16'", "f32, bf16"});
  ExpectError("model: tiny\noffload: {host_moments: bf16}\n", {"offload.host_moments", "bf16", "'memory'"});
  ExpectError("model: tiny\nparallel: {plugin: gemini}\noffload: {host_moments: bf16}\n",
              {"offload.host_moments", "bf16", "offload_optim_frac 0"});
  ExpectError("model: tiny\noffload: {optimizer: nvme, nvme_path: swap, nvme_fraction: 0}\n",
              {"offload.nvme_fraction", "0", "(0, 1]"});
  ExpectError("model: tiny\noffload: {optimizer: nvme, nvme_path: swap, nvme_fraction: 1.5}\n",
              {"offload.nvme_fraction", "1.5"});
  ExpectError("model: tiny\ntraining: [1, 2]\n", {"training", "mapping"});
  ExpectError("training: {steps: 1}\n", {"model: missing"});
  ExpectError("model: tiny\ntraining: {steps: 1\n", {"not valid YAML"});
  ExpectError("model: missing-file.yaml\n", {"missing-file.yaml", "cannot open"});
}

}  // namespace
}  // namespace llamad
