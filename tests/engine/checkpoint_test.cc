// Training checkpoints end to end: exact resume (in process and across a SIGKILL),
// crash consistency under random kills, corruption, and Hugging Face round trips.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <thread>

#include "backend/cpu/cpu_backend.h"
#include "common/scratch_dir.h"
#include "common/flip_byte.h"
#include "common/process_table.h"
#include "common/step_losses.h"
#include "common/subprocess.h"
#include "engine/small_job.h"
#include "core/rng.h"
#include "data/dataset.h"
#include "storage/checkpoint_store.h"
#include "train/checkpointing.h"

namespace llamad {
namespace {
namespace fs = std::filesystem;
using testing::Subprocess;

fs::path FreshDir(const std::string& name) {
  const fs::path dir = testing::ScratchDir("llamad-ckpt") / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

using testing::SmallJob;
using testing::Tokens;

TEST(CheckpointTrainingTest, ResumeIsBitIdentical) {
  const TokenDataset data = TokenDataset::FromTokens(Tokens(4000, 40));
  auto be = MakeCpuBackend({DType::kF32, 2});
  std::vector<double> straight;
  {
    auto t = *Trainer::Create(SmallJob(20), be.get(), 0);
    ASSERT_TRUE(t->Train(data, [&](const StepMetrics& m) {
      straight.push_back(m.loss);
      return absl::OkStatus();
    }).ok());
  }
  const fs::path root = FreshDir("inprocess");
  auto store = *storage::CheckpointStore::Open(root.string());
  std::vector<double> resumed;
  {
    auto t = *Trainer::Create(SmallJob(20), be.get(), 0);
    AsyncCheckpointer checkpointer(store.get(), "resume");
    ASSERT_TRUE(t->Train(data, [&](const StepMetrics& m) -> absl::Status {
      resumed.push_back(m.loss);
      if (m.step == 10) {
        if (auto s = checkpointer.Save(*t); !s.ok()) return s.status();
        return absl::CancelledError("stop after the save");  // the "kill"
      }
      return absl::OkStatus();
    }).code() == absl::StatusCode::kCancelled);
    ASSERT_TRUE(checkpointer.Wait().ok());
  }
  auto t = *Trainer::Create(SmallJob(20), be.get(), 0);
  ASSERT_TRUE(RestoreCheckpoint(*store, "resume", 10, *t).ok());
  EXPECT_EQ(t->step(), 10);
  ASSERT_TRUE(t->Train(data, [&](const StepMetrics& m) {
    resumed.push_back(m.loss);
    return absl::OkStatus();
  }).ok());
  ASSERT_EQ(resumed.size(), 20u);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(resumed[i], straight[i]) << "step " << i + 1;

  // A checkpoint of another model or seed is refused, naming the difference.
  JobSpec other = SmallJob(20);
  other.model.hidden_size = 64;
  auto wrong = *Trainer::Create(other, be.get(), 0);
  const auto s = RestoreCheckpoint(*store, "resume", 10, *wrong);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("hidden_size"), std::string::npos) << s;
  other = SmallJob(20);
  other.training.seed = 1;
  EXPECT_NE(RestoreCheckpoint(*store, "resume", 10, **Trainer::Create(other, be.get(), 0)).message().find("seed"),
            std::string::npos);
}

// Trains `t` to its last step and saves that step, with the sample tokenizer, as `job`.
void TrainAndSave(Trainer& t, const TokenDataset& data, storage::CheckpointStore& store, const std::string& job) {
  ASSERT_TRUE(t.Train(data, [](const StepMetrics&) { return absl::OkStatus(); }).ok());
  AsyncCheckpointer checkpointer(&store, job);
  checkpointer.set_tokenizer_model(std::string(data::SampleTokenizer()));
  ASSERT_TRUE(checkpointer.Save(t).ok());
  ASSERT_TRUE(checkpointer.Wait().ok());
}

TEST(CheckpointTrainingTest, HuggingFaceExportImportIsExact) {
  auto be = MakeCpuBackend({DType::kF32, 2});
  const TokenDataset data = TokenDataset::FromTokens(Tokens(2000, 40));
  const fs::path root = FreshDir("hf");
  auto store = *storage::CheckpointStore::Open(root.string());
  auto t = *Trainer::Create(SmallJob(3), be.get(), 0);
  const std::string tokenizer(data::SampleTokenizer());
  TrainAndSave(*t, data, *store, "resume");
  const std::string out = (root / "hf-out").string();
  bool with_tokenizer = false;
  ASSERT_TRUE(ExportHuggingFace(*store, "resume", 3, out, &with_tokenizer).ok());
  // The tokenizer travels with the checkpoint into the export, as a LlamaTokenizer.
  EXPECT_TRUE(with_tokenizer);
  std::ifstream exported_tokenizer(fs::path(out) / "tokenizer.model", std::ios::binary);
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(exported_tokenizer), {}), tokenizer);
  std::ifstream tokenizer_config(fs::path(out) / "tokenizer_config.json");
  const auto tc = nlohmann::json::parse(tokenizer_config, nullptr, false);
  EXPECT_EQ(tc.value("tokenizer_class", ""), "LlamaTokenizer");
  EXPECT_EQ(tc.value("bos_token", ""), "<s>");
  EXPECT_EQ(tc.value("eos_token", ""), "</s>");
  EXPECT_TRUE(fs::exists(fs::path(out) / "special_tokens_map.json"));
  auto config = ReadHuggingFaceConfig(out);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->NumParameters(), t->model().config().NumParameters());
  LlamaModel imported(*config, be.get());
  ASSERT_TRUE(LoadHuggingFaceWeights(out, imported, *be).ok());
  EXPECT_EQ(0, std::memcmp(imported.param_data(), t->model().param_data(), t->model().num_params() * 4));
  // A shape mismatch names the tensor.
  ModelConfig bigger = *config;
  bigger.intermediate_size = 64;
  LlamaModel wrong(bigger, be.get());
  const auto s = LoadHuggingFaceWeights(out, wrong, *be);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("mlp.gate_proj.weight"), std::string::npos) << s;
}

