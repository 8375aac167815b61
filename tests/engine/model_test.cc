// The whole model: finite differences in float64, activation checkpointing, gradient
// accumulation, memorisation and run-to-run determinism.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <tuple>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "core/strings.h"
#include "comm/communicator.h"
#include "gradcheck.h"
#include "model/llama.h"
#include "train/trainer.h"

namespace llamad {
namespace {

ModelConfig SmallConfig() {
  ModelConfig c;
  c.name = "test";
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.vocab_size = 23;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-6;
  return c;
}

std::vector<int32_t> RandomTokens(size_t n, int vocab, uint64_t stream) {
  std::vector<int32_t> t(n);
  for (size_t i = 0; i < n; ++i) t[i] = int32_t(RandomBits(7, stream, i) % uint64_t(vocab));
  return t;
}

double NormRelativeError(const std::vector<double>& a, const std::vector<double>& b) {
  double diff = 0, ref = 0;
  for (size_t i = 0; i < a.size(); ++i) diff += (a[i] - b[i]) * (a[i] - b[i]), ref += b[i] * b[i];
  return std::sqrt(diff / ref);
}

std::vector<double> Grads(LlamaModel& model, Backend& be) {
  std::vector<double> g(model.num_params());
  be.Download(g.data(), model.grad_data(), g.size());
  return g;
}

struct GradCheckCase {
  bool checkpoint;
  int attention_block;
};

class ModelGradCheck : public ::testing::TestWithParam<GradCheckCase> {};

TEST_P(ModelGradCheck, EveryParameterMatchesFiniteDifferences) {
  auto be = MakeCpuBackend({DType::kF64, 2});
  const ModelConfig config = SmallConfig();
  LlamaModel model(config, be.get(), {GetParam().checkpoint, GetParam().attention_block});
  model.InitWeights(3);
  // Larger weights than the 0.02 init so that every path carries signal.
  auto* params = static_cast<double*>(model.param_data());
  for (const ParamInfo& p : model.params()) {
    if (p.shape.size() == 2) {
      for (size_t i = 0; i < p.numel; ++i) params[p.offset + i] *= 15;
    } else {
      for (size_t i = 0; i < p.numel; ++i) params[p.offset + i] += 0.3 * RandomNormal(5, p.offset, i);
    }
  }
  const int batch = 2, seq = 7;
  auto tokens = RandomTokens(batch * seq, int(config.vocab_size), 1);
  auto targets = RandomTokens(batch * seq, int(config.vocab_size), 2);
  targets[3] = -1;  // an ignored position
  model.ZeroGrads();
  const double scale = 1.0 / 13;
  model.ForwardBackward(tokens.data(), targets.data(), batch, seq, scale);
  const std::vector<double> grads = Grads(model, *be);
  auto loss = [&] { return scale * model.Forward(tokens.data(), targets.data(), batch, seq); };
  std::vector<testing::GradInput> inputs;
  for (const ParamInfo& p : model.params()) {
    inputs.push_back({p.name, params + p.offset, grads.data() + p.offset, p.numel});
  }
  testing::ExpectGradientsMatch(loss, inputs, 1e-6, /*max_checks=*/100000);
}

INSTANTIATE_TEST_SUITE_P(Variants, ModelGradCheck,
                         ::testing::Values(GradCheckCase{false, 3}, GradCheckCase{true, 3},
                                           GradCheckCase{false, 0}),
                         [](const auto& info) {
                           return std::string(info.param.checkpoint ? "Checkpointed" : "Plain") +
                                  (info.param.attention_block > 0 ? "Tiled" : "Unfused");
                         });

// The shipped tiny preset itself (5.3M parameters): a spread of elements of every
// tensor against central differences in float64.
TEST(ModelGradCheckTiny, TinyPresetMatchesFiniteDifferences) {
  auto be = MakeCpuBackend({DType::kF64, 2});
  const ModelConfig config = *LoadModelConfig("tiny");
  LlamaModel model(config, be.get(), {false, 4});
  model.InitWeights(1);
  auto* params = static_cast<double*>(model.param_data());
  for (const ParamInfo& p : model.params()) {
    for (size_t i = 0; i < p.numel; ++i) {
      params[p.offset + i] = p.shape.size() == 2 ? params[p.offset + i] * 4
                                                 : 1 + 0.3 * RandomNormal(5, p.offset, i);
    }
  }
  const int batch = 1, seq = 9;
  auto tokens = RandomTokens(batch * seq, 300, 1);  // a few ids, so embedding rows repeat
  auto targets = RandomTokens(batch * seq, 300, 2);
  model.ForwardBackward(tokens.data(), targets.data(), batch, seq, 1.0 / seq);
  const std::vector<double> grads = Grads(model, *be);
  auto loss = [&] { return model.Forward(tokens.data(), targets.data(), batch, seq) / seq; };
  std::vector<testing::GradInput> inputs;
  for (const ParamInfo& p : model.params()) {
    // Embedding and LM head rows that the batch touches: the first 300 rows.
    const size_t numel = p.name.find("embed") != std::string::npos || p.name == "lm_head.weight"
                             ? 300 * size_t(config.hidden_size)
                             : p.numel;
    inputs.push_back({p.name, params + p.offset, grads.data() + p.offset, numel});
  }
  testing::ExpectGradientsMatch(loss, inputs, 1e-5, /*max_checks=*/12);
}

TEST(ModelTest, ParameterLayoutFollowsHuggingFaceNames) {
  const auto layout = LlamaParamLayout(SmallConfig());
  ASSERT_EQ(layout.size(), 1 + 2 * 9 + 2u);
  EXPECT_EQ(layout[0].name, "model.embed_tokens.weight");
  EXPECT_EQ(layout[2].name, "model.layers.0.self_attn.q_proj.weight");
  EXPECT_EQ(layout[3].shape, (std::vector<int64_t>{8, 16}));  // k_proj: 2 kv heads x 4
  EXPECT_EQ(layout.back().name, "lm_head.weight");
  size_t total = 0;
  for (const auto& p : layout) total += p.numel;
  EXPECT_EQ(int64_t(total), SmallConfig().NumParameters());
}

// Float32 gradients of one micro-batch under the given options.
std::vector<double> F32Gradients(const LlamaOptions& options, int batch, int seq) {
  auto be = MakeCpuBackend({DType::kF32, 2});
  ModelConfig config = SmallConfig();
  config.hidden_size = 32;
  config.num_hidden_layers = 3;
  LlamaModel model(config, be.get(), options);
  model.InitWeights(11);
  auto tokens = RandomTokens(batch * seq, int(config.vocab_size), 3);
  auto targets = RandomTokens(batch * seq, int(config.vocab_size), 4);
  model.ForwardBackward(tokens.data(), targets.data(), batch, seq, 1.0 / (batch * seq));
  return Grads(model, *be);
}

// A ZeRO rank builds only its shard: it allocates the shard (and a region's scratch)
// and holds bit for bit the values of that part of the whole model, however the shard
// boundaries cut the tensors.
TEST(ModelTest, AShardBuiltAloneHoldsThatPartOfTheWholeModel) {
  const ModelConfig config = SmallConfig();
  auto whole_be = MakeCpuBackend({DType::kF32, 2});
  LlamaModel whole(config, whole_be.get());
  whole.InitWeights(23);
  const float* all = static_cast<const float*>(whole.param_data());
  const size_t n = whole.num_params();
  for (int world : {2, 3, 7}) {
    for (int rank = 0; rank < world; ++rank) {
      auto be = MakeCpuBackend({DType::kF32, 2});
      LlamaOptions options;
      std::tie(options.shard_begin, options.shard_end) = EvenSlice(n, rank, world);
      options.shard_parameters = true;
      LlamaModel shard(config, be.get(), options);
      shard.InitWeights(23);
      const size_t count = options.shard_end - options.shard_begin;
      // Two buffers, each rounded up to the allocator's 64 bytes.
      const size_t expected = (count + LargestGradientRegion(config)) * sizeof(float);
      EXPECT_GE(be->peak_allocated_bytes(), expected);
      EXPECT_LE(be->peak_allocated_bytes(), expected + 2 * 64);
      EXPECT_EQ(shard.held_master_range(), std::make_pair(options.shard_begin, options.shard_end));
      const float* held = static_cast<const float*>(shard.param_at(options.shard_begin));
      EXPECT_TRUE(std::equal(held, held + count, all + options.shard_begin)) << "rank " << rank << " of " << world;
    }
  }
}

TEST(ModelTest, ActivationCheckpointingGivesIdenticalGradients) {
  const auto plain = F32Gradients({false, 16}, 3, 40);
  const auto checkpointed = F32Gradients({true, 16}, 3, 40);
  ASSERT_EQ(plain.size(), checkpointed.size());
  EXPECT_EQ(0, std::memcmp(plain.data(), checkpointed.data(), plain.size() * sizeof(double)))
      << "relative difference " << NormRelativeError(checkpointed, plain);
}

TEST(ModelTest, TiledAttentionMatchesUnfusedInTheModel) {
  const auto tiled = F32Gradients({false, 16}, 2, 50);
  const auto unfused = F32Gradients({false, 0}, 2, 50);
  EXPECT_LT(NormRelativeError(tiled, unfused), 1e-5);
}

TEST(ModelTest, AccumulatedMicroBatchesEqualOneLargeBatch) {
  auto be = MakeCpuBackend({DType::kF32, 2});
  const ModelConfig config = SmallConfig();
  LlamaModel model(config, be.get());
  model.InitWeights(5);
  const int seq = 12, k = 4, micro = 2;
  auto tokens = RandomTokens(k * micro * seq, int(config.vocab_size), 5);
  auto targets = RandomTokens(k * micro * seq, int(config.vocab_size), 6);
  const double scale = 1.0 / (k * micro * seq);
  model.ZeroGrads();
  double accumulated_loss = 0;
  for (int i = 0; i < k; ++i) {
    accumulated_loss += model.ForwardBackward(tokens.data() + i * micro * seq,
                                              targets.data() + i * micro * seq, micro, seq, scale);
  }
  const auto accumulated = Grads(model, *be);
  model.ZeroGrads();
  const double big_loss = model.ForwardBackward(tokens.data(), targets.data(), k * micro, seq, scale);
  const auto big = Grads(model, *be);
  EXPECT_NEAR(accumulated_loss / big_loss, 1.0, 1e-6);
  EXPECT_LT(NormRelativeError(accumulated, big), 1e-6);
}

JobSpec SmallJob(int64_t batch, int64_t global_batch, int64_t steps) {
  JobSpec spec;
  spec.path = "test-job";
  spec.model = SmallConfig();
  spec.model.hidden_size = 32;
  spec.training.max_length = 16;
  spec.training.batch_size = batch;
  spec.training.global_batch_size = global_batch;
  spec.training.steps = steps;
  spec.training.lr = 1e-2;
  spec.training.warmup_steps = 2;
  spec.training.seed = 9;
  return spec;
}

std::vector<StepMetrics> TrainRun(const JobSpec& spec, const TokenDataset& data,
                                  std::vector<float>* final_params = nullptr) {
  auto be = MakeCpuBackend({DType::kF32, 2});
  auto trainer = Trainer::Create(spec, be.get(), 0);
  EXPECT_TRUE(trainer.ok()) << trainer.status();
  std::vector<StepMetrics> steps;
  EXPECT_TRUE((*trainer)->Train(data, [&](const StepMetrics& m) {
    steps.push_back(m);
    return absl::OkStatus();
  }).ok());
  if (final_params) {
    final_params->resize((*trainer)->model().num_params());
    be->DownloadF32(final_params->data(), (*trainer)->model().param_data(), final_params->size());
  }
  return steps;
}

TEST(TrainerTest, SameSeedIsBitIdentical) {
  const TokenDataset data = TokenDataset::FromTokens(RandomTokens(2000, 23, 8));
  std::vector<float> p1, p2;
  const auto a = TrainRun(SmallJob(2, 4, 6), data, &p1);
  const auto b = TrainRun(SmallJob(2, 4, 6), data, &p2);
  ASSERT_EQ(a.size(), 6u);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].loss, b[i].loss) << "step " << i + 1;
    EXPECT_EQ(a[i].grad_norm, b[i].grad_norm) << "step " << i + 1;
  }
  EXPECT_EQ(0, std::memcmp(p1.data(), p2.data(), p1.size() * sizeof(float)));
  // A different seed is a different run.
  JobSpec other = SmallJob(2, 4, 6);
  other.training.seed = 10;
  EXPECT_NE(TrainRun(other, data)[0].loss, a[0].loss);
}

