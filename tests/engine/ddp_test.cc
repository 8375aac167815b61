// Data parallelism as real processes: `llama-train --nproc N` over Gloo on loopback.
// The same global batch gives the same losses at world sizes 1, 2 and 4; a checkpoint
// taken at one world size resumes at others on the same curve; a killed rank stops the
// job within seconds, named.
#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/flip_byte.h"
#include "common/stopped_peer.h"
#include "common/subprocess.h"
#include "common/synthetic_tokens.h"
#include "storage/checkpoint_store.h"

namespace {
namespace fs = std::filesystem;

class DdpTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("llamad-ddp-test-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    llamad::testing::WriteSyntheticTokens(dir_ / "tokens.u32");
    // A global batch of 12 windows: 12 / 1, 6 x 2, 3 x 4 and 4 x 3 per rank.
    std::ofstream(dir_ / "job.yaml") << R"(
name: ddp
model: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4,
        num_key_value_heads: 2, vocab_size: 64, max_position_embeddings: 128}
training: {max_length: 32, batch_size: 4, global_batch_size: 12, steps: 20, lr: 3e-3,
           warmup_steps: 2, seed: 9}
data: {dataset: tokens.u32}
checkpoint: {dir: ckpt, interval: 0}
)";
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Runs llama-train to the end; returns the loss of every step it printed (and the
  // optimizer state bytes rank 0 reported last).
  std::vector<double> Train(const std::string& args, size_t* state_bytes = nullptr,
                            size_t* gradient_bytes = nullptr, size_t* parameter_bytes = nullptr) {
    llamad::testing::Subprocess p(std::string(LLAMA_TRAIN_BIN) + " train --config " +
                                  (dir_ / "job.yaml").string() + " --log-format json " + args);
    std::vector<double> losses;
    std::string log;
    while (auto line = p.ReadLine(120)) {
      log += *line + "\n";
      if (!line->starts_with("{")) continue;
      const auto j = nlohmann::json::parse(*line);
      losses.push_back(j["loss"].get<double>());
      last_metrics_ = j;
      if (state_bytes != nullptr) *state_bytes = j["optimizer_state_bytes"].get<size_t>();
      if (gradient_bytes != nullptr) *gradient_bytes = j["gradient_bytes"].get<size_t>();
      if (parameter_bytes != nullptr) *parameter_bytes = j["parameter_bytes"].get<size_t>();
    }
    EXPECT_EQ(p.Wait(), 0) << log;
    return losses;
  }

  fs::path dir_;
  nlohmann::json last_metrics_;  // rank 0's last step line of the last Train
};

// A job whose parameters (4.76M, 18.1 MiB a buffer) outweigh its activations, and whose
// layers are an eighth of them each, as in real jobs (where they are less): sharding
// shows in its memory.
std::string LayeredJob(int steps) {
  return R"(
name: ddp
model: {hidden_size: 256, intermediate_size: 512, num_hidden_layers: 8, num_attention_heads: 4,
        num_key_value_heads: 2, vocab_size: 64, max_position_embeddings: 128}
training: {max_length: 32, batch_size: 2, global_batch_size: 8, steps: )" +
         std::to_string(steps) + R"(, lr: 3e-3, seed: 9}
data: {dataset: tokens.u32}
checkpoint: {dir: ckpt, interval: 0}
)";
}

void ExpectSameCurve(const std::vector<double>& a, const std::vector<double>& b, const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_NEAR(a[i], b[i], 1e-5 * std::abs(b[i])) << what << ", step " << i + 1;
  }
}

TEST_F(DdpTest, SameLossAtWorldSizesOneTwoAndFour) {
  const auto one = Train("--nproc 1 --threads 1");
  ASSERT_EQ(one.size(), 20u);
  EXPECT_LT(one.back(), one.front());
  ExpectSameCurve(Train("--nproc 2 --threads 1"), one, "world size 2");
  ExpectSameCurve(Train("--nproc 4 --threads 1"), one, "world size 4");
  // Small buckets: the gradient goes out in many overlapped collectives.
  std::ofstream(dir_ / "job.yaml", std::ios::app) << "parallel: {bucket_mb: 0.01}\n";
  ExpectSameCurve(Train("--nproc 2 --threads 1"), one, "world size 2, 10 KiB buckets");
}

