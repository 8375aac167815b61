// Checkpoint benchmark: the training stall of a save (the host copy), the background
// write throughput (shard write + fsync + index commit) and the restore read throughput
// (page cache dropped for the shard first), next to fio sequential write and read with
// direct I/O on the same folder, same size, 1 MiB blocks, in the same run.
//
//   bench-checkpoint-io [--dir DIR] [--hidden 512] [--layers 8] [--vocab 32000] [--saves 3]
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "backend/cpu/blas_kernels.h"
#include "backend/cpu/cpu_backend.h"
#include "train/checkpointing.h"

namespace llamad {
namespace {
namespace fs = std::filesystem;

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// fio's bandwidth in bytes/s for a sequential direct-I/O job, or 0 when fio is missing.
double Fio(const std::string& dir, const char* rw, uint64_t bytes) {
  const std::string out = dir + "/fio.json";
  const std::string cmd = "fio --name=bench --filename=" + dir + "/fio.tmp --rw=" + rw +
                          " --bs=1M --direct=1 --ioengine=psync --size=" + std::to_string(bytes) +
                          " --output-format=json --output=" + out + " >/dev/null 2>&1";
  if (std::system(cmd.c_str()) != 0) return 0;
  try {
    std::ifstream in(out);
    const auto j = nlohmann::json::parse(in);
    return j["jobs"][0][rw == std::string("write") ? "write" : "read"]["bw_bytes"].get<double>();
  } catch (const std::exception&) {
    return 0;
  }
}

void DropCache(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

int Main(int argc, char** argv) {
  std::map<std::string, std::string> opt = {{"dir", "build/bench-checkpoint"}, {"hidden", "512"},
                                            {"layers", "8"}, {"vocab", "32000"}, {"saves", "3"}};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = std::string(argv[i]).substr(2);
    if (!opt.count(key)) {
      std::fprintf(stderr, "bench: unknown option %s\n", argv[i]);
      return 2;
    }
    opt[key] = argv[i + 1];
  }
  const std::string dir = opt["dir"];
  fs::remove_all(dir);
  fs::create_directories(dir);
  JobSpec spec;
  spec.path = "bench";
  spec.name = "bench";
  spec.model.hidden_size = std::stol(opt["hidden"]);
  spec.model.intermediate_size = spec.model.hidden_size * 8 / 3 / 64 * 64;
  spec.model.num_hidden_layers = std::stol(opt["layers"]);
  spec.model.num_attention_heads = spec.model.hidden_size / 64;
  spec.model.num_key_value_heads = spec.model.num_attention_heads;
  spec.model.vocab_size = std::stol(opt["vocab"]);
  spec.training.max_length = 64;
  auto backend = MakeCpuBackend({DType::kF32, 0});
  auto trainer = Trainer::Create(spec, backend.get(), 0);
  if (!trainer.ok()) {
    std::fprintf(stderr, "bench: %s\n", std::string(trainer.status().message()).c_str());
    return 2;
  }
  auto store = storage::CheckpointStore::Open(dir, {2});
  if (!store.ok()) {
    std::fprintf(stderr, "bench: %s\n", std::string(store.status().message()).c_str());
    return 2;
  }
  const uint64_t state_bytes = uint64_t((*trainer)->model().num_params()) * 3 * 4;
  std::printf("state: %.1fM parameters, %.0f MiB (fp32 weights + 2 AdamW moments); folder %s\n",
              (*trainer)->model().num_params() / 1e6, state_bytes / 1048576.0, dir.c_str());

  double commit_time = 0;
  double write_started = 0, write_seconds = 0;
  AsyncCheckpointer checkpointer(store->get(), "bench", [&](int64_t, const absl::Status& s) {
    if (!s.ok()) std::fprintf(stderr, "bench: save failed: %s\n", std::string(s.message()).c_str());
    commit_time = Now();
  });
  double stall = 0;
  const int saves = std::stoi(opt["saves"]);
  for (int i = 0; i < saves; ++i) {
    (*trainer)->SetProgress(i + 1, 0);
    auto s = checkpointer.Save(**trainer);
    if (!s.ok()) return 1;
    write_started = Now();
    stall += *s;
    if (!checkpointer.Wait().ok()) return 1;
    write_seconds += commit_time - write_started;
  }
  // The disk's speed drifts from minute to minute (fio varies by 1.5x here), so restores
  // and fio runs alternate and the medians are compared.
  const int64_t step = saves;
  const std::string shard = (*store)->ShardPath("bench", step, 0);
  std::vector<double> reads, fio_writes, fio_reads;
  for (int round = 0; round < 3; ++round) {
    DropCache(shard);
    const double t0 = Now();
    if (auto s = RestoreCheckpoint(**store, "bench", step, **trainer); !s.ok()) {
      std::fprintf(stderr, "bench: %s\n", std::string(s.message()).c_str());
      return 1;
    }
    reads.push_back(state_bytes / (Now() - t0));
    fio_writes.push_back(Fio(dir, "write", state_bytes));
    fio_reads.push_back(Fio(dir, "read", state_bytes));
  }
  fs::remove(dir + "/fio.tmp");
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double write_bw = state_bytes * saves / write_seconds, read_bw = median(reads);
  const double fio_write = median(fio_writes), fio_read = median(fio_reads);

  auto mbs = [](double bw) { return bw / 1048576.0; };
  std::printf("\n%-44s %12s %12s\n", "", "MiB/s", "vs fio");
  std::printf("%-44s %12.0f %11.0f%%\n", "checkpoint write (background)", mbs(write_bw),
              fio_write > 0 ? 100 * write_bw / fio_write : 0.0);
  std::printf("%-44s %12.0f %11.0f%%\n", "checkpoint restore (cache dropped, median)", mbs(read_bw),
              fio_read > 0 ? 100 * read_bw / fio_read : 0.0);
  std::printf("%-44s %12.0f\n", "fio write, direct, 1 MiB, psync (median)", mbs(fio_write));
  std::printf("%-44s %12.0f\n", "fio read, direct, 1 MiB, psync (median)", mbs(fio_read));
  std::printf("training stall per save (host copy): %.1f ms for %.0f MiB (%.1f GiB/s)\n", 1e3 * stall / saves,
              state_bytes / 1048576.0, state_bytes / (stall / saves) / (1 << 30));
  if (fio_write == 0) std::printf("fio not found or failed: install it (ops/setup.sh does)\n");
  std::printf("{\"stall_s\": %.5f, \"write_bytes_per_s\": %.0f, \"read_bytes_per_s\": %.0f, "
              "\"fio_write_bytes_per_s\": %.0f, \"fio_read_bytes_per_s\": %.0f}\n",
              stall / saves, write_bw, read_bw, fio_write, fio_read);
  return 0;
}

}  // namespace
}  // namespace llamad

int main(int argc, char** argv) {
  llamad::SelectBlasKernels(argv);
  return llamad::Main(argc, argv);
}