TEST(TrainerTest, AccumulationStepsDoNotChangeTheRun) {
  const TokenDataset data = TokenDataset::FromTokens(RandomTokens(3000, 23, 9));
  const auto accumulated = TrainRun(SmallJob(1, 4, 5), data);  // 4 micro-batches of 1
  const auto single = TrainRun(SmallJob(4, 4, 5), data);       // 1 micro-batch of 4
  for (size_t i = 0; i < single.size(); ++i) {
    EXPECT_NEAR(accumulated[i].loss / single[i].loss, 1.0, 1e-5) << "step " << i + 1;
  }
}

TEST(TrainerTest, MemorisesAShortSequence) {
  // One window of 33 tokens: the model must learn it by heart.
  const TokenDataset data = TokenDataset::FromTokens(RandomTokens(33, 23, 10));
  JobSpec spec = SmallJob(1, 1, 150);
  spec.training.max_length = 32;
  spec.training.weight_decay = 0;
  const auto steps = TrainRun(spec, data);
  ASSERT_EQ(steps.size(), 150u);
  EXPECT_GT(steps.front().loss, 2.5);
  EXPECT_LT(steps.back().loss, 0.05);
}

TEST(TrainerTest, IdsOutsideTheVocabularyAreRefusedBeforeTheModelReadsThem) {
  // The vocabulary is 23; window 3 of 16 + 1 tokens holds a 23, window 5 a -1 (a damaged
  // shard's ids): training and evaluation refuse them, naming the id.
  for (const int32_t id : {23, -1}) {
    std::vector<int32_t> tokens = RandomTokens(200, 23, 11);
    const size_t window = id < 0 ? 5 : 3;
    tokens[window * 16 + 7] = id;
    const TokenDataset data = TokenDataset::FromTokens(tokens);
    auto be = MakeCpuBackend({DType::kF32, 2});
    auto trainer = Trainer::Create(SmallJob(2, 4, 100), be.get(), 0);
    ASSERT_TRUE(trainer.ok()) << trainer.status();
    const auto evaluated = (*trainer)->Evaluate(data);
    EXPECT_EQ(evaluated.status().code(), absl::StatusCode::kDataLoss) << id;
    EXPECT_NE(evaluated.status().message().find(StrCat("window ", window, " holds token id ", id)),
              std::string::npos) << evaluated.status();
    int steps = 0;
    const auto trained = (*trainer)->Train(data, [&](const StepMetrics&) {
      ++steps;
      return absl::OkStatus();
    });
    EXPECT_EQ(trained.code(), absl::StatusCode::kDataLoss) << id;
    EXPECT_NE(trained.message().find(StrCat("holds token id ", id, ", outside the model's vocabulary of 23")),
              std::string::npos) << trained;
    EXPECT_LT(steps, 100);
  }
  // Ids inside it evaluate.
  auto be = MakeCpuBackend({DType::kF32, 2});
  auto trainer = Trainer::Create(SmallJob(2, 4, 1), be.get(), 0);
  ASSERT_TRUE(trainer.ok());
  const auto loss = (*trainer)->Evaluate(TokenDataset::FromTokens(RandomTokens(200, 23, 11)));
  ASSERT_TRUE(loss.ok()) << loss.status();
  EXPECT_GT(*loss, 2.0);
}