// ZeRO-1: the same curve, with each rank holding 1/world of the AdamW moments.
TEST_F(DdpTest, Zero1MatchesAndShardsOptimizerState) {
  size_t full = 0;
  const auto one = Train("--nproc 1 --threads 1", &full);
  ASSERT_EQ(one.size(), 20u);
  for (int world : {2, 4}) {
    size_t bytes = 0;
    ExpectSameCurve(Train("-p zero1 --nproc " + std::to_string(world) + " --threads 1", &bytes), one,
                    world == 2 ? "zero1 at world size 2" : "zero1 at world size 4");
    // Rank 0's share: ceil(params / world) of each moment.
    EXPECT_NEAR(double(bytes), double(full) / world, 8.0 * world) << "world size " << world;
    std::printf("zero1, world size %d: optimizer state %zu bytes per rank (%zu unsharded)\n", world, bytes, full);
  }
  // A zero1 checkpoint (gathered moments) resumes under ddp at another world size.
  const auto saved = Train("-p zero1 --nproc 4 --threads 1 -i 10 --fresh");
  ExpectSameCurve(saved, one, "zero1 at world size 4, saving");
  const std::vector<double> tail(one.begin() + 10, one.end());
  ExpectSameCurve(Train("--nproc 2 --threads 1 -i 0 -f " + (dir_ / "ckpt" / "ddp" / "step-10").string()), tail,
                  "zero1 checkpoint resumed by ddp at world size 2");
  // Resumed under zero1 at world size 3 while saving into the same store (so step 20 of
  // the run above goes): rank 0 holds the index open for writing and restores the
  // weights; each rank reads its own part of the moments through a read-only view of it.
  ExpectSameCurve(Train("-p zero1 --nproc 3 --threads 1 -i 5 --discard-newer -f " +
                        (dir_ / "ckpt" / "ddp" / "step-10").string()),
                  tail, "zero1 checkpoint resumed by zero1 at world size 3, saving");
  EXPECT_TRUE(fs::exists(dir_ / "ckpt" / "ddp" / "step-15" / "rank-2.shard"));
}

// ZeRO-2: the same curve again, each rank holding 1/world of the moments and of the
// gradients, plus the scratch of one region (here a layer, the largest).
TEST_F(DdpTest, Zero2MatchesAndShardsGradients) {
  size_t full_state = 0, full_grads = 0;
  const auto one = Train("--nproc 1 --threads 1", &full_state, &full_grads);
  ASSERT_EQ(one.size(), 20u);
  const size_t params = full_grads / sizeof(float);
  // A layer: two norms [64], q/k/v [64 + 2 x 32, 64], o [64, 64], gate_up [2 x 128, 64],
  // down [64, 128].
  const size_t scratch = 2 * 64 + 128 * 64 + 64 * 64 + 256 * 64 + 64 * 128;
  for (int world : {2, 3, 4}) {
    size_t state = 0, grads = 0;
    ExpectSameCurve(Train("-p zero2 --nproc " + std::to_string(world) + " --threads 1", &state, &grads), one,
                    ("zero2 at world size " + std::to_string(world)).c_str());
    EXPECT_NEAR(double(state), double(full_state) / world, 8.0 * world) << "world size " << world;
    // The shard, the model's scratch, and the copy of the region being reduced.
    EXPECT_EQ(grads, ((params + world - 1) / world + 2 * scratch) * sizeof(float)) << "world size " << world;
    std::printf("zero2, world size %d: per rank %zu bytes of optimizer state (%zu unsharded), %zu of gradients "
                "(%zu unsharded)\n", world, state, full_state, grads, full_grads);
  }
  // A zero2 checkpoint resumes under ddp at another world size.
  ASSERT_EQ(Train("-p zero2 --nproc 4 --threads 1 -i 10 --fresh").size(), 20u);
  const std::vector<double> tail(one.begin() + 10, one.end());
  ExpectSameCurve(Train("--nproc 2 --threads 1 -i 0 -f " + (dir_ / "ckpt" / "ddp" / "step-10").string()), tail,
                  "zero2 checkpoint resumed by ddp at world size 2");
}

