// Checkpoint benchmark: the training stall of a save (the host copy), the background
// write throughput (shard write + fsync + index commit) and the restore read throughput
// (page cache dropped for the shard first), next to fio sequential write and read with
// direct I/O on the same folder, in the same run: the same size, block (1 MiB) and
// queue depth (4, io_uring) as the shard files use, and for reference one request at a
// time (psync).
//
// A virtual disk's speed drifts from minute to minute (fio varies by 1.5x here), so each
// round saves and restores next to a fio write of the same size and a fio read of the
// same shard file, fio first in every other round, and the medians over the rounds are
// compared, as are the pairs of each round.
//
//   bench-checkpoint-io [--dir DIR] [--hidden 512] [--layers 8] [--vocab 32000] [--rounds 7]
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

// fio's bandwidth in bytes/s for a sequential direct-I/O job of 1 MiB blocks over
// `bytes` of `file` with `queue_depth` in flight (io_uring; psync for 1), or 0 when fio
// is missing. A write job writes a new file, as a checkpoint does (overwriting
// allocated blocks is faster: 2.7-3.2 against 2.0-2.3 GB/s here); a read job only reads.
// fio's report goes to `out` (outside the store: a read job reads a committed shard).
double Fio(const std::string& file, const char* rw, uint64_t bytes, int queue_depth, const std::string& out) {
  const bool write = rw == std::string("write");
  if (write) fs::remove(file);
  const std::string engine =
      queue_depth == 1 ? "--ioengine=psync" : "--ioengine=io_uring --iodepth=" + std::to_string(queue_depth);
  const std::string cmd = "fio --name=bench --filename=" + file + " --rw=" + rw + " --bs=1M --direct=1 " + engine +
                          (write ? "" : " --readonly") + " --size=" + std::to_string(bytes) +
                          " --output-format=json --output=" + out + " >/dev/null 2>&1";
  if (std::system(cmd.c_str()) != 0) return 0;
  try {
    std::ifstream in(out);
    const auto j = nlohmann::json::parse(in);
    return j["jobs"][0][write ? "write" : "read"]["bw_bytes"].get<double>();
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
                                            {"layers", "8"}, {"vocab", "32000"}, {"rounds", "7"}};
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
  // Retention deletes nothing while the rounds run: removing an old checkpoint is
  // background work of its own, not part of writing a new one.
  const int rounds = std::stoi(opt["rounds"]);
  auto store = storage::CheckpointStore::Open(dir, {rounds + 1});
  if (!store.ok()) {
    std::fprintf(stderr, "bench: %s\n", std::string(store.status().message()).c_str());
    return 2;
  }
  const uint64_t state_bytes = uint64_t((*trainer)->model().num_params()) * 3 * 4;
  std::printf("state: %.1fM parameters, %.0f MiB (fp32 weights + 2 AdamW moments); folder %s\n",
              (*trainer)->model().num_params() / 1e6, state_bytes / 1048576.0, dir.c_str());

  double commit_time = 0;
  AsyncCheckpointer checkpointer(store->get(), "bench", [&](int64_t, const absl::Status& s) {
    if (!s.ok()) std::fprintf(stderr, "bench: save failed: %s\n", std::string(s.message()).c_str());
    commit_time = Now();
  });
  constexpr int kDepth = storage::CheckpointStore::kDefaultReadDepth;  // the shard files' queue depth
  std::vector<double> stalls, writes, reads, fio_writes, fio_reads, fio_writes_qd1, fio_reads_qd1;
  const std::string fio_file = dir + "/fio.tmp", fio_out = dir + "/fio.json";
  for (int round = 0; round < rounds; ++round) {
    const int64_t step = round + 1;
    // fio writes a file of the checkpoint's size and reads the shard the restore reads,
    // one right before or after ours, alternating, so that neither gains from whatever
    // the disk's host still caches of what it last did.
    const bool fio_first = round % 2 == 1;
    auto fio_write = [&] {
      fio_writes.push_back(Fio(fio_file, "write", state_bytes, kDepth, fio_out));
      fio_writes_qd1.push_back(Fio(fio_file, "write", state_bytes, 1, fio_out));
    };
    if (fio_first) fio_write();
    (*trainer)->SetProgress(step, 0);
    auto stall = checkpointer.Save(**trainer);
    if (!stall.ok()) return 1;
    const double write_started = Now();
    if (!checkpointer.Wait().ok()) return 1;
    stalls.push_back(*stall);
    writes.push_back(state_bytes / (commit_time - write_started));
    if (!fio_first) fio_write();

    const std::string shard = (*store)->ShardPath("bench", step, 0);
    const uint64_t shard_bytes = fs::file_size(shard);
    auto fio_read = [&] {
      DropCache(shard);
      fio_reads.push_back(Fio(shard, "read", shard_bytes, kDepth, fio_out));
      fio_reads_qd1.push_back(Fio(shard, "read", shard_bytes, 1, fio_out));
    };
    if (fio_first) fio_read();
    DropCache(shard);
    const double t0 = Now();
    if (auto s = RestoreCheckpoint(**store, "bench", step, **trainer); !s.ok()) {
      std::fprintf(stderr, "bench: %s\n", std::string(s.message()).c_str());
      return 1;
    }
    reads.push_back(state_bytes / (Now() - t0));
    if (!fio_first) fio_read();
  }
  fs::remove(fio_file);
  fs::remove(fio_out);
  std::printf("%-6s %12s %12s %12s %12s  (MiB/s)\n", "round", "write", "fio write", "restore", "fio read");
  for (int i = 0; i < rounds; ++i) {
    std::printf("%-6d %12.0f %12.0f %12.0f %12.0f\n", i + 1, writes[i] / 1048576.0, fio_writes[i] / 1048576.0,
                reads[i] / 1048576.0, fio_reads[i] / 1048576.0);
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double stall = median(stalls), write_bw = median(writes), read_bw = median(reads);
  const double fio_write = median(fio_writes), fio_read = median(fio_reads);
  // Each round's ratio to fio in the same round, the pairs closest in time.
  std::vector<double> write_ratios, read_ratios;
  for (int i = 0; i < rounds; ++i) {
    if (fio_writes[i] > 0) write_ratios.push_back(writes[i] / fio_writes[i]);
    if (fio_reads[i] > 0) read_ratios.push_back(reads[i] / fio_reads[i]);
  }

  auto mbs = [](double bw) { return bw / 1048576.0; };
  std::printf("\nmedians over %d rounds\n", rounds);
  std::printf("%-48s %10s %10s\n", "", "MiB/s", "vs fio");
  std::printf("%-48s %10.0f %9.0f%%\n", "checkpoint write (background, fsync, commit)", mbs(write_bw),
              fio_write > 0 ? 100 * write_bw / fio_write : 0.0);
  std::printf("%-48s %10.0f %9.0f%%\n", "checkpoint restore (cache dropped, verified)", mbs(read_bw),
              fio_read > 0 ? 100 * read_bw / fio_read : 0.0);
  std::printf("%-48s %10.0f\n", "fio write, direct, 1 MiB, io_uring, depth 4", mbs(fio_write));
  std::printf("%-48s %10.0f\n", "fio read, direct, 1 MiB, io_uring, depth 4", mbs(fio_read));
  std::printf("%-48s %10.0f\n", "fio write, direct, 1 MiB, psync (depth 1)", mbs(median(fio_writes_qd1)));
  std::printf("%-48s %10.0f\n", "fio read, direct, 1 MiB, psync (depth 1)", mbs(median(fio_reads_qd1)));
  auto range = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return std::make_pair(v.front(), v.back());
  };
  if (!write_ratios.empty() && !read_ratios.empty()) {
    const auto [wl, wh] = range(write_ratios);
    const auto [rl, rh] = range(read_ratios);
    std::printf("per round, against fio in the same round: write %.0f%% (median; %.0f-%.0f%%), "
                "restore %.0f%% (%.0f-%.0f%%)\n",
                100 * median(write_ratios), 100 * wl, 100 * wh, 100 * median(read_ratios), 100 * rl, 100 * rh);
  }
  std::printf("training stall per save (host copy): %.1f ms for %.0f MiB (%.1f GiB/s)\n", 1e3 * stall,
              state_bytes / 1048576.0, state_bytes / stall / (1 << 30));
  if (fio_write == 0) std::printf("fio not found or failed: install it (ops/setup.sh does)\n");
  std::printf("{\"stall_s\": %.5f, \"write_bytes_per_s\": %.0f, \"read_bytes_per_s\": %.0f, "
              "\"fio_write_bytes_per_s\": %.0f, \"fio_read_bytes_per_s\": %.0f}\n",
              stall, write_bw, read_bw, fio_write, fio_read);
  return 0;
}

}  // namespace
}  // namespace llamad

int main(int argc, char** argv) {
  llamad::SelectBlasKernels(argv);
  return llamad::Main(argc, argv);
}