// Metadata or index records that a damaged store could hold are errors that name the
// checkpoint and what is wrong; none of them reads outside what was saved.
TEST(CheckpointTrainingTest, DamagedMetadataIsAnErrorForRestoreAndExport) {
  auto be = MakeCpuBackend({DType::kF32, 2});
  const TokenDataset data = TokenDataset::FromTokens(Tokens(2000, 40));
  const fs::path root = FreshDir("damaged-meta");
  auto store = *storage::CheckpointStore::Open(root.string());
  TrainAndSave(**Trainer::Create(SmallJob(3), be.get(), 0), data, *store, "job");
  const auto meta = nlohmann::json::parse(*store->Meta("job", 3));
  const auto pieces = *store->Pieces("job", 3);
  const std::string out = (root / "hf-out").string();
  auto restore = [&] { return RestoreCheckpoint(*store, "job", 3, **Trainer::Create(SmallJob(3), be.get(), 0)); };
  auto export_hf = [&] { return ExportHuggingFace(*store, "job", 3, out, nullptr); };
  // What restore's and export's errors name; nullptr: that one succeeds.
  struct Case {
    const char* what;
    std::function<void(nlohmann::json&)> edit;
    const char *restore_error, *export_error;
  };
  const std::vector<Case> cases = {
      // A resume removes the checkpoints newer than the step it restored.
      {"an optimizer step that is not the index's", [](nlohmann::json& m) { m["optimizer"]["step"] = 1; },
       "optimizer step 1", "optimizer step 1"},
      {"a step that is not the index's", [](nlohmann::json& m) { m["step"] = 7; }, "step 7", "step 7"},
      // The sampler is the trainer's, not the exported model's.
      {"a negative sampler position", [](nlohmann::json& m) { m["data"]["sampler_position"] = -1; },
       "sampler_position", nullptr},
      {"no model", [](nlohmann::json& m) { m.erase("model"); }, "no model configuration", "no model configuration"},
      {"a model that is not an object", [](nlohmann::json& m) { m["model"] = "tiny"; }, "no model configuration",
       "no model configuration"},
      {"another format", [](nlohmann::json& m) { m["format"] = "other"; }, "llamad checkpoint", "llamad checkpoint"},
      // Valid, but far larger than the saved tensors: 2^37 parameters would be allocated.
      // A restore compares it with its own model first.
      {"a model larger than its tensors", [](nlohmann::json& m) { m["model"]["vocab_size"] = int64_t{1} << 30; },
       "the checkpoint's model has vocab_size", "which the checkpoint's model needs"},
  };
  for (const Case& c : cases) {
    nlohmann::json damaged = meta;
    c.edit(damaged);
    ASSERT_TRUE(store->Commit("job", 3, damaged.dump(), pieces).ok());
    for (const auto& [error, s] : {std::pair{c.restore_error, restore()}, std::pair{c.export_error, export_hf()}}) {
      if (error == nullptr) {
        EXPECT_TRUE(s.ok()) << c.what << ": " << s;
        continue;
      }
      ASSERT_FALSE(s.ok()) << c.what;
      EXPECT_NE(s.message().find(store->StepDir("job", 3)), std::string::npos) << s;
      EXPECT_NE(s.message().find(error), std::string::npos) << s;
    }
  }
  ASSERT_TRUE(store->Commit("job", 3, meta.dump(), pieces).ok());
  ASSERT_TRUE(restore().ok());
  ASSERT_TRUE(export_hf().ok());
  // The tokenizer's record sizes the export's buffer: a shape its pieces do not fill is
  // damage, not an allocation of 2^50 bytes, and found before any file is written.
  fs::remove_all(out);
  for (const int64_t bad : {int64_t{1} << 50, int64_t{-1}, int64_t{5}}) {
    auto damaged = pieces;
    for (auto& p : damaged) {
      if (p.name == kTokenizerTensor) p.shape = {bad};
    }
    ASSERT_TRUE(store->Commit("job", 3, meta.dump(), damaged).ok());
    const auto s = export_hf();
    ASSERT_TRUE(absl::IsDataLoss(s)) << s;
    EXPECT_NE(s.message().find(kTokenizerTensor), std::string::npos) << s;
    EXPECT_FALSE(fs::exists(out)) << bad;
  }
}