// ZeRO-3: the same curve again, each rank holding 1/world of the moments, gradients and
// parameters, the last two with two regions besides: the parameters' scratch and the
// next region's, gathered ahead; the gradients' scratch and the copy being reduced.
// Gathered checkpoints resume elsewhere.
TEST_F(DdpTest, Zero3MatchesAndShardsParameters) {
  size_t full_state = 0, full_grads = 0, full_params = 0;
  const auto one = Train("--nproc 1 --threads 1 -g", &full_state, &full_grads, &full_params);
  ASSERT_EQ(one.size(), 20u);
  ASSERT_EQ(full_params, full_grads);  // fp32 on the CPU
  const size_t params = full_params / sizeof(float);
  const size_t scratch = 2 * 64 + 128 * 64 + 64 * 64 + 256 * 64 + 64 * 128;  // a layer, as above
  for (int world : {2, 3}) {
    size_t state = 0, grads = 0, weights = 0;
    // With activation checkpointing: the backward's recomputation reads gathered layers too.
    ExpectSameCurve(Train("-p zero3 -g --nproc " + std::to_string(world) + " --threads 1", &state, &grads, &weights),
                    one, ("zero3 at world size " + std::to_string(world)).c_str());
    const size_t shard_bytes = ((params + world - 1) / world + 2 * scratch) * sizeof(float);
    EXPECT_EQ(weights, shard_bytes) << "world size " << world;
    EXPECT_EQ(grads, shard_bytes) << "world size " << world;
    EXPECT_NEAR(double(state), double(full_state) / world, 8.0 * world) << "world size " << world;
    std::printf("zero3, world size %d: per rank %zu bytes of parameters (%zu unsharded), %zu of gradients, "
                "%zu of optimizer state (%zu)\n", world, weights, full_params, grads, state, full_state);
  }
  // Saved at world size 4 under zero3, resumed by ddp at world size 2 on the same curve.
  ASSERT_EQ(Train("-p zero3 -g --nproc 4 --threads 1 -i 10 --fresh").size(), 20u);
  const std::vector<double> tail(one.begin() + 10, one.end());
  ExpectSameCurve(Train("-g --nproc 2 --threads 1 -i 0 -f " + (dir_ / "ckpt" / "ddp" / "step-10").string()), tail,
                  "zero3 checkpoint resumed by ddp at world size 2");
  // And by zero3 at world size 3: each rank restores its own part.
  ExpectSameCurve(Train("-p zero3 -g --nproc 3 --threads 1 -i 0 -f " + (dir_ / "ckpt" / "ddp" / "step-10").string()),
                  tail, "zero3 checkpoint resumed by zero3 at world size 3");
}

// zero2 and zero3 talk inside every micro-batch, so ranks with fewer micro-batches than
// others must still take part: 12 windows over 5 ranks in micro-batches of 2 are 2, 2,
// 1, 1 and 1 micro-batches. The curve stays the same, and no rank waits forever.
TEST_F(DdpTest, ShardedPluginsWithUnevenMicroBatchCounts) {
  const auto one = Train("--nproc 1 --threads 1");
  ASSERT_EQ(one.size(), 20u);
  for (const char* plugin : {"zero2", "zero3"}) {
    ExpectSameCurve(Train(std::string("-p ") + plugin + " -b 2 --nproc 5 --threads 1"), one,
                    (std::string(plugin) + " at world size 5 with micro-batches of 2").c_str());
  }
}

