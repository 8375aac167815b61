// The NVMe tier: optimizer moments in an io_uring/O_DIRECT swap file give the same
// training, bit for bit, as moments in memory; a bad swap folder is a clear error.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "core/host_memory.h"
#include "core/strings.h"
#include "engine/small_job.h"
#include "offload/swap_file.h"
#include "storage/checkpoint_store.h"
#include "train/checkpointing.h"
#include "train/memory_plan.h"
#include "train/placement.h"
#include "train/trainer.h"

namespace llamad {
namespace {
namespace fs = std::filesystem;

// Swap files need a file system with direct I/O: the build folder's disk, not tmpfs.
fs::path ScratchDir(const std::string& name) {
  const fs::path dir = fs::path(LLAMAD_BINARY_DIR) / "test-scratch" / (std::to_string(::getpid()) + "-" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

JobSpec OffloadJob(int64_t steps) { return testing::SmallJob(steps, "offload", 2); }

// The job with its moments placed by `tier` (nvme or auto) and a swap folder. Small
// chunks and blocks, so that the parameters span many chunks and a chunk many
// requests: the pipeline (read ahead, update, write behind) really runs.
JobSpec OffloadedJob(int64_t steps, const std::string& tier, const std::string& folder) {
  JobSpec spec = OffloadJob(steps);
  spec.offload.optimizer = tier;
  spec.offload.nvme_path = ScratchDir(folder).string();
  spec.offload.chunk_mb = 8.0 / 1024;
  spec.offload.block_kb = 4;
  spec.offload.queue_depth = 3;
  return spec;
}

TokenDataset Data() { return TokenDataset::FromTokens(testing::Tokens(4000, 40)); }

std::vector<float> Copy(const void* data, size_t n) {
  const float* f = static_cast<const float*>(data);
  return std::vector<float>(f, f + n);
}

// Both moments of an optimizer's shard, wherever they are: memory, then the swap.
std::pair<std::vector<float>, std::vector<float>> AllMoments(AdamWOptimizer& optimizer) {
  const size_t in_memory = optimizer.memory_end() - optimizer.shard_begin();
  std::vector<float> m, v;
  if (in_memory > 0) {
    m = Copy(optimizer.exp_avg(), in_memory);
    v = Copy(optimizer.exp_avg_sq(), in_memory);
  }
  if (optimizer.offloaded()) {
    EXPECT_TRUE(optimizer
                    .ReadOffloadedMoments([&](size_t first, size_t count, const float* cm, const float* cv) {
                      EXPECT_EQ(first, optimizer.shard_begin() + m.size());
                      m.insert(m.end(), cm, cm + count);
                      v.insert(v.end(), cv, cv + count);
                    })
                    .ok());
  }
  return {m, v};
}

TEST(NvmeOffloadTest, MomentsOnNvmeTrainBitIdenticallyToMomentsInMemory) {
  const TokenDataset data = Data();
  auto be = MakeCpuBackend({DType::kF32, 2});
  auto in_memory = *Trainer::Create(OffloadJob(6), be.get(), 0);
  ASSERT_TRUE(in_memory->Train(data, [](const StepMetrics&) { return absl::OkStatus(); }).ok());

  const JobSpec spec = OffloadedJob(6, "nvme", "bit-identical");
  auto swap_be = MakeCpuBackend({DType::kF32, 2});  // its own, for its peak memory
  auto offloaded = *Trainer::Create(spec, swap_be.get(), 0);
  ASSERT_TRUE(offloaded->OffloadOptimizerState().ok());
  ASSERT_TRUE(offloaded->optimizer().offloaded());
  const size_t n = offloaded->model().num_params();
  // The moments never were in memory, not even on their way to the swap: nothing was
  // allocated and freed again, and what is held is the model's parameters and gradients.
  EXPECT_EQ(swap_be->peak_allocated_bytes(), swap_be->allocated_bytes());
  EXPECT_LT(swap_be->allocated_bytes(), 2 * n * sizeof(float) + 4096);
  ASSERT_GT(offloaded->optimizer().swap()->num_chunks(), 10u);
  std::printf("moments of %zu parameters in %zu chunks\n", n, offloaded->optimizer().swap()->num_chunks());
  EXPECT_LT(offloaded->optimizer().state_bytes(), 2 * n * sizeof(float));
  // The planner's numbers are the ones held: in memory, and in the swap file.
  const MemoryPlan plan = PlanMemory(spec, DType::kF32, DType::kF32, 1, 1 << 20, 4, 1);
  EXPECT_EQ(plan.optimizer_state, offloaded->optimizer().state_bytes());
  EXPECT_EQ(plan.optimizer_state_nvme, offloaded->optimizer().swap()->size());
  ASSERT_TRUE(offloaded->Train(data, [](const StepMetrics&) { return absl::OkStatus(); }).ok());

  EXPECT_EQ(0, std::memcmp(offloaded->model().param_data(), in_memory->model().param_data(), n * sizeof(float)));
  // The moments too, read back from the swap.
  const auto [m, v] = AllMoments(offloaded->optimizer());
  EXPECT_EQ(m, Copy(in_memory->optimizer().exp_avg(), n));
  EXPECT_EQ(v, Copy(in_memory->optimizer().exp_avg_sq(), n));
  // Swap reads and writes happened: 6 steps of all moments each way, plus the read back
  // (a fresh swap reads as zeros: nothing is written before the first step).
  const uint64_t moments = 2 * n * sizeof(float);
  EXPECT_GE(offloaded->optimizer().swap()->bytes_read(), 7 * moments);
  EXPECT_GE(offloaded->optimizer().swap()->bytes_written(), 6 * moments);

  // A checkpoint of the offloaded run (its moments streamed from the swap into the
  // snapshot) restores into an in-memory trainer exactly.
  auto store = *storage::CheckpointStore::Open(ScratchDir("checkpoints").string());
  {
    AsyncCheckpointer checkpointer(store.get(), "offload");
    ASSERT_TRUE(checkpointer.Save(*offloaded).ok());
    ASSERT_TRUE(checkpointer.Wait().ok());
  }
  auto restored = *Trainer::Create(OffloadJob(8), be.get(), 0);
  ASSERT_TRUE(RestoreCheckpoint(*store, "offload", 6, *restored).ok());
  EXPECT_EQ(Copy(restored->model().param_data(), n), Copy(in_memory->model().param_data(), n));
  EXPECT_EQ(Copy(restored->optimizer().exp_avg(), n), Copy(in_memory->optimizer().exp_avg(), n));
  EXPECT_EQ(Copy(restored->optimizer().exp_avg_sq(), n), Copy(in_memory->optimizer().exp_avg_sq(), n));

  // And into an offloaded trainer: the moments go from the checkpoint into its swap
  // without ever being whole in memory, and both continue on the same bits.
  auto resumed_be = MakeCpuBackend({DType::kF32, 2});
  auto resumed = *Trainer::Create(OffloadedJob(8, "nvme", "resumed"), resumed_be.get(), 0);
  ASSERT_TRUE(resumed->OffloadOptimizerState().ok());
  const absl::Status into_swap = RestoreCheckpoint(*store, "offload", 6, *resumed);
  ASSERT_TRUE(into_swap.ok()) << into_swap;
  EXPECT_FALSE(resumed->optimizer().has_moments());
  EXPECT_EQ(resumed_be->peak_allocated_bytes(), resumed_be->allocated_bytes());
  ASSERT_TRUE(restored->Train(data, [](const StepMetrics&) { return absl::OkStatus(); }).ok());
  ASSERT_TRUE(resumed->Train(data, [](const StepMetrics&) { return absl::OkStatus(); }).ok());
  EXPECT_EQ(resumed->step(), 8);
  EXPECT_EQ(0, std::memcmp(resumed->model().param_data(), restored->model().param_data(), n * sizeof(float)));
}

// Colossal-AI's nvme_offload_fraction: part of the moments on the NVMe tier, the rest in
// memory. The same bits as all in memory, and checkpoints move between placements.
TEST(NvmeOffloadTest, AFractionOfTheMomentsOnNvmeTrainsBitIdentically) {
  const TokenDataset data = Data();
  auto be = MakeCpuBackend({DType::kF32, 2});
  auto in_memory = *Trainer::Create(OffloadJob(6), be.get(), 0);
  ASSERT_TRUE(in_memory->Train(data, [](const StepMetrics&) { return absl::OkStatus(); }).ok());
  const size_t n = in_memory->model().num_params();

  JobSpec spec = OffloadedJob(6, "nvme", "fraction");
  spec.offload.nvme_fraction = 0.4;
  auto split_be = MakeCpuBackend({DType::kF32, 2});
  auto split = *Trainer::Create(spec, split_be.get(), 0);
  ASSERT_TRUE(split->OffloadOptimizerState().ok());
  const AdamWOptimizer& o = split->optimizer();
  const size_t swapped = n - o.memory_end();
  EXPECT_EQ(swapped, size_t(std::ceil(0.4 * double(n))));
  // Planned as held: the moments kept in memory and three chunks; the rest in the file.
  const MemoryPlan plan = PlanMemory(spec, DType::kF32, DType::kF32, 1, 1 << 20, 4, 1);
  EXPECT_EQ(plan.optimizer_state, o.state_bytes());
  EXPECT_EQ(plan.optimizer_state_nvme, o.swap()->size());
  EXPECT_LT(o.swap()->size(), 2 * n * sizeof(float) / 2);
  ASSERT_TRUE(split->Train(data, [](const StepMetrics&) { return absl::OkStatus(); }).ok());
  EXPECT_EQ(0, std::memcmp(split->model().param_data(), in_memory->model().param_data(), n * sizeof(float)));
  const auto [m, v] = AllMoments(split->optimizer());
  EXPECT_EQ(m, Copy(in_memory->optimizer().exp_avg(), n));
  EXPECT_EQ(v, Copy(in_memory->optimizer().exp_avg_sq(), n));

  // Saved from the split placement, restored into another split (0.7) and into memory,
  // both go on alike.
  auto store = *storage::CheckpointStore::Open(ScratchDir("fraction-checkpoints").string());
  {
    AsyncCheckpointer checkpointer(store.get(), "offload");
    ASSERT_TRUE(checkpointer.Save(*split).ok());
    ASSERT_TRUE(checkpointer.Wait().ok());
  }
  JobSpec other = OffloadedJob(8, "nvme", "fraction-resumed");
  other.offload.nvme_fraction = 0.7;
  auto resumed = *Trainer::Create(other, be.get(), 0);
  ASSERT_TRUE(resumed->OffloadOptimizerState().ok());
  const absl::Status restored = RestoreCheckpoint(*store, "offload", 6, *resumed);
  ASSERT_TRUE(restored.ok()) << restored;
  auto straight = *Trainer::Create(OffloadJob(8), be.get(), 0);
  ASSERT_TRUE(RestoreCheckpoint(*store, "offload", 6, *straight).ok());
  ASSERT_TRUE(straight->Train(data, [](const StepMetrics&) { return absl::OkStatus(); }).ok());
  ASSERT_TRUE(resumed->Train(data, [](const StepMetrics&) { return absl::OkStatus(); }).ok());
  EXPECT_EQ(resumed->step(), 8);
  EXPECT_EQ(0, std::memcmp(resumed->model().param_data(), straight->model().param_data(), n * sizeof(float)));
  // Moments restored into memory first (a checkpoint, then the offload) split the same way.
  auto late = *Trainer::Create(other, be.get(), 0);
  ASSERT_TRUE(RestoreCheckpoint(*store, "offload", 6, *late).ok());
  ASSERT_TRUE(late->OffloadOptimizerState().ok());
  const auto [late_m, late_v] = AllMoments(late->optimizer());
  const auto [split_m, split_v] = AllMoments(split->optimizer());
  EXPECT_EQ(late_m, split_m);
  EXPECT_EQ(late_v, split_v);
}

TEST(NvmeOffloadTest, AMemoryBudgetPlacesTheOptimizerState) {
  const TokenDataset data = Data();
  auto be = MakeCpuBackend({DType::kF32, 1});
  JobSpec spec = OffloadedJob(3, "auto", "auto");
  // A roomy budget keeps the moments in memory...
  spec.offload.memory_budget_gb = 4;
  auto roomy = *Trainer::Create(spec, be.get(), 0);
  EXPECT_EQ(roomy->spec().offload.optimizer, "memory");
  ASSERT_TRUE(roomy->OffloadOptimizerState().ok());
  EXPECT_FALSE(roomy->optimizer().offloaded());
  // ...one the moments do not fit sends them to the NVMe tier, with the same training.
  JobSpec tight_spec = spec;
  const MemoryPlan in_memory = PlanMemory(OffloadJob(3), DType::kF32, DType::kF32, 1,
                                          CpuBackendOptions{}.lm_head_chunk_elements, 4, 3 * CpuThreads());
  tight_spec.offload.memory_budget_gb = double(in_memory.total() - in_memory.optimizer_state / 4) / double(1 << 30);
  auto tight = Trainer::Create(tight_spec, be.get(), 0);
  ASSERT_TRUE(tight.ok()) << tight.status();
  EXPECT_EQ((*tight)->spec().offload.optimizer, "nvme");
  // Only what does not fit goes: about a quarter of the moments, not all of them.
  const double fraction = (*tight)->spec().offload.nvme_fraction;
  std::printf("a budget short of a quarter of the moments puts %.3f of them on NVMe\n", fraction);
  EXPECT_GT(fraction, 0.2);
  EXPECT_LT(fraction, 0.5);
  const MemoryPlan placed = PlanMemory((*tight)->spec(), DType::kF32, DType::kF32, 1,
                                       CpuBackendOptions{}.lm_head_chunk_elements, 4, 3 * CpuThreads());
  EXPECT_LE(double(placed.total()), tight_spec.offload.memory_budget_gb * double(1 << 30));
  ASSERT_TRUE((*tight)->OffloadOptimizerState().ok());
  EXPECT_TRUE((*tight)->optimizer().offloaded());
  ASSERT_TRUE(roomy->Train(data, [](const StepMetrics&) { return absl::OkStatus(); }).ok());
  ASSERT_TRUE((*tight)->Train(data, [](const StepMetrics&) { return absl::OkStatus(); }).ok());
  const size_t n = roomy->model().num_params();
  EXPECT_EQ(0, std::memcmp(roomy->model().param_data(), (*tight)->model().param_data(), n * sizeof(float)));
  // Without a folder for the swap, a budget the job does not fit is an error naming it.
  tight_spec.offload.nvme_path.clear();
  auto nowhere = Trainer::Create(tight_spec, be.get(), 0);
  ASSERT_FALSE(nowhere.ok());
  EXPECT_NE(nowhere.status().message().find("set offload.nvme_path"), std::string::npos) << nowhere.status();
}

TEST(NvmeOffloadTest, ABadSwapFolderIsAClearErrorAtStart) {
  offload::SwapOptions options;
  auto missing = offload::SwapFile::Create("/nonexistent/nvme", 1 << 20, options);
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("/nonexistent/nvme: no such folder"), std::string::npos)
      << missing.status();
  // (A file system without direct I/O is refused the same way; tmpfs has it since Linux
  // 6.6, so there is no such file system to test with here.)
  // More than the disk holds: refused before training, with the sizes.
  auto huge = offload::SwapFile::Create(ScratchDir("full").string(), size_t(1) << 52, options);
  ASSERT_FALSE(huge.ok());
  EXPECT_NE(huge.status().message().find("not enough free space"), std::string::npos) << huge.status();
  // Alignment the disk cannot take.
  options.block_bytes = 1000;
  EXPECT_FALSE(offload::SwapFile::Create(ScratchDir("aligned").string(), 1 << 20, options).ok());
  // And through a job spec: the folder is named.
  JobSpec spec = OffloadJob(2);
  spec.offload.optimizer = "nvme";
  spec.offload.nvme_path = "/nonexistent/nvme";
  auto be = MakeCpuBackend({DType::kF32, 1});
  auto trainer = *Trainer::Create(spec, be.get(), 0);
  const absl::Status s = trainer->OffloadOptimizerState();
  EXPECT_NE(s.message().find("/nonexistent/nvme"), std::string::npos) << s;
}

TEST(NvmeOffloadTest, StreamUpdatesEveryChunkOnce) {
  offload::SwapOptions options;
  options.chunk_bytes = 8192;
  options.block_bytes = 4096;
  options.queue_depth = 2;
  auto swap = *offload::SwapFile::Create(ScratchDir("stream").string(), 10 * 8192 + 4096, options);
  ASSERT_EQ(swap->num_chunks(), 11u);
  EXPECT_EQ(swap->chunk_size(10), 4096u);
  // Fill every chunk with its number, then add one to each byte three times.
  ASSERT_TRUE(swap->Stream([&](size_t c, char* data) { std::memset(data, int(c), swap->chunk_size(c)); },
                           offload::SwapFile::Mode::kWrite)
                  .ok());
  for (int pass = 0; pass < 3; ++pass) {
    ASSERT_TRUE(swap->Stream([&](size_t c, char* data) {
                     for (size_t i = 0; i < swap->chunk_size(c); ++i) ++data[i];
                   }).ok());
  }
  std::vector<int> seen;
  ASSERT_TRUE(swap->Stream(
                      [&](size_t c, char* data) {
                        bool all = true;
                        for (size_t i = 0; i < swap->chunk_size(c); ++i) all = all && data[i] == char(c + 3);
                        seen.push_back(all ? int(c) : -1);
                      },
                      offload::SwapFile::Mode::kRead)
                  .ok());
  EXPECT_EQ(seen, std::vector<int>({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10}));
}

// A write that the kernel cuts short (here at a file size limit, set once the swap file
// exists) is resubmitted for the rest; the rest then fails with the limit's own error
// (EFBIG), not as a silently short chunk, and as an Internal error. Runs in a child
// process, whose limit it sets.
TEST(NvmeOffloadTest, AShortTransferIsResubmittedForTheRest) {
  offload::SwapOptions options;
  options.chunk_bytes = 64 << 10;
  options.block_bytes = 16 << 10;
  options.queue_depth = 4;
  const std::string dir = ScratchDir("short").string();
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::close(fds[0]);
    auto swap = offload::SwapFile::Create(dir, 4 * options.chunk_bytes, options);
    std::string report = swap.ok() ? "" : "create: " + std::string(swap.status().message());
    if (swap.ok()) {
      ::signal(SIGXFSZ, SIG_IGN);
      // 8 KiB before the end: the last 16 KiB request is the only one the limit cuts,
      // and 8 KiB of it go through.
      const rlim_t at = rlim_t(4 * options.chunk_bytes - (8 << 10));
      const rlimit limit{at, at};
      if (::setrlimit(RLIMIT_FSIZE, &limit) != 0) {
        report = "setrlimit failed";
      } else {
        const absl::Status s = (*swap)->Stream([](size_t, char* data) { std::memset(data, 7, 64 << 10); },
                                               offload::SwapFile::Mode::kWrite);
        report = s.ok() ? "ok" : std::string(s.message()) + "\ncode " + absl::StatusCodeToString(s.code());
        report += "\nwritten " + std::to_string((*swap)->bytes_written());
        report += (*swap)->synchronous() ? "\npath: pread/pwrite (no io_uring here)" : "\npath: io_uring";
      }
    }
    (void)!::write(fds[1], report.data(), report.size());
    ::_exit(0);
  }
  ::close(fds[1]);
  std::string report;
  char buffer[512];
  for (ssize_t n; (n = ::read(fds[0], buffer, sizeof(buffer))) > 0;) report.append(buffer, size_t(n));
  ::close(fds[0]);
  int status = 0;
  ::waitpid(child, &status, 0);
  ASSERT_TRUE(WIFEXITED(status)) << report;
  if (report.starts_with("create: ")) GTEST_SKIP() << "no swap file here: " << report;
  // Before: "moved 8192 of 16384 bytes". Now the rest was sent again and met the limit.
  EXPECT_NE(report.find("writing the NVMe swap file: " + std::string(std::strerror(EFBIG))), std::string::npos)
      << report;
  EXPECT_NE(report.find("written " + std::to_string(4 * options.chunk_bytes - (8 << 10))), std::string::npos)
      << report;
  // A failed write is the machine's failure, not damage to data (not DataLoss, which
  // sends --resume-fallback to older checkpoints).
  EXPECT_NE(report.find("code INTERNAL"), std::string::npos) << report;
  // Both paths resubmit the rest; say which one this machine tested.
  if (const size_t at = report.find("path: "); at != std::string::npos) std::printf("%s\n", report.c_str() + at);
}

}  // namespace
}  // namespace llamad