// ---- llama-train as a process ------------------------------------------------------

std::string WriteJob(const fs::path& dir, int64_t steps, int64_t interval, int64_t vocab_size = 40) {
  std::string tokens;
  for (int32_t id : Tokens(6000, 40)) tokens.append(reinterpret_cast<const char*>(&id), 4);
  std::ofstream(dir / "tokens.u32", std::ios::binary) << tokens;
  const std::string path = (dir / "job.yaml").string();
  std::ofstream(path) << "name: proc\n"
                      << "model: {hidden_size: 32, intermediate_size: 48, num_hidden_layers: 2,\n"
                      << "        num_attention_heads: 4, num_key_value_heads: 2, vocab_size: " << vocab_size << ",\n"
                      << "        max_position_embeddings: 64}\n"
                      << "training: {max_length: 16, batch_size: 2, global_batch_size: 4, steps: " << steps
                      << ", lr: 3.0e-3, warmup_steps: 3}\n"
                      << "data: {dataset: tokens.u32}\n"
                      << "checkpoint: {dir: ckpt, interval: " << interval << "}\n";
  return path;
}

std::string Train(const std::string& args) { return std::string(LLAMA_TRAIN_BIN) + " train --threads 2 " + args; }
std::string Export(const fs::path& step, const std::string& hf) {
  return std::string(LLAMA_TRAIN_BIN) + " export --load " + step.string() + " --hf " + hf;
}

using llamad::testing::ReadUpToStep;
using llamad::testing::StepLosses;

TEST(CheckpointProcessTest, KilledAfterASaveResumesBitIdentically) {
  const fs::path a = FreshDir("proc-straight"), b = FreshDir("proc-killed");
  Subprocess straight(Train("--config " + WriteJob(a, 20, 0) + " --log-format json"));
  const auto expected = StepLosses(straight.Drain());
  ASSERT_EQ(straight.Wait(), 0) << straight.Drain();
  ASSERT_EQ(expected.size(), 20u);

  const std::string job = WriteJob(b, 20, 10);
  std::map<int64_t, double> got;
  {
    Subprocess first(Train("--config " + job + " --log-format json"));
    while (auto line = first.ReadLine()) {
      if (line->find("checkpoint step 10 committed") != std::string::npos) {
        first.Kill(SIGKILL);
        break;
      }
    }
    EXPECT_EQ(first.Wait(), 128 + SIGKILL) << first.Drain();
    for (const auto& [step, loss] : StepLosses(first.Drain())) {
      if (step <= 10) got[step] = loss;
    }
  }
  Subprocess second(Train("--config " + job + " --log-format json -f latest"));
  const std::string output = second.Drain();
  ASSERT_EQ(second.Wait(), 0) << output;
  EXPECT_NE(output.find("resumed job 'proc' at step 10"), std::string::npos) << output;
  for (const auto& [step, loss] : StepLosses(output)) got[step] = loss;
  ASSERT_EQ(got.size(), 20u);
  for (const auto& [step, loss] : expected) EXPECT_EQ(got[step], loss) << "step " << step;
}

// What a run of `args` printed up to its step line of `last_step`, after which it was
// killed (SIGKILL).
std::string OutputUpTo(const std::string& args, int64_t last_step) {
  Subprocess run(Train(args + " --log-format json"));
  EXPECT_GE(ReadUpToStep(run, last_step), last_step) << run.Drain();
  run.Kill(SIGKILL);
  run.Wait();
  return run.output();
}

// A run of `args` with -f latest, up to `last_step` (OutputUpTo), which must say that it
// resumed job "proc" at step `from`: its losses from there.
std::map<int64_t, double> ResumedLossesUpTo(const std::string& args, int64_t from, int64_t last_step) {
  const std::string output = OutputUpTo(args + " -f latest", last_step);
  EXPECT_NE(output.find("resumed job 'proc' at step " + std::to_string(from)), std::string::npos) << output;
  const auto losses = StepLosses(output);
  EXPECT_TRUE(!losses.empty() && losses.begin()->first == from + 1) << output;
  return losses;
}

// That job "proc"'s newest checkpoint under `root` is `step`, and intact. The store is
// closed again on return: a run cannot open it while another process holds it.
void ExpectLatestCheckpoint(const fs::path& root, int64_t step) {
  auto store = storage::CheckpointStore::Open(root.string());
  ASSERT_TRUE(store.ok()) << store.status();
  auto latest = (*store)->LatestStep("proc");
  ASSERT_TRUE(latest.ok()) << latest.status();
  EXPECT_EQ(*latest, step);
  EXPECT_TRUE((*store)->Verify("proc", step).ok());
}