// Each plugin lowers a rank's high-water mark, start-up included: a rank never holds the
// full gradients or moments of a state it will shard (the gradients come at their first
// use, fresh moments are not sent). Here the parameters outweigh the activations
// (LayeredJob).
TEST_F(DdpTest, ShardedPluginsLowerPeakMemoryFromTheStart) {
  std::ofstream(dir_ / "job.yaml") << LayeredJob(2);
  std::map<std::string, double> peak;
  double buffer = 0;  // bytes of one f32 buffer the size of the parameters
  for (const char* plugin : {"ddp", "zero1", "zero2", "zero3"}) {
    ASSERT_EQ(Train(std::string("-p ") + plugin + " --nproc 2 --threads 1").size(), 2u) << plugin;
    peak[plugin] = last_metrics_["peak_memory_bytes"].get<double>();
    if (buffer == 0) buffer = last_metrics_["parameter_bytes"].get<double>();
    std::printf("%s at world size 2: peak %.2f MiB per rank\n", plugin, peak[plugin] / (1 << 20));
  }
  // zero1 drops half the moments (a whole buffer); zero2 half the gradients less two
  // layers (the scratch and the copy being reduced); zero3 half the parameters less two
  // layers (the scratch and the next layer, gathered ahead).
  EXPECT_LT(peak["zero1"], peak["ddp"] - 0.9 * buffer);
  EXPECT_LT(peak["zero2"], peak["zero1"] - 0.15 * buffer);
  EXPECT_LT(peak["zero3"], peak["zero2"] - 0.15 * buffer);
}

// gemini places a job as zero2 or zero3 (or zero3 for a first share of the parameters),
// by its static fractions or (placement auto) by the memory planner against the rank's
// budget, with the optimizer state partly on the NVMe tier when even zero3 does not fit.
// The curve is the same wherever things go, and the planner knows what a rank holds.
TEST_F(DdpTest, GeminiPlacesByFractionsOrByMemoryBudget) {
  const std::string job = LayeredJob(4);
  auto write_job = [&](const std::string& extra) { std::ofstream(dir_ / "job.yaml") << job << extra; };
  write_job("");
  size_t full_params = 0;
  const auto one = Train("--nproc 1 --threads 1", nullptr, nullptr, &full_params);
  ASSERT_EQ(one.size(), 4u);
  auto run = [&](const std::string& args, const char* what) {
    size_t state = 0, params = 0;
    ExpectSameCurve(Train(args + " --nproc 2 --threads 1", &state, nullptr, &params), one, what);
    return std::pair{params, state};
  };
  // static: shard_param_frac 1 (the default) shards the parameters as zero3 does; 0
  // keeps them whole on every rank, as zero2 does.
  const auto [zero3_params, zero3_state] = run("-p gemini", "gemini static, parameters sharded");
  EXPECT_LT(zero3_params, 0.8 * full_params);
  EXPECT_EQ(run("-p gemini --shard-param-frac 0", "gemini static, parameters replicated").first, full_params);
  // What the planner says a rank holds.
  auto plan = [&](const std::string& args) {
    const auto r = llamad::testing::RunCommand(std::string(LLAMA_TRAIN_BIN) + " plan --config " +
                                               (dir_ / "job.yaml").string() + " --json --nproc 2 --threads 1 " + args);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return nlohmann::json::parse(r.output.substr(r.output.find('{')));
  };
  auto planned = [&](const std::string& args) { return plan(args)["total"].get<double>(); };
  // In between: the regions in the first half of the parameters sharded, the rest held
  // whole on both ranks (refreshed once a step instead of gathered at every use): at
  // two ranks rank 0 then holds about half the parameters more than under zero3.
  const size_t half_params = run("-p gemini --shard-param-frac 0.5", "gemini static, half sharded").first;
  EXPECT_NEAR(double(half_params - zero3_params), 0.5 * double(full_params), 0.15 * double(full_params));
  EXPECT_EQ(double(half_params), plan("-p gemini --shard-param-frac 0.5")["parameters"].get<double>());
  EXPECT_EQ(double(zero3_params), plan("-p gemini")["parameters"].get<double>());

  // auto: what each layout needs per rank, from the planner...
  const double zero2 = planned("-p zero2"), zero3 = planned("-p zero3");
  // The swap pipeline's chunks small next to this model's moments (3 x 64 KiB in memory).
  const std::string swap = "nvme_path: swap, chunk_mb: 0.0625, block_kb: 4";
  fs::create_directories(dir_ / "swap");
  write_job("offload: {optimizer: nvme, " + swap + "}\n");
  const double zero3_nvme = planned("-p zero3");
  ASSERT_LT(zero3, zero2);
  ASSERT_LT(zero3_nvme, zero3);
  // ...and the layout each budget gets: zero2 when it fits, else zero3, else zero3 with
  // as many moments on NVMe as it takes.
  auto with_budget = [&](double bytes, bool nvme) {
    write_job("parallel: {plugin: gemini, placement: auto}\noffload: {memory_budget_gb: " +
              std::to_string(bytes / (1 << 30)) + (nvme ? ", " + swap : "") + "}\n");
  };
  with_budget(zero2 * 1.01, false);
  EXPECT_EQ(run("", "gemini auto, zero2 fits").first, full_params);
  with_budget((zero2 + zero3) / 2, false);
  EXPECT_EQ(run("", "gemini auto, zero3 fits").first, zero3_params);
  with_budget((zero3 + zero3_nvme) / 2, true);
  const auto [params, state] = run("", "gemini auto, zero3 with moments on NVMe");
  EXPECT_EQ(params, zero3_params);
  EXPECT_LT(state, zero3_state);
  // Nothing fits: a clear error that says what each layout needs.
  with_budget(zero3_nvme / 2, true);
  const auto none = llamad::testing::RunCommand(std::string(LLAMA_TRAIN_BIN) + " train --config " +
                                                (dir_ / "job.yaml").string() + " --nproc 2 --threads 1");
  EXPECT_NE(none.exit_code, 0) << none.output;
  EXPECT_NE(none.output.find("no layout fits"), std::string::npos) << none.output;
}