TEST(TrainerTest, LearningRateScheduleWarmsUpThenDecaysToTheFloor) {
  LrSchedule s{1.0, 0.1, 10, 110};
  EXPECT_DOUBLE_EQ(s.At(0), 0.1);
  EXPECT_DOUBLE_EQ(s.At(9), 1.0);
  EXPECT_DOUBLE_EQ(s.At(10), 1.0);
  EXPECT_NEAR(s.At(60), 0.55, 1e-12);  // halfway through the cosine
  EXPECT_NEAR(s.At(110), 0.1, 1e-12);
  EXPECT_NEAR(s.At(500), 0.1, 1e-12);
}

TEST(TrainerTest, RefusesWhatThisBuildCannotRun) {
  const TokenDataset data = TokenDataset::FromTokens(RandomTokens(100, 23, 1));
  auto be = MakeCpuBackend({DType::kF32, 2});
  JobSpec spec = SmallJob(1, 1, 1);
  spec.training.mixed_precision = "bf16";
  auto t = Trainer::Create(spec, be.get(), 0);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("training.mixed_precision"), std::string::npos) << t.status();
  spec = SmallJob(1, 1, 1);
  spec.parallel.plugin = "gemini";
  spec.parallel.placement = "auto";
  spec.offload.memory_budget_gb = 1e-5;  // 10 KiB: no layout fits
  t = Trainer::Create(spec, be.get(), 0);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("no layout fits"), std::string::npos) << t.status();
  spec = SmallJob(1, 1, 1);
  spec.training.max_length = 65;
  t = Trainer::Create(spec, be.get(), 0);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("max_position_embeddings"), std::string::npos) << t.status();
  // Too little data for one window is an error, not a crash.
  spec = SmallJob(1, 1, 1);
  spec.training.max_length = 64;
  t = Trainer::Create(spec, be.get(), 0);
  ASSERT_TRUE(t.ok());
  const auto status = (*t)->Train(TokenDataset::FromTokens(RandomTokens(10, 23, 1)), [](const StepMetrics&) { return absl::OkStatus(); });
  EXPECT_FALSE(status.ok());
}

}  // namespace
}  // namespace llamad