namespace llamad {
namespace {

// A GPU job of the speed tests' shape (ops/bench/{7b,65b}): sequence 2048, micro-batch
// 8, activation checkpointing, bf16; `preset` names the model and the file.
JobSpec GpuBenchJob(const std::string& preset) {
  JobSpec spec;
  spec.path = preset + ".yaml";
  auto model = LoadModelConfig(preset);
  EXPECT_TRUE(model.ok()) << model.status();
  if (model.ok()) spec.model = *model;
  spec.training.max_length = 2048;
  spec.training.batch_size = 8;
  spec.training.grad_checkpoint = true;
  spec.training.mixed_precision = "bf16";
  return spec;
}

// gemini on GPUs, planned as a run places it: LLaMA-65B against 80 GiB GPUs.
TEST(GeminiPlacementTest, PlacesAGpuJobByFractionsOrByTheDeviceBudget) {
  JobSpec spec = GpuBenchJob("65b");
  spec.parallel.plugin = "gemini";
  const uint64_t gpu = uint64_t{80} << 30;
  auto place = [&](const JobSpec& s, int world, uint64_t budget) {
    return PlaceGemini(s, /*cuda=*/true, world, budget,
                       [world](const JobSpec& r) { return PlanMemoryOn(r, /*cuda=*/true, world, 0); });
  };
  auto total = [](const absl::StatusOr<GeminiPlacement>& p, int world) {
    return PlanMemoryOn(p->spec, /*cuda=*/true, world, 0).total();
  };

  // static, the defaults: parameters sharded, optimizer state on the GPU. On 4 x 8 GPUs
  // it fits (configs/65b.yaml).
  auto defaults = place(spec, 32, 0);
  ASSERT_TRUE(defaults.ok()) << defaults.status();
  EXPECT_EQ(defaults->spec.parallel.plugin, "zero3");
  EXPECT_EQ(defaults->spec.offload.optimizer, "memory");
  EXPECT_LT(total(defaults, 32), gpu);
  // offload_optim_frac 1: the f32 master weights and moments (12 bytes a parameter of the
  // shard) leave the GPU.
  JobSpec offloaded = spec;
  offloaded.parallel.offload_optim_frac = 1;
  auto host = place(offloaded, 32, 0);
  ASSERT_TRUE(host.ok()) << host.status();
  EXPECT_EQ(host->spec.offload.optimizer, "host");
  const double shard = double(spec.model.NumParameters()) / 32;
  EXPECT_NEAR(double(total(defaults, 32) - total(host, 32)), 12 * shard, 0.01 * 12 * shard);
  // shard_param_frac 0: every GPU holds all the parameters (zero2).
  JobSpec replicated = spec;
  replicated.parallel.shard_param_frac = 0;
  EXPECT_EQ(place(replicated, 32, 0)->spec.parallel.plugin, "zero2");
  // shard_param_frac 0.5: zero3 for the regions in the first half of the parameters,
  // the rest held whole on every GPU.
  JobSpec part = spec;
  part.parallel.shard_param_frac = 0.5;
  auto partly = place(part, 32, 0);
  ASSERT_TRUE(partly.ok()) << partly.status();
  EXPECT_EQ(partly->spec.parallel.plugin, "zero3");
  EXPECT_EQ(partly->spec.parallel.sharded_share, 0.5);
  const uint64_t whole = uint64_t(spec.model.NumParameters()) - ReplicatedBegin(spec.model, 0.5);
  EXPECT_GE(whole, uint64_t(spec.model.NumParameters()) / 2 - uint64_t(spec.model.NumParameters()) / 40);
  EXPECT_EQ(total(partly, 32) - total(defaults, 32), 2 * whole);  // bf16
  // offload.optimizer nvme with offload_optim_frac 1 (ZeRO-Infinity): the GPU holds what
  // it holds with the state on the host; half the moments go on from host memory to the
  // NVMe tier, through the pipeline's three 64 MiB chunks.
  JobSpec infinity = offloaded;
  infinity.offload.optimizer = "nvme";
  infinity.offload.nvme_path = "/nvme";
  infinity.offload.nvme_fraction = 0.5;
  auto on_nvme = place(infinity, 32, 0);
  ASSERT_TRUE(on_nvme.ok()) << on_nvme.status();
  EXPECT_EQ(on_nvme->spec.offload.optimizer, "nvme");
  EXPECT_NE(on_nvme->summary.find("50.0% of its moments on the NVMe tier"), std::string::npos) << on_nvme->summary;
  EXPECT_EQ(total(on_nvme, 32), total(host, 32));
  const MemoryPlan nvme_plan = PlanMemoryOn(on_nvme->spec, /*cuda=*/true, 32, 0);
  const MemoryPlan host_plan = PlanMemoryOn(host->spec, /*cuda=*/true, 32, 0);
  EXPECT_NEAR(double(nvme_plan.optimizer_state_nvme), 0.5 * 8 * shard, 0.01 * 8 * shard);
  EXPECT_NEAR(double(host_plan.optimizer_state_host - nvme_plan.optimizer_state_host), 0.5 * 8 * shard - 3 * 64.0 * (1 << 20),
              0.01 * 8 * shard);
  JobSpec infinity_auto = infinity;
  infinity_auto.parallel.placement = "auto";
  infinity_auto.parallel.offload_optim_frac = 0;
  EXPECT_NE(place(infinity_auto, 32, uint64_t{80} << 30).status().message().find("offload_optim_frac 1"),
            std::string::npos);
  // offload_optim_frac 0.5: the state of the last half of each shard in host memory, the
  // rest on the GPU: half the saving.
  JobSpec half = spec;
  half.parallel.offload_optim_frac = 0.5;
  auto halfway = place(half, 32, 0);
  ASSERT_TRUE(halfway.ok()) << halfway.status();
  EXPECT_EQ(halfway->spec.offload.optimizer, "host");
  EXPECT_EQ(halfway->spec.offload.host_fraction, 0.5);
  EXPECT_NE(halfway->summary.find("last 50.0% of each shard"), std::string::npos) << halfway->summary;
  EXPECT_NEAR(double(total(defaults, 32) - total(halfway, 32)), 6 * shard, 0.01 * 6 * shard);
  const MemoryPlan half_plan = PlanMemoryOn(halfway->spec, /*cuda=*/true, 32, 0);
  EXPECT_NEAR(double(half_plan.optimizer_state_host), double(host_plan.optimizer_state_host) / 2,
              0.01 * double(host_plan.optimizer_state_host));
  // offload_param_frac 0.5 with the optimizer state on the host: the bf16 parameters of
  // the last half of each shard leave the GPU too (2 bytes each).
  JobSpec params = offloaded;
  params.parallel.offload_param_frac = 0.5;
  auto params_out = place(params, 32, 0);
  ASSERT_TRUE(params_out.ok()) << params_out.status();
  EXPECT_EQ(params_out->spec.parallel.params_host_share, 0.5);
  EXPECT_NE(params_out->summary.find("parameters of the last 50.0%"), std::string::npos) << params_out->summary;
  EXPECT_NEAR(double(total(host, 32) - total(params_out, 32)), 2 * 0.5 * shard, 0.01 * shard);
  // Parameters in host memory are rounded from their master weights there: not more of
  // them than of the optimizer state, and only from a whole shard.
  JobSpec more_params = half;
  more_params.parallel.offload_param_frac = 1;
  EXPECT_NE(place(more_params, 32, 0).status().message().find("parallel.offload_param_frac: 1"), std::string::npos);
  EXPECT_NE(place(more_params, 32, 0).status().message().find("offload_optim_frac must be at least"), std::string::npos);
  JobSpec part_params = params;
  part_params.parallel.shard_param_frac = 0.5;
  EXPECT_NE(place(part_params, 32, 0).status().message().find("shard_param_frac 1"), std::string::npos);
  JobSpec nvme = spec;
  nvme.offload.optimizer = "nvme";
  EXPECT_NE(place(nvme, 32, 0).status().message().find("offload.optimizer: 'nvme'"), std::string::npos);

  // auto: the fastest layout that fits. 32 GPUs: zero3 (zero2's whole parameters alone
  // would not fit); 8 GPUs: zero3 with the optimizer state in host memory; with room to
  // spare, zero2; too little, an error listing what each layout needs.
  spec.parallel.placement = "auto";
  auto on32 = place(spec, 32, gpu);
  ASSERT_TRUE(on32.ok()) << on32.status();
  EXPECT_EQ(on32->spec.parallel.plugin, "zero3");
  EXPECT_EQ(on32->spec.offload.optimizer, "memory");
  auto on8 = place(spec, 8, gpu);
  ASSERT_TRUE(on8.ok()) << on8.status();
  EXPECT_EQ(on8->spec.parallel.plugin, "zero3");
  EXPECT_EQ(on8->spec.offload.optimizer, "host");
  EXPECT_LE(total(on8, 8), gpu);
  EXPECT_NE(on8->summary.find("zero2 needs"), std::string::npos) << on8->summary;
  // ...and only without the overlap's second region scratch (a 65B layer: its bf16
  // parameters and f32 gradients, about 4.5 GiB).
  EXPECT_FALSE(on8->spec.parallel.overlap_regions) << on8->summary;
  EXPECT_NE(on8->summary.find("inline"), std::string::npos) << on8->summary;
  JobSpec overlapped = on8->spec;
  overlapped.parallel.overlap_regions = true;
  const uint64_t layer = LargestGradientRegion(spec.model);
  EXPECT_EQ(PlanMemoryOn(overlapped, /*cuda=*/true, 8, 0).total() - total(on8, 8), layer * (2 + 4));
  EXPECT_GT(PlanMemoryOn(overlapped, /*cuda=*/true, 8, 0).total(), gpu);
  // The static fractions of that layout: PlaceJob turns the overlap off to fit, and the
  // placement's summary (which a run and `plan` print) says so.
  JobSpec fixed = spec;
  fixed.parallel.placement = "static";
  fixed.parallel.offload_optim_frac = 1;
  auto fitted = PlaceJob(fixed, /*cuda=*/true, 8, gpu,
                         [](const JobSpec& r) { return PlanMemoryOn(r, /*cuda=*/true, 8, 0); }, /*must_fit=*/false);
  ASSERT_TRUE(fitted.ok()) << fitted.status();
  EXPECT_FALSE(fitted->spec.parallel.overlap_regions);
  EXPECT_NE(fitted->summary.find("gathered inline"), std::string::npos) << fitted->summary;
  // Of the optimizer state, as little in host memory as fits 2% short of the budget (room
  // for what the plan does not see): the smallest share in 1/1024ths.
  const uint64_t headroomed = gpu - gpu / 50;
  const double share = on8->spec.offload.host_fraction;
  EXPECT_EQ(std::fmod(share * 1024, 1.0), 0.0) << share << " is not a whole number of 1/1024ths";
  EXPECT_GT(share, 0.5);
  EXPECT_LE(total(on8, 8), headroomed);
  JobSpec less = on8->spec;
  less.offload.host_fraction = share - 1.0 / 1024;
  EXPECT_GT(PlanMemoryOn(less, /*cuda=*/true, 8, 0).total(), headroomed);
  std::printf("%s\n", on8->summary.c_str());
  auto roomy = place(spec, 8, uint64_t{1} << 40);
  ASSERT_TRUE(roomy.ok()) << roomy.status();
  EXPECT_EQ(roomy->spec.parallel.plugin, "zero2");
  // 70 GiB: the optimizer state and as few of the parameters as make the rest fit.
  const uint64_t smaller = uint64_t{70} << 30;
  auto on70 = place(spec, 8, smaller);
  ASSERT_TRUE(on70.ok()) << on70.status();
  EXPECT_EQ(on70->spec.offload.host_fraction, 1.0);
  const double param_share = on70->spec.parallel.params_host_share;
  EXPECT_GT(param_share, 0.0);
  EXPECT_LT(param_share, 1.0);
  EXPECT_LE(total(on70, 8), smaller - smaller / 50);
  JobSpec fewer = on70->spec;
  fewer.parallel.params_host_share = param_share - 1.0 / 1024;
  EXPECT_GT(PlanMemoryOn(fewer, /*cuda=*/true, 8, 0).total(), smaller - smaller / 50);
  std::printf("%s\n", on70->summary.c_str());
  auto tight = place(spec, 8, uint64_t{20} << 30);
  ASSERT_FALSE(tight.ok());
  EXPECT_NE(tight.status().message().find("no layout fits"), std::string::npos) << tight.status();
  EXPECT_NE(tight.status().message().find("zero3 with the optimizer state on host needs"), std::string::npos)
      << tight.status();
  EXPECT_NE(tight.status().message().find("zero3 with the optimizer state on host and the parameters needs"),
            std::string::npos)
      << tight.status();
}

// Sizes in memory messages: binary units, the largest that keeps the number at 1 or more.
TEST(HostMemoryCheckTest, SizesReadInTheLargestUnitBelowTheSize) {
  EXPECT_EQ(BytesForPeople(0), "0 B");
  EXPECT_EQ(BytesForPeople(1023), "1023 B");
  EXPECT_EQ(BytesForPeople(1024), "1.0 KiB");
  EXPECT_EQ(BytesForPeople(18.1 * (1 << 20)), "18.1 MiB");
  EXPECT_EQ(BytesForPeople(double(uint64_t{1} << 30) - 1), "1024.0 MiB");
  EXPECT_EQ(BytesForPeople(75.4 * double(uint64_t{1} << 30)), "75.4 GiB");
  EXPECT_EQ(BytesForPeople(3.0 * double(uint64_t{1} << 40)), "3.0 TiB");
  EXPECT_EQ(BytesForPeople(2048.0 * double(uint64_t{1} << 50)), "2048.0 PiB");
}

// A GPU job's host memory: LLaMA-7B with its optimizer state in host memory on ranks
// that share one host. The state a rank moves there (ddp: all of it, on every rank)
// against what the host has; each way out the message names is one the job can take.
TEST(HostMemoryCheckTest, GpuRanksSharingAHostMustFitItsMemory) {
  JobSpec spec = GpuBenchJob("7b");
  spec.offload.optimizer = "host";
  const int64_t gib = int64_t{1} << 30;
  const uint64_t n = uint64_t(spec.model.NumParameters());
  auto need = [&](const JobSpec& s, int world, bool nccl = true) {
    return HostMemoryNeedOf(PlanMemoryOn(s, /*cuda=*/true, world, 0), s, nccl);
  };
  auto machine = [&](int64_t bytes) { return HostMemory{bytes, "boot", -1, ""}; };
  auto check = [&](const HostMemoryNeed& each, int ranks, const HostMemory& host, const JobSpec& s) {
    return CheckHostMemory(each, ranks, ranks, host, s);
  };
  // 12 bytes per parameter (f32 master weights and moments) and two 64 MiB gradient
  // chunks: 75.4 GiB.
  const HostMemoryNeed one = need(spec, 1);
  EXPECT_EQ(one.total(), 12 * n + 2 * (uint64_t{64} << 20));
  EXPECT_TRUE(check(one, 1, machine(80 * gib), spec).ok());
  const absl::Status alone = check(one, 1, machine(60 * gib), spec);
  ASSERT_FALSE(alone.ok());
  for (const char* says : {"the 1 rank on this host needs 75.4 GiB", "MemAvailable leaves 60.0 GiB",
                           "58.8 GiB usable", "offload.host_moments: bf16", "offload.host_fraction",
                           "offload.optimizer: nvme", "a host with more memory"}) {
    EXPECT_NE(alone.message().find(says), std::string::npos) << says << " in: " << alone.message();
  }
  EXPECT_EQ(alone.message().find("zero1"), std::string::npos) << "one rank has nothing to shard: " << alone;
  // Eight ddp ranks on a 512 GiB host each hold all of it: 603.5 GiB.
  const absl::Status ddp = check(need(spec, 8), 8, machine(512 * gib), spec);
  ASSERT_FALSE(ddp.ok());
  EXPECT_EQ(ddp.code(), absl::StatusCode::kResourceExhausted);
  RecordProperty("message", std::string(ddp.message()));
  for (const char* says : {"7b.yaml", "the 8 ranks on this host need 603.5 GiB", "75.4 GiB each",
                           "MemAvailable leaves 512.0 GiB", "501.8 GiB usable", "zero1, zero2 or zero3",
                           "fewer ranks on each host"}) {
    EXPECT_NE(ddp.message().find(says), std::string::npos) << says << " in: " << ddp.message();
  }
  // Sharding is offered by the world's size, not the host's: one rank on each of eight.
  EXPECT_NE(check(need(spec, 8), 1, machine(60 * gib), spec).message().find("zero1"), std::string::npos);
  // zero2 shards it, an eighth each; bf16 moments take 8 bytes per parameter instead of
  // 12 (402.6 GiB for the eight), and are not offered again once set.
  JobSpec zero2 = spec;
  zero2.parallel.plugin = "zero2";
  EXPECT_TRUE(check(need(zero2, 8), 8, machine(512 * gib), zero2).ok());
  JobSpec bf16 = spec;
  bf16.offload.host_moments = "bf16";
  EXPECT_TRUE(check(need(bf16, 8), 8, machine(512 * gib), bf16).ok());
  const absl::Status bf16_short = check(need(bf16, 8), 8, machine(400 * gib), bf16);
  ASSERT_FALSE(bf16_short.ok());
  EXPECT_EQ(bf16_short.message().find("host_moments"), std::string::npos) << bf16_short;
  // The NVMe tier keeps the 4 bytes of master weights: offered only where it saves.
  JobSpec quarter = spec;
  quarter.offload.host_fraction = 0.25;  // 3 bytes a parameter on the host
  const absl::Status quarter_short = check(need(quarter, 1), 1, machine(10 * gib), quarter);
  ASSERT_FALSE(quarter_short.ok());
  EXPECT_EQ(quarter_short.message().find("offload.optimizer: nvme"), std::string::npos) << quarter_short;
  // A cgroup's limit binds for the ranks in it, MemAvailable for all on the machine.
  const HostMemoryNeed zero2_each = need(zero2, 8);  // 9.5 GiB
  const HostMemory pod{512 * gib, "boot", 30 * gib, "boot:cgroup:7"};
  EXPECT_TRUE(CheckHostMemory(zero2_each, 8, 3, pod, zero2).ok());
  const absl::Status crowded = CheckHostMemory(zero2_each, 8, 4, pod, zero2);
  ASSERT_FALSE(crowded.ok());
  EXPECT_NE(crowded.message().find("the 4 ranks in this cgroup need"), std::string::npos) << crowded;
  EXPECT_NE(crowded.message().find("its memory limit leaves 30.0 GiB"), std::string::npos) << crowded;
  const absl::Status machine_full = CheckHostMemory(zero2_each, 64, 3, pod, zero2);
  ASSERT_FALSE(machine_full.ok());
  EXPECT_NE(machine_full.message().find("the 64 ranks on this host need"), std::string::npos) << machine_full;
  // Checkpoint saves keep a snapshot of the rank's state in host memory too; a job with
  // its state on the GPU is told about that alone.
  JobSpec saving = spec;
  saving.checkpoint.interval = 100;
  saving.offload.optimizer = "memory";
  const HostMemoryNeed snapshot_only = need(saving, 1);
  EXPECT_EQ(snapshot_only.optimizer_state, 0u);
  ASSERT_GE(snapshot_only.snapshot, 12 * n);  // three f32 copies of the state, padded
  const absl::Status short_of_snapshot = check(snapshot_only, 1, machine(60 * gib), saving);
  ASSERT_FALSE(short_of_snapshot.ok());
  EXPECT_NE(short_of_snapshot.message().find("of checkpoint snapshot"), std::string::npos) << short_of_snapshot;
  EXPECT_NE(short_of_snapshot.message().find("checkpoint.interval: 0"), std::string::npos) << short_of_snapshot;
  EXPECT_EQ(short_of_snapshot.message().find("optimizer state"), std::string::npos) << short_of_snapshot;
  // Ranks without NCCL stage their collectives in host f32: the whole gradient under
  // ddp and zero1, the larger of a layer's region and a shard under zero2 and zero3.
  JobSpec on_gpu = spec;
  on_gpu.offload.optimizer = "memory";
  EXPECT_EQ(need(on_gpu, 8, /*nccl=*/true).total(), 0u);
  EXPECT_EQ(need(on_gpu, 1, /*nccl=*/false).total(), 0u);
  EXPECT_EQ(need(on_gpu, 8, /*nccl=*/false).staging, 4 * n);
  JobSpec zero3 = on_gpu;
  zero3.parallel.plugin = "zero3";
  EXPECT_EQ(need(zero3, 8, /*nccl=*/false).staging, 4 * ((n + 7) / 8));
  EXPECT_EQ(need(zero3, 512, /*nccl=*/false).staging, 4 * uint64_t(LargestGradientRegion(spec.model)));
  const absl::Status no_nccl = check(need(on_gpu, 8, /*nccl=*/false), 8, machine(100 * gib), on_gpu);
  ASSERT_FALSE(no_nccl.ok());
  EXPECT_NE(no_nccl.message().find("staged without NCCL"), std::string::npos) << no_nccl;
  EXPECT_NE(no_nccl.message().find("zero2 or zero3"), std::string::npos) << no_nccl;
  // Nothing in host memory, or a host that does not say what it has: nothing to check.
  EXPECT_TRUE(check(need(on_gpu, 1), 8, machine(1), spec).ok());
  EXPECT_TRUE(check(need(spec, 8), 8, machine(-1), spec).ok());
}

// The host's memory as /proc and the cgroup file system give it, read from a copy of
// their layout: MemAvailable alone; cgroup v2 limits on the process's cgroup and an
// ancestor (the tightest binds; page cache the kernel reclaims first does not count as
// used); a namespaced root; v1 on a hybrid system, with its "no limit"; the keys the
// ranks sharing that memory have in common.
TEST(HostMemoryCheckTest, ReadsMemAvailableAndTheTightestCgroupLimit) {
  const fs::path root = ScratchDir("host-memory");
  auto write = [&](const fs::path& path, const std::string& text) {
    fs::create_directories((root / path).parent_path());
    std::ofstream(root / path) << text;
  };
  const int64_t gib = int64_t{1} << 30;
  const std::string boot = "0b3f0c5e-1111-2222-3333-444455556666";
  write("proc/meminfo", "MemTotal:       67108864 kB\nMemAvailable:   50331648 kB\n");  // 48 GiB
  write("proc/sys/kernel/random/boot_id", boot + "\n");
  write("proc/self/cgroup", "0::/jobs/rank3\n");
  const std::string proc = (root / "proc").string();
  // No cgroup file system: MemAvailable.
  HostMemory plain = ReadHostMemory(proc, (root / "none").string());
  EXPECT_EQ(plain.mem_available, 48 * gib);
  EXPECT_EQ(plain.cgroup_left, -1);
  EXPECT_EQ(plain.available(), 48 * gib);
  EXPECT_EQ(plain.machine_key, boot);
  EXPECT_EQ(plain.cgroup_key, "");
  // v2: the job's folder limits to 32 GiB with 6 GiB charged, 4 of them reclaimable page
  // cache; the rank's own folder to 40 GiB with 1 GiB used. Above the root a limit that
  // is not the process's to see.
  write("v2/cgroup.controllers", "cpu memory\n");
  write("memory.max", "1\n");
  write("memory.current", "0\n");
  write("v2/jobs/memory.max", std::to_string(32 * gib) + "\n");
  write("v2/jobs/memory.current", std::to_string(6 * gib) + "\n");
  write("v2/jobs/memory.stat", "anon 2147483648\nfile 4294967296\ninactive_file " + std::to_string(4 * gib) + "\n");
  write("v2/jobs/rank3/memory.max", std::to_string(40 * gib) + "\n");
  write("v2/jobs/rank3/memory.current", std::to_string(gib) + "\n");
  HostMemory limited = ReadHostMemory(proc, (root / "v2").string());
  EXPECT_EQ(limited.cgroup_left, 30 * gib);
  EXPECT_EQ(limited.available(), 30 * gib);
  EXPECT_EQ(limited.machine_key, boot);
  EXPECT_EQ(limited.cgroup_key.rfind(boot + ":cgroup:", 0), 0u) << limited.cgroup_key;
  // The rank's own limit tighter: it binds, under another key.
  write("v2/jobs/rank3/memory.max", std::to_string(9 * gib) + "\n");
  HostMemory own = ReadHostMemory(proc, (root / "v2").string());
  EXPECT_EQ(own.cgroup_left, 8 * gib);
  EXPECT_NE(own.cgroup_key, limited.cgroup_key);
  // A limit above MemAvailable: MemAvailable is what the process can take.
  write("v2/jobs/rank3/memory.max", "max\n");
  write("v2/jobs/memory.max", std::to_string(100 * gib) + "\n");
  EXPECT_EQ(ReadHostMemory(proc, (root / "v2").string()).available(), 48 * gib);
  // Inside a cgroup namespace: "0::/" (or a path outside the mount) is the mount's root.
  write("v2/memory.max", std::to_string(20 * gib) + "\n");
  write("v2/memory.current", std::to_string(5 * gib) + "\n");
  for (const char* line : {"0::/\n", "0::/../..\n"}) {
    write("proc/self/cgroup", line);
    EXPECT_EQ(ReadHostMemory(proc, (root / "v2").string()).cgroup_left, 15 * gib) << line;
  }
  // v1 on a hybrid system (a v2 line first, no cgroup.controllers at this root): the
  // memory controller's line, and its near-2^63 "no limit" at the root.
  write("proc/self/cgroup", "0::/user.slice\n5:cpu,cpuacct:/x\n4:memory:/pod7\n");
  write("v1/unified/cgroup.controllers", "\n");
  write("v1/memory/memory.limit_in_bytes", "9223372036854771712\n");
  write("v1/memory/memory.usage_in_bytes", std::to_string(40 * gib) + "\n");
  write("v1/memory/pod7/memory.limit_in_bytes", std::to_string(16 * gib) + "\n");
  write("v1/memory/pod7/memory.usage_in_bytes", std::to_string(5 * gib) + "\n");
  write("v1/memory/pod7/memory.stat", "cache 1073741824\ntotal_inactive_file " + std::to_string(gib) + "\n");
  HostMemory v1 = ReadHostMemory(proc, (root / "v1").string());
  EXPECT_EQ(v1.cgroup_left, 12 * gib);
  EXPECT_EQ(v1.available(), 12 * gib);
  fs::remove_all(root);
}

}  // namespace
}  // namespace llamad