TEST_F(DdpTest, CheckpointAtWorldSizeFourResumesAtTwoAndThree) {
  // The uninterrupted world-size-4 run saves at steps 10 and 20.
  const auto uninterrupted = Train("--nproc 4 --threads 1 -i 10");
  ASSERT_EQ(uninterrupted.size(), 20u);
  const std::vector<double> tail(uninterrupted.begin() + 10, uninterrupted.end());
  const fs::path step10 = dir_ / "ckpt" / "ddp" / "step-10";
  ASSERT_TRUE(fs::exists(step10));
  // Each rank wrote its own part; rank 0 committed them (nothing else is left over).
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(step10)) files.push_back(e.path().filename().string());
  std::sort(files.begin(), files.end());
  EXPECT_EQ(files, (std::vector<std::string>{"rank-0.shard", "rank-1.shard", "rank-2.shard", "rank-3.shard"}));
  for (int world : {2, 3}) {
    // From step 10, saving nothing (the store stays as it is for the next resume).
    const auto resumed = Train("--nproc " + std::to_string(world) + " --threads 1 -i 0 -f " + step10.string());
    ExpectSameCurve(resumed, tail, world == 2 ? "resumed at world size 2" : "resumed at world size 3");
  }
}

// Under ZeRO each rank reads its own moments after rank 0 restored the weights. A damaged
// moment piece in the newest checkpoint stops every rank, naming the damage, or with
// --resume-fallback sends all of them back to the previous checkpoint together.
TEST_F(DdpTest, ADamagedMomentPieceStopsOrFallsBackOnEveryRank) {
  const auto saved = Train("-p zero1 --nproc 2 --threads 1 -i 10");
  ASSERT_EQ(saved.size(), 20u);
  // Flip a byte in the first AdamW moment piece of rank 1's shard of step 20.
  const fs::path shard = dir_ / "ckpt" / "ddp" / "step-20" / "rank-1.shard";
  uint64_t offset = 0;
  {
    auto store = llamad::storage::CheckpointStore::Open((dir_ / "ckpt").string(), {2, /*read_only=*/true});
    ASSERT_TRUE(store.ok()) << store.status();
    const auto pieces = (*store)->Pieces("ddp", 20);
    ASSERT_TRUE(pieces.ok()) << pieces.status();
    for (const auto& piece : *pieces) {
      if (piece.rank == 1 && piece.name.starts_with("optimizer.exp_avg.")) {
        offset = piece.offset + 1;
        break;
      }
    }
  }
  ASSERT_GT(offset, 0u);
  ASSERT_TRUE(llamad::testing::FlipByte(shard.string(), offset));

  llamad::testing::Subprocess refused(std::string(LLAMA_TRAIN_BIN) + " train --config " + (dir_ / "job.yaml").string() +
                                      " --log-format json -p zero1 --nproc 2 --threads 1 -i 0 -f latest");
  const std::string output = refused.Drain();
  EXPECT_NE(refused.Wait(), 0) << output;
  EXPECT_NE(output.find("rank-1.shard"), std::string::npos) << output;
  // With the fallback: step 10 on every rank, then the uninterrupted curve.
  const std::vector<double> tail(saved.begin() + 10, saved.end());
  ExpectSameCurve(Train("-p zero1 --nproc 2 --threads 1 -i 0 -f latest --resume-fallback"), tail,
                  "zero1 fallback to step 10");
}