// A run asked to stop (SIGTERM, as its node's daemon sends when the machine is preempted
// or the job is resized) finishes the step in flight, saves it and exits as the signal
// would have ended it; -f latest goes on from that step with the losses of a run never
// stopped.
TEST(CheckpointProcessTest, AStoppedRunSavesItsLastStepAndResumesFromItBitIdentically) {
  const fs::path dir = FreshDir("proc-stopped");
  const std::string job = WriteJob(dir, 100000, 100000);  // no save but the stop's
  std::map<int64_t, double> got;
  int64_t stopped = 0;
  {
    Subprocess first(Train("--config " + job + " --log-format json"));
    ASSERT_GE(ReadUpToStep(first, 3), 3) << first.Drain();
    first.Kill(SIGTERM);
    const std::string output = first.Drain();
    EXPECT_EQ(first.Wait(), 128 + SIGTERM) << output;
    got = StepLosses(output);
    ASSERT_FALSE(got.empty()) << output;
    stopped = got.rbegin()->first;
    EXPECT_NE(output.find("asked to stop; the ranks stop after the step in flight and save it"), std::string::npos)
        << output;
    EXPECT_NE(output.find("checkpoint step " + std::to_string(stopped) + " committed"), std::string::npos) << output;
    EXPECT_NE(output.find("stopped after step " + std::to_string(stopped) + " of 100000"), std::string::npos)
        << output;
  }
  ExpectLatestCheckpoint(dir / "ckpt", stopped);
  for (const auto& [step, loss] : ResumedLossesUpTo("--config " + job, stopped, stopped + 2)) got[step] = loss;
  const auto straight =
      StepLosses(OutputUpTo("--config " + WriteJob(FreshDir("proc-not-stopped"), 100000, 0), stopped + 2));
  ASSERT_GE(straight.size(), size_t(stopped + 2));
  for (int64_t step = 1; step <= stopped + 2; ++step) EXPECT_EQ(got[step], straight.at(step)) << "step " << step;
}

