// llama-train as a real process: exit codes and messages for bad input, and a short run.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/scratch_dir.h"
#include "common/step_losses.h"
#include "common/subprocess.h"

namespace {

using Result = llamad::testing::CommandResult;

// llama-train with `args`.
Result RunTrain(const std::string& args) { return llamad::testing::RunCommand(std::string(LLAMA_TRAIN_BIN) + " " + args); }

std::filesystem::path TempDir() {
  auto dir = llamad::testing::ScratchDir("llamad-cli-test");
  std::filesystem::create_directories(dir);
  return dir;
}

std::string WriteFile(const std::string& name, const std::string& text) {
  const auto path = TempDir() / name;
  std::ofstream(path, std::ios::binary) << text;
  return path.string();
}

// A small job over a token file of `n` ids below 50.
std::string SmallJob(const std::string& extra = "", const std::string& name = "job.yaml") {
  std::string tokens;
  for (uint32_t i = 0; i < 3000; ++i) {
    const uint32_t id = (i * 7 + i / 13) % 50;
    tokens.append(reinterpret_cast<const char*>(&id), 4);
  }
  WriteFile("tokens.u32", tokens);
  return WriteFile(name, R"(
model: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4,
        num_key_value_heads: 2, vocab_size: 64, max_position_embeddings: 128}
training: {max_length: 32, batch_size: 2, global_batch_size: 4, steps: 3, lr: 1e-3}
data: {dataset: tokens.u32}
)" + extra);
}

TEST(CliTest, TrainsAndPrintsJsonLines) {
  const Result r = RunTrain("train --config " + SmallJob() + " --log-format json --threads 2");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* key : {"\"step\":3", "\"loss\":", "\"lr\":", "\"grad_norm\":",
                          "\"tokens_per_s\":", "\"tflops\":", "\"mfu\":"}) {
    EXPECT_NE(r.output.find(key), std::string::npos) << key << " missing in\n" << r.output;
  }
}

TEST(CliTest, EvalPrintsTheMeanLossAsJson) {
  const std::string job = SmallJob();
  const Result r = RunTrain("eval --config " + job + " --tokens " + (TempDir() / "tokens.u32").string());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("\"loss\":"), std::string::npos) << r.output;
}