TEST_F(DdpTest, AKilledRankStopsTheJobWithinSeconds) {
  llamad::testing::Subprocess p(std::string(LLAMA_TRAIN_BIN) + " train --config " +
                                (dir_ / "job.yaml").string() +
                                " --log-format json --nproc 3 --threads 1 --steps 100000");
  // Wait until training runs, then kill one rank (a child of the launcher).
  bool running = false;
  while (auto line = p.ReadLine(60)) {
    if (line->starts_with("{")) {
      running = true;
      break;
    }
  }
  ASSERT_TRUE(running) << p.output();
  std::ifstream children("/proc/" + std::to_string(p.pid()) + "/task/" + std::to_string(p.pid()) + "/children");
  std::vector<pid_t> ranks;
  for (pid_t pid; children >> pid;) ranks.push_back(pid);
  ASSERT_EQ(ranks.size(), 3u);
  const auto killed = std::chrono::steady_clock::now();
  ASSERT_EQ(::kill(ranks[1], SIGKILL), 0);
  while (p.ReadLine(30)) {
  }
  const int code = p.Wait();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - killed).count();
  EXPECT_NE(code, 0);
  EXPECT_LT(seconds, 15.0);
  EXPECT_NE(p.output().find("rank 1 of 3 was killed by signal 9"), std::string::npos) << p.output();
  std::printf("job stopped %.2f s after rank 1 was killed\n", seconds);
}

// A rank that stops answering without dying (SIGSTOP: hung, or cut off while its
// connections stay open) ends its peers after the job's parallel.collective_timeout_s,
// as having lost a peer (75), instead of after the default ten minutes. The timeout runs
// from when rank 0 began to wait, which may be before the stop.
TEST_F(DdpTest, ARankThatStopsAnsweringEndsItsPeersAfterTheCollectiveTimeout) {
  std::ofstream(dir_ / "job.yaml", std::ios::app) << "parallel: {collective_timeout_s: 10}\n";
  llamad::testing::Subprocess p(std::string(LLAMA_TRAIN_BIN) + " train --config " + (dir_ / "job.yaml").string() +
                                " --log-format json --nproc 2 --threads 1 --steps 100000");
  const double seconds = llamad::testing::SecondsUntilRank0LeavesAStoppedRank1(p, 40);
  ASSERT_GE(seconds, 5.0) << p.output();
  EXPECT_NE(p.output().find("stopped answering"), std::string::npos) << p.output();
  std::printf("rank 0 gave up on its stopped peer %.2f s after it stopped (timeout 10 s)\n", seconds);
}

}  // namespace