// Under llamad (which passes its stop_grace_ms as LLAMAD_STOP_GRACE_MS) rank 0 says when
// a stop could not finish its step and save it within that grace, from the steps and the
// saves it measures; a grace that is long enough says nothing.
TEST(CheckpointProcessTest, ARunSaysWhenAStopWouldNotFitLlamadsGrace) {
  const fs::path dir = FreshDir("proc-grace");
  const std::string job = WriteJob(dir, 6, 2);
  const std::string warning = "warning: a stop would take about";
  for (const int64_t grace_ms : {int64_t(0), int64_t(600'000), int64_t(-1)}) {
    fs::remove_all(dir / "ckpt");
    const std::string env = grace_ms >= 0 ? "env LLAMAD_STOP_GRACE_MS=" + std::to_string(grace_ms) + " "
                                          : "env -u LLAMAD_STOP_GRACE_MS ";
    Subprocess run(env + Train("--config " + job + " --log-format json"));
    const std::string output = run.Drain();
    ASSERT_EQ(run.Wait(), 0) << output;
    for (int step : {2, 4, 6}) {
      EXPECT_NE(output.find("checkpoint step " + std::to_string(step) + " committed in "), std::string::npos)
          << output;
    }
    const size_t at = output.find(warning);
    if (grace_ms == 0) {
      ASSERT_NE(at, std::string::npos) << output;
      EXPECT_EQ(output.find(warning, at + 1), std::string::npos) << "said once: " << output;
      EXPECT_NE(output.find("to save and commit step 2), longer than llamad's stop_grace_ms of 0.0 s"),
                std::string::npos)
          << output;
    } else {
      EXPECT_EQ(at, std::string::npos) << "grace " << grace_ms << " ms: " << output;
    }
  }
}

// Of two ranks only rank 1 is asked to stop: both stop after the same step, rank 0
// (which was not asked) commits it, and the job resumes from it.
TEST(CheckpointProcessTest, RanksStopAfterTheSameStepWhenOneIsAsked) {
  const fs::path dir = FreshDir("proc-stopped-ranks");
  const std::string job = WriteJob(dir, 100000, 100000);
  Subprocess run(Train("--config " + job + " --log-format json --nproc 2"));
  ASSERT_GE(ReadUpToStep(run, 3), 3) << run.Drain();
  const pid_t rank1 = testing::LaunchedRank(run.pid(), 1);
  ASSERT_GT(rank1, 0) << "rank 1 of the launcher " << run.pid() << " not found";
  ::kill(rank1, SIGTERM);
  const std::string output = run.Drain();
  // The launcher ends as its asked rank did, and signals no rank itself: they stop alone.
  EXPECT_EQ(run.Wait(), 128 + SIGTERM) << output;
  EXPECT_EQ(output.find("rank 0: asked to stop"), std::string::npos) << output;
  const auto losses = StepLosses(output);
  ASSERT_FALSE(losses.empty()) << output;
  const int64_t stopped = losses.rbegin()->first;
  EXPECT_NE(output.find("rank 1: asked to stop"), std::string::npos) << output;
  EXPECT_NE(output.find("stopped after step " + std::to_string(stopped) + " of 100000"), std::string::npos) << output;
  EXPECT_NE(output.find("rank 0 stopped with the rank that was asked to"), std::string::npos) << output;
  ExpectLatestCheckpoint(dir / "ckpt", stopped);
  ResumedLossesUpTo("--config " + job + " --nproc 2", stopped, stopped + 1);
}

// A run whose checkpoint store another process still holds (the job's previous run
// saving the step it stopped after, on other devices) waits for it rather than failing.
TEST(CheckpointProcessTest, ARunWaitsForTheStoreThatItsPreviousRunStillHolds) {
  const fs::path dir = FreshDir("proc-store-held");
  const std::string job = WriteJob(dir, 6, 2);
  {
    Subprocess first(Train("--config " + job + " --steps 4"));
    const std::string output = first.Drain();
    ASSERT_EQ(first.Wait(), 0) << output;
  }
  auto held = storage::CheckpointStore::Open((dir / "ckpt").string());
  ASSERT_TRUE(held.ok()) << held.status();
  Subprocess second(Train("--config " + job + " -f latest"));
  bool waits = false;
  while (auto line = second.ReadLine()) {
    if (line->find("another process holds the checkpoint index") != std::string::npos) {
      waits = true;
      break;
    }
  }
  ASSERT_TRUE(waits) << second.Drain();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  held->reset();  // the previous run exits
  const std::string output = second.Drain();
  EXPECT_EQ(second.Wait(), 0) << output;
  EXPECT_NE(output.find("resumed job 'proc' at step 4"), std::string::npos) << output;
  // A store whose index is gone is not one that another process holds: refused at once.
  fs::remove_all(dir / "ckpt" / "index");
  const auto no_index = testing::RunCommand(Train("--config " + job + " -f latest"));
  EXPECT_EQ(no_index.exit_code, 2) << no_index.output;
  EXPECT_NE(no_index.output.find("no checkpoint index"), std::string::npos) << no_index.output;
  EXPECT_EQ(no_index.output.find("another process"), std::string::npos) << no_index.output;
}

// Kills a job that saves after every step at random moments, `trials` times, resuming
// each time: every committed checkpoint must verify, and none may be lost.
void KillSavingJobRepeatedly(const std::string& name, int nproc, int trials) {
  const fs::path dir = FreshDir(name);
  const std::string job = WriteJob(dir, 100000, 1);  // save after every step
  std::mt19937 rng(7);
  int64_t latest = -1;
  int trials_with_progress = 0;
  for (int trial = 0; trial < trials; ++trial) {
    {
      Subprocess p(Train("--config " + job + " -f latest --nproc " + std::to_string(nproc)));
      std::this_thread::sleep_for(std::chrono::milliseconds(200 + rng() % 1000));
      p.Kill(SIGKILL);
      p.Wait();
      p.Drain();  // until its ranks (which die with the launcher) have closed the output too
    }
    auto store = storage::CheckpointStore::Open((dir / "ckpt").string());
    ASSERT_TRUE(store.ok()) << store.status();
    auto steps = (*store)->Steps("proc");
    ASSERT_TRUE(steps.ok());
    if (steps->empty()) {
      EXPECT_EQ(latest, -1) << "trial " << trial << " lost every checkpoint";
      continue;
    }
    for (int64_t step : *steps) {
      const auto s = (*store)->Verify("proc", step);
      EXPECT_TRUE(s.ok()) << "trial " << trial << " step " << step << ": " << s;
    }
    EXPECT_GE(steps->back(), latest) << "trial " << trial << " lost the newest checkpoint";
    trials_with_progress += steps->back() > latest;
    latest = steps->back();
  }
  EXPECT_GE(trials_with_progress, 2) << "the kills came too early to test anything";
}

TEST(CheckpointProcessTest, RandomKillsNeverLeaveABrokenOrLostCheckpoint) {
  KillSavingJobRepeatedly("proc-crash", 1, 16);
}

// Two ranks each write their shard and rank 0 commits both: a kill of the job between the
// two writes or before the commit must leave the previous checkpoint as it was.
TEST(CheckpointProcessTest, RandomKillsOfTwoRanksNeverLeaveABrokenOrLostCheckpoint) {
  KillSavingJobRepeatedly("proc-crash-2", 2, 10);
}

// The steps of `job` committed in the store at `root` (none when it cannot be read).
std::vector<int64_t> SavedSteps(const fs::path& root, const std::string& job) {
  // Read-only: a look that removes nothing, in tests of what runs remove.
  auto store = storage::CheckpointStore::Open(root.string(), {.read_only = true});
  if (!store.ok()) return {};
  auto steps = (*store)->Steps(job);
  return steps.ok() ? *steps : std::vector<int64_t>{};
}

// Resuming an older step of the job's own store (with steps left to train) would remove
// the newer checkpoints, which are committed work: refused, with nothing removed, unless
// --discard-newer asks.
TEST(CheckpointProcessTest, ResumingAnOlderStepRemovesNewerCheckpointsOnlyWhenAsked) {
  const fs::path dir = FreshDir("proc-older");
  const std::string job = WriteJob(dir, 6, 3);
  const auto saved = testing::RunCommand(Train("--config " + job));
  ASSERT_EQ(saved.exit_code, 0) << saved.output;
  const std::string three = (dir / "ckpt" / "proc" / "step-3").string();
  auto steps = [&] { return SavedSteps(dir / "ckpt", "proc"); };
  ASSERT_EQ(steps(), (std::vector<int64_t>{3, 6}));

  const auto refused = testing::RunCommand(Train("--config " + job + " -f " + three));
  EXPECT_EQ(refused.exit_code, 2) << refused.output;
  EXPECT_NE(refused.output.find("newest: step 6"), std::string::npos) << refused.output;
  EXPECT_NE(refused.output.find("--discard-newer"), std::string::npos) << refused.output;
  EXPECT_EQ(steps(), (std::vector<int64_t>{3, 6}));

  // Asked, but the run cannot start (an offload tier that cannot be set up, which ddp ranks
  // find after the restore), or has nothing to train: nothing is removed either.
  const std::string nvme_job = (dir / "nvme.yaml").string();
  std::ofstream(nvme_job) << std::ifstream(job).rdbuf() << "offload: {optimizer: nvme, nvme_path: tokens.u32/swap}\n";
  const auto no_swap =
      testing::RunCommand(Train("--config " + nvme_job + " -f " + three + " --discard-newer -p ddp --nproc 2"));
  EXPECT_EQ(no_swap.exit_code, 2) << no_swap.output;
  EXPECT_NE(no_swap.output.find("no such folder for the NVMe swap file"), std::string::npos) << no_swap.output;
  EXPECT_EQ(steps(), (std::vector<int64_t>{3, 6}));
  // Not asked, a run with nothing to train is not refused either: it would remove nothing.
  for (const char* discard : {" --discard-newer", ""}) {
    const auto nothing = testing::RunCommand(Train("--config " + job + " -f " + three + discard + " --steps 3"));
    EXPECT_EQ(nothing.exit_code, 0) << discard << "\n" << nothing.output;
    EXPECT_NE(nothing.output.find("nothing to train"), std::string::npos) << discard << "\n" << nothing.output;
    EXPECT_EQ(steps(), (std::vector<int64_t>{3, 6})) << discard;
  }
  // Unless it may fall back: a damaged step 3 would leave steps to train from step 2.
  const auto may_fall_back =
      testing::RunCommand(Train("--config " + job + " -f " + three + " --resume-fallback --steps 3"));
  EXPECT_EQ(may_fall_back.exit_code, 2) << may_fall_back.output;
  EXPECT_NE(may_fall_back.output.find("--discard-newer"), std::string::npos) << may_fall_back.output;
  EXPECT_EQ(steps(), (std::vector<int64_t>{3, 6}));

  const auto asked = testing::RunCommand(Train("--config " + job + " -f " + three + " --discard-newer --steps 4"));
  EXPECT_EQ(asked.exit_code, 0) << asked.output;
  EXPECT_NE(asked.output.find("removed checkpoint step 6"), std::string::npos) << asked.output;
  EXPECT_EQ(steps(), (std::vector<int64_t>{3, 4}));

  // A job already at its last step says there is nothing to train.
  const auto done = testing::RunCommand(Train("--config " + job + " -f latest --steps 4"));
  EXPECT_EQ(done.exit_code, 0) << done.output;
  EXPECT_NE(done.output.find("job 'proc' is at step 4 already"), std::string::npos) << done.output;
}

TEST(CheckpointProcessTest, CorruptionIsRefusedOrFallsBackWhenAsked) {
  const fs::path dir = FreshDir("proc-corrupt");
  const std::string job = WriteJob(dir, 6, 3);
  Subprocess run(Train("--config " + job));
  const std::string out = run.Drain();
  ASSERT_EQ(run.Wait(), 0) << out;
  const std::string shard = (dir / "ckpt" / "proc" / "step-6" / "rank-0.shard").string();
  uint64_t offset = 0;  // a byte inside the LM head's payload
  {
    auto store = *storage::CheckpointStore::Open((dir / "ckpt").string());
    const auto pieces = store->Pieces("proc", 6);  // kept alive for the loop
    ASSERT_TRUE(pieces.ok()) << pieces.status();
    for (const auto& piece : *pieces) {
      if (piece.name == "lm_head.weight") offset = piece.offset + piece.length / 2;
    }
    ASSERT_GT(offset, 0u);
  }
  ASSERT_TRUE(llamad::testing::FlipByte(shard, offset));
  Subprocess refused(Train("--config " + job + " -f latest --steps 8"));
  const std::string message = refused.Drain();
  EXPECT_EQ(refused.Wait(), 2) << message;
  EXPECT_NE(message.find(shard), std::string::npos) << message;
  EXPECT_NE(message.find("checksum"), std::string::npos) << message;
  EXPECT_NE(message.find("tensor 'lm_head.weight'"), std::string::npos) << message;

  // eval of a damaged checkpoint is refused the same way.
  Subprocess eval(std::string(LLAMA_TRAIN_BIN) + " eval --config " + job + " --tokens " +
                  (dir / "tokens.u32").string() + " --load latest");
  const std::string eval_out = eval.Drain();
  EXPECT_EQ(eval.Wait(), 2) << eval_out;
  EXPECT_NE(eval_out.find("checksum"), std::string::npos) << eval_out;

  Subprocess fallback(Train("--config " + job + " -f latest --resume-fallback --steps 8"));
  const std::string resumed = fallback.Drain();
  EXPECT_EQ(fallback.Wait(), 0) << resumed;
  EXPECT_NE(resumed.find("falling back to checkpoint step 3"), std::string::npos) << resumed;
  EXPECT_NE(resumed.find("resumed job 'proc' at step 3"), std::string::npos) << resumed;
  EXPECT_NE(resumed.find("removed checkpoint step 6"), std::string::npos) << resumed;
  // The new history saved steps 6 and 8 afresh; everything committed verifies.
  auto store = *storage::CheckpointStore::Open((dir / "ckpt").string());
  const auto steps = store->Steps("proc");  // kept alive for the loop
  ASSERT_TRUE(steps.ok());
  EXPECT_EQ(*steps, (std::vector<int64_t>{6, 8}));
  for (int64_t step : *steps) EXPECT_TRUE(store->Verify("proc", step).ok()) << step;
}

TEST(CheckpointProcessTest, ExistingCheckpointsAreNeverOverwrittenSilently) {
  const fs::path dir = FreshDir("proc-rerun");
  const std::string job = WriteJob(dir, 4, 2);
  Subprocess first(Train("--config " + job));
  ASSERT_EQ(first.Wait(), 0) << first.Drain();
  Subprocess again(Train("--config " + job));
  const std::string out = again.Drain();
  EXPECT_EQ(again.Wait(), 2) << out;
  EXPECT_NE(out.find("already has checkpoints (newest: step 4)"), std::string::npos) << out;
  // The checkpoints are looked at before the data: the run says what is wrong with them
  // at once, not after preparing a corpus.
  const auto no_data = testing::RunCommand(Train("--config " + job + " -d missing.u32"));
  EXPECT_EQ(no_data.exit_code, 2) << no_data.output;
  EXPECT_NE(no_data.output.find("already has checkpoints"), std::string::npos) << no_data.output;
  // --fresh removes them only once the rest of the run's input has been opened: a typo
  // in the data path loses no committed step.
  const auto fresh_no_data = testing::RunCommand(Train("--config " + job + " --fresh -d missing.u32"));
  EXPECT_EQ(fresh_no_data.exit_code, 2) << fresh_no_data.output;
  EXPECT_NE(fresh_no_data.output.find("missing.u32"), std::string::npos) << fresh_no_data.output;
  EXPECT_EQ(SavedSteps(dir / "ckpt", "proc"), (std::vector<int64_t>{2, 4}));
  // Nor does an offload tier that cannot be set up, which the run finds after the data.
  const std::string nvme_job = (dir / "nvme.yaml").string();
  std::ofstream(nvme_job) << std::ifstream(job).rdbuf() << "offload: {optimizer: nvme, nvme_path: tokens.u32/swap}\n";
  const auto fresh_no_swap = testing::RunCommand(Train("--config " + nvme_job + " --fresh"));
  EXPECT_EQ(fresh_no_swap.exit_code, 2) << fresh_no_swap.output;
  EXPECT_NE(fresh_no_swap.output.find("no such folder for the NVMe swap file"), std::string::npos)
      << fresh_no_swap.output;
  EXPECT_EQ(SavedSteps(dir / "ckpt", "proc"), (std::vector<int64_t>{2, 4}));
  Subprocess fresh(Train("--config " + job + " --fresh"));
  const std::string fresh_out = fresh.Drain();
  EXPECT_EQ(fresh.Wait(), 0) << fresh_out;
  EXPECT_NE(fresh_out.find("removed 2 checkpoint(s)"), std::string::npos) << fresh_out;
  // A read-only export elsewhere leaves unrelated folders alone.
  fs::create_directories(dir / "elsewhere" / "x" / "step-1");
  Subprocess exp(Export(dir / "elsewhere/x/step-1", (dir / "hf").string()));
  const std::string exp_out = exp.Drain();
  EXPECT_EQ(exp.Wait(), 2) << exp_out;
  EXPECT_NE(exp_out.find("no checkpoint index"), std::string::npos) << exp_out;
  EXPECT_TRUE(fs::exists(dir / "elsewhere" / "x" / "step-1"));
}

TEST(CheckpointProcessTest, EvalOfACheckpointBeatsTheInitialWeights) {
  const fs::path dir = FreshDir("proc-eval");
  const std::string job = WriteJob(dir, 30, 30);
  Subprocess run(Train("--config " + job));
  ASSERT_EQ(run.Wait(), 0) << run.Drain();
  auto loss_of = [&](const std::string& extra) {
    Subprocess eval(std::string(LLAMA_TRAIN_BIN) + " eval --config " + job + " --tokens " +
                    (dir / "tokens.u32").string() + extra);
    const std::string out = eval.Drain();
    EXPECT_EQ(eval.Wait(), 0) << out;
    const auto line = out.substr(out.find('{'));
    return nlohmann::json::parse(line.substr(0, line.find('\n')))["loss"].get<double>();
  };
  const double initial = loss_of(""), trained = loss_of(" --load latest");
  EXPECT_LT(trained, initial - 0.1) << "initial " << initial << " trained " << trained;
  EXPECT_DOUBLE_EQ(loss_of(" --load " + (dir / "ckpt/proc/step-30").string()), trained);
}

TEST(CheckpointProcessTest, ExportThenInitFromHf) {
  const fs::path dir = FreshDir("proc-hf");
  const std::string job = WriteJob(dir, 2, 2);
  Subprocess run(Train("--config " + job));
  ASSERT_EQ(run.Wait(), 0) << run.Drain();
  const std::string hf = (dir / "hf").string();
  Subprocess exp(Export(dir / "ckpt/proc/step-2", hf));
  ASSERT_EQ(exp.Wait(), 0) << exp.Drain();
  EXPECT_TRUE(fs::exists(fs::path(hf) / "model.safetensors"));
  Subprocess init(Train("--config " + job + " -o " + (dir / "ckpt2").string() + " --init-from-hf " + hf +
                        " --steps 3 --log-format json"));
  const std::string out = init.Drain();
  EXPECT_EQ(init.Wait(), 0) << out;
  EXPECT_NE(out.find("weights from " + hf), std::string::npos) << out;
  // ZeRO ranks each import their own shard (zero3: of the parameters too) and go on
  // from the same weights.
  const auto expected = StepLosses(out);
  ASSERT_EQ(expected.size(), 3u) << out;
  for (const char* ranks : {"-p zero1 --nproc 3", "-p zero3 --nproc 2"}) {
    Subprocess zero(Train("--config " + job + " -o " + (dir / "ckpt3").string() + " --init-from-hf " + hf +
                          " --steps 3 --log-format json --fresh " + ranks));
    const std::string zero_out = zero.Drain();
    ASSERT_EQ(zero.Wait(), 0) << ranks << "\n" << zero_out;
    const auto got = StepLosses(zero_out);
    ASSERT_EQ(got.size(), 3u) << ranks << "\n" << zero_out;
    for (const auto& [step, loss] : expected) EXPECT_NEAR(got.at(step), loss, 1e-5 * loss) << ranks << " step " << step;
  }
  Subprocess bad(Export(dir, hf));
  const std::string bad_out = bad.Drain();
  EXPECT_EQ(bad.Wait(), 2) << bad_out;
  EXPECT_NE(bad_out.find("not a checkpoint folder"), std::string::npos) << bad_out;
  // An output folder that cannot be made (a file stands in its way) is the caller's to fix.
  Subprocess blocked(Export(dir / "ckpt/proc/step-2", job + "/hf"));
  const std::string blocked_out = blocked.Drain();
  EXPECT_EQ(blocked.Wait(), 2) << blocked_out;
  EXPECT_NE(blocked_out.find(job + "/hf: cannot create: Not a directory"), std::string::npos) << blocked_out;
  Subprocess blocked_run(Train("--config " + job + " -o " + job + "/ckpt --steps 1"));
  const std::string blocked_run_out = blocked_run.Drain();
  EXPECT_EQ(blocked_run.Wait(), 2) << blocked_run_out;
  EXPECT_NE(blocked_run_out.find(job + "/ckpt: cannot create: Not a directory"), std::string::npos)
      << blocked_run_out;
}

// A save that fails partway through a run is a failure while training (exit 1), whether
// the next save or the end of the run finds it, and whatever the cause: here a file
// stands where step 4's folder goes.
TEST(CheckpointProcessTest, AFailedSaveFailsTheRunWithExit1) {
  for (const int steps : {6, 4}) {
    const fs::path dir = FreshDir("proc-save-fails");
    const std::string job = WriteJob(dir, steps, 2);
    fs::create_directories(dir / "ckpt/proc");
    std::ofstream(dir / "ckpt/proc/step-4") << "not a folder";
    Subprocess run(Train("--config " + job));
    const std::string out = run.Drain();
    EXPECT_EQ(run.Wait(), 1) << "steps " << steps << "\n" << out;
    EXPECT_NE(out.find("step-4: cannot create"), std::string::npos) << "steps " << steps << "\n" << out;
  }
}

TEST(CheckpointProcessTest, AnExportCarriesTheTokenizerOfTheTrainingData) {
  const fs::path dir = FreshDir("proc-hf-tokenizer");
  Subprocess run(Train("--config " + WriteJob(dir, 2, 2, 4096) + " -d sample"));
  ASSERT_EQ(run.Wait(), 0) << run.Drain();
  const std::string hf = (dir / "hf").string();
  Subprocess exp(Export(dir / "ckpt/proc/step-2", hf));
  const std::string out = exp.Drain();
  ASSERT_EQ(exp.Wait(), 0) << out;
  EXPECT_NE(out.find("tokenizer.model"), std::string::npos) << out;
  std::ifstream in(fs::path(hf) / "tokenizer.model", std::ios::binary);
  std::stringstream tokenizer;
  tokenizer << in.rdbuf();
  EXPECT_EQ(tokenizer.str(), std::string(data::SampleTokenizer()));
}

}  // namespace
}  // namespace llamad