TEST(CliTest, BadInputExitsWithCode2AndNamesTheProblem) {
  const std::string job = SmallJob();
  struct Case {
    std::string args;
    std::string needle;
  } cases[] = {
      {"train --config " + job + " -c 5b", "unknown model preset '5b'"},
      {"train --config " + job + " -b -4", "training.batch_size: -4"},
      {"train --config " + job + " --lr 0", "training.lr: 0"},
      {"train --config " + job + " -p gemini --shard-param-frac 1.5", "parallel.shard_param_frac: 1.5"},
      {"train --config " + job + " --offload-optim-frac 1", "parallel.offload_optim_frac: 1 places gemini's"},
      {"plan --config " + job + " -x bf16 -p gemini --placement auto", "--device-memory"},
      {"train --config " + job + " -x bf16", "training.mixed_precision"},
      {"train --config " + job + " -l 4096", "max_position_embeddings"},
      {"train --config " + job + " --no-such-flag", "no-such-flag"},
      {"train --config /nonexistent/job.yaml", "/nonexistent/job.yaml"},
      {"train --config " + SmallJob("bogus_key: 1\n", "typo.yaml"), "unknown key 'bogus_key'"},
      {"train --config " + job + " -d " + WriteFile("odd.bin", "abcde"), "not a multiple of 4"},
      {"train --config " + job + " -d " + WriteFile("big.bin", std::string("\xff\xff\x00\x00", 4)),
       "outside the vocabulary"},
      {"train --config " + job + " -d " + WriteFile("short.bin", std::string(8, '\0')),
       "fewer than one window"},
      {"eval --config " + job, "--tokens"},
      // Integers in base 10 only, within their type, as in the job file. (-b -4: a value
      // read laxly would end in that error instead, not in a long run.)
      {"train --config " + job + " -l 0100 -b -4", "--max-length: '0100' is not a whole number in base 10"},
      {"train --config " + job + " --steps 99999999999999999999 -b -4",
       "--steps: '99999999999999999999' is out of range"},
      {"train --config " + job + " --seed -1 -b -4", "--seed: '-1' is not a non-negative whole number"},
      {"train --config " + job + " --threads 5000", "--threads: Value 5000 not in range 0 to 1024"},
      // A job file field's error says when the command line set its value.
      {"train --config " + job + " -l -5",
       "max_length: -5 must be a positive integer (the job file with --max-length -5)"},
      // A flag by the spelling given, last one winning.
      {"train --config " + job + " -l -5 -a --no-flash-attention --no-grad-checkpoint -g",
       "(the job file with --max-length -5, --grad-checkpoint, --no-flash-attention)"},
      {"train --config " + job + " -l -5 --no-grad-checkpoint",
       "(the job file with --max-length -5, --no-grad-checkpoint)"},
      {"plan --config " + job + " --device-memory 1e30GiB", "--device-memory: '1e30GiB' is not a size from 1 byte"},
      {"plan --config " + job + " --device-memory inf", "--device-memory: 'inf' is not a size from 1 byte"},
      {"plan --config " + job + " --device-memory 0", "--device-memory: '0' is not a size from 1 byte"},
      {"plan --config " + job + " --nodes 100000 --devices-per-node 1024",
       "--nodes 100000 times --devices-per-node 1024 is 102400000 ranks; a job runs as at most 1048576"},
      {"plan --config " + job + " --nodes 1025 --devices-per-node 1024", "is 1049600 ranks"},
      {"train --config " + job + " --fresh -f latest", "--resume excludes --fresh"},
      {"train --config " + job + " -c tiny --init-from-hf " + TempDir().string(), "--init-from-hf excludes --model"},
      // Far beyond any host's memory: refused before allocating anything.
      {"train --config " + job + " -c 70b -l 4096 -b 4096 --global-batch-size 4096", "TiB of host memory"},
  };
  for (const Case& c : cases) {
    const Result r = RunTrain(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << "\n" << r.output;
    EXPECT_NE(r.output.find(c.needle), std::string::npos) << c.args << "\n" << r.output;
  }
  // What llamad and the rank launcher pass in the environment is read as strictly.
  for (const std::string env : {"LLAMAD_STOP_GRACE_MS=5x", "LLAMAD_STOP_GRACE_MS=-1"}) {
    const Result r = llamad::testing::RunCommand("env " + env + " " + LLAMA_TRAIN_BIN + " train --config " + job);
    EXPECT_EQ(r.exit_code, 2) << env << "\n" << r.output;
    EXPECT_NE(r.output.find("environment LLAMAD_STOP_GRACE_MS="), std::string::npos) << env << "\n" << r.output;
  }
}

// A launcher killed with SIGKILL cannot remove its ranks' rendezvous folder; the next
// launcher removes the folders whose launcher no longer holds their lock, and its own
// when done. A folder of that name without a lock file is not a launcher's: it stays.
TEST(CliTest, LaunchersRemoveTheRendezvousFoldersOfKilledLaunchers) {
  auto make_folder = [](const std::string& name, bool with_lock_file = true) {
    const std::filesystem::path folder = "/tmp/llamad-rendezvous-" + name;
    std::filesystem::create_directories(folder);
    if (with_lock_file) std::ofstream(folder / "launcher.lock");
    std::ofstream(folder / "0") << "a rank's key";
    // Older than the minute a new launcher's folder is left alone.
    std::filesystem::last_write_time(folder, std::filesystem::file_time_type::clock::now() - std::chrono::minutes(5));
    return folder;
  };
  const std::filesystem::path stale = make_folder("1-Xy12Zw");
  // A launcher that still runs (here: this test) holds its folder's lock.
  const std::filesystem::path live = make_folder("2-Ab34Cd");
  const int lock = ::open((live / "launcher.lock").c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(lock, 0);
  ASSERT_EQ(::flock(lock, LOCK_EX), 0);
  const std::filesystem::path unknown = make_folder("3-Ef56Gh", false);
  const Result r = RunTrain("train --config " + SmallJob() + " --nproc 2 --threads 1");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_FALSE(std::filesystem::exists(stale));
  EXPECT_TRUE(std::filesystem::exists(live / "0"));
  EXPECT_TRUE(std::filesystem::exists(unknown / "0"));
  EXPECT_FALSE(std::filesystem::exists(unknown / "launcher.lock"));
  ::close(lock);
  std::filesystem::remove_all(live);
  std::filesystem::remove_all(unknown);
}

}  // namespace

// The planner's per-rank total is what a run allocates (the backend's peak), and a job
// that cannot fit is reported as such.
TEST(CliTest, PlanMatchesTheMeasuredPeak) {
  const std::string job = SmallJob();
  const Result plan = RunTrain("plan --config " + job + " --json --threads 2");
  ASSERT_EQ(plan.exit_code, 0) << plan.output;
  const auto planned = nlohmann::json::parse(plan.output.substr(plan.output.find('{')));
  const Result run = RunTrain("train --config " + job + " --log-format json --threads 2");
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const size_t at = run.output.rfind("\"peak_memory_bytes\":");
  ASSERT_NE(at, std::string::npos) << run.output;
  const double peak = std::stod(run.output.substr(at + 20));
  const double total = planned["total"].get<double>();
  EXPECT_NEAR(total, peak, 0.05 * peak) << "planned " << total << " bytes, measured peak " << peak;
  const Result big = RunTrain("plan --config " + job +
                              " -c 65b -l 2048 -b 8 --global-batch-size 8 -g -x bf16 --device-memory 80GiB");
  EXPECT_EQ(big.exit_code, 1) << big.output;
  EXPECT_NE(big.output.find("does not fit in --device-memory 80GiB"), std::string::npos) << big.output;
  EXPECT_EQ(RunTrain("plan --config " + job + " --device-memory lots").exit_code, 2);

  // Saving checkpoints adds the snapshot of the rank's part of the state (master weights
  // and both moments, f32, each tensor part padded to 4 KiB): every rank writes its own.
  auto plan_of = [&](const std::string& args) {
    const Result r = RunTrain("plan --config " + job + " --json --threads 2 " + args);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return nlohmann::json::parse(r.output.substr(r.output.find('{')));
  };
  const auto saving = plan_of("-i 10 -o ckpt");
  const double n = planned["parameters"].get<double>() / 4;
  EXPECT_GE(saving["checkpoint_snapshot"].get<double>(), 3 * 4 * n);
  EXPECT_LT(saving["checkpoint_snapshot"].get<double>(), 3 * 4 * n + 3 * 4096 * 40);  // padding
  EXPECT_EQ(saving["total"].get<double>(), total + saving["checkpoint_snapshot"].get<double>());
  const auto two = plan_of("-i 10 -o ckpt -p zero3 --nproc 2");
  EXPECT_GE(two["checkpoint_snapshot"].get<double>(), 3 * 4 * n / 2);
  EXPECT_LT(two["checkpoint_snapshot"].get<double>(), 3 * 4 * n / 2 + 3 * 4096 * 40);

  // offload.optimizer host (GPU): the f32 master weights and both moments leave the
  // device's plan for host memory, with two gradient chunks (here each the whole model).
  const std::string host_job = SmallJob("offload: {optimizer: host}\n", "host.yaml");
  auto plan_host = [&](const std::string& config) {
    const Result r = RunTrain("plan --config " + config + " --json -x bf16");
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return nlohmann::json::parse(r.output.substr(r.output.find('{')));
  };
  const auto on_gpu = plan_host(job), on_host = plan_host(host_job);
  EXPECT_EQ(on_host["optimizer_state_host"].get<double>(), 4 * n + 2 * 4 * n + 2 * 4 * n);
  EXPECT_EQ(on_host["master_weights"].get<double>(), 0);
  EXPECT_EQ(on_host["optimizer_state"].get<double>(), 0);
  EXPECT_EQ(on_host["total"].get<double>(), on_gpu["total"].get<double>() - 3 * 4 * n);
  // offload.chunk_mb sizes the two gradient chunks: 64 KiB of f32 here, smaller than the model.
  const auto chunked = plan_host(SmallJob("offload: {optimizer: host, chunk_mb: 0.0625, block_kb: 4}\n", "chunked.yaml"));
  ASSERT_GT(n, 16384);
  EXPECT_EQ(chunked["optimizer_state_host"].get<double>(), 4 * n + 2 * 4 * n + 2 * 4 * 16384.0);
  // offload.host_moments: bf16 keeps the moments in 2 bytes each.
  const auto bf16 = plan_host(SmallJob("offload: {optimizer: host, host_moments: bf16}\n", "host-bf16.yaml"));
  EXPECT_EQ(bf16["optimizer_state_host"].get<double>(), 4 * n + 2 * 2 * n + 2 * 4 * n);
  // The ranks of a node share its memory: two ddp ranks each hold all of it.
  EXPECT_EQ(on_host["host_bytes_per_node"].get<double>(), on_host["optimizer_state_host"].get<double>());
  const Result two_ranks = RunTrain("plan --config " + host_job + " --json -x bf16 --nproc 2");
  ASSERT_EQ(two_ranks.exit_code, 0) << two_ranks.output;
  const auto per_node = nlohmann::json::parse(two_ranks.output.substr(two_ranks.output.find('{')));
  EXPECT_EQ(per_node["host_bytes_per_node"].get<double>(), 2 * on_host["optimizer_state_host"].get<double>());
  // Two nodes of two: two ranks per node, not the world's four.
  const Result nodes = RunTrain("plan --config " + host_job + " --json -x bf16 --nodes 2 --devices-per-node 2");
  ASSERT_EQ(nodes.exit_code, 0) << nodes.output;
  const auto by_node = nlohmann::json::parse(nodes.output.substr(nodes.output.find('{')));
  EXPECT_EQ(by_node["world_size"].get<int>(), 4);
  EXPECT_EQ(by_node["host_bytes_per_node"].get<double>(), 2 * by_node["optimizer_state_host"].get<double>());
  // A ZeRO rank builds only its shard: at 8 ranks under zero3 nothing of the whole model
  // (6 bytes per parameter: bf16 parameters and f32 master weights) is ever held.
  auto plan_json = [&](const std::string& args) {
    const Result r = RunTrain("plan --config " + job + " --json -x bf16 -c 1b -l 256 -b 1 " + args);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return nlohmann::json::parse(r.output.substr(r.output.find('{')));
  };
  const auto one = plan_json("");
  const auto z3 = plan_json("-p zero3 --nproc 8");
  const double n1b = one["parameters"].get<double>() / 2;
  EXPECT_LT(z3["parameters"].get<double>() + z3["master_weights"].get<double>(), 6 * n1b / 4);
  EXPECT_LT(z3["total"].get<double>(), one["total"].get<double>() / 4);
  EXPECT_FALSE(z3.contains("startup"));
  // The CPU backend has nothing to move: a clear error.
  const Result cpu_host = RunTrain("train --config " + host_job);
  EXPECT_EQ(cpu_host.exit_code, 2) << cpu_host.output;
  EXPECT_NE(cpu_host.output.find("offload.optimizer: host moves a GPU's optimizer state to host memory"),
            std::string::npos) << cpu_host.output;

}

// A single process with its moments on the NVMe tier offloads before it restores, so the
// restore streams them into the swap; the resumed run continues on the same losses.
TEST(CliTest, AnNvmeJobResumesOnTheSameLosses) {
  std::filesystem::create_directories(TempDir() / "swap");
  std::filesystem::remove_all(TempDir() / "nvme-ckpt");
  const std::string job = SmallJob(
      "offload: {optimizer: nvme, nvme_path: swap, chunk_mb: 0.0625, block_kb: 4}\n"
      "checkpoint: {dir: nvme-ckpt, interval: 2}\n",
      "nvme.yaml");
  const Result straight = RunTrain("train --config " + job + " --log-format json --threads 2");
  ASSERT_EQ(straight.exit_code, 0) << straight.output;
  EXPECT_NE(straight.output.find("NVMe swap file"), std::string::npos) << straight.output;
  const Result resumed = RunTrain("train --config " + job + " --log-format json --threads 2 -i 0 -f " +
                                  (TempDir() / "nvme-ckpt" / "nvme" / "step-2").string());
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  const auto a = llamad::testing::StepLosses(straight.output), b = llamad::testing::StepLosses(resumed.output);
  ASSERT_EQ(a.size(), 3u);
  ASSERT_EQ(b.size(), 1u);
  EXPECT_EQ(b.at(3), a.at(3));
  // Half of the moments on NVMe resumes the same checkpoint on the same loss, and says so.
  const std::string half_job = SmallJob(
      "offload: {optimizer: nvme, nvme_path: swap, nvme_fraction: 0.5, chunk_mb: 0.0625, block_kb: 4}\n"
      "checkpoint: {dir: nvme-ckpt, interval: 2}\n",
      "nvme.yaml");
  const Result half = RunTrain("train --config " + half_job + " --log-format json --threads 2 -i 0 -f " +
                               (TempDir() / "nvme-ckpt" / "nvme" / "step-2").string());
  ASSERT_EQ(half.exit_code, 0) << half.output;
  EXPECT_NE(half.output.find("50.0% of the moments"), std::string::npos) << half.output;
  EXPECT_EQ(llamad::testing::StepLosses(half.output).at(3), a.at(3));
}

// The mixed-precision code of a GPU job on the CPU (--cpu-master-weights: master weights
// apart from the parameters, of the same f32 type): the optimizer state in host memory,
// updated in chunks by the host's AdamW and sent back through the gradients; a part of
// it; the NVMe tier behind it (ZeRO-Infinity); the checkpoints of each, restored straight
// into where the state lives and into a plain job. All on the plain job's bits.
class MasterWeightsJob {
 public:
  // Each job file under its own name, the same job name: one checkpoint folder.
  static std::string Write(const std::string& file, const std::string& offload) {
    return SmallJob("name: offload\ncheckpoint: {dir: offload-ckpt, interval: 0}\n" + offload, file);
  }
  // The losses by step; `says`, when given, must be in the output (which path ran: the
  // losses are the same on the plain path). Two ranks take a thread each.
  static std::map<int64_t, double> Run(const std::string& job, const std::string& args, int threads = 2,
                                       const std::vector<std::string>& says = {}) {
    const Result r = RunTrain("train --config " + job + " --log-format json --steps 12 --threads " +
                              std::to_string(threads) + " " + args);
    EXPECT_EQ(r.exit_code, 0) << args << "\n" << r.output;
    for (const std::string& text : says) EXPECT_NE(r.output.find(text), std::string::npos) << text << "\n" << r.output;
    return llamad::testing::StepLosses(r.output);
  }
  static std::string StepSix() { return (TempDir() / "offload-ckpt" / "offload" / "step-6").string(); }
};

void ExpectSameLosses(const std::map<int64_t, double>& got, const std::map<int64_t, double>& want, int64_t from,
                      const std::string& what) {
  ASSERT_EQ(got.size(), size_t(12 - from)) << what;
  for (const auto& [step, loss] : got) EXPECT_EQ(loss, want.at(step)) << what << ", step " << step;
}

TEST(CliTest, HostOffloadedOptimizerOnTheCpuTrainsOnThePlainBits) {
  // 8 KiB chunks: about 11 of them for this model's 23k parameters.
  const std::string plain = MasterWeightsJob::Write("plain.yaml", "");
  const std::string host =
      MasterWeightsJob::Write("host.yaml", "offload: {optimizer: host, chunk_mb: 0.0078125, block_kb: 4}\n");
  const std::string part = MasterWeightsJob::Write(
      "part.yaml", "offload: {optimizer: host, host_fraction: 0.4, chunk_mb: 0.0078125, block_kb: 4}\n");
  std::filesystem::create_directories(TempDir() / "offload-swap");
  const std::string nvme = MasterWeightsJob::Write(
      "nvme.yaml",
      "offload: {optimizer: nvme, nvme_path: offload-swap, nvme_fraction: 0.6, chunk_mb: 0.0078125, block_kb: 4}\n");
  const auto want = MasterWeightsJob::Run(plain, "--fresh");
  ASSERT_EQ(want.size(), 12u);
  const std::string master = " --cpu-master-weights";
  // The host's state, and for nvme the swap file behind it (the CPU's own NVMe tier says
  // only the second).
  const std::string on_host = "in host memory, updated by the CPU";
  struct Case {
    const char* what;
    std::string job;
    std::vector<std::string> says;
  };
  for (const Case& c : {Case{"host", host, {on_host}}, Case{"40% on the host", part, {"40.0% of them) " + on_host}},
                        Case{"nvme", nvme, {on_host, "60.0% of the moments) in an NVMe swap file"}}}) {
    const char* what = c.what;
    const std::string& job = c.job;
    SCOPED_TRACE(what);
    ExpectSameLosses(MasterWeightsJob::Run(job, "--fresh -i 6" + master, 2, c.says), want, 0, what);
    // Its checkpoint restored into the same places, and into a plain job.
    ExpectSameLosses(MasterWeightsJob::Run(job, "-i 0 -f " + MasterWeightsJob::StepSix() + master), want, 6,
                     std::string(what) + ", resumed");
    ExpectSameLosses(MasterWeightsJob::Run(plain, "-i 0 -f " + MasterWeightsJob::StepSix()), want, 6,
                     std::string(what) + ", resumed by the plain job");
  }
  // The plain job's checkpoint restored into host memory.
  MasterWeightsJob::Run(plain, "--fresh -i 6");
  ExpectSameLosses(MasterWeightsJob::Run(host, "-i 0 -f " + MasterWeightsJob::StepSix() + master), want, 6,
                   "plain checkpoint resumed into host memory");
}

// offload.host_moments: bf16 on the CPU: the host's moments stored as bf16, rounded
// stochastically. The losses stay near those of f32 moments without being the same bits;
// a resumed run continues on its own bits, since checkpoints hold the bf16 values exactly
// (as f32): one rank, and two under ddp (rank 0's arrays sent as they are), zero2
// (each rank reads its shard) and gemini. A plain job resumes its checkpoint from the
// same weights.
TEST(CliTest, HostBf16MomentsTrainNearF32AndResumeOnTheirOwnBits) {
  const std::string plain = MasterWeightsJob::Write("bf16-plain.yaml", "");
  const std::string bf16 = MasterWeightsJob::Write(
      "bf16-host.yaml", "offload: {optimizer: host, host_moments: bf16, chunk_mb: 0.0078125, block_kb: 4}\n");
  const std::string master = " --cpu-master-weights";
  const auto f32 = MasterWeightsJob::Run(plain, "--fresh");
  const auto got = MasterWeightsJob::Run(bf16, "--fresh -i 6" + master, 2, {"AdamW moments (bf16)"});
  ASSERT_EQ(f32.size(), 12u);
  ASSERT_EQ(got.size(), 12u);
  EXPECT_EQ(got.at(1), f32.at(1));  // the first step's weights come before any moment is stored
  double worst = 0;
  for (const auto& [step, loss] : got) worst = std::max(worst, std::abs(loss - f32.at(step)) / f32.at(step));
  EXPECT_GT(worst, 0) << "bf16 moments ran on the f32 bits";
  EXPECT_LT(worst, 0.01);
  RecordProperty("max relative loss difference to f32 moments", std::to_string(worst));
  ExpectSameLosses(MasterWeightsJob::Run(bf16, "-i 0 -f " + MasterWeightsJob::StepSix() + master), got, 6, "resumed");
  const auto by_plain = MasterWeightsJob::Run(plain, "-i 0 -f " + MasterWeightsJob::StepSix());
  ASSERT_EQ(by_plain.size(), 6u);
  EXPECT_EQ(by_plain.at(7), got.at(7)) << "resumed by the plain job";
  // ddp ranks with an NVMe tier restore on the device and then move the state: the host's
  // 40% of the moments come down through the gradient buffer and are rounded there.
  std::filesystem::create_directories(TempDir() / "bf16-swap");
  const std::string nvme = MasterWeightsJob::Write(
      "bf16-nvme.yaml", "offload: {optimizer: nvme, nvme_path: bf16-swap, nvme_fraction: 0.6, host_moments: bf16,\n"
                        "          chunk_mb: 0.0078125, block_kb: 4}\n");
  // gemini's offload_optim_frac 1 puts the state in host memory with offload.optimizer
  // left at memory: its moments take the type too.
  const std::string gemini = MasterWeightsJob::Write(
      "bf16-gemini.yaml", "parallel: {plugin: gemini, placement: static, offload_optim_frac: 1}\n"
                          "offload: {host_moments: bf16, chunk_mb: 0.0078125, block_kb: 4}\n");
  for (const auto& [job, plugin] :
       {std::pair{bf16, "ddp"}, std::pair{bf16, "zero2"}, std::pair{nvme, "ddp"}, std::pair{gemini, "gemini"}}) {
    const std::string what = std::string(plugin) + (job == nvme ? ", nvme" : "");
    SCOPED_TRACE(what);
    const std::string ranks = master + " --nproc 2 -p " + plugin;
    const auto two = MasterWeightsJob::Run(job, "--fresh -i 6" + ranks, 1, {"AdamW moments (bf16)"});
    ASSERT_EQ(two.size(), 12u);
    ExpectSameLosses(MasterWeightsJob::Run(job, "-i 0 -f " + MasterWeightsJob::StepSix() + ranks, 1), two, 6,
                     what + ", resumed");
  }
  // The CPU backend's own state is f32 wherever it lives: the type is refused there, by
  // a run and by a plan, and so is offload.optimizer host.
  for (const auto& [job, says] : {std::pair{gemini, "offload.host_moments: bf16"},
                                  std::pair{nvme, "offload.host_moments: bf16"},
                                  std::pair{bf16, "offload.optimizer: host"}}) {
    for (const std::string command : {"train --fresh --steps 1 --threads 1", "plan"}) {
      const Result r = RunTrain(command + " --config " + job);
      EXPECT_NE(r.exit_code, 0) << command << " " << job;
      EXPECT_NE(r.output.find(says), std::string::npos) << r.output;
      EXPECT_NE(r.output.find("the CPU backend keeps"), std::string::npos) << r.output;
    }
  }
}

// Two ranks (Gloo), each with its shard's optimizer state in host memory, under every
// plugin and gemini's parameter offload; each plugin's checkpoint resumed into host
// memory (ddp: rank 0 restores and sends the host arrays). The two-rank plain bits.
TEST(CliTest, HostOffloadedRanksOnTheCpuTrainOnThePlainBits) {
  const std::string plain = MasterWeightsJob::Write("ranks-plain.yaml", "");
  const std::string host =
      MasterWeightsJob::Write("ranks-host.yaml", "offload: {optimizer: host, chunk_mb: 0.0078125, block_kb: 4}\n");
  const auto want = MasterWeightsJob::Run(plain, "--fresh --nproc 2", 1);
  ASSERT_EQ(want.size(), 12u);
  const std::string master = " --cpu-master-weights --nproc 2";
  for (const std::string plugin : {"ddp", "zero1", "zero2", "zero3"}) {
    SCOPED_TRACE(plugin);
    ExpectSameLosses(
        MasterWeightsJob::Run(host, "--fresh -i 6 -p " + plugin + master, 1, {"in host memory, updated by the CPU"}),
        want, 0, plugin);
    ExpectSameLosses(
        MasterWeightsJob::Run(host, "-i 0 -f " + MasterWeightsJob::StepSix() + " -p " + plugin + master, 1), want, 6,
        plugin + ", resumed");
  }
  // gemini: half of each shard's parameters in host memory, gathered from the master
  // weights there (with activation checkpointing, gathered again for the recomputation).
  const std::string gemini = " -p gemini -g --offload-optim-frac 1 --offload-param-frac 0.5";
  ExpectSameLosses(MasterWeightsJob::Run(plain, "--fresh -i 6" + gemini + master, 1,
                                         {"the parameters of the last 50.0% of each shard in host memory"}),
                   want, 0, "gemini");
  ExpectSameLosses(MasterWeightsJob::Run(plain, "-i 0 -f " + MasterWeightsJob::StepSix() + gemini + master, 1), want,
                   6, "gemini, resumed");
}

